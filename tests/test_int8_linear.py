"""quantize_int8 and the int8 weight-only linear (bloom_kernels.int8_linear) against the float64
reference, through tests/kernel_harness.py.

Without CUDA the kernel runs in Triton's interpreter on the CPU (fp32, fp16, and bf16 with its dots done
in fp32, see the kernel's docstring); tests marked `gpu` run the compiled kernel at BLOOM's shapes.
Random shapes and strides: test_properties.py.
"""

import importlib

import pytest
import torch

import bloom_kernels
from bloom_kernels import _dispatch, ops, reference
from helpers import HAS_CUDA, KERNEL_DEVICE
from kernel_harness import (Run, assert_matches, check_compiled, check_cuda_graph, check_kernel, check_opcheck,
                            dequantize64, int8_linear64)

try:  # the kernel module and its configs
    il = importlib.import_module("bloom_kernels.triton.int8_linear")
    il_configs = importlib.import_module("bloom_kernels.triton._int8_configs")
except ImportError:  # triton is not installed: only the reference-level tests run
    il = None

needs_triton = pytest.mark.skipif(il is None, reason="triton is not installed")
DEV = KERNEL_DEVICE
int8_linear = bloom_kernels.int8_linear  # the public op: validation, then the backend switch

# (dtype, atol as a fraction of max|ref|, rtol), forward, against the float64 reference. The kernel
# accumulates in fp32 and rounds once: the fp32 summation error (~1e-6 relative) plus one rounding to the
# output dtype, within one ulp: 2^-10 relative for fp16 (we allow 2 ulps, 2^-9: GPU tensor cores do not
# add exactly like IEEE fp32). bf16: 2^-7 per ulp, and the interpreter truncates fp32 -> bf16 instead of
# rounding (1 ulp by itself), so 2 ulps: 2^-6. fp32 outputs: the summation only.
FWD_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2**-12, 2**-9),
    torch.bfloat16: (2**-9, 2**-6),
}
# dx: the kernel rounds each dequantised weight w * scale to the dot dtype before the MMA (the
# reference keeps it fp32): a relative error u (2^-11 fp16, 2^-8 bf16) per product, so the sum is off
# by about u * |dx| typical; with the output rounding, allow 4u of max|dx| absolute plus 2 ulps relative.
# dscale (fp32) and dbias are torch sums of the fp32 (or fp16) products: well inside the same rows.
GRAD_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2**-9, 2**-9),
    torch.bfloat16: (2**-6, 2**-6),
}
INTERP_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def check(op, x, q, s, b, grads=(), dispatched=None):
    """op(x, q, s, b) on the kernel path (NaN-poisoned buffers) against the float64 reference: the output
    in x.dtype, and the gradients in `grads`, within the tables above (atol a fraction of max|ref|)."""
    return check_kernel(op, int8_linear64, {"x": x, "weight_int8": q, "scale": s, "bias": b}, grads=grads,
                        tol=FWD_TOL, grad_tol=GRAD_TOL, atol_of_max=True, dispatched=dispatched)


def make_inputs(m, k, n, dtype, bias=True, lead=None, seed=0, device=DEV):
    """x (*lead or (m,), k), then a random (n, k) weight quantised: (x, w_int8, scale fp32, bias)."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn((*(lead or (m,)), k), generator=g, device=device).to(dtype)
    q, s = reference.quantize_int8(torch.randn(n, k, generator=g, device=device))
    b = torch.randn(n, generator=g, device=device).to(dtype) if bias else None
    return x, q, s, b


# --------------------------------------------------------------------------------------------------
# quantize_int8 (the reference is the implementation)
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", INTERP_DTYPES)
@pytest.mark.parametrize("shape", [(17, 130), (3, 1), (1, 257), (64, 33)])
def test_quantize_error_bound(dtype, shape):
    w = (torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 0.05).to(dtype)
    q, s = bloom_kernels.quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == shape
    assert s.dtype == torch.float32 and s.shape == (shape[0],)
    assert q.min() >= -127 and q.max() <= 127  # symmetric: -128 never used
    assert torch.equal(q.abs().amax(1), torch.full((shape[0],), 127, dtype=torch.int8))  # absmax hits 127
    err = (w.float() - reference.dequantize_int8(q, s)).abs()
    # round-to-nearest: half a step, plus fp32 rounding of w / s and of q * s (a few ulps of |w|)
    bound = s[:, None] / 2 + 4 * torch.finfo(torch.float32).eps * w.float().abs()
    assert (err <= bound).all(), (err - bound).max()


def test_quantize_zero_and_constant_rows():
    w = torch.randn(6, 40, generator=torch.Generator().manual_seed(2))
    w[0] = 0.0
    w[1] = 0.3
    w[2] = -1.7
    w[3, :] = 0.0
    w[3, 5] = -2.5  # a single non-zero
    q, s = bloom_kernels.quantize_int8(w)
    assert s[0] == 0 and s[3] > 0 and not torch.isnan(s).any()
    assert (q[0] == 0).all()
    assert (reference.dequantize_int8(q, s)[0] == 0).all()  # exactly zero, no NaN from 0/0
    assert (q[1] == 127).all() and (q[2] == -127).all()
    deq = reference.dequantize_int8(q, s)
    torch.testing.assert_close(deq[1], w[1], atol=0, rtol=2e-7)
    torch.testing.assert_close(deq[2], w[2], atol=0, rtol=2e-7)
    assert q[3, 5] == -127 and (q[3].count_nonzero() == 1)


def test_quantize_rejects_bad_weight():
    with pytest.raises(ValueError, match="weight must be 2-D"):
        bloom_kernels.quantize_int8(torch.randn(2, 3, 4))
    with pytest.raises(TypeError, match="weight must have dtype"):
        bloom_kernels.quantize_int8(torch.ones(2, 3, dtype=torch.int32))


# --------------------------------------------------------------------------------------------------
# The kernel in the interpreter (or on the GPU when there is one)
# --------------------------------------------------------------------------------------------------
@needs_triton
def test_int8_conversions_are_exact():
    """The kernel relies on int8 -> fp32 / fp16 (bit tricks) and -> bf16 (GPU) being exact."""
    import triton
    import triton.language as tl

    @triton.jit
    def convert(w_ptr, o32_ptr, o16_ptr, obf_ptr, BF16: tl.constexpr):
        offs = tl.arange(0, 256)
        w = tl.load(w_ptr + offs)
        tl.store(o32_ptr + offs, il._int8_to(w, tl.float32))
        tl.store(o16_ptr + offs, il._int8_to(w, tl.float16))
        if BF16:
            tl.store(obf_ptr + offs, il._int8_to(w, tl.bfloat16))

    w = torch.arange(-128, 128, dtype=torch.int16).to(torch.int8).to(DEV)
    o32 = torch.empty(256, device=DEV)
    o16 = torch.empty(256, dtype=torch.float16, device=DEV)
    obf = torch.zeros(256, dtype=torch.bfloat16, device=DEV)
    convert[(1,)](w, o32, o16, obf, BF16=HAS_CUDA)  # the interpreter's int -> bf16 cast is broken
    expected = torch.arange(-128, 128, dtype=torch.float32, device=DEV)
    assert torch.equal(o32, expected)
    assert torch.equal(o16.float(), expected)
    if HAS_CUDA:
        assert torch.equal(obf.float(), expected)


SHAPES = {  # (M, K, N): odd sizes that divide no block size, tails everywhere
    "small": [(1, 17, 3), (3, 130, 17), (16, 67, 33)],
    "large": [(17, 33, 130), (70, 100, 65), (130, 16, 7)],
}


# every shape in every dtype, with and without a bias in turn (test_properties draws the combinations)
MATCH_CASES = [pytest.param(path, shape, dtype, (i + j) % 2 == 0,
                            id=f"{path}-{shape}-{str(dtype)[6:]}-{'bias' if (i + j) % 2 == 0 else 'nobias'}")
               for i, (path, shape) in enumerate((p, s) for p in SHAPES for s in SHAPES[p])
               for j, dtype in enumerate(INTERP_DTYPES)]


@needs_triton
@pytest.mark.parametrize("path, shape, dtype, bias", MATCH_CASES)
def test_matches_reference(path, shape, dtype, bias):
    m, k, n = shape
    x, q, s, b = make_inputs(m, k, n, dtype, bias)
    before = il.path_counts[path]
    check(lambda *a: il.int8_linear_triton(*a, path=path), x, q, s, b)
    assert il.path_counts[path] == before + 1


# Explicit launch configs: split-K with an uneven last split, K and M exactly divisible (mask-free
# loads), several row tiles with a partial group, N tails, scale in the activation dtype.
CONFIGS = [
    ("split3", (5, 100, 40), dict(block_m=16, block_n=16, block_k=16, split_k=3, stream_weight=True)),
    ("split-even", (16, 64, 48), dict(block_m=16, block_n=16, block_k=32, split_k=2)),
    ("tiles-group", (70, 48, 65), dict(block_m=16, block_n=32, block_k=16, group_m=2)),
    ("tiles-split", (33, 96, 20), dict(block_m=16, block_n=16, block_k=32, split_k=3, group_m=1)),
]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("name,shape,cfg", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_explicit_configs_with_poisoned_buffers(name, shape, cfg, dtype):
    """Every buffer the launcher allocates (output and split-K partials) starts as NaN."""
    m, k, n = shape
    x, q, s, b = make_inputs(m, k, n, dtype, seed=3)
    s = s.to(dtype)  # a scale in the activation dtype is accepted too
    check(lambda *a: il.int8_linear_triton(*a, config=il.Int8MatmulConfig(**cfg)), x, q, s, b)


@needs_triton
def test_strided_inputs():
    """x with a row stride (a column slice) and 3-D leading dims; a transposed (column-major) weight."""
    x_wide, q, s, b = make_inputs(6, 50, 19, torch.float16, lead=(2, 3), seed=4)
    x = x_wide[..., 7:40]  # (2, 3, 33), row stride 50
    q_t = q[:, 7:40].t().contiguous().t()  # (19, 33) with strides (1, 19)
    assert q_t.stride() == (1, 19)
    for qq in (q[:, 7:40], q_t):
        got, _ = check(int8_linear, x, qq, s, b, dispatched="int8_linear")
        assert got["out"].shape == (2, 3, 19)
    x_t = x_wide[0, :, :33].t().contiguous().t()  # (3, 33) with strides (1, 3): K is not contiguous
    assert x_t.stride() == (1, 3)
    check(int8_linear, x_t, q_t, s, b, dispatched="int8_linear")


@needs_triton
@pytest.mark.parametrize("lead", [(2, 3), (1, 1, 5)])
def test_leading_dims_public_op(lead):
    x, q, s, b = make_inputs(0, 37, 23, torch.float16, lead=lead, seed=5)
    got, _ = check(int8_linear, x, q, s, b, dispatched="int8_linear")
    assert got["out"].shape == (*lead, 23)


@needs_triton
def test_triton_path_ran(force_triton, monkeypatch):
    x, q, s, b = make_inputs(3, 40, 24, torch.float32, seed=6)
    expected = reference.int8_linear(x, q, s, b)

    def boom(*args, **kwargs):
        raise AssertionError("the reference ran")

    monkeypatch.setattr(reference, "int8_linear", boom)
    key = ("int8_linear", "triton")
    before, small_before = _dispatch.dispatch_counts[key], il.path_counts["small"]
    out = int8_linear(x, q, s, b)
    assert _dispatch.dispatch_counts[key] == before + 1
    assert il.path_counts["small"] == small_before + 1
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU fallback of the auto backend")
def test_auto_backend_on_cpu_takes_the_cpu_route(monkeypatch):
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "auto")
    x, q, s, b = make_inputs(2, 16, 8, torch.float32, device="cpu")
    before = _dispatch.dispatch_counts[("int8_linear", "cpu")]
    out = int8_linear(x, q, s, b)
    assert _dispatch.dispatch_counts[("int8_linear", "cpu")] == before + 1
    # the CPU routes sum the same fp32 products in another order: rounding of 16-term dot products
    torch.testing.assert_close(out, reference.int8_linear(x, q, s, b), atol=1e-5, rtol=1e-5)


@needs_triton
def test_zero_and_constant_weight_rows():
    x, _, _, b = make_inputs(3, 24, 5, torch.float32, seed=7)
    w = torch.randn(5, 24, generator=torch.Generator().manual_seed(8))
    w[1] = 0.0
    w[3] = 0.25
    q, s = reference.quantize_int8(w)
    got, _ = check(int8_linear, x, q.to(DEV), s.to(DEV), b, dispatched="int8_linear")
    assert torch.equal(got["out"][:, 1], b[1].expand(3))  # scale 0: exactly the bias


@needs_triton
def test_empty_dims():
    x = torch.randn(0, 16, device=DEV)
    q = torch.zeros(8, 16, dtype=torch.int8, device=DEV)
    s = torch.ones(8, device=DEV)
    assert il.int8_linear_triton(x, q, s).shape == (0, 8)
    b = torch.randn(8, device=DEV)
    out = il.int8_linear_triton(torch.randn(3, 0, device=DEV), q[:, :0], s, b)
    assert torch.equal(out, b.expand(3, 8))


@needs_triton
def test_bad_path_and_supported():
    x, q, s, b = make_inputs(2, 16, 8, torch.float32)
    with pytest.raises(ValueError, match="path must be"):
        il.int8_linear_triton(x, q, s, b, path="medium")
    assert il.int8_linear_unsupported(x, q, s, b) is None


@needs_triton
def test_public_name_survives_kernel_import(force_triton):
    """The kernel module shares the op's name; importing it must not hide the public function."""
    x, q, s, b = make_inputs(2, 16, 8, torch.float32)
    bloom_kernels.int8_linear(x, q, s, b)  # a Triton dispatch: the kernel module is imported by now
    assert bloom_kernels.int8_linear is ops.int8_linear


@pytest.mark.parametrize("bad,err,match", [
    (lambda x, q, s, b: (x[:, :-1], q, s, b), ValueError, "x's last dim must equal weight_int8's in_features"),
    (lambda x, q, s, b: (x, q.float(), s, b), TypeError, "weight_int8 must have dtype int8"),
    (lambda x, q, s, b: (x, q[0], s, b), ValueError, "weight_int8 must be 2-D"),
    (lambda x, q, s, b: (x, q, s[:-1], b), ValueError, "scale must have shape"),
    (lambda x, q, s, b: (x, q, s.to(torch.int32), b), TypeError, "scale must have dtype"),
    (lambda x, q, s, b: (x, q, s, b[:3]), ValueError, "bias must have shape"),
    (lambda x, q, s, b: (x.long(), q, s, b), TypeError, "x must have dtype"),
])
def test_clear_errors(bad, err, match):
    x, q, s, b = make_inputs(2, 16, 8, torch.float32, device="cpu")
    with pytest.raises(err, match=match):
        int8_linear(*bad(x, q, s, b))


# --------------------------------------------------------------------------------------------------
# Gradients (x through the kernel on the transposed problem; bias and scale in torch)
# --------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_gradients(dtype):
    x, q, s, b = make_inputs(0, 37, 29, dtype, lead=(2, 5), seed=9)
    check(int8_linear, x, q, s, b, grads=("x", "scale", "bias"), dispatched="int8_linear")


@needs_triton
@pytest.mark.parametrize("cfg", [None, dict(block_m=16, block_n=16, block_k=16, split_k=3)],
                         ids=["default", "split3"])
@pytest.mark.parametrize("dtype", INTERP_DTYPES, ids=str)
def test_dx_kernel(cfg, dtype):
    g = torch.Generator().manual_seed(11)
    q, s = reference.quantize_int8(torch.randn(45, 70, generator=g))
    dy = torch.randn(3, 6, 45, generator=g).to(dtype)
    config = None if cfg is None else il.Int8MatmulConfig(**cfg)
    got, _ = check_kernel(lambda dy, q, s: il.int8_linear_dx_triton(dy, q, s, config=config),
                          lambda dy, q, s: dy @ dequantize64(q, s), {"dy": dy.to(DEV), "q": q.to(DEV), "s": s.to(DEV)},
                          tol=GRAD_TOL, atol_of_max=True)
    assert got["out"].shape == (3, 6, 70)


# --------------------------------------------------------------------------------------------------
# Custom op: registration, fake tensors, torch.compile
# --------------------------------------------------------------------------------------------------
@needs_triton
def test_opcheck():
    x, q, s, b = make_inputs(0, 24, 10, torch.float32, lead=(2, 3), seed=12)
    check_opcheck(torch.ops.bloom_kernels.int8_linear.default, (x, q, s, b), grad=(0,))
    check_opcheck(torch.ops.bloom_kernels.int8_linear.default, (x, q, s, None))
    check_opcheck(torch.ops.bloom_kernels.int8_linear_dx.default, (x[..., :10], q, s))


@needs_triton
@pytest.mark.skipif(HAS_CUDA, reason="the GPU variant below compiles with inductor")
def test_torch_compile_fullgraph_cpu():
    """Dynamo traces the public op into one graph (the custom op stays opaque), forward and backward."""
    x, q, s, b = make_inputs(4, 32, 12, torch.float32, seed=13)
    check_compiled(lambda x: int8_linear(x, q, s, b).sum(), {"x": x}, grads=("x",))


@needs_triton
def test_candidates_are_sane():
    """The GPU tuner's candidate lists (pure Python): non-empty, fit shared memory, cover M."""
    from bloom_kernels.triton._launch import planning_for
    from bloom_kernels.compile_targets import TARGETS
    dev = torch.device("cuda", 0)
    cases = [("small", 1, 4096, 4096), ("small", 16, 4096, 16384), ("small", 9, 250880, 1024),
             ("large", 64, 4096, 4096), ("large", 2048, 16384, 4096), ("large", 300, 43008, 14336)]
    for spec in TARGETS.values():  # an A100 and an H100, planned for without the GPU
        with planning_for(spec):
            for path, m, n, k in cases:
                cands = il_configs.candidates(path, m, n, k, dev)
                assert cands and len(set(cands)) == len(cands)
                assert il_configs.default_config(path, m, n, k, dev).block_k > 0
                _check_candidates(cands, path, m, k, spec.smem_per_block)


def _check_candidates(cands, path, m, k, smem_limit):
    for c in cands:
        assert il_configs.smem_bytes(c.block_m, c.block_n, c.block_k, c.num_stages) <= smem_limit
        assert 1 <= c.split_k <= max(1, k // c.block_k // 4)
        if path == "small":
            assert c.block_m >= m and c.stream_weight


# --------------------------------------------------------------------------------------------------
# GPU: bf16 at BLOOM's shapes, torch.compile with inductor, CUDA graphs
# --------------------------------------------------------------------------------------------------
BLOOM_SHAPES = [  # (K, N): bloom-560m qkv / mlp-in / mlp-out / lm_head, bloom-7b1 mlp-in / mlp-out
    (1024, 3072), (1024, 4096), (4096, 1024), (1024, 250880), (4096, 16384), (16384, 4096),
]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 5, 16, 100, 1000])
@pytest.mark.parametrize("k,n", BLOOM_SHAPES)
def test_gpu_bf16_bloom_shapes(m, k, n):
    if m >= 100 and n == 250880:
        pytest.skip("tuning this size takes long and adds nothing")
    check(il.int8_linear_triton, *make_inputs(m, k, n, torch.bfloat16, device="cuda", seed=m + k))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_gpu_other_dtypes(dtype):
    for m in (1, 300):
        check(il.int8_linear_triton, *make_inputs(m, 4096, 1024, dtype, device="cuda", seed=m))


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    """Inductor fuses the GeLU around the opaque op: the same kernel and config underneath, GeLU and its
    gradient rounded by inductor's code instead of eager's (the tables' bf16 rows)."""
    x, q, s, b = make_inputs(0, 1024, 4096, torch.bfloat16, lead=(2, 7), device="cuda", seed=14)
    check_compiled(lambda x: torch.nn.functional.gelu(int8_linear(x, q, s, b)), {"x": x}, grads=("x",),
                   tol=FWD_TOL, grad_tol=GRAD_TOL, atol_of_max=True)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 16, 64])
def test_gpu_cuda_graph(m):
    x, q, s, b = make_inputs(m, 4096, 4096, torch.bfloat16, device="cuda", seed=15)
    check_cuda_graph(int8_linear, int8_linear64, {"x": x, "weight_int8": q, "scale": s, "bias": b},
                     [{"x": torch.randn_like(x)}], tol=FWD_TOL, atol_of_max=True)


@pytest.mark.gpu
def test_gpu_capture_without_warmup_uses_default_config(force_triton, monkeypatch):
    """A key first seen inside a capture must not time candidates (that would synchronise)."""
    x, q, s, b = make_inputs(3, 1536, 2304, torch.bfloat16, device="cuda", seed=16)
    monkeypatch.setenv(il.TUNE_ENV, "0")
    int8_linear(x, q, s, b)  # compiles the default config's kernel (compiling is not under test here)
    monkeypatch.setenv(il.TUNE_ENV, "1")
    torch.cuda.synchronize()
    key_count = len(il._TUNED)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int8_linear(x, q, s, b)
    graph.replay()
    torch.cuda.synchronize()
    assert len(il._TUNED) == key_count
    assert_matches(Run({"out": y}), Run({"out": int8_linear64(x, q, s, b)}), FWD_TOL, atol_of_max=True)
