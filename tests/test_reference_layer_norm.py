"""reference.layer_norm and bloom_kernels.layer_norm (backend=reference) against INDEPENDENT float64
math: LayerNorm from the mean and the biased variance (kernel_harness.layer_norm64), and its autograd.
Tolerances: half an ulp of the output dtype relative plus FP32_ATOL absolute (see kernel_harness.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import IMPLS, REFERENCE_DTYPE_IDS, REFERENCE_DTYPES, assert_close64, impl_of, layer_norm64

from bloom_kernels import reference

pytestmark = pytest.mark.usefixtures("force_reference")  # public calls run the eager reference

FP32_ATOL = {  # measured maxima on these shapes given; each bound keeps a margin of >= 5x
    # mean/var over <= 67 features then one fma on |y| <~ 5: measured 3.7e-7
    "layer_norm": 3e-6,
    # dx involves two 67-term reductions, dweight/dbias sum <= 21 rows: measured 1.6e-6
    "layer_norm_grad": 1e-5,
}


# ==================================================================================================
# (residual +) LayerNorm
# ==================================================================================================
LN_SHAPES = [(3, 7, 67), (21, 67), (2, 3, 2, 33)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=REFERENCE_DTYPE_IDS)
@pytest.mark.parametrize("shape", LN_SHAPES, ids=str)
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_layer_norm_forward_and_backward(with_residual, shape, dtype, impl):
    g = torch.Generator().manual_seed(sum(shape) + with_residual)
    hidden = shape[-1]
    eps = 1e-5
    x = (1.5 * torch.randn(shape, generator=g) + 0.7).to(dtype).requires_grad_()
    weight = (1 + 0.3 * torch.randn(hidden, generator=g)).to(dtype).requires_grad_()
    bias = (0.2 * torch.randn(hidden, generator=g)).to(dtype).requires_grad_()
    residual = torch.randn(shape, generator=g).to(dtype).requires_grad_() if with_residual else None
    grad_y = torch.randn(shape, generator=g).to(dtype)
    grad_sum = torch.randn(shape, generator=g).to(dtype)

    result = impl_of(impl, "layer_norm")(x, weight, bias, eps, residual)
    leaves = [x, weight, bias] + ([residual] if with_residual else [])
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    x64, w64, b64 = leaves64[:3]
    h64 = x64 + leaves64[3] if with_residual else x64
    y64 = layer_norm64(h64, w64, b64, eps)

    if with_residual:
        y, total = result
        assert total.dtype == dtype and total.shape == x.shape
        assert_close64(total, h64, dtype, 0.0, "x + residual")
        grads = torch.autograd.grad((y, total), leaves, (grad_y, grad_sum))
        grads64 = torch.autograd.grad((y64, h64), leaves64, (grad_y.double(), grad_sum.double()))
    else:
        y = result
        grads = torch.autograd.grad(y, leaves, grad_y)
        grads64 = torch.autograd.grad(y64, leaves64, grad_y.double())
    assert y.dtype == dtype and y.shape == x.shape
    assert_close64(y, y64, dtype, FP32_ATOL["layer_norm"], "y")
    for name, grad, grad64, leaf in zip(["dx", "dweight", "dbias", "dresidual"], grads, grads64, leaves):
        assert grad.dtype == leaf.dtype and grad.shape == leaf.shape
        assert_close64(grad, grad64, dtype, FP32_ATOL["layer_norm_grad"], name)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("eps", [1e-5, 1e-2, 0.3])
def test_layer_norm_honours_eps(eps, impl):
    g = torch.Generator().manual_seed(13)
    x = 0.1 * torch.randn(5, 29, generator=g)  # variance ~0.01: eps matters
    weight, bias = 1 + 0.1 * torch.randn(29, generator=g), 0.1 * torch.randn(29, generator=g)
    y = impl_of(impl, "layer_norm")(x, weight, bias, eps)
    y64 = layer_norm64(x.double(), weight.double(), bias.double(), eps)
    assert_close64(y, y64, torch.float32, FP32_ATOL["layer_norm"], f"eps={eps}")
    # unbiased variance would be off by a factor 29/28 (~2%): the fp32 bound above excludes it
    for other in {1e-5, 1e-2, 0.3} - {eps}:
        assert (y.double() - layer_norm64(x.double(), weight.double(), bias.double(), other)).abs().max() > 1e-3


def test_layer_norm_unbiased_variance_would_fail():
    """Sanity check of this file's bound: the unbiased-variance LayerNorm is outside it."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(4, 67, generator=g)
    w, b = torch.ones(67), torch.zeros(67)
    y = reference.layer_norm(x, w, b)
    unbiased = (x.double() - x.double().mean(-1, keepdim=True)) / torch.sqrt(x.double().var(-1, keepdim=True) + 1e-5)
    assert (y.double() - unbiased).abs().max() > 10 * FP32_ATOL["layer_norm"]


@pytest.mark.parametrize("magnitude", [1e19, 1e25, 1e30], ids=str)
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_huge_rows_keep_finite_statistics(magnitude, compiled):
    """Rows of magnitude 1e19-1e30 in fp32: the squares overflow fp32, the true LayerNorm is O(1).
    The reference scales each row's deviations before squaring (issue 14); output and gradient equal
    float64's, eager (F.layer_norm for ordinary rows, the scaled form for these) and compiled (always
    the scaled form). A constant row and an ordinary row ride along."""
    g = torch.Generator().manual_seed(7)
    n = 96
    x = torch.randn(4, n, generator=g)
    x[0] *= magnitude
    x[1] = x[1] * magnitude + 3 * magnitude  # large mean as well
    x[2] = 2.5  # constant
    weight, bias = torch.randn(n, generator=g), torch.randn(n, generator=g)
    dy = torch.randn(4, n, generator=g)
    fn = torch.compile(reference.layer_norm, fullgraph=True) if compiled else reference.layer_norm
    xg = x.clone().requires_grad_()
    y = fn(xg, weight, bias)
    y.backward(dy)
    x64 = x.double().requires_grad_()
    want = torch.nn.functional.layer_norm(x64, (n,), weight.double(), bias.double(), 1e-5)
    want.backward(dy.double())
    assert torch.isfinite(y).all() and torch.isfinite(xg.grad).all()
    torch.testing.assert_close(y.double(), want.detach(), rtol=1e-5, atol=1e-5)
    # gradients scale as 1/magnitude: compare relative to each row's largest
    rel = (xg.grad.double() - x64.grad).abs().amax(-1) / x64.grad.abs().amax(-1).clamp(min=1e-300)
    assert (rel < 1e-4).all(), rel
