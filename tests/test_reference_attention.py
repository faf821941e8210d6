"""reference.alibi_slopes / alibi_attention / alibi_attention_probs and their public wrappers against
INDEPENDENT float64 math (nothing from reference.py builds an expectation): ALiBi slopes from the
paper's rule, and the dense float64 ALiBi attention with an explicit causal/padding mask of
kernel_harness.attention64. The public functions run with BLOOM_KERNELS_BACKEND=reference.
Tolerances: half an ulp of the output dtype relative plus FP32_ATOL absolute (see kernel_harness.py).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import left_padding_mask
from kernel_harness import (HALF_ULP, IMPLS, REFERENCE_DTYPE_IDS, REFERENCE_DTYPES, assert_close64, attention64,
                            impl_of, qkv)

import bloom_kernels
from bloom_kernels import reference

pytestmark = pytest.mark.usefixtures("force_reference")  # public calls run the eager reference

# The fp32 computation error (absolute, on O(1) data as generated here; measured maxima given, each
# bound keeps a margin of >= 5x):
FP32_ATOL = {
    # softmax over <= 17 keys of scores |s| <~ 10, then <= 17-term average of |v| <~ 4: measured 6.4e-7
    "attention": 5e-6,
}


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
@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=REFERENCE_DTYPE_IDS)
@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_alibi_attention_matches_float64(case, dtype, impl):
    batch, heads, q_len, key_len, head_dim, lengths = ATTENTION_CASES[case]
    q, k, v = qkv(batch, heads, q_len, key_len, head_dim, dtype, seed=len(case))
    slopes = torch.tensor(paper_slopes(heads), dtype=torch.float32)
    mask = None if lengths is None else left_padding_mask(key_len, lengths=lengths)
    out = impl_of(impl, "alibi_attention")(q, k, v, slopes, mask)
    rows = check_attention(out, q, k, v, slopes, mask, None, dtype, case)
    if lengths is not None and q_len > 1:
        assert not rows.all(), "the padded case should contain queries without keys"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [0.37, 1.0, 0.0])
def test_alibi_attention_custom_scale(scale, impl):
    q, k, v = qkv(2, 3, 7, 10, 13, torch.float32, seed=3)
    slopes = torch.tensor([0.9, 0.31, 0.055])  # any slopes, not only ALiBi's
    mask = left_padding_mask(10, lengths=[10, 6])
    out = impl_of(impl, "alibi_attention")(q, k, v, slopes, mask, scale)
    check_attention(out, q, k, v, slopes, mask, scale, torch.float32, f"scale={scale}")
    default = impl_of(impl, "alibi_attention")(q, k, v, slopes, mask)
    assert not torch.allclose(out, default), "scale was ignored"


def test_alibi_attention_mask_with_holes():
    """Not just left padding: any 0/1 mask; positions still count the real tokens only."""
    q, k, v = qkv(2, 3, 6, 12, 7, torch.float32, seed=4)
    slopes = torch.tensor(paper_slopes(3), dtype=torch.float32)
    mask = torch.tensor([[1, 1, 0, 1, 0, 0, 1, 1, 1, 0, 1, 1],
                         [0, 0, 1, 1, 1, 0, 1, 0, 1, 1, 1, 0]])
    out = reference.alibi_attention(q, k, v, slopes, mask)
    check_attention(out, q, k, v, slopes, mask, None, torch.float32, "holes")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=REFERENCE_DTYPE_IDS)
def test_alibi_attention_non_contiguous_fused_qkv(dtype, impl):
    """q/k/v as BLOOM makes them: views of one fused (B, S, H, 3, D) tensor, transposed to (B, H, S, D)."""
    batch, seq, heads, head_dim = 2, 9, 12, 11
    g = torch.Generator().manual_seed(5)
    fused = torch.randn(batch, seq, heads, 3, head_dim, generator=g).to(dtype)
    q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    slopes = torch.tensor(paper_slopes(heads), dtype=torch.float32)
    mask = left_padding_mask(seq, lengths=[9, 4])
    out = impl_of(impl, "alibi_attention")(q, k, v, slopes, mask)
    check_attention(out, q, k, v, slopes, mask, None, dtype, "fused qkv views")
    contiguous = impl_of(impl, "alibi_attention")(q.contiguous(), k.contiguous(), v.contiguous(), slopes, mask)
    # same math on other strides: only the fp32 summation order may differ (then the rounding once)
    torch.testing.assert_close(out, contiguous, atol=FP32_ATOL["attention"], rtol=2 * HALF_ULP[dtype])


@pytest.mark.parametrize("impl", IMPLS)
def test_alibi_attention_mask_dtypes_agree(impl):
    q, k, v = qkv(3, 3, 4, 10, 9, torch.float32, seed=6)
    slopes = torch.tensor(paper_slopes(3), dtype=torch.float32)
    mask = left_padding_mask(10, lengths=[10, 5, 2])
    attention = impl_of(impl, "alibi_attention")
    outs = {dt: attention(q, k, v, slopes, mask.to(dt))
            for dt in (torch.bool, torch.int64, torch.int32, torch.float32, torch.float16)}
    check_attention(outs[torch.int64], q, k, v, slopes, mask, None, torch.float32, "int64 mask")
    for dt, out in outs.items():
        assert torch.equal(out, outs[torch.int64]), f"{dt} mask gives different outputs"


@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=REFERENCE_DTYPE_IDS)
@pytest.mark.parametrize("q_len", [7, 3, 1])
def test_alibi_attention_left_padding_is_exact(q_len, dtype):
    """A left-padded row's real tokens get the outputs of the same sequence run alone, unpadded."""
    heads, head_dim, real_len, pad = 5, 12, 7, 6
    q, k, v = qkv(1, heads, q_len, real_len, head_dim, dtype, seed=7 + q_len)
    slopes = torch.tensor(paper_slopes(heads), dtype=torch.float32)
    alone = reference.alibi_attention(q, k, v, slopes)
    # the same row, left padded with `pad` junk tokens, in a batch with a full-length neighbour
    g = torch.Generator().manual_seed(8)
    junk = lambda n: torch.randn(1, heads, n, head_dim, generator=g).to(dtype)  # noqa: E731
    k_pad, v_pad = torch.cat([junk(pad), k], 2), torch.cat([junk(pad), v], 2)
    other_q, other_k, other_v = junk(q_len), junk(pad + real_len), junk(pad + real_len)
    mask = left_padding_mask(pad + real_len, lengths=[real_len, pad + real_len])
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
    q, k, v = qkv(batch, heads, seq, seq, head_dim, torch.float32, seed=9)
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
@pytest.mark.parametrize("dtype", REFERENCE_DTYPES, ids=REFERENCE_DTYPE_IDS)
def test_alibi_attention_probs(dtype, impl):
    q, k, v = qkv(3, 3, 6, 11, 10, dtype, seed=10)
    slopes = torch.tensor(paper_slopes(3), dtype=torch.float32)
    mask = left_padding_mask(11, lengths=[11, 8, 3])
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
    q, k, v = qkv(2, 5, 9, 9, 8, torch.float32, seed=11)
    slopes = torch.tensor(paper_slopes(5), dtype=torch.float32)
    mask = left_padding_mask(9, lengths=[9, 6])
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


@pytest.mark.parametrize("magnitude", [1e10, 1e19, 1e25, 1e37])
@pytest.mark.parametrize("q_len", [9, 1], ids=["prefill", "decode"])
def test_scores_past_fp32_range_give_the_float64_answer(magnitude, q_len):
    """q·k beyond fp32's range (issue 14: |q|, |k| ~ 1e19 and up overflow fp32 scores, and inf - inf is
    NaN) while the softmax is finite: the reference's per-row power-of-two scaling gives float64's
    answer. Probabilities there are ~one-hot, so the output equals float64's to fp32 rounding."""
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, n, 64, generator=g) for n in (q_len, 9, 9))
    q, k = q * magnitude, k * magnitude
    slopes = reference.alibi_slopes(3)
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0
    out = reference.alibi_attention(q, k, v, slopes, mask)
    want = attention64(q, k, v, slopes, mask)[0]
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    probs_out, _ = reference.alibi_attention_probs(q, k, v, slopes, mask)
    torch.testing.assert_close(probs_out.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("magnitude", [1e19, 1e30])
def test_cpu_route_scores_past_fp32_range(magnitude, monkeypatch):
    """The model's fp32 CPU route (SDPA) overflows there; it hands such a call to the reference."""
    from bloom_kernels import unchecked

    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "auto")  # this module forces the reference elsewhere
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 3, n, 64, generator=g) for n in (5, 9, 9))
    q, k = q * magnitude, k * magnitude
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :2] = 0
    inputs = unchecked.prepare_attention(reference.alibi_slopes(3), mask, 2, 5, 9, torch.float32)
    assert inputs.bias is not None  # the SDPA route
    out = unchecked.alibi_attention(q, k, v, inputs, None)
    torch.testing.assert_close(out.double(), attention64(q, k, v, reference.alibi_slopes(3), mask)[0],
                               rtol=1e-5, atol=1e-5)
