"""Property-based tests: hypothesis draws shapes (odd sizes that divide no block), strides (slices,
transposes, views of a fused projection, a KV-cache buffer, stride-0 gradients), masks and dtypes for
every kernel, runs it on the kernel path (Triton's interpreter on a CPU) and compares every output and
gradient with the float64 reference within the tolerance table of the op's own test file (through
tests/kernel_harness.py).

Bounded for CI: a few derandomized examples per kernel (the same examples on every run, no example
database) at small sizes, so the whole file takes well under a minute on two cores in the interpreter.
More examples: BLOOM_PROPERTY_EXAMPLES=200 python -m pytest tests/test_properties.py.
"""

import contextlib
import importlib
import os
from unittest import mock

import pytest
import torch

pytest.importorskip("hypothesis")
pytest.importorskip("triton")

from helpers import KERNEL_DEVICE, left_padding_mask  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from kernel_harness import (alibi_attention64, bias_gelu64, check_kernel, int8_linear64, layer_norm64,  # noqa: E402
                            qkv)
from test_attention import FWD_TOL as ATTENTION_TOL  # noqa: E402
from test_attention import GRAD_TOL as ATTENTION_GRAD_TOL  # noqa: E402
from test_bias_gelu import TOL as BIAS_GELU_TOL  # noqa: E402
from test_int8_linear import FWD_TOL as INT8_TOL  # noqa: E402
from test_int8_linear import GRAD_TOL as INT8_GRAD_TOL  # noqa: E402
from test_layer_norm import TOL as LAYER_NORM_TOL  # noqa: E402

import bloom_kernels as bk  # noqa: E402
from bloom_kernels import reference  # noqa: E402

ln_kernel = importlib.import_module("bloom_kernels.triton.layer_norm")

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning",
                                        "ignore:overflow encountered:RuntimeWarning")

EXAMPLES = int(os.environ.get("BLOOM_PROPERTY_EXAMPLES", "0")) or None


def bounded(max_examples: int):
    """derandomize: the same examples on every run (a CI failure reproduces); no database."""
    return settings(max_examples=EXAMPLES or max_examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


FLOAT_DTYPES = st.sampled_from([torch.float32, torch.float16])


def _randn(shape, seed, dtype, scale=1.0, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    return (scale * torch.randn(shape, generator=gen) + shift).to(KERNEL_DEVICE, dtype)


def _laid_out(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The values of t (..., N) in another memory layout: "contiguous"; "sliced", a column slice of a
    wider buffer (a row stride > N) whose margins hold NaN (int: 127), never to be read; "transposed",
    the last two dims stored transposed (column stride != 1); "expanded", stride 0 everywhere (t's
    first element broadcast, as the gradient of a sum)."""
    if layout == "contiguous" or t.dim() < 2 and layout == "transposed":
        return t
    if layout == "sliced":
        junk = float("nan") if t.is_floating_point() else 127
        wide = torch.full((*t.shape[:-1], t.shape[-1] + 5), junk, dtype=t.dtype, device=t.device)
        view = wide[..., 3:3 + t.shape[-1]]
        view.copy_(t)
        return view
    if layout == "transposed":
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded":
        return t.reshape(-1)[:1].reshape([1] * t.dim()).expand(t.shape)
    raise ValueError(layout)


LAYOUTS = st.sampled_from(["contiguous", "sliced", "transposed"])
ROWS = st.lists(st.integers(1, 5), min_size=1, max_size=2)  # leading dims: 1-D to 3-D inputs
SEEDS = st.integers(0, 2**16)


# ------------------------------------------------------------------------------------------------
# attention: prefill, chunked prefill and decode lengths, masks, strided q/k/v
# ------------------------------------------------------------------------------------------------
@st.composite
def attention_cases(draw):
    k_len = draw(st.integers(1, 64))
    q_len = draw(st.one_of(st.just(k_len), st.integers(1, min(k_len, 16)), st.integers(1, k_len)))
    batch = draw(st.integers(1, 2))
    mask = draw(st.sampled_from(["none", "left", "holes"]))
    return dict(
        batch=batch, heads=draw(st.integers(1, 2)), q_len=q_len, k_len=k_len,
        head_dim=draw(st.sampled_from([8, 13, 64, 80, 96, 128])), dtype=draw(FLOAT_DTYPES),
        mask=mask, pads=[draw(st.integers(0, k_len - 1)) for _ in range(batch)] if mask == "left" else None,
        mask_dtype=draw(st.sampled_from([torch.int64, torch.bool, torch.float32])),
        scale=draw(st.one_of(st.none(), st.floats(0.05, 1.0))), grad=draw(st.booleans()), seed=draw(SEEDS),
    )


def _attention_tensors(batch, heads, q_len, k_len, head_dim, dtype, layout, seed):
    """q (B, H, Sq, D), k, v (B, H, Sk, D) in a layout (the values do not depend on it)."""
    q, k, v = qkv(batch, heads, q_len, k_len, head_dim, dtype, seed, device=KERNEL_DEVICE)
    if layout == "fused":  # BLOOM's views of its fused (B, S, H, 3, D) projection; q = the last Sq rows
        fused = torch.zeros(batch, k_len, heads, 3, head_dim, dtype=dtype, device=KERNEL_DEVICE)
        views = [fused[..., i, :].transpose(1, 2) for i in range(3)]  # (B, H, S, D), strided
        views[0] = views[0][:, :, k_len - q_len:]
        for view, t in zip(views, (q, k, v)):
            view.copy_(t)
        return tuple(views)
    if layout == "bshd":  # each (B, S, H, D) in memory
        return tuple(t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    if layout == "cache":  # k/v the first Sk slots of a longer cache buffer whose tail is NaN
        caches = [torch.full((batch, heads, k_len + 7, head_dim), float("nan"), dtype=dtype, device=KERNEL_DEVICE)
                  for _ in range(2)]
        for cache, t in zip(caches, (k, v)):
            cache[:, :, :k_len] = t
        return q, caches[0][:, :, :k_len], caches[1][:, :, :k_len]
    if layout == "padded_d":  # rows padded past D: stride(2) = D + 3
        return tuple(_laid_out(t, "sliced") for t in (q, k, v))
    return q, k, v


def _attention_mask(case):
    batch, k_len = case["batch"], case["k_len"]
    if case["mask"] == "none":
        return None
    if case["mask"] == "left":
        mask = left_padding_mask(k_len, pads=case["pads"])
    else:  # any 0/1 mask: holes anywhere, positions still count the real tokens only
        mask = (torch.rand(batch, k_len, generator=torch.Generator().manual_seed(case["seed"])) < 0.7).long()
    return mask.to(KERNEL_DEVICE, case["mask_dtype"])


@pytest.mark.parametrize("layout", ["contiguous", "fused", "bshd", "cache", "padded_d"])
@bounded(3)
@given(case=attention_cases())
def test_attention(layout, case):
    q, k, v = _attention_tensors(*(case[n] for n in ("batch", "heads", "q_len", "k_len", "head_dim", "dtype")),
                                 layout, case["seed"])
    slopes = bk.alibi_slopes(case["heads"], device=KERNEL_DEVICE)
    check_kernel(bk.alibi_attention, alibi_attention64,
                 {"q": q, "k": k, "v": v, "slopes": slopes, "mask": _attention_mask(case), "scale": case["scale"]},
                 grads=("q", "k", "v") if case["grad"] else (), tol=ATTENTION_TOL, grad_tol=ATTENTION_GRAD_TOL,
                 dispatched="alibi_attention", seed=case["seed"])


@bounded(6)
@given(case=attention_cases(), poison=st.sampled_from([float("nan"), float("inf"), float("-inf"), 1e30]))
def test_attention_ignores_what_padded_keys_hold(case, poison):
    """Padding never leaks (issue 14): NaN, +-inf or huge values stored at the keys and values of
    masked positions change no output or gradient: kernel and float64 reference both read them as
    absent (check_kernel compares the two on the poisoned inputs)."""
    mask = _attention_mask({**case, "mask": "holes" if case["mask"] == "none" else case["mask"]})
    q, k, v = _attention_tensors(*(case[n] for n in ("batch", "heads", "q_len", "k_len", "head_dim", "dtype")),
                                 "contiguous", case["seed"])
    padded = (mask == 0)[:, None, :, None]
    k, v = k.masked_fill(padded, poison), v.masked_fill(padded, poison)
    slopes = bk.alibi_slopes(case["heads"], device=KERNEL_DEVICE)
    check_kernel(bk.alibi_attention, alibi_attention64,
                 {"q": q, "k": k, "v": v, "slopes": slopes, "mask": mask, "scale": case["scale"]},
                 grads=("q", "k", "v") if case["grad"] else (), tol=ATTENTION_TOL, grad_tol=ATTENTION_GRAD_TOL,
                 dispatched="alibi_attention", seed=case["seed"])


# ------------------------------------------------------------------------------------------------
# bias + GeLU
# ------------------------------------------------------------------------------------------------
@bounded(10)
@given(rows=ROWS, n=st.integers(1, 300), dtype=FLOAT_DTYPES, fp32_bias=st.booleans(), x_layout=LAYOUTS,
       dy_layout=st.sampled_from(["contiguous", "transposed", "expanded"]), seed=SEEDS)
def test_bias_gelu(rows, n, dtype, fp32_bias, x_layout, dy_layout, seed):
    shape = (*rows, n)
    x = _laid_out(_randn(shape, seed, dtype, scale=3.0), x_layout)  # |h| up to ~15: both GeLU tails
    bias = _randn(n, seed + 1, torch.float32 if fp32_bias else dtype)
    dy = _laid_out(_randn(shape, seed + 2, dtype), dy_layout)
    check_kernel(bk.bias_gelu, bias_gelu64, {"x": x, "bias": bias}, grads=("x", "bias"), upstream={"out": dy},
                 tol=BIAS_GELU_TOL, dispatched="bias_gelu")


# ------------------------------------------------------------------------------------------------
# (residual +) LayerNorm, the fused and the looped long-row paths
# ------------------------------------------------------------------------------------------------
@bounded(12)
@given(rows=ROWS, n=st.integers(1, 300), dtype=FLOAT_DTYPES, residual=st.booleans(), fp32_params=st.booleans(),
       use=st.sampled_from([("y", "s"), ("y",), ("s",)]), x_layout=LAYOUTS, r_layout=LAYOUTS,
       dy_layout=st.sampled_from(["contiguous", "transposed", "expanded"]), looped=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-3]), seed=SEEDS)
def test_layer_norm(rows, n, dtype, residual, fp32_params, use, x_layout, r_layout, dy_layout, looped, eps, seed):
    shape = (*rows, n)
    param_dtype = torch.float32 if fp32_params else dtype
    x = _laid_out(_randn(shape, seed, dtype, scale=2.0, shift=0.5), x_layout)  # a non-zero mean
    r = _laid_out(_randn(shape, seed + 1, dtype), r_layout) if residual else None
    weight = _randn(n, seed + 2, param_dtype, scale=0.5, shift=1.0)
    bias = _randn(n, seed + 3, param_dtype, scale=0.1)
    upstream = {"y": _laid_out(_randn(shape, seed + 4, dtype), dy_layout), "s": _randn(shape, seed + 5, dtype)}
    if not residual:
        use = ("y",)
    # looped: the long-row paths (chunked statistics, column-block backward) forced on short rows
    small = mock.patch.multiple(ln_kernel, _MAX_FUSED_BLOCK=128, _MAX_FUSED_BLOCK_BWD=128, _LOOP_CHUNK=128,
                                _BWD_TILE_N=64)
    with small if looped else contextlib.nullcontext():
        check_kernel(bk.layer_norm, layer_norm64, {"x": x, "weight": weight, "bias": bias, "eps": eps, "residual": r},
                     grads=("x", "weight", "bias") + (("residual",) if residual else ()),
                     outputs=("y", "s") if residual else ("y",), upstream={k: upstream[k] for k in use},
                     tol=LAYER_NORM_TOL, dispatched="layer_norm")


@bounded(8)
@given(rows=ROWS, n=st.integers(1, 300), magnitude=st.sampled_from([1e10, 1e19, 1e25, 1e30]),
       residual=st.booleans(), looped=st.booleans(), seed=SEEDS)
def test_layer_norm_huge_rows(rows, n, magnitude, residual, looped, seed):
    """fp32 rows of huge magnitude (issue 14): the kernel's and the float64 LayerNorm agree, so the fp32
    statistics stayed finite — on the one-tile path (every BLOOM width) and the looped long-row path
    (forced on short rows). Outputs only: the gradients scale as 1/magnitude, below any absolute
    tolerance (tests/test_layer_norm.py checks them relatively)."""
    shape = (*rows, n)
    x = _randn(shape, seed, torch.float32, scale=magnitude, shift=0.5 * magnitude)
    r = _randn(shape, seed + 1, torch.float32, scale=magnitude) if residual else None
    weight = _randn(n, seed + 2, torch.float32, scale=0.5, shift=1.0)
    bias = _randn(n, seed + 3, torch.float32, scale=0.1)
    small = mock.patch.multiple(ln_kernel, _MAX_FUSED_BLOCK=32, _LOOP_CHUNK=32)
    with small if looped else contextlib.nullcontext():
        check_kernel(bk.layer_norm, layer_norm64,
                     {"x": x, "weight": weight, "bias": bias, "eps": 1e-5, "residual": r},
                     grads=(), outputs=("y", "s") if residual else ("y",), tol=LAYER_NORM_TOL,
                     dispatched="layer_norm")


# ------------------------------------------------------------------------------------------------
# int8 weight-only linear: both paths (M <= 16 streams the weight), strided x and weight, gradients
# ------------------------------------------------------------------------------------------------
@bounded(12)
@given(rows=ROWS, k=st.integers(1, 100), n=st.integers(1, 70), many_rows=st.booleans(),
       dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]), with_bias=st.booleans(),
       scale_in_dtype=st.booleans(), x_layout=LAYOUTS, w_layout=LAYOUTS, grad=st.booleans(), seed=SEEDS)
def test_int8_linear(rows, k, n, many_rows, dtype, with_bias, scale_in_dtype, x_layout, w_layout, grad, seed):
    lead = (*rows[:-1], rows[-1] * 9) if many_rows else tuple(rows)  # 9-45 rows: the tiled ("large") path
    x = _laid_out(_randn((*lead, k), seed, dtype), x_layout)
    q, scale = reference.quantize_int8(torch.randn(n, k, generator=torch.Generator().manual_seed(seed + 1)))
    q = _laid_out(q.to(KERNEL_DEVICE), w_layout)
    scale = scale.to(KERNEL_DEVICE, dtype if scale_in_dtype else torch.float32)
    bias = _randn(n, seed + 2, dtype) if with_bias else None
    check_kernel(bk.int8_linear, int8_linear64, {"x": x, "weight_int8": q, "scale": scale, "bias": bias},
                 grads=("x", "scale") + (("bias",) if with_bias else ()) if grad else (), tol=INT8_TOL,
                 grad_tol=INT8_GRAD_TOL, atol_of_max=True, dispatched="int8_linear")
