"""reference.bias_gelu and bloom_kernels.bias_gelu (backend=reference) against INDEPENDENT float64
math: the tanh-GeLU formula (kernel_harness.gelu64) and its float64 autograd.
Tolerances: half an ulp of the output dtype relative plus FP32_ATOL absolute (see kernel_harness.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import IMPLS, REFERENCE_DTYPE_IDS, REFERENCE_DTYPES, assert_close64, gelu64, impl_of

from bloom_kernels import reference

pytestmark = pytest.mark.usefixtures("force_reference")  # public calls run the eager reference

FP32_ATOL = {  # measured maxima on these shapes given; each bound keeps a margin of >= 5x
    # one tanh and a handful of multiplies per element, a few ulp of fp32 on |y|, |dx| <~ 6:
    # measured 1.8e-7 (y), 5.5e-7 (dx)
    "gelu": 4e-6,
    # dbias sums up to 42 rows of |dh| <~ 3 in fp32 (worst case 42 * 2^-24 * 3 ~ 8e-6): measured 1.2e-6
    "gelu_dbias": 1e-5,
}


# ==================================================================================================
# bias + GeLU
# ==================================================================================================
GELU_SHAPES = [(3, 5, 37), (2, 7, 3, 19), (41,)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=REFERENCE_DTYPE_IDS)
@pytest.mark.parametrize("shape", GELU_SHAPES, ids=str)
def test_bias_gelu_forward_and_backward(shape, dtype, impl):
    g = torch.Generator().manual_seed(sum(shape))
    x = (2.0 * torch.randn(shape, generator=g)).to(dtype).requires_grad_()
    bias = torch.randn(shape[-1], generator=g).to(dtype).requires_grad_()
    grad_out = torch.randn(shape, generator=g).to(dtype)

    y = impl_of(impl, "bias_gelu")(x, bias)
    assert y.dtype == dtype and y.shape == x.shape
    dx, dbias = torch.autograd.grad(y, (x, bias), grad_out)

    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    y64 = gelu64(x64 + b64)
    dx64, db64 = torch.autograd.grad(y64, (x64, b64), grad_out.double())

    assert_close64(y, y64, dtype, FP32_ATOL["gelu"], "y")
    assert dx.dtype == dtype and dbias.dtype == dtype and dbias.shape == bias.shape
    assert_close64(dx, dx64, dtype, FP32_ATOL["gelu"], "dx")
    assert_close64(dbias, db64, dtype, FP32_ATOL["gelu_dbias"], "dbias")


def test_bias_gelu_only_one_input_needs_grad():
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 9, generator=g)
    bias = torch.randn(9, generator=g).requires_grad_()
    (dbias,) = torch.autograd.grad(reference.bias_gelu(x, bias).sum(), bias)
    b64 = bias.detach().double().requires_grad_()
    (db64,) = torch.autograd.grad(gelu64(x.double() + b64).sum(), b64)
    assert_close64(dbias, db64, torch.float32, FP32_ATOL["gelu_dbias"], "dbias")
