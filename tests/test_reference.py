"""The eager reference (bloom_kernels/reference.py) and the public wrappers, against float64 math.

reference.py is the truth every Triton kernel is tested against, so it is itself tested here against
an INDEPENDENT float64 computation written in this file (nothing from reference.py is used to build an
expectation): ALiBi slopes from the paper's rule, a dense float64 ALiBi attention with an explicit
causal/padding mask, the tanh-GeLU formula and its float64 autograd, LayerNorm from mean and biased
variance, absmax int8 quantisation bounds and a float64 dequantised matmul. The public functions
(`bloom_kernels.<op>`) run with BLOOM_KERNELS_BACKEND=reference (autouse fixture below); their argument
checks and the dispatch counter are tested at the end.

Tolerances. Every reference op upcasts to fp32, computes, and rounds ONCE to the output dtype. Against
the exact (float64) result on the same inputs the error is therefore at most
    half an ulp of the output dtype (relative: 2^-(p+1), p = mantissa bits)  +  the fp32 computation's
    own error (absolute, set per op below from the op's accumulation length, with a margin)
so each check is  |ref - exact| <= atol + rtol * |exact|  with rtol = HALF_ULP[dtype] and atol the
op's fp32 error. A wrong constant, a wrong position, a missing mask or a variance off by N/(N-1) is
orders of magnitude above these bounds in fp32 (and above half an ulp in fp16).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import bloom_kernels
from bloom_kernels import _dispatch, reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DTYPE_IDS = ["fp32", "fp16", "bf16"]

# Relative rounding error of one round-to-nearest into the dtype: 2^-(mantissa bits + 1).
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}

# The fp32 computation error of each op (absolute, on O(1) data as generated here), the `atol` above.
# Measured maxima on these shapes are given; each bound keeps a margin of >= 5x.
FP32_ATOL = {
    # softmax over <= 17 keys of scores |s| <~ 10, then <= 17-term average of |v| <~ 4: measured 6.4e-7
    "attention": 5e-6,
    # one tanh and a handful of multiplies per element, a few ulp of fp32 on |y|, |dx| <~ 6:
    # measured 1.8e-7 (y), 5.5e-7 (dx)
    "gelu": 4e-6,
    # dbias sums up to 42 rows of |dh| <~ 3 in fp32 (worst case 42 * 2^-24 * 3 ~ 8e-6): measured 1.2e-6
    "gelu_dbias": 1e-5,
    # mean/var over <= 67 features then one fma on |y| <~ 5: measured 3.7e-7
    "layer_norm": 3e-6,
    # dx involves two 67-term reductions, dweight/dbias sum <= 21 rows: measured 1.6e-6
    "layer_norm_grad": 1e-5,
    # K = 37-term dot products of |x| <~ 3 and |w| <~ 1 in fp32: measured 7.4e-7
    "int8_linear": 5e-6,
}


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, atol: float,
                   what: str = "") -> None:
    """|actual - expected| <= atol + HALF_ULP[dtype] * |expected|, elementwise, in float64."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs()
    bound = atol + HALF_ULP[dtype] * expected.abs()
    bad = err > bound
    if bad.any():
        idx = tuple(i.item() for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} / {err.numel()} elements off; first at {idx}: got "
            f"{actual[idx].item()!r}, expected {expected[idx].item()!r} (bound {bound[idx].item():.3g}); "
            f"max err {err.max().item():.3g}"
        )


@pytest.fixture(autouse=True)
def _reference_backend(force_reference):
    """Every public call in this file runs the eager reference (see tests/conftest.py)."""


IMPLS = ["reference", "public"]


def impl_of(name: str, op: str):
    return getattr(reference if name == "reference" else bloom_kernels, op)


# ==================================================================================================
# ALiBi slopes
# ==================================================================================================
def paper_slopes(n: int) -> list[float]:
    """The ALiBi paper's slopes in float64 math (Press et al. 2021, and their reference code)."""

    def geometric(m: int) -> list[float]:  # power of two m: 2^(-8k/m), k = 1..m
        return [2.0 ** (-8.0 * k / m) for k in range(1, m + 1)]

    p = 1
    while 2 * p <= n:
        p *= 2
    if p == n:
        return geometric(n)
    # the odd-indexed (1st, 3rd, 5th, ...) slopes of the rule for 2p, as many as are missing
    return geometric(p) + geometric(2 * p)[0::2][: n - p]


SLOPE_COUNTS = [1, 2, 3, 5, 8, 12, 16, 24, 32, 64, 112, 113]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("n", SLOPE_COUNTS)
def test_alibi_slopes_match_the_paper(n, impl):
    slopes = impl_of(impl, "alibi_slopes")(n)
    assert slopes.dtype == torch.float32 and slopes.shape == (n,)
    expected = torch.tensor(paper_slopes(n), dtype=torch.float64)
    # slope k is computed as base**k in fp32 with base = 2^(-8/p) rounded to fp32: the base's rounding
    # error (2^-24 relative) is multiplied by k, plus the final rounding.
    p = 2 ** int(math.log2(n))
    k = torch.tensor(list(range(1, p + 1)) + list(range(1, 2 * (n - p), 2)), dtype=torch.float64)
    bound = (k + 2) * 2.0**-24 * expected
    err = (slopes.double() - expected).abs()
    assert (err <= bound).all(), f"max relative error {(err / expected).max().item():.3g}"
    # every slope in (0, 1), strictly decreasing within the first (power-of-two) group
    assert (slopes > 0).all() and (slopes < 1).all()
    assert (slopes[1:p] < slopes[: p - 1]).all()


@pytest.mark.parametrize("n", SLOPE_COUNTS)
def test_alibi_slopes_equal_transformers_bit_for_bit(n):
    modeling_bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    theirs = modeling_bloom._get_alibi_slopes(n, torch.device("cpu"))
    assert torch.equal(reference.alibi_slopes(n), theirs)
    assert torch.equal(bloom_kernels.alibi_slopes(n, "cpu"), theirs)


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "8", None])
def test_alibi_slopes_rejects_bad_head_counts(bad):
    with pytest.raises(ValueError, match="n_head"):
        reference.alibi_slopes(bad)
    with pytest.raises(ValueError, match="n_head"):
        bloom_kernels.alibi_slopes(bad)


# ==================================================================================================
# ALiBi attention
# ==================================================================================================
def attention64(q, k, v, slopes, mask, scale):
    """Dense float64 ALiBi attention. Returns (out (B,H,Sq,D), probs (B,H,Sq,Sk), has_key (B,1,Sq)).

    bias[b,h,i,j] = slopes[h] * pos[b,j], pos = cumsum(mask) - 1 (arange without mask); query i sits at
    absolute position Sk - Sq + i and sees keys j <= Sk - Sq + i that are not padding.
    """
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, q_len, head_dim = q.shape
    key_len = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if mask is None:
        real = torch.ones(batch, key_len, dtype=torch.bool)
        pos = torch.arange(key_len, dtype=torch.float64).expand(batch, key_len)
    else:
        real = mask != 0
        pos = (real.to(torch.float64).cumsum(-1) - 1.0)
    bias = slopes.double().view(1, heads, 1, 1) * pos.view(batch, 1, 1, key_len)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale + bias  # (B, H, Sq, Sk)
    causal = torch.ones(q_len, key_len, dtype=torch.bool).tril(diagonal=key_len - q_len)
    visible = causal.view(1, 1, q_len, key_len) & real.view(batch, 1, 1, key_len)
    has_key = visible.any(-1)  # (B, 1, Sq)
    scores = scores.masked_fill(~visible, -math.inf)
    row_max = torch.where(has_key, scores.amax(-1), torch.zeros(()))[..., None]
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 at hidden keys
    denom = weights.sum(-1, keepdim=True)
    probs = torch.where(denom > 0, weights / torch.where(denom > 0, denom, 1.0), 0.0)
    return probs @ v, probs, has_key


def left_padding_mask(lengths, key_len, dtype=torch.int64):
    mask = torch.zeros(len(lengths), key_len, dtype=dtype)
    for b, n in enumerate(lengths):
        mask[b, key_len - n:] = 1
    return mask


def make_qkv(batch, heads, q_len, key_len, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, q_len, head_dim, generator=g).to(dtype)
    k = torch.randn(batch, heads, key_len, head_dim, generator=g).to(dtype)
    v = torch.randn(batch, heads, key_len, head_dim, generator=g).to(dtype)
    return q, k, v


def check_attention(out, q, k, v, slopes, mask, scale, dtype, what):
    expected, _, has_key = attention64(q, k, v, slopes, mask, scale)
    rows = has_key.expand(out.shape[:3])  # (B, H, Sq): compare only queries that see a key
    assert out.dtype == dtype and out.shape == q.shape
    assert_close64(out[rows], expected[rows], dtype, FP32_ATOL["attention"], what)
    # queries that see no key at all (padded queries under left padding) are exactly zero
    assert (out[~rows] == 0).all(), f"{what}: rows without a visible key are not zero"
    return rows


# (batch, heads, Sq, Sk, head_dim, lengths of the real tokens per row or None)
ATTENTION_CASES = {
    "square": (2, 12, 11, 11, 24, None),
    "heads3_odd_dim": (3, 3, 9, 9, 13, None),
    "chunked_prefill": (2, 5, 5, 13, 16, None),
    "decode": (3, 12, 1, 17, 8, None),
    "left_padded": (3, 3, 11, 11, 13, [11, 7, 2]),
    "left_padded_prefill": (3, 5, 5, 13, 9, [13, 10, 3]),
    "left_padded_decode": (3, 12, 1, 17, 8, [17, 1, 9]),
}


# Note: under LEFT padding the ALiBi positions of a row are only shifted by a per-row constant
# (cumsum(mask) - 1 = j - n_pad), which softmax ignores; the mask-with-holes test below is the one that
# pins positions to cumsum(mask) - 1 rather than arange(Sk).
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_alibi_attention_matches_float64(case, dtype, impl):
    batch, heads, q_len, key_len, head_dim, lengths = ATTENTION_CASES[case]
    q, k, v = make_qkv(batch, heads, q_len, key_len, head_dim, dtype, seed=len(case))
    slopes = torch.tensor(paper_slopes(heads), dtype=torch.float32)
    mask = None if lengths is None else left_padding_mask(lengths, key_len)
    out = impl_of(impl, "alibi_attention")(q, k, v, slopes, mask)
    rows = check_attention(out, q, k, v, slopes, mask, None, dtype, case)
    if lengths is not None and q_len > 1:
        assert not rows.all(), "the padded case should contain queries without keys"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [0.37, 1.0, 0.0])
def test_alibi_attention_custom_scale(scale, impl):
    q, k, v = make_qkv(2, 3, 7, 10, 13, torch.float32, seed=3)
    slopes = torch.tensor([0.9, 0.31, 0.055])  # any slopes, not only ALiBi's
    mask = left_padding_mask([10, 6], 10)
    out = impl_of(impl, "alibi_attention")(q, k, v, slopes, mask, scale)
    check_attention(out, q, k, v, slopes, mask, scale, torch.float32, f"scale={scale}")
    default = impl_of(impl, "alibi_attention")(q, k, v, slopes, mask)
    assert not torch.allclose(out, default), "scale was ignored"


def test_alibi_attention_mask_with_holes():
    """Not just left padding: any 0/1 mask; positions still count the real tokens only."""
    q, k, v = make_qkv(2, 3, 6, 12, 7, torch.float32, seed=4)
    slopes = torch.tensor(paper_slopes(3), dtype=torch.float32)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1],
                         [0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 1, 0]])
    out = reference.alibi_attention(q, k, v, slopes, mask)
    check_attention(out, q, k, v, slopes, mask, None, torch.float32, "holes")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_alibi_attention_non_contiguous_fused_qkv(dtype, impl):
    """q/k/v as BLOOM makes them: views of one fused (B, S, H, 3, D) tensor, transposed to (B, H, S, D)."""
    batch, seq, heads, head_dim = 2, 9, 12, 11
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(batch, seq, heads, 3, head_dim, generator=g).to(dtype)
    q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    slopes = torch.tensor(paper_slopes(heads), dtype=torch.float32)
    mask = left_padding_mask([9, 4], seq)
    out = impl_of(impl, "alibi_attention")(q, k, v, slopes, mask)
    check_attention(out, q, k, v, slopes, mask, None, dtype, "fused qkv views")
    contiguous = impl_of(impl, "alibi_attention")(q.contiguous(), k.contiguous(), v.contiguous(), slopes, mask)
    # same math on other strides: only the fp32 summation order may differ (then the rounding once)
    torch.testing.assert_close(out, contiguous, atol=FP32_ATOL["attention"], rtol=2 * HALF_ULP[dtype])


@pytest.mark.parametrize("impl", IMPLS)
def test_alibi_attention_mask_dtypes_agree(impl):
    q, k, v = make_qkv(3, 3, 4, 10, 9, torch.float32, seed=6)
    slopes = torch.tensor(paper_slopes(3), dtype=torch.float32)
    mask = left_padding_mask([10, 5, 2], 10)
    attention = impl_of(impl, "alibi_attention")
    outs = {dt: attention(q, k, v, slopes, mask.to(dt))
            for dt in (torch.bool, torch.int64, torch.int32, torch.float32, torch.float16)}
    check_attention(outs[torch.int64], q, k, v, slopes, mask, None, torch.float32, "int64 mask")
    for dt, out in outs.items():
        assert torch.equal(out, outs[torch.int64]), f"{dt} mask gives different outputs"


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("q_len", [7, 3, 1])
def test_alibi_attention_left_padding_is_exact(q_len, dtype):
    """A left-padded row's real tokens get the outputs of the same sequence run alone, unpadded."""
    heads, head_dim, real_len, pad = 5, 12, 7, 6
    q, k, v = make_qkv(1, heads, q_len, real_len, head_dim, dtype, seed=7 + q_len)
    slopes = torch.tensor(paper_slopes(heads), dtype=torch.float32)
    alone = reference.alibi_attention(q, k, v, slopes)
    # the same row, left padded with `pad` junk tokens, in a batch with a full-length neighbour
    g = torch.Generator().manual_seed(8)
    junk = lambda n: torch.randn(1, heads, n, head_dim, generator=g).to(dtype)  # noqa: E731
    k_pad, v_pad = torch.cat([junk(pad), k], 2), torch.cat([junk(pad), v], 2)
    other_q, other_k, other_v = junk(q_len), junk(pad + real_len), junk(pad + real_len)
    mask = left_padding_mask([real_len, pad + real_len], pad + real_len)
    padded = reference.alibi_attention(torch.cat([q, other_q]), torch.cat([k_pad, other_k]),
                                       torch.cat([v_pad, other_v]), slopes, mask)
    # The math is the same; only the fp32 summation order (a few extra zero terms, other blocking)
    # may differ, which can move the single rounding to `dtype` by one ulp (2 * HALF_ULP relative).
    torch.testing.assert_close(padded[:1], alone, atol=FP32_ATOL["attention"], rtol=2 * HALF_ULP[dtype],
                               msg="left padding changed the outputs of the real tokens")


def test_alibi_attention_matches_transformers_eager():
    """transformers' eager BLOOM attention math: build_alibi_tensor + baddbmm + additive causal mask."""
    modeling_bloom = pytest.importorskip("transformers.models.bloom.modeling_bloom")
    batch, heads, seq, head_dim = 2, 12, 13, 16
    q, k, v = make_qkv(batch, heads, seq, seq, head_dim, torch.float32, seed=9)
    mask = torch.ones(batch, seq, dtype=torch.int64)
    alibi = modeling_bloom.build_alibi_tensor(mask, heads, torch.float32)  # (B*H, 1, S)
    scores = alibi.baddbmm(q.reshape(batch * heads, seq, head_dim),
                           k.reshape(batch * heads, seq, head_dim).transpose(1, 2),
                           beta=1.0, alpha=1.0 / math.sqrt(head_dim)).view(batch, heads, seq, seq)
    causal = torch.full((seq, seq), torch.finfo(torch.float32).min).triu(1)
    probs = F.softmax(scores + causal, dim=-1, dtype=torch.float32)
    theirs = (probs.view(batch * heads, seq, seq) @ v.reshape(batch * heads, seq, head_dim)).view(q.shape)
    slopes = modeling_bloom._get_alibi_slopes(heads, torch.device("cpu"))
    ours = reference.alibi_attention(q, k, v, slopes)
    torch.testing.assert_close(ours, theirs, atol=FP32_ATOL["attention"], rtol=1e-5)


# ==================================================================================================
# alibi_attention_probs
# ==================================================================================================
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_alibi_attention_probs(dtype, impl):
    q, k, v = make_qkv(3, 3, 6, 11, 10, dtype, seed=10)
    slopes = torch.tensor(paper_slopes(3), dtype=torch.float32)
    mask = left_padding_mask([11, 8, 3], 11)
    out, probs = impl_of(impl, "alibi_attention_probs")(q, k, v, slopes, mask)
    exp_out, exp_probs, has_key = attention64(q, k, v, slopes, mask, None)
    rows = has_key.expand(3, 3, 6)
    assert probs.shape == (3, 3, 6, 11) and probs.dtype == dtype
    assert_close64(probs, exp_probs, dtype, FP32_ATOL["attention"], "probs")
    # each row sums to 1 (up to the rounding of each of its <= 11 entries), rows without keys are 0
    sums = probs.double().sum(-1)
    torch.testing.assert_close(sums[rows], torch.ones_like(sums[rows]), atol=11 * HALF_ULP[dtype] + 1e-6, rtol=0)
    assert (probs[~rows] == 0).all()
    # hidden keys (future or padding) get exactly zero weight
    assert (probs[exp_probs == 0] == 0).all()
    # the output is the attention output; the probabilities are rounded to `dtype` before the matmul,
    # so in fp16/bf16 it may differ from alibi_attention by the rounding of the weights (<= half an ulp
    # each, times sum |v| over the keys).
    assert_close64(out[rows], exp_out[rows], dtype,
                   FP32_ATOL["attention"] + HALF_ULP[dtype] * v.double().abs().sum(2).max().item(), "out")
    plain = reference.alibi_attention(q, k, v, slopes, mask)
    if dtype == torch.float32:
        assert torch.equal(out, plain)


def test_alibi_attention_probs_dropout():
    q, k, v = make_qkv(2, 5, 9, 9, 8, torch.float32, seed=11)
    slopes = torch.tensor(paper_slopes(5), dtype=torch.float32)
    mask = left_padding_mask([9, 6], 9)
    p = 0.3
    run = lambda dropout_p: reference.alibi_attention_probs(q, k, v, slopes, mask, dropout_p=dropout_p)  # noqa: E731

    # dropout_p = 0 is exact: the probabilities and output of the plain op
    out0, probs0 = run(0.0)
    assert torch.equal(out0, reference.alibi_attention(q, k, v, slopes, mask))
    out0_public, _ = bloom_kernels.alibi_attention_probs(q, k, v, slopes, mask, dropout_p=0.0)
    assert torch.equal(out0_public, out0)

    torch.manual_seed(1234)
    out1, probs1 = run(p)
    torch.manual_seed(1234)
    out2, probs2 = run(p)
    assert torch.equal(probs1, probs2) and torch.equal(out1, out2), "same seed, different dropout"
    torch.manual_seed(1234)
    out_public, probs_public = bloom_kernels.alibi_attention_probs(q, k, v, slopes, mask, dropout_p=p)
    assert torch.equal(probs_public, probs1)

    positive = probs0 > 0
    dropped = positive & (probs1 == 0)
    kept = positive & (probs1 != 0)
    frac = dropped.sum().item() / positive.sum().item()
    assert 0.2 < frac < 0.4, f"dropped {frac:.2f} of the weights with p={p}"
    torch.testing.assert_close(probs1[kept], probs0[kept] / (1 - p), atol=0, rtol=2e-7)
    assert (probs1[~positive] == 0).all()
    # the output uses the dropped-out weights
    torch.testing.assert_close(out1.double(), probs1.double() @ v.double(), atol=FP32_ATOL["attention"], rtol=1e-6)
    assert not torch.allclose(out1, out0)
    # same RNG call as transformers' nn.Dropout on the probabilities: same entries dropped
    torch.manual_seed(1234)
    theirs = torch.nn.Dropout(p).train()(probs0)
    assert torch.equal(theirs, probs1)


# ==================================================================================================
# bias + GeLU
# ==================================================================================================
def gelu64(h):
    return h * 0.5 * (1.0 + torch.tanh(0.79788456 * h * (1.0 + 0.044715 * h * h)))


GELU_SHAPES = [(3, 5, 37), (2, 7, 3, 19), (41,)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
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


# ==================================================================================================
# (residual +) LayerNorm
# ==================================================================================================
def layer_norm64(h, weight, bias, eps):
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)  # biased variance
    return (h - mean) / torch.sqrt(var + eps) * weight + bias


LN_SHAPES = [(3, 7, 67), (21, 67), (2, 3, 2, 33)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
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
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
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
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
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


# ==================================================================================================
# linear (F.linear; a batched-matmul route on the CPU for skinny inputs against large weights)
# ==================================================================================================
@pytest.mark.parametrize("out_features, route", [(16388, "bmm"), (16386, "bmm"), (16385, "F.linear"),
                                                 (300, "F.linear")])
@pytest.mark.parametrize("x_shape", [(1, 64), (2, 3, 64), (17, 64)], ids=str)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_matches_float64_on_both_routes(out_features, route, x_shape, with_bias, impl, monkeypatch):
    g = torch.Generator().manual_seed(out_features)
    w = torch.randn(out_features, 64, generator=g)
    b = torch.randn(out_features, generator=g) if with_bias else None
    x = torch.randn(*x_shape, generator=g)
    used = []
    for name in ("bmm", "baddbmm"):
        real = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _real=real, **k: used.append(1) or _real(*a, **k))
    y = impl_of(impl, "linear")(x, w, b)
    expected = x.double() @ w.double().T + (b.double() if b is not None else 0)
    assert y.shape == (*x_shape[:-1], out_features) and y.is_contiguous()
    # fp32 dot products of length 64 with |terms| ~ 1: a few 1e-6 of rounding
    torch.testing.assert_close(y.double(), expected, atol=2e-5, rtol=1e-5)
    skinny = x.numel() // 64 <= reference.SKINNY_MAX_ROWS and w.numel() >= reference.SKINNY_MIN_WEIGHT
    assert bool(used) == (route == "bmm" and skinny)


def test_linear_gradients_on_the_bmm_route():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(16388, 64, generator=g, dtype=torch.float64).float().requires_grad_()
    b = torch.randn(16388, generator=g).requires_grad_()
    x = torch.randn(2, 64, generator=g).requires_grad_()
    dy = torch.randn(2, 16388, generator=g)
    reference.linear(x, w, b).backward(dy)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    F.linear(xd, wd, bd).backward(dy.double())
    # x.grad sums 16388 fp32 products (|x.grad| ~ 1e2): fp32 accumulation error ~1e-4 relative
    for got, want in ((x.grad, xd.grad), (w.grad, wd.grad), (b.grad, bd.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-3, rtol=1e-4)


# ==================================================================================================
# public wrappers: argument checks, backend switch, dispatch counter
# ==================================================================================================
def _attn_args(**over):
    q, k, v = make_qkv(2, 3, 4, 6, 5, torch.float32, seed=18)
    args = dict(q=q, k=k, v=v, slopes=torch.rand(3), attention_mask=torch.ones(2, 6, dtype=torch.int64),
                scale=None)
    args.update(over)
    return args


def _f(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


W_INT8 = torch.randint(-127, 128, (4, 7), dtype=torch.int8)

# (call, exception, message pattern naming the argument)
BAD_CALLS = {
    # wrong dtype -> TypeError naming the argument
    "attn_q_int": (lambda: bloom_kernels.alibi_attention(**_attn_args(q=torch.ones(2, 3, 4, 5, dtype=torch.int64))),
                   TypeError, r"\bq\b"),
    "attn_k_int": (lambda: bloom_kernels.alibi_attention(**_attn_args(k=torch.ones(2, 3, 6, 5, dtype=torch.int32))),
                   TypeError, r"\bk\b"),
    "attn_dtype_mix": (lambda: bloom_kernels.alibi_attention(**_attn_args(v=_f(2, 3, 6, 5, dtype=torch.float16))),
                       TypeError, r"\bv torch.float16"),
    "attn_scale_str": (lambda: bloom_kernels.alibi_attention(**_attn_args(scale="0.5")), TypeError, r"scale"),
    "attn_q_not_tensor": (lambda: bloom_kernels.alibi_attention(**_attn_args(q=[[1.0]])), TypeError, r"\bq\b"),
    "probs_q_int": (lambda: bloom_kernels.alibi_attention_probs(**_attn_args(q=torch.ones(2, 3, 4, 5, dtype=torch.int64))),
                    TypeError, r"\bq\b"),
    "gelu_x_int": (lambda: bloom_kernels.bias_gelu(torch.ones(3, 5, dtype=torch.int64), _f(5)), TypeError, r"\bx\b"),
    "gelu_bias_int": (lambda: bloom_kernels.bias_gelu(_f(3, 5), torch.ones(5, dtype=torch.int64)),
                      TypeError, r"\bbias\b"),
    "ln_weight_int": (lambda: bloom_kernels.layer_norm(_f(3, 5), torch.ones(5, dtype=torch.int64), _f(5)),
                      TypeError, r"\bweight\b"),
    "ln_residual_int": (lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5), 1e-5, torch.ones(3, 5, dtype=torch.int64)),
                        TypeError, r"\bresidual\b"),
    "quant_weight_int": (lambda: bloom_kernels.quantize_int8(torch.ones(3, 5, dtype=torch.int64)),
                         TypeError, r"\bweight\b"),
    "int8_x_int": (lambda: bloom_kernels.int8_linear(torch.ones(2, 7, dtype=torch.int64), W_INT8, torch.rand(4)),
                   TypeError, r"\bx\b"),
    "int8_weight_float": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8.float(), torch.rand(4)),
                          TypeError, r"\bweight_int8\b.*int8"),
    "int8_weight_uint8": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8.to(torch.uint8), torch.rand(4)),
                          TypeError, r"\bweight_int8\b"),
    "int8_scale_int": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.ones(4, dtype=torch.int64)),
                       TypeError, r"\bscale\b"),
    # wrong shapes -> ValueError naming the argument
    "attn_q_3d": (lambda: bloom_kernels.alibi_attention(**_attn_args(q=_f(3, 4, 5))), ValueError, r"\bq\b"),
    "attn_slopes_len": (lambda: bloom_kernels.alibi_attention(**_attn_args(slopes=torch.rand(4))),
                        ValueError, r"\bslopes\b"),
    "attn_mask_shape": (lambda: bloom_kernels.alibi_attention(**_attn_args(attention_mask=torch.ones(2, 5))),
                        ValueError, r"\battention_mask\b"),
    "attn_mask_3d": (lambda: bloom_kernels.alibi_attention(**_attn_args(attention_mask=torch.ones(2, 1, 6))),
                     ValueError, r"\battention_mask\b"),
    "attn_sq_gt_sk": (lambda: bloom_kernels.alibi_attention(**_attn_args(q=_f(2, 3, 7, 5))), ValueError, r"Sq must be <= Sk"),
    "attn_kv_len": (lambda: bloom_kernels.alibi_attention(**_attn_args(v=_f(2, 3, 5, 5))), ValueError, r"\bv\b"),
    "attn_k_heads": (lambda: bloom_kernels.alibi_attention(**_attn_args(k=_f(2, 2, 6, 5))), ValueError, r"\bk\b"),
    "attn_k_dim": (lambda: bloom_kernels.alibi_attention(**_attn_args(k=_f(2, 3, 6, 4))), ValueError, r"\bk\b"),
    "probs_slopes_len": (lambda: bloom_kernels.alibi_attention_probs(**_attn_args(slopes=torch.rand(2))),
                         ValueError, r"\bslopes\b"),
    "gelu_bias_len": (lambda: bloom_kernels.bias_gelu(_f(3, 5), _f(6)), ValueError, r"\bbias\b"),
    "gelu_bias_2d": (lambda: bloom_kernels.bias_gelu(_f(3, 5), _f(3, 5)), ValueError, r"\bbias\b"),
    "ln_weight_len": (lambda: bloom_kernels.layer_norm(_f(3, 5), _f(4), _f(5)), ValueError, r"\bweight\b"),
    "ln_bias_len": (lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(6)), ValueError, r"\bbias\b"),
    "ln_residual_shape": (lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5), 1e-5, _f(2, 5)),
                          ValueError, r"\bresidual\b"),
    "quant_weight_3d": (lambda: bloom_kernels.quantize_int8(_f(2, 3, 5)), ValueError, r"\bweight\b"),
    "int8_x_last_dim": (lambda: bloom_kernels.int8_linear(_f(2, 6), W_INT8, torch.rand(4)), ValueError, r"\bx\b"),
    "int8_weight_1d": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8[0], torch.rand(4)),
                       ValueError, r"\bweight_int8\b"),
    "int8_scale_len": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.rand(5)), ValueError, r"\bscale\b"),
    "int8_bias_len": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.rand(4), _f(3)),
                      ValueError, r"\bbias\b"),
    # tensors on different devices (meta vs cpu: the check runs before any computation)
    "attn_device": (lambda: bloom_kernels.alibi_attention(**_attn_args(slopes=torch.rand(3, device="meta"))),
                    ValueError, r"slopes on meta"),
    "attn_mask_device": (lambda: bloom_kernels.alibi_attention(
        **_attn_args(attention_mask=torch.ones(2, 6, device="meta"))), ValueError, r"attention_mask on meta"),
    "gelu_device": (lambda: bloom_kernels.bias_gelu(_f(3, 5), torch.rand(5, device="meta")), ValueError, r"bias on meta"),
    "ln_device": (lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5), 1e-5, torch.rand(3, 5, device="meta")),
                  ValueError, r"residual on meta"),
    "int8_device": (lambda: bloom_kernels.int8_linear(torch.rand(2, 7, device="meta"), W_INT8, torch.rand(4)),
                    ValueError, r"x on meta"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_public_ops_reject_bad_arguments(case):
    call, exc, pattern = BAD_CALLS[case]
    with pytest.raises(exc, match=pattern):
        call()


def test_public_ops_accept_the_good_version_of_the_bad_calls():
    """The bad calls above differ from these in one argument only: the good ones must run."""
    bloom_kernels.alibi_attention(**_attn_args())
    bloom_kernels.alibi_attention_probs(**_attn_args())
    bloom_kernels.bias_gelu(_f(3, 5), _f(5))
    bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5), 1e-5, _f(3, 5))
    bloom_kernels.quantize_int8(_f(3, 5))
    bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.rand(4), _f(4))


@pytest.mark.parametrize("bogus", ["bogus", "cuda", "tritonn"])
def test_bogus_backend_is_an_error_naming_the_variable(monkeypatch, bogus):
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", bogus)
    calls = [
        lambda: bloom_kernels.alibi_attention(**_attn_args()),
        lambda: bloom_kernels.bias_gelu(_f(3, 5), _f(5)),
        lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5)),
        lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.rand(4)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=rf"BLOOM_KERNELS_BACKEND.*{bogus}"):
            call()


DISPATCHED = {
    "alibi_attention": lambda: bloom_kernels.alibi_attention(**_attn_args()),
    "bias_gelu": lambda: bloom_kernels.bias_gelu(_f(3, 5), _f(5)),
    "layer_norm": lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5)),
    "int8_linear": lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.rand(4)),
}


@pytest.mark.parametrize("op", list(DISPATCHED))
def test_reference_backend_is_counted_and_bit_identical(op, monkeypatch):
    before = dict(_dispatch.dispatch_counts)
    args_holder = {}

    real = getattr(reference, op)

    def spy(*args, **kwargs):
        args_holder["args"], args_holder["kwargs"] = args, kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, op, spy)
    out = DISPATCHED[op]()
    assert _dispatch.dispatch_counts[(op, "reference")] == before.get((op, "reference"), 0) + 1
    assert _dispatch.dispatch_counts[(op, "triton")] == before.get((op, "triton"), 0)
    assert "args" in args_holder, f"{op} did not run reference.{op}"
    torch.testing.assert_close(out, real(*args_holder["args"], **args_holder["kwargs"]), atol=0, rtol=0)
