"""Fused bias-GeLU (bloom_kernels/triton/bias_gelu.py) against the float64 reference, forward and both
gradients, through tests/kernel_harness.py.

On a CPU the kernels run in Triton's interpreter (fp32 and fp16) on small odd shapes; the `gpu` tests
add bf16/fp16 at BLOOM sizes, torch.compile(fullgraph=True) and CUDA-graph capture/replay. Random
shapes and strides: test_properties.py.
"""

import importlib

import pytest
import torch

pytest.importorskip("triton")

from helpers import KERNEL_DEVICE
from kernel_harness import (SkippedLaunch, bias_gelu64, check_compiled, check_cuda_graph, check_kernel,
                            check_opcheck, check_public_name_survives_kernel_import, check_row_limit,
                            only_the_kernel_runs)

from bloom_kernels import _dispatch, ops

kernel = importlib.import_module("bloom_kernels.triton.bias_gelu")

# (dtype, atol, rtol) against the float64 reference on the same inputs; the kernel forms h = x + bias
# in fp32 and rounds once.
# fp32: the kernel evaluates 0.5 (1 + tanh(u)) as sigmoid(2u) through exp2: a few fp32 ulp, scaled by
#       |h| (<= ~15 here) -> ~1e-6 absolute; 1e-5 leaves room.
# fp16: one rounding of (nearly) the exact value: half an ulp = 2^-11 relative; 2e-3 (2 ulps) covers a
#       value that sits on a rounding boundary after the fp32 differences above.
# bf16: the same with 1 ulp = 2^-7 relative (GPU only; the interpreter cannot do bf16 reliably).
# dbias is a sum over rows in fp32 rounded once to bias.dtype: the same rule.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 2e-3), torch.bfloat16: (1e-2, 1.6e-2)}

SHAPES = [
    (1, 1),  # a single element: every mask on
    (3, 1000),  # a row that divides no block size
    (7, 14336),  # BLOOM-176B hidden size
    (67, 129),  # several row groups in the dbias partial sums, odd width
    (2, 3, 257),  # 3-D leading shape
    (16, 2048),  # sizes that divide the blocks: the unmasked (EVEN) variants
]


def _inputs(shape, dtype, seed=0, device=KERNEL_DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=gen)).to(device, dtype)  # |h| up to ~15: both tails of GeLU
    bias = torch.randn(shape[-1], generator=gen).to(device, dtype)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    return x, bias, dy


def _check(x, bias, dy=None, tol=TOL):
    """y, dx, dbias of the kernel against the float64 reference (dy: the upstream gradient, else random)."""
    return check_kernel(ops.bias_gelu, bias_gelu64, {"x": x, "bias": bias}, grads=("x", "bias"),
                        upstream=None if dy is None else {"out": dy}, tol=tol, dispatched="bias_gelu")


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(shape, dtype):
    _check(*_inputs(shape, dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(dtype):
    m, n = 5, 300
    x, bias, dy = _inputs((m, n), dtype)
    # a row slice of a wider matrix: read in place through the row stride
    wide = torch.randn(m, n + 7, generator=torch.Generator().manual_seed(3)).to(KERNEL_DEVICE, dtype)
    sliced = wide[:, 2:n + 2]
    assert sliced.stride() == (n + 7, 1)
    _check(sliced, bias, dy)
    # a transposed view (column stride != 1: copied once) and a transposed upstream gradient
    x_t = x.t().contiguous().t()
    dy_t = dy.t().contiguous().t()
    assert not x_t.is_contiguous() and not dy_t.is_contiguous()
    _check(x_t, bias, dy_t)
    # an expanded (stride-0) upstream gradient, as from y.sum().backward()
    _check(x, bias, torch.ones((), dtype=dtype, device=KERNEL_DEVICE).expand(m, n))


def test_strided_bias():
    x, _, dy = _inputs((5, 300), torch.float32)
    bias = torch.randn(600, generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE)[::2]
    _check(x, bias, dy)


def test_mixed_dtypes():
    """fp16 activations with an fp32 bias: y/dx in fp16, dbias in fp32 (as the reference): its fp32 sum
    of the fp32 dh within 1e-4."""
    x, _, dy = _inputs((4, 333), torch.float16)
    bias = torch.randn(333, generator=torch.Generator().manual_seed(5)).to(KERNEL_DEVICE)
    got, _ = _check(x, bias, dy, tol={torch.float16: TOL[torch.float16], torch.float32: (1e-4, 1e-4)})
    assert (got["out"].dtype, got["dx"].dtype, got["dbias"].dtype) == (torch.float16, torch.float16, torch.float32)


def test_empty_rows(force_triton):
    x = torch.empty(0, 8, device=KERNEL_DEVICE)
    bias = torch.randn(8, device=KERNEL_DEVICE, requires_grad=True)
    x.requires_grad_()
    y = ops.bias_gelu(x, bias)
    y.backward(torch.empty_like(y))
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)
    assert torch.equal(bias.grad, torch.zeros(8, device=KERNEL_DEVICE))


@pytest.mark.parametrize("shape", [(3, 0), (2, 3, 0)], ids=str)
def test_empty_columns(force_triton, shape):
    """Rows of no elements: empty output and gradients of the input's shape (reshape(-1, 0) of such a
    tensor is ambiguous; the launcher must not use it)."""
    x = torch.randn(shape, device=KERNEL_DEVICE, requires_grad=True)
    bias = torch.randn(0, device=KERNEL_DEVICE, requires_grad=True)
    y = ops.bias_gelu(x, bias)
    y.backward(torch.empty_like(y))
    assert y.shape == shape and x.grad.shape == shape and bias.grad.shape == (0,)


def test_poison_catches_an_unwritten_output(force_triton, poisoned, monkeypatch):
    """The NaN fill is real: with the forward kernel skipped, the output is all NaN."""
    monkeypatch.setattr(kernel, "_bias_gelu_fwd_kernel", SkippedLaunch())
    x, bias, _ = _inputs((3, 100), torch.float32)
    assert torch.isnan(ops.bias_gelu(x, bias)).all()


def test_triton_path_ran(force_triton, monkeypatch):
    """Forced triton: the dispatcher picks the kernel, the kernel launches, the reference never runs."""
    x, bias, dy = _inputs((3, 100), torch.float32)
    x.requires_grad_()
    with only_the_kernel_runs(monkeypatch, kernel, "bias_gelu"):
        ops.bias_gelu(x, bias).backward(dy)


def test_public_name_survives_the_kernel_import():
    check_public_name_survives_kernel_import("bias_gelu")


def test_rows_over_the_limit():
    assert kernel.MAX_N == 65536
    check_row_limit(kernel, "bias_gelu", lambda n: (torch.zeros(1, n, device=KERNEL_DEVICE),
                                                    torch.zeros(n, device=KERNEL_DEVICE)))


def test_bad_input_errors():
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.bias_gelu(torch.ones(2, 3, dtype=torch.int32), torch.ones(3))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bias_gelu(torch.ones(2, 3), torch.ones(4))


def test_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both custom ops."""
    x, bias, dy = _inputs((3, 40), torch.float32)
    check_opcheck(torch.ops.bloom_kernels.bias_gelu.default, (x, bias), grad=(0, 1))
    check_opcheck(torch.ops.bloom_kernels.bias_gelu_backward.default, (dy, x, bias))


def test_compile_fullgraph():
    """The custom op under torch.compile(fullgraph=True): same forward and gradients as eager."""
    x, bias, _ = _inputs((5, 77), torch.float32)
    check_compiled(lambda a, b: ops.bias_gelu(a, b) * 2.0, {"x": x, "bias": bias}, grads=("x", "bias"))


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 256, 16384), (64, 57344), (3, 4097)], ids=str)
def test_gpu_bloom_sizes(shape, dtype):
    _check(*_inputs(shape, dtype))


@pytest.mark.gpu
def test_gpu_auto_backend_uses_kernel_and_falls_back(monkeypatch):
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "auto")
    x, bias, _ = _inputs((4, 1024), torch.bfloat16)
    before = dict(_dispatch.dispatch_counts)
    ops.bias_gelu(x, bias)
    assert _dispatch.dispatch_counts[("bias_gelu", "triton")] == before.get(("bias_gelu", "triton"), 0) + 1
    wide = torch.zeros(1, kernel.MAX_N + 1, device="cuda")
    ops.bias_gelu(wide, torch.zeros(kernel.MAX_N + 1, device="cuda"))
    assert _dispatch.dispatch_counts[("bias_gelu", "reference")] == before.get(("bias_gelu", "reference"), 0) + 1


@pytest.mark.gpu
def test_gpu_compile_fullgraph():
    x, bias, _ = _inputs((2, 128, 4096), torch.bfloat16)
    check_compiled(ops.bias_gelu, {"x": x, "bias": bias}, grads=("x", "bias"))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay():
    shape, dtype = (256, 4096), torch.bfloat16
    x, bias, _ = _inputs(shape, dtype)
    refills = [dict(zip(("x", "bias"), _inputs(shape, dtype, seed=seed)[:2])) for seed in (7, 8)]
    check_cuda_graph(ops.bias_gelu, bias_gelu64, {"x": x, "bias": bias}, refills, grads=("x", "bias"), tol=TOL)
