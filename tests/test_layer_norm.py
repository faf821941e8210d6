"""Fused (residual-add +) LayerNorm (bloom_kernels/layer_norm.py) against reference.layer_norm.

Forward (y, and the sum x + residual) and every gradient (dx, dweight, dbias, dresidual) with random
upstream gradients on both outputs. On a CPU the kernels run in Triton's interpreter (fp32 and fp16)
on small odd shapes, plus the looped long-row path (forced on small rows, and once at 57,344); the
`gpu` tests add bf16/fp16 at BLOOM sizes, torch.compile(fullgraph=True) and CUDA-graph capture/replay.
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

kernel = importlib.import_module("bloom_kernels.layer_norm")

# (dtype, atol, rtol) against the reference on the same inputs; both normalise in fp32.
# fp32: only the summation order of mean / variance / the backward row sums differs (the kernel merges
#       per-chunk statistics on long rows): a few ulp of O(1) values, ~1e-7 seen; 1e-5 leaves room for
#       rows of 65,536 elements.
# fp16: both round (nearly) the same fp32 value once: at most 1 ulp = 2^-10 relative (< 1e-3), the
#       2e-3 covers a value on a rounding boundary. The sum x + residual is bit-exact (same fp32 add).
# bf16: the same with 1 ulp = 2^-7 (GPU only; the interpreter cannot do bf16 reliably).
# dweight / dbias are fp32 sums over rows in another order, rounded once to the parameter dtype.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 2e-3),
    torch.bfloat16: (1e-2, 1.6e-2),
}
EPS = 1e-5

SHAPES = [
    (1, 1),  # a single element (variance 0: rstd = 1/sqrt(eps))
    (3, 1000),  # a row that divides no block size
    (7, 14336),  # BLOOM-176B hidden size (backward takes the column-block path)
    (67, 129),  # several row groups in the dweight/dbias partial sums, odd width
    (2, 3, 257),  # 3-D leading shape
    (16, 1024),  # bloom-560m width: a power of two, no column mask
]


@pytest.fixture(autouse=True)
def poisoned_buffers(monkeypatch):
    """Every buffer the launchers allocate (y, sum, mean, rstd, dx, row dots, partials) starts NaN."""
    monkeypatch.setattr(kernel, "_empty", lambda shape, dtype, device: poison_(torch.empty(shape, dtype=dtype, device=device)))


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


def _run(fn, x, weight, bias, r, dy, ds, use=("y", "s")):
    """Outputs and gradients of fn on fresh leaves: {name: tensor}; upstream grads on the outputs used."""
    leaves = {k: t.detach().clone().requires_grad_() for k, t in
              {"x": x, "weight": weight, "bias": bias, "residual": r}.items() if t is not None}
    out = fn(leaves["x"], leaves["weight"], leaves["bias"], EPS, leaves.get("residual"))
    y, s = out if r is not None else (out, None)
    pairs = [(y, dy)] if "y" in use else []
    if s is not None and "s" in use:
        pairs.append((s, ds))
    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    result = {"y": y} if s is None else {"y": y, "s": s}
    result.update({f"d{k}": t.grad for k, t in leaves.items()})
    return result


def _check(x, weight, bias, r, dy, ds, use=("y", "s")):
    got = _run(ops.layer_norm, x, weight, bias, r, dy, ds, use)
    expected = _run(reference.layer_norm, x, weight, bias, r, dy, ds, use)
    assert got.keys() == expected.keys()
    atol, rtol = TOL[x.dtype]
    if x.shape[-1] == 1:
        # One element per row: variance 0, so rstd = 1/sqrt(eps) ~ 316 multiplies any rounding of
        # h - mean. ATen's CPU backward is not exact there (dweight ~1e-5 where the exact value, and
        # the kernel's, is 0): allow 316x an fp32 ulp of the O(1) inputs.
        atol = max(atol, 316 * 2**-22)
    for name in expected:
        a, b = got[name], expected[name]
        if b is None:  # the reference leaves a parameter the used output does not depend on without
            assert a is None or not a.any(), name  # a grad; the fused op gives it zeros
            continue
        assert a.dtype == b.dtype and a.shape == b.shape, name
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m, name=name: f"{name}: {m}")
    return got


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: against the reference
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_reference(force_triton, shape, dtype, residual):
    _check(*_inputs(shape, dtype, residual))


@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("shape", [(3, 1000), (5, 130)], ids=str)
def test_looped_long_row_path(force_triton, looped, shape, dtype, residual):
    _check(*_inputs(shape, dtype, residual))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_longest_rows(force_triton, dtype):
    """The real thresholds at BLOOM-176B's MLP width and at the limit."""
    _check(*_inputs((2, 57344), dtype, residual=True))
    _check(*_inputs((1, kernel.MAX_N), dtype, residual=False))


@pytest.mark.parametrize("use", [("y",), ("s",)], ids=["only-normed", "only-sum"])
def test_gradient_through_one_output(force_triton, use):
    """With a residual, either output alone may carry the gradient; x and residual both get it."""
    _check(*_inputs((4, 300), torch.float32), use=use)


def test_statistics(force_triton):
    """The saved mean / rstd (fp32) are those of the fp32 sum."""
    x, weight, bias, r, _, _ = _inputs((6, 777), torch.float16)
    _, _, mean, rstd = torch.ops.bloom_kernels.layer_norm(x, weight, bias, EPS, r)
    h = x.double() + r.double()
    var, expected_mean = torch.var_mean(h, dim=-1, unbiased=False)
    assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (6,)
    torch.testing.assert_close(mean.double(), expected_mean, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(rstd.double(), (var + EPS).rsqrt(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_non_contiguous_inputs(force_triton, dtype):
    m, n = 5, 300
    x, weight, bias, r, dy, ds = _inputs((m, n), dtype)
    gen = torch.Generator().manual_seed(3)
    # row slices of wider matrices: read in place through the row strides
    x_wide = torch.randn(m, n + 9, generator=gen).to(KERNEL_DEVICE, dtype)[:, 4:n + 4]
    r_wide = torch.randn(m, 2 * n, generator=gen).to(KERNEL_DEVICE, dtype)[:, :n]
    _check(x_wide, weight, bias, r_wide, dy, ds)
    # transposed views (column stride != 1: copied once), strided parameters, transposed upstream grads
    x_t, r_t, dy_t, ds_t = (t.t().contiguous().t() for t in (x, r, dy, ds))
    assert not x_t.is_contiguous()
    weight_s = torch.randn(2 * n, generator=gen).to(KERNEL_DEVICE, dtype)[::2]
    _check(x_t, weight_s, bias, r_t, dy_t, ds_t)


def test_fp32_parameters_with_fp16_activations(force_triton):
    """Mixed precision: fp16 x/residual with fp32 weight/bias; dweight/dbias come back in fp32."""
    x, weight, bias, r, dy, ds = _inputs((4, 333), torch.float16, param_dtype=torch.float32)
    got = _run(ops.layer_norm, x, weight, bias, r, dy, ds)
    expected = _run(reference.layer_norm, x, weight, bias, r, dy, ds)
    assert got["dweight"].dtype == got["dbias"].dtype == torch.float32
    for name in expected:
        tol = (1e-4, 1e-4) if expected[name].dtype == torch.float32 else TOL[torch.float16]
        torch.testing.assert_close(got[name], expected[name], atol=tol[0], rtol=tol[1], msg=lambda m, name=name: f"{name}: {m}")


def test_empty_rows(force_triton):
    x = torch.empty(0, 8, device=KERNEL_DEVICE, requires_grad=True)
    weight = torch.ones(8, device=KERNEL_DEVICE, requires_grad=True)
    y = ops.layer_norm(x, weight, torch.zeros(8, device=KERNEL_DEVICE), EPS)
    y.backward(torch.empty_like(y))
    assert y.shape == (0, 8) and x.grad.shape == (0, 8)
    assert torch.equal(weight.grad, torch.zeros(8, device=KERNEL_DEVICE))


def test_poison_catches_an_unwritten_output(force_triton, monkeypatch):
    """The NaN fill is real: with the forward kernel skipped, the output is all NaN."""
    class Skipped:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: None
    monkeypatch.setattr(kernel, "_ln_fwd_kernel", Skipped())
    x, weight, bias, _, _, _ = _inputs((3, 100), torch.float32)
    assert torch.isnan(ops.layer_norm(x, weight, bias, EPS)).all()


def test_triton_path_ran(force_triton, monkeypatch):
    """Forced triton: the dispatcher picks the kernel, the kernel launches, the reference never runs."""
    def boom(*args, **kwargs):
        raise AssertionError("the reference ran")
    monkeypatch.setattr(reference, "layer_norm", boom)
    monkeypatch.setattr(torch.nn.functional, "layer_norm", boom)
    launches = []
    forward, backward = kernel._forward, kernel._backward
    monkeypatch.setattr(kernel, "_forward", lambda *a: launches.append("fwd") or forward(*a))
    monkeypatch.setattr(kernel, "_backward", lambda *a: launches.append("bwd") or backward(*a))
    before = _dispatch.dispatch_counts[("layer_norm", "triton")]
    x, weight, bias, r, dy, ds = _inputs((3, 100), torch.float32)
    x.requires_grad_()
    y, s = ops.layer_norm(x, weight, bias, EPS, r)
    torch.autograd.backward([y, s], [dy, ds])
    assert _dispatch.dispatch_counts[("layer_norm", "triton")] == before + 1
    assert launches == ["fwd", "bwd"]


def test_public_name_survives_the_kernel_import():
    """In a fresh interpreter: after the dispatcher imports the kernel module, `bloom_kernels.layer_norm` is
    still the public op (the model calls it as an attribute on every forward)."""
    code = (
        "import torch, bloom_kernels as bk\n"
        f"dev = {KERNEL_DEVICE.type!r}\n"
        "bk.layer_norm(torch.randn(2, 8, device=dev), torch.ones(8, device=dev), torch.zeros(8, device=dev))\n"
        "assert bk.layer_norm is bk.ops.layer_norm, bk.layer_norm\n"
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
    weight, bias = torch.ones(n, device=KERNEL_DEVICE), torch.zeros(n, device=KERNEL_DEVICE)
    assert kernel.layer_norm_unsupported(x[:, :-1], weight[:-1], bias[:-1]) is None
    reason = kernel.layer_norm_unsupported(x, weight, bias, EPS, x)
    assert "65536" in reason and "65537" in reason
    with pytest.raises(ValueError, match="at most 65536 elements"):
        ops.layer_norm(x, weight, bias, EPS, x)


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
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias, r)]
    torch.library.opcheck(op, (*leaves[:3], EPS, leaves[3]))
    torch.library.opcheck(op, (*leaves[:3], EPS, None))
    _, _, mean, rstd = op(x, weight, bias, EPS, r)
    torch.library.opcheck(torch.ops.bloom_kernels.layer_norm_backward.default,
                          (dy, ds, x, r, weight, mean, rstd, torch.float32))


def test_compile_fullgraph(force_triton):
    """The custom op under torch.compile(fullgraph=True): same outputs and gradients as eager."""
    inputs = _inputs((5, 77), torch.float32)

    def fn(x, weight, bias, eps, residual):
        y, s = ops.layer_norm(x, weight, bias, eps, residual)
        return y * 2.0, s

    fn(*inputs[:3], EPS, inputs[3])  # first call eagerly: the dispatcher imports the kernel module outside dynamo
    got = _run(torch.compile(fn, fullgraph=True), *inputs)
    expected = _run(fn, *inputs)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


# ------------------------------------------------------------------------------------------------
# GPU only
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(2, 512, 1024), (2, 256, 4096), (2, 64, 14336), (48, 57344), (3, 5, 4097)],
                         ids=str)
def test_gpu_bloom_sizes(force_triton, shape, dtype, residual):
    _check(*_inputs(shape, dtype, residual))


@pytest.mark.gpu
def test_gpu_fp32_params_bf16_activations(force_triton):
    x, weight, bias, r, dy, ds = _inputs((512, 4096), torch.bfloat16, param_dtype=torch.float32)
    got = _run(ops.layer_norm, x, weight, bias, r, dy, ds)
    expected = _run(reference.layer_norm, x, weight, bias, r, dy, ds)
    for name in expected:
        tol = (1e-3, 1e-4) if expected[name].dtype == torch.float32 else TOL[torch.bfloat16]
        torch.testing.assert_close(got[name], expected[name], atol=tol[0], rtol=tol[1], msg=lambda m, name=name: f"{name}: {m}")


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
def test_gpu_compile_fullgraph(force_triton):
    inputs = _inputs((2, 128, 4096), torch.bfloat16)
    fn = ops.layer_norm
    fn(*inputs[:3], EPS, inputs[3])
    got = _run(torch.compile(fn, fullgraph=True), *inputs)
    expected = _run(fn, *inputs)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], atol=0, rtol=0, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_and_replay(force_triton):
    shape, dtype = (256, 4096), torch.bfloat16
    x, weight, bias, r, dy, ds = (t.clone() for t in _inputs(shape, dtype))
    leaves = (x, weight, bias, r)
    for t in leaves:
        t.requires_grad_()

    def step():
        y, s = ops.layer_norm(x, weight, bias, EPS, r)
        grads = torch.autograd.grad((y, s), leaves, (dy, ds))
        return (y, s, *grads)

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
        new = _inputs(shape, dtype, seed=seed)
        with torch.no_grad():
            for static, fresh in zip((x, weight, bias, r, dy, ds), new):
                static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        expected = _run(reference.layer_norm, *new)
        atol, rtol = TOL[dtype]
        for name, got in zip(("y", "s", "dx", "dweight", "dbias", "dresidual"), outs):
            torch.testing.assert_close(got.float(), expected[name].float(), atol=atol, rtol=rtol,
                                       msg=lambda m, name=name: f"{name}: {m}")
