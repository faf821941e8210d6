"""linear and int8_linear on the CPU: every route of cpu.py against float64 math (values, shapes,
dtypes, gradients), and the public op's dispatch to the measured routes (cpu_routes.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bloom_kernels
from bloom_kernels import _dispatch, cpu, reference


def _inputs(rows_shape, n, k, dtype, with_bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g).to(dtype)
    b = torch.randn(n, generator=g).to(dtype) if with_bias else None
    x = torch.randn(*rows_shape, k, generator=g).to(dtype)
    return x, w, b


def _float64_linear(x, w, b):
    y = x.double() @ w.double().T
    return y if b is None else y + b.double()


# fp32: dot products of K <= 200 terms of size ~1 round to a few 1e-6 relative to their ~sqrt(K)
# magnitude; bf16 inputs are exact in fp32 and the routes accumulate in fp32 (gemv) or in MKL's bf16
# GEMM (fp32 accumulation, one bf16 rounding of the output: 2^-8 relative).
TOLERANCE = {torch.float32: dict(atol=5e-5, rtol=1e-5), torch.bfloat16: dict(atol=0.1, rtol=1.6e-2)}


@pytest.mark.parametrize("route", sorted(cpu.LINEAR_ROUTES))
@pytest.mark.parametrize("rows_shape, n, k", [((1,), 300, 64), ((3, 5), 1028, 200), ((2, 1), 7, 33),
                                              ((17,), 66, 64)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_routes_match_float64(route, rows_shape, n, k, with_bias, dtype):
    x, w, b = _inputs(rows_shape, n, k, dtype, with_bias, seed=n + k)
    y = cpu.LINEAR_ROUTES[route](x, w, b)
    assert y.shape == (*rows_shape, n) and y.dtype == dtype and y.is_contiguous()
    torch.testing.assert_close(y.double(), _float64_linear(x, w, b), **TOLERANCE[dtype])


@pytest.mark.parametrize("route", sorted(cpu.INT8_LINEAR_ROUTES))
@pytest.mark.parametrize("rows_shape, n, k", [((1,), 300, 64), ((2, 3), 129, 200), ((19,), 5, 7)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_int8_linear_routes_match_float64(route, rows_shape, n, k, with_bias):
    x, w, b = _inputs(rows_shape, n, k, torch.float32, with_bias, seed=7 * n + k)
    q, s = reference.quantize_int8(w)
    y = cpu.INT8_LINEAR_ROUTES[route](x, q, s, b)
    expected = _float64_linear(x, reference.dequantize_int8(q, s).double(), b)
    assert y.shape == (*rows_shape, n) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[torch.float32])


@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_int8_blocked_route_over_many_uneven_blocks(with_bias, dtype, monkeypatch):
    """blocked with blocks of 7 output rows: 129 rows = 18 blocks + a partial one, each written once
    (a block lost, repeated or shifted fails against float64), bias sliced with its block."""
    monkeypatch.setattr(cpu, "DEQUANT_BLOCK_BYTES", 4 * 200 * 7)
    x, w, b = _inputs((3, 19), 129, 200, dtype, with_bias, seed=11)
    q, s = reference.quantize_int8(w.float())
    y = cpu.int8_linear_blocked(x, q, s, b)
    expected = _float64_linear(x, reference.dequantize_int8(q, s).double(), b)
    assert y.shape == (3, 19, 129) and y.dtype == dtype
    torch.testing.assert_close(y.double(), expected, **TOLERANCE[dtype])


def test_rowblock_takes_f_linear_when_rows_do_not_split():
    """7 output rows split neither in 4 nor in 2: the row-block route is F.linear itself."""
    x, w, b = _inputs((2,), 7, 16, torch.float32, True, seed=1)
    assert torch.equal(cpu.linear_rowblock(x, w, b), F.linear(x, w, b))


def test_route_gradients_through_the_public_op(monkeypatch):
    """A call that needs gradients runs the reference route, whatever is pinned: the gradients are
    F.linear's, checked against float64."""
    monkeypatch.setenv("BLOOM_KERNELS_CPU_ROUTE", "gemv")
    g = torch.Generator().manual_seed(3)
    w = torch.randn(300, 64, generator=g).requires_grad_()
    b = torch.randn(300, generator=g).requires_grad_()
    x = torch.randn(2, 64, generator=g).requires_grad_()
    dy = torch.randn(2, 300, generator=g)
    compiled_before = len(cpu._compiled)
    bloom_kernels.linear(x, w, b).backward(dy)
    assert len(cpu._compiled) == compiled_before  # gemv was never built for this call
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.linear(xd, wd, bd).backward(dy.double())
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend, path", [("auto", "cpu"), ("triton", "cpu"), ("reference", "reference")])
def test_public_linear_dispatch(backend, path, monkeypatch):
    """On CPU tensors the public op takes the CPU routes unless the reference is forced."""
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", backend)
    before = _dispatch.dispatch_counts[("linear", path)]
    bloom_kernels.linear(torch.randn(2, 8), torch.randn(4, 8))
    assert _dispatch.dispatch_counts[("linear", path)] == before + 1


def test_gemv_compiled_per_shape_stride_and_dtype_without_dynamo():
    """The eager gemv route compiles its graph with inductor directly (no dynamo frame, so no guards):
    the key is therefore the whole guard — a transposed input of the same shape, and another dtype, get
    their own compilation and the right numbers."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(96, 40, generator=g), torch.randn(96, generator=g)
    q, s = reference.quantize_int8(w)
    x = torch.randn(3, 40, generator=g)
    x_t = x.t().contiguous().t()  # the same values, column-major
    counters.clear()
    before = len(cpu._compiled)
    for inp in (x, x_t, x.to(torch.bfloat16)):
        expected = _float64_linear(inp, reference.dequantize_int8(q, s).double(), b)
        got = cpu.int8_linear_gemv(inp, q, s, b)
        torch.testing.assert_close(got.double(), expected, **TOLERANCE[inp.dtype])
    assert len(cpu._compiled) == before + 3
    assert not counters["stats"].get("calls_captured")  # dynamo traced nothing
