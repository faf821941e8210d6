"""Fused bias-GeLU (bloom_kernels/bias_gelu.py) against reference.bias_gelu, forward and both gradients.

On a CPU the kernels run in Triton's interpreter (fp32 and fp16) on small odd shapes; the `gpu` tests
add bf16/fp16 at BLOOM sizes, torch.compile(fullgraph=True) and CUDA-graph capture/replay.
"""

import importlib
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from helpers import KERNEL_DEVICE, poison_

from bloom_kernels import _dispatch, ops, reference

kernel = importlib.import_module("bloom_kernels.bias_gelu")

# (dtype, atol, rtol) against the reference on the same inputs; both compute h = x + bias in fp32.
# fp32: the kernel evaluates 0.5 (1 + tanh(u)) as sigmoid(2u) through exp2, the reference calls tanh:
#       a few fp32 ulp apart, scaled by |h| (<= ~15 here) -> ~1e-6 absolute; 1e-5 leaves room.
# fp16: both round (nearly) the same fp32 value once: at most 1 ulp = 2^-10 relative (< 1e-3); the
#       2e-3 covers a value sitting on a rounding boundary after the fp32 differences above.
# bf16: the same with 1 ulp = 2^-7 relative (GPU only; the interpreter cannot do bf16 reliably).
# dbias is a sum over rows in fp32 (different order) rounded once to bias.dtype: the same rule.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}

SHAPES = [
    (1, 1),  # a single element: every mask on
    (3, 1000),  # a row that divides no block size
    (7, 14336),  # BLOOM-176B hidden size
    (67, 129),  # several row groups in the dbias partial sums, odd width
    (2, 3, 257),  # 3-D leading shape
    (16, 2048),  # sizes that divide the blocks: the unmasked (EVEN) variants
]


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the launchers allocate (y, dx, dbias partials) starts as NaN."""
    monkeypatch.setattr(kernel, "_empty", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))


def _inputs(shape, dtype, seed=0, device=KERNEL_DEVICE):
    gen = torch.Generator().manual_seed(seed)
    x = (3 * torch.randn(shape, generator=gen)).to(device, dtype)  # |h| up to ~15: both tails of GeLU
    bias = torch.randn(shape[-1], generator=gen).to(device, dtype)
    dy = torch.randn(shape, generator=gen).to(device, dtype)
    return x, bias, dy


def _run(fn, x, bias, dy):
    """(y, dx, dbias) of fn on fresh leaves."""
    x = x.detach().clone().requires_grad_()
    bias = bias.detach().clone().requires_grad_()
    y = fn(x, bias)
    y.backward(dy)
    return y, x.grad, bias.grad


def _check(x, bias, dy, fn=ops.bias_gelu):
    got = _run(fn, x, bias, dy)
    expected = _run(reference.bias_gelu, x, bias, dy)
    atol, rtol = TOL[x.dtype]
    for name, a, b in zip(("y", "dx", "dbias"), got, expected):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
    return got


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(force_triton, shape, dtype):
    _check(*_inputs(shape, dtype), fn=ops.bias_gelu)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(force_triton, dtype):
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
    # a strided bias and an expanded (stride-0) upstream gradient, as from y.sum().backward()
    bias_s = torch.randn(2 * n, generator=torch.Generator().manual_seed(4)).to(KERNEL_DEVICE, dtype)[::2]
    _check(x, bias_s, torch.ones((), dtype=dtype, device=KERNEL_DEVICE).expand(m, n))


def test_mixed_dtypes(force_triton):
    """fp16 activations with an fp32 bias: y/dx in fp16, dbias in fp32 (as the reference)."""
    x, _, dy = _inputs((4, 333), torch.float16)
    bias = torch.randn(333, generator=torch.Generator().manual_seed(5)).to(KERNEL_DEVICE)
    y, dx, dbias = _run(ops.bias_gelu, x, bias, dy)
    ey, edx, edbias = _run(reference.bias_gelu, x, bias, dy)
    assert (y.dtype, dx.dtype, dbias.dtype) == (torch.float16, torch.float16, torch.float32)
    torch.testing.assert_close(y, ey, atol=1e-3, rtol=2e-3)
    torch.testing.assert_close(dx, edx, atol=1e-3, rtol=2e-3)
    torch.testing.assert_close(dbias, edbias, atol=1e-4, rtol=1e-4)  # fp32 sums of the same fp32 dh


def test_empty_rows(force_triton):
    x = torch.empty(0, 8, device=KERNEL_DEVICE)
    bias = torch.randn(8, device=KERNEL_DEVICE, requires_grad=True)
    x.requires_grad_()
    y = ops.bias_gelu(x, bias)
    y.backward(torch.empty_like(y))
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)
    assert torch.equal(bias.grad, torch.zeros(8, device=KERNEL_DEVICE))


def test_poison_catches_an_unwritten_output(force_triton, monkeypatch):
    """The NaN fill is real: with the forward kernel skipped, the output is all NaN."""
    class Skipped:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    monkeypatch.setattr(kernel, "_bias_gelu_fwd_kernel", Skipped())
    x, bias, _ = _inputs((3, 100), torch.float32)
    assert torch.isnan(ops.bias_gelu(x, bias)).all()


def test_triton_path_ran(force_triton, monkeypatch):
    """Forced triton: the dispatcher picks the kernel, the kernel launches, the reference never runs."""
    def boom(*args, **kwargs):
        raise AssertionError("the reference ran")
    monkeypatch.setattr(reference, "bias_gelu", boom)
    launches = []
    forward, backward = kernel._forward, kernel._backward
    monkeypatch.setattr(kernel, "_forward", lambda *a: launches.append("fwd") or forward(*a))
    monkeypatch.setattr(kernel, "_backward", lambda *a: launches.append("bwd") or backward(*a))
    before = _dispatch.dispatch_counts[("bias_gelu", "triton")]
    x, bias, dy = _inputs((3, 100), torch.float32)
    x.requires_grad_()
    ops.bias_gelu(x, bias).backward(dy)
    assert _dispatch.dispatch_counts[("bias_gelu", "triton")] == before + 1
    assert launches == ["fwd", "bwd"]


def test_public_name_survives_the_kernel_import():
    """In a fresh interpreter: after the dispatcher imports the kernel module, `bloom_kernels.bias_gelu` is
    still the public op (the model calls it as an attribute on every forward)."""
    code = (
        "import torch, bloom_kernels as bk\n"
        f"dev = {KERNEL_DEVICE.type!r}\n"
        "bk.bias_gelu(torch.randn(2, 8, device=dev), torch.randn(8, device=dev))\n"
        "assert bk.bias_gelu is bk.ops.bias_gelu, bk.bias_gelu\n"
    )
    env = {**os.environ, "BLOOM_KERNELS_BACKEND": "triton"}
    if KERNEL_DEVICE.type == "cpu":
        env["TRITON_INTERPRET"] = "1"
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", code], env=env, cwd=repo, capture_output=True, text=True,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]


def test_rows_over_the_limit(force_triton):
    n = kernel.MAX_N + 1
    x = torch.zeros(1, n, device=KERNEL_DEVICE)
    bias = torch.zeros(n, device=KERNEL_DEVICE)
    assert kernel.bias_gelu_unsupported(x[:, : kernel.MAX_N], bias[: kernel.MAX_N]) is None
    reason = kernel.bias_gelu_unsupported(x, bias)
    assert "65536" in reason and "65537" in reason
    with pytest.raises(ValueError, match="at most 65536 elements"):
        ops.bias_gelu(x, bias)


def test_bad_input_errors():
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.bias_gelu(torch.ones(2, 3, dtype=torch.int32), torch.ones(3))
    with pytest.raises(ValueError, match="bias must have shape"):
        ops.bias_gelu(torch.ones(2, 3), torch.ones(4))


def test_opcheck():
    """Schema, fake (meta) implementation, autograd registration and AOT dispatch of both custom ops."""
    x, bias, dy = _inputs((3, 40), torch.float32)
    torch.library.opcheck(torch.ops.bloom_kernels.bias_gelu.default,
                          (x.requires_grad_(), bias.requires_grad_()))
    torch.library.opcheck(torch.ops.bloom_kernels.bias_gelu_backward.default, (dy, x.detach(), bias.detach()))


def test_compile_fullgraph(force_triton):
    """The custom op under torch.compile(fullgraph=True): same forward and gradients as eager."""
    x, bias, dy = _inputs((5, 77), torch.float32)
    ops.bias_gelu(x, bias)  # first call eagerly: the dispatcher imports the kernel module outside dynamo
    compiled = torch.compile(lambda a, b: ops.bias_gelu(a, b) * 2.0, fullgraph=True)
    got = _run(compiled, x, bias, dy)
    expected = _run(lambda a, b: ops.bias_gelu(a, b) * 2.0, x, bias, dy)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 256, 16384), (64, 57344), (3, 4097)], ids=str)
def test_gpu_bloom_sizes(force_triton, shape, dtype):
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
def test_gpu_compile_fullgraph(force_triton):
    x, bias, dy = _inputs((2, 128, 4096), torch.bfloat16)
    ops.bias_gelu(x, bias)
    compiled = torch.compile(lambda a, b: ops.bias_gelu(a, b), fullgraph=True)
    for a, b in zip(_run(compiled, x, bias, dy), _run(ops.bias_gelu, x, bias, dy)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay(force_triton):
    shape, dtype = (256, 4096), torch.bfloat16
    x, bias, dy = (t.clone() for t in _inputs(shape, dtype))
    x.requires_grad_()
    bias.requires_grad_()

    def step():
        y = ops.bias_gelu(x, bias)
        dx, dbias = torch.autograd.grad(y, (x, bias), dy)
        return y, dx, dbias

    stream = torch.cuda.Stream()  # warm up (autotuning included) outside the capture
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (7, 8):
        nx, nb, ndy = _inputs(shape, dtype, seed=seed)
        with torch.no_grad():
            x.copy_(nx)
            bias.copy_(nb)
            dy.copy_(ndy)
        graph.replay()
        torch.cuda.synchronize()
        expected = _run(reference.bias_gelu, nx, nb, ndy)
        atol, rtol = TOL[dtype]
        for a, b in zip(outs, expected):
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol)
