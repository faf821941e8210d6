"""Padding never leaks: NaN or inf stored in the key or value of a padded position (mask 0) must not
reach any real position's output or gradient, on every attention path: the reference, the CPU SDPA
route of a model forward, and the Triton kernels (prefill forward, split-KV decode, backward; in the
interpreter on a CPU). The answer is the same call with zeros at the padded positions (what a padded
key contributes: nothing), itself checked against float64 in test_attention.py."""

import pytest
import torch

import bloom_kernels as bk
from bloom_kernels import reference, unchecked
from helpers import KERNEL_DEVICE, left_padding_mask
from kernel_harness import qkv

pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

POISONS = [float("nan"), float("inf"), float("-inf")]


def _poisoned_case(q_len, k_len, pads, poison, dtype=torch.float32, device=KERNEL_DEVICE, seed=0):
    """(q, k, v, slopes, mask, k_poisoned, v_poisoned): padded keys of k/v hold `poison`."""
    q, k, v = qkv(len(pads), 2, q_len, k_len, 64, dtype, seed, device=device)
    mask = left_padding_mask(k_len, pads=pads, device=device)
    padded = (mask == 0)[:, None, :, None]
    k0, v0 = k.masked_fill(padded, 0.0), v.masked_fill(padded, 0.0)
    kp, vp = k.masked_fill(padded, poison), v.masked_fill(padded, poison)
    return q, k0, v0, bk.alibi_slopes(2, device=device), mask, kp, vp


def _real_rows(out, mask, q_len):
    """The outputs of queries at real (not padded) positions."""
    real = mask[:, -q_len:].bool()
    return out.transpose(1, 2)[real]  # (real queries, H, D)


def _forward_and_grads(fn, q, k, v, slopes, mask):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = fn(q, k, v, slopes, mask)
    g = torch.Generator(device="cpu").manual_seed(1)
    (out.float() * torch.randn(out.shape, generator=g).to(out.device)).sum().backward()
    return out.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("poison", POISONS, ids=str)
def test_reference_ignores_poisoned_padding(poison):
    q, k0, v0, slopes, mask, kp, vp = _poisoned_case(9, 9, [0, 3, 6], poison, device="cpu")
    clean = _forward_and_grads(reference.alibi_attention, q, k0, v0, slopes, mask)
    dirty = _forward_and_grads(reference.alibi_attention, q, kp, vp, slopes, mask)
    torch.testing.assert_close(_real_rows(dirty[0], mask, 9), _real_rows(clean[0], mask, 9), rtol=0, atol=0)
    for got, want in zip(dirty[1:], clean[1:]):  # dq, dk, dv: finite everywhere, equal
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    out_p, _ = reference.alibi_attention_probs(q, kp, vp, slopes, mask)
    torch.testing.assert_close(_real_rows(out_p, mask, 9), _real_rows(clean[0], mask, 9), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("poison", POISONS, ids=str)
@pytest.mark.parametrize("q_len", [7, 1], ids=["prefill", "decode"])
def test_cpu_route_ignores_poisoned_padding(poison, q_len):
    """The model's CPU attention (SDPA with the prepared ALiBi bias), fp32."""
    q, k0, v0, slopes, mask, kp, vp = _poisoned_case(q_len, 7, [0, 2, 5], poison, device="cpu")
    inputs = unchecked.prepare_attention(slopes, mask, 3, q_len, 7, torch.float32)
    assert inputs.bias is not None  # the SDPA route, not the reference
    clean = unchecked.alibi_attention(q, k0, v0, inputs, None)
    dirty = unchecked.alibi_attention(q, kp, vp, inputs, None)
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)
    # a query with no visible key that holds NaN itself gives 0, not NaN
    if q_len == 7:
        q_nan = q.clone()
        q_nan[2, :, 0] = float("nan")  # row 2 is padded at position 0
        assert torch.equal(unchecked.alibi_attention(q_nan, k0, v0, inputs, None)[2, :, 0],
                           torch.zeros_like(q[2, :, 0]))


@pytest.mark.parametrize("poison", POISONS, ids=str)
@pytest.mark.parametrize("q_len, k_len, grads", [(70, 70, True), (5, 70, True), (1, 130, False)],
                         ids=["prefill", "chunk", "decode"])
def test_triton_ignores_poisoned_padding(force_triton, poisoned, poison, q_len, k_len, grads):
    """Forward (prefill and split-KV decode) and the backward kernels (dQ, dK/dV)."""
    pads = [0, 9, 40]
    q, k0, v0, slopes, mask, kp, vp = _poisoned_case(q_len, k_len, pads, poison)
    if grads:
        clean = _forward_and_grads(bk.alibi_attention, q, k0, v0, slopes, mask)
        dirty = _forward_and_grads(bk.alibi_attention, q, kp, vp, slopes, mask)
    else:
        clean, dirty = (bk.alibi_attention(q, k0, v0, slopes, mask),), (bk.alibi_attention(q, kp, vp, slopes, mask),)
    torch.testing.assert_close(_real_rows(dirty[0], mask, q_len), _real_rows(clean[0], mask, q_len),
                               rtol=0, atol=0)
    for got, want in zip(dirty[1:], clean[1:]):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_model_forward_with_nan_in_padded_cache_slots():
    """End to end: a left-padded batch whose padded positions' hidden states are NaN (an fp16 overflow
    at a pad token, say) still gives the real tokens the logits of the unpadded rows."""
    from bloom import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    # untied: the pad row of the embedding is poisoned, not the pad token's logit
    model = BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=32, n_layer=2, n_head=4,
                                         tie_word_embeddings=False)).eval()
    ids = torch.randint(4, 50, (2, 6))
    mask = left_padding_mask(6, pads=[0, 3])
    clean = model(ids, attention_mask=mask).logits
    with torch.no_grad():
        model.transformer.word_embeddings.weight[3] = float("nan")  # the pad id's embedding
    ids_padded = ids.clone()
    ids_padded[1, :3] = 3
    dirty = model(ids_padded, attention_mask=mask).logits
    real = mask.bool()
    assert torch.isfinite(dirty[real]).all()
    torch.testing.assert_close(dirty[real], clean[real], rtol=1e-5, atol=1e-5)


def _nan_pad_model():
    from bloom import BloomConfig, BloomForCausalLM

    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=50, hidden_size=32, n_layer=2, n_head=4,
                                        tie_word_embeddings=False)).eval()


def test_model_step_with_nan_in_a_given_cache_padded_slots():
    """past_key_values from outside (transformers' tuples) may hold anything at padded slots: the CPU
    route masks them at every read, since the model did not write them."""
    model = _nan_pad_model()
    ids = torch.randint(4, 50, (2, 6))
    mask = left_padding_mask(6, pads=[0, 3])
    with torch.no_grad():
        past = model(ids, attention_mask=mask, use_cache=True).past_key_values.to_legacy_cache()
        poisoned = tuple((k.clone(), v.clone()) for k, v in past)
        for key, value in poisoned:  # legacy layout: key (B*H, D, L), value (B*H, L, D); row 1 padded at 0..2
            key.view(2, 4, 8, 6)[1, :, :, :3] = float("nan")
            value.view(2, 4, 6, 8)[1, :, :3] = float("inf")
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        nxt = torch.randint(4, 50, (2, 1))
        clean = model(nxt, attention_mask=step_mask, past_key_values=past).logits
        dirty = model(nxt, attention_mask=step_mask, past_key_values=poisoned).logits
    assert torch.isfinite(dirty).all()
    torch.testing.assert_close(dirty, clean, rtol=0, atol=0)


def test_generate_with_nan_at_padded_positions():
    """generate's static decode step over a left-padded batch whose pad token's hidden states are NaN:
    the model stores padded keys/values as zeros, so the tokens equal those of a clean pad embedding."""
    model = _nan_pad_model()
    ids = torch.randint(4, 50, (2, 6))
    ids[1, :3] = 3
    mask = left_padding_mask(6, pads=[0, 3])
    clean = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=[])
    with torch.no_grad():
        model.transformer.word_embeddings.weight[3] = float("nan")
    dirty = model.generate(ids, attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=[])
    assert torch.equal(dirty, clean)


def test_cpu_route_masks_only_new_keys_over_a_zeroed_cache():
    """Over a cache whose padded slots the model zeroed, the CPU route does not copy the cached K/V in
    every layer (it used to: ~2 ms a step at bloom-560m batch 1): only the new keys' padding is kept."""
    slopes = torch.rand(4)
    mask = left_padding_mask(7, pads=[0, 2, 5])
    fresh = unchecked.prepare_attention(slopes, mask, 3, 1, 7, torch.float32)
    zeroed = unchecked.prepare_attention(slopes, mask, 3, 1, 7, torch.float32, cached_padding_zeroed=True)
    assert fresh.padded_keys is not None and zeroed.padded_keys is None
    for inputs in (fresh, zeroed):
        assert torch.equal(inputs.padded_new, (mask[:, -1:] == 0)[:, None, :, None])
    at = torch.tensor([1])
    static = unchecked.prepare_attention(slopes, mask, 3, 1, 7, torch.float32, new_slots=at)
    assert torch.equal(static.padded_new, (mask[:, 1:2] == 0)[:, None, :, None])
