"""Fused (residual-add +) LayerNorm (bloom_kernels/triton/layer_norm.py) against the float64 reference,
through tests/kernel_harness.py.

Forward (y, and the sum x + residual) and every gradient (dx, dweight, dbias, dresidual) with random
upstream gradients on both outputs. On a CPU the kernels run in Triton's interpreter (fp32 and fp16)
on small odd shapes, plus the looped long-row path (forced on small rows, and once at 57,344); the
`gpu` tests add bf16/fp16 at BLOOM sizes, torch.compile(fullgraph=True) and CUDA-graph capture/replay.
Random shapes and strides: test_properties.py.
"""

import importlib

import pytest
import torch

pytest.importorskip("triton")

from helpers import KERNEL_DEVICE
from kernel_harness import (SkippedLaunch, check_compiled, check_cuda_graph, check_kernel, check_opcheck,
                            check_public_name_survives_kernel_import, check_row_limit, layer_norm64,
                            only_the_kernel_runs)

from bloom_kernels import _dispatch, ops

kernel = importlib.import_module("bloom_kernels.triton.layer_norm")

# (dtype, atol, rtol) against the float64 reference on the same inputs; the kernel normalises in fp32.
# fp32: the fp32 summation of mean / variance / the backward row sums (the kernel merges per-chunk
#       statistics on long rows): a few ulp of O(1) values, ~1e-7 seen; 1e-5 leaves room for rows of
#       65,536 elements.
# fp16: one rounding of (nearly) the exact value: half an ulp = 2^-11 relative; 2e-3 (2 ulps) covers a
#       value on a rounding boundary. The sum x + residual is the exact sum rounded once.
# bf16: the same with 1 ulp = 2^-7 (GPU only; the interpreter cannot do bf16 reliably).
# dweight / dbias are fp32 sums over rows in another order, rounded once to the parameter dtype.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}
EPS = 1e-5

SHAPES = [
    (1, 1),  # a single element (variance 0: rstd = 1/sqrt(eps))
    (3, 1000),  # a row that divides no block size
    (7, 14336),  # BLOOM-176B hidden size (backward takes the column-block path)
    (67, 129),  # several row groups in the dweight/dbias partial sums, odd width
    (2, 3, 257),  # 3-D leading shape
    (16, 1024),  # bloom-560m width: a power of two, no column mask
]


@pytest.fixture
def looped(monkeypatch):
    """Force the long-row paths (chunked statistics, column-block backward) on small rows."""
    monkeypatch.setattr(kernel, "_MAX_FUSED_BLOCK", 128)
    monkeypatch.setattr(kernel, "_MAX_FUSED_BLOCK_BWD", 128)
    monkeypatch.setattr(kernel, "_LOOP_CHUNK", 128)
    monkeypatch.setattr(kernel, "_BWD_TILE_N", 64)


def _inputs(shape, dtype, residual=True, seed=0, param_dtype=None, device=KERNEL_DEVICE):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rand(*size, scale=1.0, shift=0.0):
        return (scale * torch.randn(size, generator=gen) + shift).to(device, dtype)

    x = rand(*shape, scale=2.0, shift=0.5)  # a non-zero mean, as in a residual stream
    r = rand(*shape) if residual else None
    weight = rand(n, scale=0.5, shift=1.0).to(param_dtype or dtype)
    bias = rand(n, scale=0.1).to(param_dtype or dtype)
    dy, ds = rand(*shape), rand(*shape)
    return x, weight, bias, r, dy, ds


def _check(x, weight, bias, r, dy, ds, use=("y", "s"), tol=TOL):
    """Outputs (y, and s = x + residual) and every gradient of the kernel against the float64 reference,
    the upstream gradients on the outputs in `use` only."""
    upstream = {"y": dy, "s": ds} if r is not None else {"y": dy}
    return check_kernel(ops.layer_norm, layer_norm64, {"x": x, "weight": weight, "bias": bias, "eps": EPS, "residual": r},
                        grads=("x", "weight", "bias") + (("residual",) if r is not None else ()),
                        outputs=("y", "s") if r is not None else ("y",),
                        upstream={k: g for k, g in upstream.items() if k in use}, tol=tol, dispatched="layer_norm")


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: against the reference
# ------------------------------------------------------------------------------------------------
def _cases(shapes):
    """Each shape in both dtypes, with and without a residual; a shape test_properties' rows reach
    (<= 300 wide, where it draws dtype and residual at random) with the residual in one dtype only."""
    return [pytest.param(shape, dtype, residual, id=f"{shape}-{str(dtype)[6:]}-{'residual' if residual else 'plain'}")
            for shape in shapes for dtype in (torch.float32, torch.float16) for residual in (False, True)
            if shape[-1] > 300 or residual == (dtype == torch.float16)]


@pytest.mark.parametrize("shape, dtype, residual", _cases(SHAPES))
def test_matches_reference(shape, dtype, residual):
    _check(*_inputs(shape, dtype, residual))


@pytest.mark.parametrize("shape, dtype, residual", _cases([(3, 1000), (5, 130)]))
def test_looped_long_row_path(looped, shape, dtype, residual):
    _check(*_inputs(shape, dtype, residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_longest_rows(dtype):
    """The real thresholds at BLOOM-176B's MLP width and at the limit."""
    _check(*_inputs((2, 57344), dtype, residual=True))
    _check(*_inputs((1, kernel.MAX_N), dtype, residual=False))


@pytest.mark.parametrize("use", [("y",), ("s",)], ids=["only-normed", "only-sum"])
def test_gradient_through_one_output(use):
    """With a residual, either output alone may carry the gradient; x and residual both get it."""
    _check(*_inputs((4, 300), torch.float32), use=use)


def test_statistics(force_triton, poisoned):
    """The saved mean / rstd (fp32) are those of the fp32 sum."""
    x, weight, bias, r, _, _ = _inputs((6, 777), torch.float16)
    _, _, mean, rstd = torch.ops.bloom_kernels.layer_norm(x, weight, bias, EPS, r)
    h = x.double() + r.double()
    var, expected_mean = torch.var_mean(h, dim=-1, unbiased=False)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (6,)
    torch.testing.assert_close(mean.double(), expected_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (var + EPS).rsqrt(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(dtype):
    m, n = 5, 300
    x, weight, bias, r, dy, ds = _inputs((m, n), dtype)
    gen = torch.Generator().manual_seed(3)
    # row slices of wider matrices: read in place through the row strides
    x_wide = torch.randn(m, n + 9, generator=gen).to(KERNEL_DEVICE, dtype)[:, 4:n + 4]
    r_wide = torch.randn(m, 2 * n, generator=gen).to(KERNEL_DEVICE, dtype)[:, :n]
    _check(x_wide, weight, bias, r_wide, dy, ds)
    # transposed views (column stride != 1: copied once) and transposed upstream grads
    x_t, r_t, dy_t, ds_t = (t.t().contiguous().t() for t in (x, r, dy, ds))
    assert not x_t.is_contiguous()
    _check(x_t, weight, bias, r_t, dy_t, ds_t)


def test_strided_parameters():
    """weight and bias as strided views (every other element of a longer vector), each in turn."""
    x, weight, bias, r, dy, ds = _inputs((5, 300), torch.float32)
    strided = torch.randn(600, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE)[::2]
    _check(x, strided, bias, r, dy, ds)
    _check(x, weight, strided, r, dy, ds)


def test_fp32_parameters_with_fp16_activations():
    """Mixed precision: fp16 x/residual with fp32 weight/bias; dweight/dbias come back in fp32 (1e-4)."""
    got, _ = _check(*_inputs((4, 333), torch.float16, param_dtype=torch.float32),
                    tol={torch.float16: TOL[torch.float16], torch.float32: (1e-4, 1e-4)})
    assert got["dweight"].dtype == got["dbias"].dtype == torch.float32


def test_empty_rows(force_triton):
    x = torch.empty(0, 8, device=KERNEL_DEVICE, requires_grad=True)
    weight = torch.ones(8, device=KERNEL_DEVICE, requires_grad=True)
    y = ops.layer_norm(x, weight, torch.zeros(8, device=KERNEL_DEVICE), EPS)
    y.backward(torch.empty_like(y))
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros(8, device=KERNEL_DEVICE))


def test_poison_catches_an_unwritten_output(force_triton, poisoned, monkeypatch):
    """The NaN fill is real: with the forward kernel skipped, the output is all NaN."""
    monkeypatch.setattr(kernel, "_ln_fwd_kernel", SkippedLaunch())
    x, weight, bias, _, _, _ = _inputs((3, 100), torch.float32)
    assert torch.isnan(ops.layer_norm(x, weight, bias, EPS)).all()


def test_triton_path_ran(force_triton, monkeypatch):
    """Forced triton: the dispatcher picks the kernel, the kernel launches, neither the reference nor
    ATen's layer_norm runs."""
    x, weight, bias, r, dy, ds = _inputs((3, 100), torch.float32)
    x.requires_grad_()
    with only_the_kernel_runs(monkeypatch, kernel, "layer_norm", also=[(torch.nn.functional, "layer_norm")]):
        y, s = ops.layer_norm(x, weight, bias, EPS, r)
        torch.autograd.backward([y, s], [dy, ds])


def test_public_name_survives_the_kernel_import():
    check_public_name_survives_kernel_import("layer_norm")


def test_rows_over_the_limit():
    assert kernel.MAX_N == 65536

    def args_of(n):
        x = torch.zeros(1, n, device=KERNEL_DEVICE)
        return x, torch.ones(n, device=KERNEL_DEVICE), torch.zeros(n, device=KERNEL_DEVICE), EPS, x

    check_row_limit(kernel, "layer_norm", args_of)


def test_bad_input_errors():
    x = torch.ones(2, 3)
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.layer_norm(x.to(torch.int64), torch.ones(3), torch.zeros(3))
    with pytest.raises(ValueError, match="weight must have shape"):
        ops.layer_norm(x, torch.ones(4), torch.zeros(3))
    with pytest.raises(ValueError, match="residual must have the shape"):
        ops.layer_norm(x, torch.ones(3), torch.zeros(3), residual=torch.ones(3, 3))


def test_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both custom ops."""
    x, weight, bias, r, dy, ds = _inputs((3, 40), torch.float32)
    op = torch.ops.bloom_kernels.layer_norm.default
    check_opcheck(op, (x, weight, bias, EPS, r), grad=(0, 1, 2, 4))
    check_opcheck(op, (x, weight, bias, EPS, None), grad=(0, 1, 2))
    _, _, mean, rstd = op(x, weight, bias, EPS, r)
    check_opcheck(torch.ops.bloom_kernels.layer_norm_backward.default,
                  (dy, ds, x, r, weight, mean, rstd, torch.float32))


def _scaled_layer_norm(x, weight, bias, eps, residual):
    y, s = ops.layer_norm(x, weight, bias, eps, residual)
    return y * 2.0, s


def test_compile_fullgraph():
    """The custom op under torch.compile(fullgraph=True): same outputs and gradients as eager."""
    x, weight, bias, r, _, _ = _inputs((5, 77), torch.float32)
    check_compiled(_scaled_layer_norm, {"x": x, "weight": weight, "bias": bias, "eps": EPS, "residual": r},
                   grads=("x", "weight", "bias", "residual"), outputs=("y", "s"))


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 512, 1024), (2, 256, 4096), (2, 64, 14336), (48, 57344), (3, 5, 4097)],
                         ids=str)
def test_gpu_bloom_sizes(shape, dtype, residual):
    _check(*_inputs(shape, dtype, residual))


@pytest.mark.gpu
def test_gpu_fp32_params_bf16_activations():
    _check(*_inputs((512, 4096), torch.bfloat16, param_dtype=torch.float32),
           tol={torch.bfloat16: TOL[torch.bfloat16], torch.float32: (1e-3, 1e-4)})


@pytest.mark.gpu
def test_gpu_auto_backend_uses_kernel_and_falls_back(monkeypatch):
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "auto")
    x, weight, bias, r, _, _ = _inputs((4, 1024), torch.bfloat16)
    before = dict(_dispatch.dispatch_counts)
    ops.layer_norm(x, weight, bias, EPS, r)
    assert _dispatch.dispatch_counts[("layer_norm", "triton")] == before.get(("layer_norm", "triton"), 0) + 1
    n = kernel.MAX_N + 1
    ops.layer_norm(torch.zeros(1, n, device="cuda"), torch.ones(n, device="cuda"), torch.zeros(n, device="cuda"))
    assert _dispatch.dispatch_counts[("layer_norm", "reference")] == before.get(("layer_norm", "reference"), 0) + 1


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    x, weight, bias, r, _, _ = _inputs((2, 128, 4096), torch.bfloat16)
    check_compiled(ops.layer_norm, {"x": x, "weight": weight, "bias": bias, "eps": EPS, "residual": r},
                   grads=("x", "weight", "bias", "residual"), outputs=("y", "s"))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    shape, dtype = (256, 4096), torch.bfloat16
    names = ("x", "weight", "bias", "residual")
    x, weight, bias, r, _, _ = _inputs(shape, dtype)
    refills = [dict(zip(names, _inputs(shape, dtype, seed=seed)[:4])) for seed in (7, 8)]
    check_cuda_graph(ops.layer_norm, layer_norm64, {"x": x, "weight": weight, "bias": bias, "eps": EPS, "residual": r},
                     refills, grads=names, outputs=("y", "s"), tol=TOL)


@pytest.mark.parametrize("magnitude", [1e19, 1e25, 1e30], ids=str)
def test_huge_rows_keep_finite_statistics(force_triton, poisoned, magnitude):
    """fp32 rows of magnitude 1e19-1e30 (issue 14): the squares overflow fp32, the LayerNorm is O(1).
    The one-tile forward (every BLOOM width, up to 16,384) scales the deviations before squaring;
    output, saved rstd and gradients are finite and equal float64's. A constant and an ordinary row
    ride along."""
    g = torch.Generator().manual_seed(11)
    n = 96
    x = torch.randn(4, n, generator=g)
    x[0] *= magnitude
    x[1] = x[1] * magnitude + 3 * magnitude
    x[2] = 2.5
    weight, bias, dy = (torch.randn(*s, generator=g) for s in ((n,), (n,), (4, n)))
    x, weight, bias, dy = (t.to(KERNEL_DEVICE) for t in (x, weight, bias, dy))
    xg = x.clone().requires_grad_()
    y = ops.layer_norm(xg, weight, bias, EPS)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    want = torch.nn.functional.layer_norm(x64, (n,), weight.double(), bias.double(), EPS)
    want.backward(dy.double())
    _, _, _, rstd = torch.ops.bloom_kernels.layer_norm(x, weight, bias, EPS, None)
    var = torch.var(x.double(), dim=-1, unbiased=False)
    assert torch.isfinite(y).all() and torch.isfinite(xg.grad).all() and torch.isfinite(rstd).all()
    torch.testing.assert_close(y.double(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rstd.double(), (var + EPS).rsqrt(), rtol=1e-5, atol=0)
    rel = (xg.grad.double() - x64.grad).abs().amax(-1) / x64.grad.abs().amax(-1)
    assert (rel < 1e-4).all(), rel
