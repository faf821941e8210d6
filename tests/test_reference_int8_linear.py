"""reference.quantize_int8 / int8_linear and their public wrappers (backend=reference) against
INDEPENDENT float64 math: absmax int8 quantisation bounds and a float64 dequantised matmul.
Tolerances: half an ulp of the output dtype relative plus FP32_ATOL absolute (see kernel_harness.py).
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import IMPLS, REFERENCE_DTYPE_IDS, REFERENCE_DTYPES, assert_close64, impl_of

import bloom_kernels
from bloom_kernels import reference

pytestmark = pytest.mark.usefixtures("force_reference")  # public calls run the eager reference

FP32_ATOL = {  # measured maxima on these shapes given; each bound keeps a margin of >= 5x
    # K = 37-term dot products of |x| <~ 3 and |w| <~ 1 in fp32: measured 7.4e-7
    "int8_linear": 5e-6,
}


# ==================================================================================================
# int8 weight-only quantisation and linear
# ==================================================================================================
def random_weight(rows, cols, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, 1, generator=g)  # per-row magnitudes
    w[1] = 0.0  # all-zero row
    w[2] = -0.37  # constant row
    w[3, 5] = 1e4  # one huge outlier
    w[4, 0] = -50.0  # a negative outlier
    return w.to(dtype)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=REFERENCE_DTYPE_IDS)
def test_quantize_int8(dtype, impl):
    w = random_weight(19, 37, dtype, seed=15)
    q, scale = impl_of(impl, "quantize_int8")(w)
    assert q.dtype == torch.int8 and q.shape == w.shape
    assert scale.dtype == torch.float32 and scale.shape == (19,)
    w64 = w.double()
    absmax = w64.abs().amax(-1)
    # scale = max|w| / 127, computed in fp32 (one rounding)
    torch.testing.assert_close(scale.double(), absmax / 127, atol=0, rtol=2.0**-23)
    assert torch.isfinite(scale).all()
    qi = q.to(torch.int64)
    assert (qi.abs() <= 127).all(), "q outside [-127, 127]"
    nonzero = absmax > 0
    # the absmax element of each non-zero row maps to +-127 with its sign
    top = w64.abs().argmax(-1)
    assert torch.equal(qi[nonzero, top[nonzero]], (127 * w64[nonzero, top[nonzero]].sign()).long())
    # round to nearest: |w - q*scale| <= scale/2 (plus the fp32 rounding of w/scale, ~127 * 2^-24 scale)
    err = (w64 - qi.double() * scale.double()[:, None]).abs()
    bound = scale.double()[:, None] * (0.5 + 1e-5)
    assert (err <= bound).all(), f"max err / scale {(err / scale.double()[:, None].clamp_min(1e-30)).max():.4f}"
    # all-zero row: scale 0 and zeros, no NaN/inf anywhere
    assert scale[1] == 0 and (q[1] == 0).all()
    # constant row: every element is the absmax -> exactly -127, dequantised to the value within 1 ulp
    assert (qi[2] == -127).all()
    torch.testing.assert_close(qi[2].double() * scale[2].double(), w64[2], atol=0, rtol=2.0**-22)
    # huge outlier: it takes 127, the rest of the row rounds to (mostly) zero but stays within scale/2
    assert qi[3, 5] == 127 and scale[3].double() == pytest.approx(w64[3, 5].item() / 127, rel=2**-23)
    assert qi[4, 0] == -127


def test_quantize_int8_rounds_to_nearest_not_truncates():
    w = torch.tensor([[127.0, 1.6, -1.6, 2.4, -2.4, 0.49, 0.51]])  # scale exactly 1
    q, scale = reference.quantize_int8(w)
    assert scale.item() == 1.0
    assert q.tolist() == [[127, 2, -2, 2, -2, 0, 1]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=REFERENCE_DTYPE_IDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("x_shape", [(2, 3, 37), (5, 37), (37,)], ids=str)
def test_int8_linear_matches_float64(x_shape, with_bias, dtype, impl):
    out_features, in_features = 19, 37
    g = torch.Generator().manual_seed(16 + len(x_shape))
    q = torch.randint(-127, 128, (out_features, in_features), generator=g, dtype=torch.int8)
    scale = torch.rand(out_features, generator=g) / 127 + 1e-4
    x = torch.randn(x_shape, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype) if with_bias else None
    y = impl_of(impl, "int8_linear")(x, q, scale, bias)
    assert y.dtype == dtype and y.shape == (*x_shape[:-1], out_features)
    w64 = q.double() * scale.double()[:, None]
    y64 = x.double() @ w64.T + (bias.double() if with_bias else 0.0)
    assert_close64(y, y64, dtype, FP32_ATOL["int8_linear"], "y")


def test_int8_linear_after_quantize_approximates_the_float_linear():
    g = torch.Generator().manual_seed(17)
    w = torch.randn(23, 41, generator=g)
    x = torch.randn(3, 41, generator=g)
    q, scale = bloom_kernels.quantize_int8(w)
    y = bloom_kernels.int8_linear(x, q, scale)
    # each weight moves by <= scale/2: |dy| <= sum_k |x_k| * scale/2
    bound = x.abs().sum(-1, keepdim=True) * scale[None, :] / 2 + 1e-5
    assert ((y - x @ w.T).abs() <= bound).all()


@pytest.mark.parametrize("shape", [(4, 0), (0, 4), (0, 0)], ids=str)
def test_zero_size_weights_quantize_and_multiply(shape):
    """A weight with no rows or no columns quantizes (int8 of its shape, scale 0 per row, as an
    all-zero row) and the int8 product equals the float one: the bias alone when K = 0."""
    n, k = shape
    weight = torch.randn(shape)
    q, scale = bloom_kernels.quantize_int8(weight)
    assert q.shape == shape and q.dtype == torch.int8 and torch.equal(scale, torch.zeros(n))
    x, bias = torch.randn(3, k), torch.randn(n)
    torch.testing.assert_close(bloom_kernels.int8_linear(x, q, scale, bias), torch.nn.functional.linear(x, weight, bias))
