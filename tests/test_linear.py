"""linear: the CPU route (bloom_kernels.cpu.linear), the reference (F.linear) and the public op's
choice between them, against float64 math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import bloom_kernels
from bloom_kernels import _dispatch, cpu, reference

LINEAR_IMPLS = {"cpu": cpu.linear, "reference": reference.linear, "public": bloom_kernels.linear}


@pytest.mark.parametrize("out_features, route", [(16388, "bmm"), (16386, "bmm"), (16385, "F.linear"),
                                                 (300, "F.linear")])
@pytest.mark.parametrize("x_shape", [(1, 64), (2, 3, 64), (17, 64)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("impl", sorted(LINEAR_IMPLS))
def test_linear_matches_float64_on_both_routes(out_features, route, x_shape, with_bias, impl, monkeypatch):
    g = torch.Generator().manual_seed(out_features)
    w = torch.randn(out_features, 64, generator=g)
    b = torch.randn(out_features, generator=g) if with_bias else None
    x = torch.randn(*x_shape, generator=g)
    used = []
    for name in ("bmm", "baddbmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: used.append(1) or _real(*a, **k))
    y = LINEAR_IMPLS[impl](x, w, b)
    expected = x.double() @ w.double().T + (b.double() if b is not None else 0)
    assert y.shape == (*x_shape[:-1], out_features) and y.is_contiguous()
    # fp32 dot products of length 64 with |terms| ~ 1: a few 1e-6 of rounding
    torch.testing.assert_close(y.double(), expected, atol=2e-5, rtol=1e-5)
    skinny = x.numel() // 64 <= cpu.SKINNY_MAX_ROWS and w.numel() >= cpu.SKINNY_MIN_WEIGHT
    # the reference is plain F.linear; the public op takes the CPU route on CPU tensors
    assert bool(used) == (impl != "reference" and route == "bmm" and skinny)


def test_linear_gradients_on_the_bmm_route():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16388, 64, generator=g, dtype=torch.float64).float().requires_grad_()
    b = torch.randn(16388, generator=g).requires_grad_()
    x = torch.randn(2, 64, generator=g).requires_grad_()
    dy = torch.randn(2, 16388, generator=g)
    cpu.linear(x, w, b).backward(dy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.linear(xd, wd, bd).backward(dy.double())
    # x.grad sums 16388 fp32 products (|x.grad| ~ 1e2): fp32 accumulation error ~1e-4 relative
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("backend, path", [("auto", "cpu"), ("triton", "cpu"), ("reference", "reference")])
def test_public_linear_dispatch(backend, path, monkeypatch):
    """On CPU tensors the public op takes the CPU route unless the reference is forced."""
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", backend)
    before = _dispatch.dispatch_counts[("linear", path)]
    bloom_kernels.linear(torch.randn(2, 8), torch.randn(4, 8))
    assert _dispatch.dispatch_counts[("linear", path)] == before + 1
