"""Zero-size inputs on every public op, on the reference and on the Triton kernels (issue 14): each
either returns the reference's (empty or bias-only) answer with the right shape and dtype, or is
refused by name — never a crash inside a kernel or an index error."""

from __future__ import annotations

import pytest
import torch
from helpers import KERNEL_DEVICE, triton_importable

import bloom_kernels as bk

BACKENDS = ["reference"] + (["triton"] if triton_importable() else [])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", request.param)
    return request.param


def _device(backend):
    return KERNEL_DEVICE if backend == "triton" else "cpu"


def _same(got, want):
    assert got.shape == want.shape and got.dtype == want.dtype
    torch.testing.assert_close(got.cpu(), want.cpu(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch, heads, q_len, k_len", [(0, 2, 3, 5), (2, 0, 3, 5), (2, 2, 0, 5), (2, 2, 0, 0)])
def test_attention(backend, batch, heads, q_len, k_len):
    dev = _device(backend)
    q = torch.randn(batch, heads, q_len, 64, device=dev)
    k, v = (torch.randn(batch, heads, k_len, 64, device=dev) for _ in range(2))
    slopes = bk.alibi_slopes(heads, device=dev) if heads else torch.empty(0, device=dev)
    mask = torch.ones(batch, k_len, dtype=torch.long, device=dev)
    out = bk.alibi_attention(q, k, v, slopes, mask)
    assert out.shape == q.shape and out.dtype == q.dtype


@pytest.mark.parametrize("shape", [(0, 7), (3, 0), (0, 0), (2, 0, 5)], ids=str)
def test_bias_gelu(backend, shape):
    dev = _device(backend)
    x, bias = torch.randn(shape, device=dev), torch.randn(shape[-1], device=dev)
    from bloom_kernels import reference

    _same(bk.bias_gelu(x, bias), reference.bias_gelu(x.cpu(), bias.cpu()))


@pytest.mark.parametrize("rows", [(0,), (2, 0)], ids=str)
@pytest.mark.parametrize("residual", [False, True])
def test_layer_norm_no_rows(backend, rows, residual):
    dev = _device(backend)
    x = torch.randn(*rows, 24, device=dev)
    w, b = torch.randn(24, device=dev), torch.randn(24, device=dev)
    r = torch.randn_like(x) if residual else None
    got = bk.layer_norm(x, w, b, 1e-5, r)
    got = got if isinstance(got, tuple) else (got,)
    assert all(t.shape == x.shape and t.dtype == x.dtype for t in got)


def test_layer_norm_no_features(backend):
    """Rows of 0 features: an empty output (torch's answer) from the reference; the kernel, forced,
    refuses them by name (under the default backend the reference takes them)."""
    dev = _device(backend)
    x = torch.randn(3, 0, device=dev)
    w, b = torch.ones(0, device=dev), torch.zeros(0, device=dev)
    if backend == "triton":
        with pytest.raises(ValueError, match=r"x must have a non-empty last dim; got shape \(3, 0\)"):
            bk.layer_norm(x, w, b)
    else:
        assert bk.layer_norm(x, w, b).shape == (3, 0)


@pytest.mark.parametrize("m, k, n", [(0, 8, 5), (3, 0, 5), (3, 8, 0), (0, 0, 0)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_int8_linear_and_linear(backend, m, k, n, with_bias):
    dev = _device(backend)
    weight = torch.randn(n, k, device=dev)
    x = torch.randn(m, k, device=dev)
    bias = torch.randn(n, device=dev) if with_bias else None
    q, scale = bk.quantize_int8(weight)
    assert q.shape == (n, k) and scale.shape == (n,)
    want = torch.nn.functional.linear(x.cpu(), weight.cpu(), None if bias is None else bias.cpu())
    _same(bk.int8_linear(x, q, scale, bias), want)
    _same(bk.linear(x, weight, bias), want)
