"""bloom.flax against the PyTorch model on the same weights (CPU, jax's CPU build).

Tolerances: fp32 outputs within 1e-5 (both sides compute in fp32; only the summation order differs).
bf16: the Flax model's error against the fp32 model is at most 2x (+ a small floor) the PyTorch bf16
model's own error against it, both measured on the same inputs (the rule of tests/test_attention.py:
a tolerance that adapts to the dtype instead of a magic number).
"""

import subprocess
import sys

import numpy as np
import pytest

jax = pytest.importorskip("jax")
pytest.importorskip("flax")

import jax.numpy as jnp  # noqa: E402
import torch  # noqa: E402

import bloom  # noqa: E402
from bloom.flax import FlaxBloomForCausalLM, FlaxBloomModel  # noqa: E402
from bloom.flax.generation import TRACE_COUNTS  # noqa: E402

FP32_ATOL = 1e-5

CONFIGS = {
    # 6 heads: not a power of two (the interleaved ALiBi slopes)
    "heads6": dict(vocab_size=120, hidden_size=48, n_layer=2, n_head=6),
    # transformers' post-LN residual, and an untied lm_head
    "post_ln_untied": dict(vocab_size=96, hidden_size=32, n_layer=3, n_head=4,
                           apply_residual_connection_post_layernorm=True, tie_word_embeddings=False),
}


def torch_model(config: dict, seed: int = 0, noise: float = 0.2) -> bloom.BloomForCausalLM:
    """A random PyTorch model with noise on every parameter (LayerNorms and biases not identity)."""
    torch.manual_seed(seed)
    model = bloom.BloomForCausalLM(bloom.BloomConfig(**config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(noise * torch.randn_like(p))
    return model


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    """(PyTorch model, Flax model loaded from its save_pretrained directory, that directory)."""
    pt = torch_model(CONFIGS[request.param])
    path = tmp_path_factory.mktemp(request.param)
    pt.save_pretrained(path)
    return pt, FlaxBloomForCausalLM.from_pretrained(path), path


@pytest.fixture(scope="module")
def heads6(tmp_path_factory):
    pt = torch_model(CONFIGS["heads6"])
    path = tmp_path_factory.mktemp("heads6_single")
    pt.save_pretrained(path)
    return pt, FlaxBloomForCausalLM.from_pretrained(path), path


def left_padded_batch(vocab: int, batch: int = 3, seq: int = 9, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, seq), generator=gen)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    return ids, mask


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, dtype=np.float32) - np.asarray(b, dtype=np.float32))))


# --------------------------------------------------------------------------------------------------
# The optional extra stays optional
# --------------------------------------------------------------------------------------------------
def test_importing_bloom_does_not_import_jax():
    code = "import bloom, sys; assert 'jax' not in sys.modules and 'flax' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------------------------------
# Same weights, same numbers
# --------------------------------------------------------------------------------------------------
def test_logits_hidden_states_attentions_match_pytorch(pair):
    pt, fx, _ = pair
    ids, mask = left_padded_batch(pt.config.vocab_size)
    with torch.no_grad():
        ref = pt(ids, attention_mask=mask, output_hidden_states=True, output_attentions=True)
    out = fx(ids.numpy(), mask.numpy(), output_hidden_states=True, output_attentions=True)
    assert out.logits.shape == tuple(ref.logits.shape)
    assert max_diff(out.logits, ref.logits) < FP32_ATOL
    assert len(out.hidden_states) == len(ref.hidden_states) == pt.config.n_layer + 1
    for mine, theirs in zip(out.hidden_states, ref.hidden_states):
        assert max_diff(mine, theirs) < FP32_ATOL
    for mine, theirs in zip(out.attentions, ref.attentions):
        assert max_diff(mine, theirs) < FP32_ATOL


def test_base_model_matches_pytorch_and_loads_a_causal_lm_checkpoint(pair):
    pt, _, path = pair
    ids, mask = left_padded_batch(pt.config.vocab_size)
    base = FlaxBloomModel.from_pretrained(path)  # "transformer." stripped, lm_head ignored
    with torch.no_grad():
        ref = pt.transformer(ids, attention_mask=mask).last_hidden_state
    assert max_diff(base(ids.numpy(), mask.numpy()).last_hidden_state, ref) < FP32_ATOL


def test_unpadded_rows_equal_their_padded_versions(heads6):
    """ALiBi positions come from the mask: a left-padded row sees what it sees unpadded."""
    _, fx, _ = heads6
    ids, mask = left_padded_batch(fx.config.vocab_size)
    padded = np.asarray(fx(ids.numpy(), mask.numpy()).logits)[1, 4:]
    alone = np.asarray(fx(ids.numpy()[1:2, 4:]).logits)[0]
    assert max_diff(padded, alone) < FP32_ATOL


def test_cached_decode_equals_full_forward(pair):
    pt, fx, _ = pair
    ids, mask = left_padded_batch(pt.config.vocab_size)
    ids, mask = ids.numpy(), mask.numpy()
    full = np.asarray(fx(ids, mask).logits)
    capacity = 12
    cache = fx.init_cache(ids.shape[0], capacity)
    cache_mask = np.ones((ids.shape[0], capacity), np.int32)  # slots past the input: hidden by causality
    cache_mask[:, : ids.shape[1]] = mask
    out = fx(ids[:, :5], cache_mask, past_key_values=cache)
    pieces = [np.asarray(out.logits)]
    for i in range(5, ids.shape[1]):  # one token at a time
        out = fx(ids[:, i:i + 1], cache_mask, past_key_values=out.past_key_values)
        pieces.append(np.asarray(out.logits))
    assert max_diff(np.concatenate(pieces, axis=1), full) < FP32_ATOL
    index = out.past_key_values["transformer"]["h"]["0"]["self_attention"]["cache_index"]
    assert int(index) == ids.shape[1]


def test_fused_attention_route_equals_explicit(heads6):
    """The jax.nn.dot_product_attention route (cuDNN's on a GPU) with its relative ALiBi bias, run here
    through its XLA implementation: the same outputs, padded queries included."""
    pt, _, path = heads6
    fused = FlaxBloomForCausalLM.from_pretrained(path, attention_implementation="xla")
    ids, mask = left_padded_batch(pt.config.vocab_size)
    with torch.no_grad():
        ref = pt(ids, attention_mask=mask).logits
    assert max_diff(fused(ids.numpy(), mask.numpy()).logits, ref) < FP32_ATOL


def test_bf16_within_bf16_tolerance(heads6):
    pt, _, path = heads6
    ids, mask = left_padded_batch(pt.config.vocab_size)
    with torch.no_grad():
        exact = pt(ids, attention_mask=mask).logits.numpy()
        torch_bf16 = bloom.BloomForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        torch_err = max_diff(torch_bf16(ids, attention_mask=mask).logits.float(), exact)
    fx = FlaxBloomForCausalLM.from_pretrained(path, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    assert jax.tree_util.tree_leaves(fx.params)[0].dtype == jnp.bfloat16
    logits = fx(ids.numpy(), mask.numpy()).logits
    assert logits.dtype == jnp.bfloat16
    assert max_diff(logits, exact) <= 2 * torch_err + 1e-2, (max_diff(logits, exact), torch_err)


def test_dropout_follows_dropout_rng(tmp_path):
    pt = torch_model(dict(CONFIGS["heads6"], hidden_dropout=0.3, attention_dropout=0.3))
    pt.save_pretrained(tmp_path)
    fx = FlaxBloomForCausalLM.from_pretrained(tmp_path)
    ids, mask = left_padded_batch(pt.config.vocab_size)
    ids, mask = ids.numpy(), mask.numpy()
    eval_logits = np.asarray(fx(ids, mask).logits)
    with torch.no_grad():
        assert max_diff(eval_logits, pt(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits) \
            < FP32_ATOL  # dropout off unless train=True
    a = np.asarray(fx(ids, mask, train=True, dropout_rng=jax.random.PRNGKey(0)).logits)
    b = np.asarray(fx(ids, mask, train=True, dropout_rng=jax.random.PRNGKey(0)).logits)
    c = np.asarray(fx(ids, mask, train=True, dropout_rng=jax.random.PRNGKey(1)).logits)
    assert np.array_equal(a, b) and not np.allclose(a, c) and not np.allclose(a, eval_logits)
    with pytest.raises(ValueError, match="dropout_rng"):
        fx(ids, mask, train=True)


def test_module_is_a_regular_flax_module(heads6):
    _, fx, _ = heads6
    ids, mask = left_padded_batch(fx.config.vocab_size)
    logits, _, _ = fx.module.apply({"params": fx.params}, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()))
    assert max_diff(logits, fx(ids.numpy(), mask.numpy()).logits) < FP32_ATOL  # eager vs jit: rounding only
    fresh = FlaxBloomForCausalLM(fx.config, seed=3)
    shapes = jax.tree_util.tree_map(lambda x: x.shape, fresh.params)
    assert shapes == jax.tree_util.tree_map(lambda x: x.shape, fx.params)
    lazy = FlaxBloomForCausalLM(fx.config, _do_init=False)
    assert lazy.params is None
    params = lazy.init_weights(jax.random.PRNGKey(0), (1, 4))
    assert lazy(ids.numpy(), mask.numpy(), params=params).logits.shape == tuple(ids.shape) + (fx.config.vocab_size,)
    half = fx.to_bf16()
    assert {x.dtype for x in jax.tree_util.tree_leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree_util.tree_leaves(fx.params)} == {jnp.dtype(jnp.float32)}  # unchanged
    assert {x.dtype for x in jax.tree_util.tree_leaves(fx.to_fp16(half))} == {jnp.dtype(jnp.float16)}


# --------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shard_size", ["5GB", 20_000])
def test_round_trip_pytorch_flax_pytorch_identical(pair, tmp_path, shard_size):
    pt, fx, _ = pair
    fx.save_pretrained(tmp_path, max_shard_size=shard_size)
    if shard_size != "5GB":
        assert (tmp_path / "model.safetensors.index.json").exists()
        assert FlaxBloomForCausalLM.from_pretrained(tmp_path).params is not None  # sharded loads too
    back = bloom.BloomForCausalLM.from_pretrained(tmp_path)
    original, loaded = pt.state_dict(), back.state_dict()
    assert original.keys() == loaded.keys()
    for name in original:
        assert torch.equal(original[name], loaded[name]), name


def test_bf16_params_round_trip_bit_for_bit(heads6, tmp_path):
    pt, _, path = heads6
    pt16 = bloom.BloomForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    pt16.save_pretrained(tmp_path / "a")
    fx = FlaxBloomForCausalLM.from_pretrained(tmp_path / "a", param_dtype=jnp.bfloat16)
    fx.save_pretrained(tmp_path / "b")
    back = bloom.BloomForCausalLM.from_pretrained(tmp_path / "b", dtype="auto")
    for name, tensor in pt16.state_dict().items():
        assert back.state_dict()[name].dtype == torch.bfloat16
        assert torch.equal(tensor, back.state_dict()[name]), name


def test_transformers_loads_what_flax_saves(heads6, tmp_path):
    transformers = pytest.importorskip("transformers")
    pt, fx, _ = heads6
    fx.save_pretrained(tmp_path)
    hf = transformers.BloomForCausalLM.from_pretrained(tmp_path).eval()
    ids, mask = left_padded_batch(pt.config.vocab_size)
    real = mask.bool()  # transformers' outputs at padded queries are not the reference's zeros
    with torch.no_grad():
        theirs, ours = hf(ids, attention_mask=mask).logits, pt(ids, attention_mask=mask).logits
    assert max_diff(theirs[real], ours[real]) < FP32_ATOL


@pytest.mark.parametrize("base_tree", [False, True])
def test_transformers_flax_msgpack_checkpoint_loads(heads6, tmp_path, base_tree):
    """A flax_model.msgpack as transformers 4.x wrote it (flax.serialization.msgpack_serialize of the
    params), from a causal LM or a base model (no "transformer" level)."""
    from flax.serialization import msgpack_serialize

    _, fx, _ = heads6
    params = jax.tree_util.tree_map(np.asarray, fx.params)
    tree = params["transformer"] if base_tree else params
    fx.config.save_pretrained(tmp_path)
    (tmp_path / "flax_model.msgpack").write_bytes(msgpack_serialize(tree))
    loaded = FlaxBloomForCausalLM.from_pretrained(tmp_path)
    leaves = jax.tree_util.tree_leaves_with_path(loaded.params)
    assert len(leaves) == len(jax.tree_util.tree_leaves(fx.params))
    for (key, mine), theirs in zip(leaves, jax.tree_util.tree_leaves(fx.params)):
        assert np.array_equal(mine, theirs), key
    base = FlaxBloomModel.from_pretrained(tmp_path)
    assert np.array_equal(base.params["ln_f"]["scale"], fx.params["transformer"]["ln_f"]["scale"])


def test_base_model_checkpoint_loads_into_causal_lm(heads6, tmp_path):
    pt, fx, _ = heads6
    pt.transformer.save_pretrained(tmp_path)  # BloomModel names: no "transformer." prefix
    loaded = FlaxBloomForCausalLM.from_pretrained(tmp_path)
    ids, mask = left_padded_batch(pt.config.vocab_size)
    assert max_diff(loaded(ids.numpy(), mask.numpy()).logits, fx(ids.numpy(), mask.numpy()).logits) == 0.0


def test_from_a_pytorch_state_dict_in_memory(pair):
    pt, fx, _ = pair
    direct = FlaxBloomForCausalLM.from_pretrained(None, config=pt.config, state_dict=pt.state_dict())
    for mine, theirs in zip(jax.tree_util.tree_leaves(direct.params), jax.tree_util.tree_leaves(fx.params)):
        assert np.array_equal(mine, theirs)
    with pytest.raises(ValueError, match="needs both config= and state_dict="):
        FlaxBloomForCausalLM.from_pretrained(None, config=pt.config)


def test_checkpoint_errors_are_clear(heads6, tmp_path):
    _, _, path = heads6
    with pytest.raises(bloom.CheckpointError, match="expects"):
        FlaxBloomForCausalLM.from_pretrained(path, hidden_size=24)  # shape mismatch names the tensor
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((path / "config.json").read_text())
    (bad / "flax_model.msgpack").write_bytes(b"not msgpack at all")
    with pytest.raises(bloom.CheckpointError, match="flax_model.msgpack"):
        FlaxBloomForCausalLM.from_pretrained(bad)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text((path / "config.json").read_text())
    with pytest.raises(FileNotFoundError, match="flax_model.msgpack"):
        FlaxBloomForCausalLM.from_pretrained(empty)


# --------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------
def generation_batch(vocab: int):
    ids, mask = left_padded_batch(vocab, batch=3, seq=6, seed=5)
    ids[mask == 0] = 3  # pad id 3 (eos is 2)
    return ids, mask


def test_greedy_generate_equals_pytorch_on_a_padded_batch(pair):
    pt, fx, _ = pair
    ids, mask = generation_batch(pt.config.vocab_size)
    ref = pt.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=3)
    out = np.asarray(fx.generate(ids.numpy(), mask.numpy(), max_new_tokens=8, pad_token_id=3).sequences)
    assert out.shape == (3, 6 + 8)
    assert np.array_equal(out[:, : ref.shape[1]], ref.numpy())
    assert (out[:, ref.shape[1]:] == 3).all()  # pytorch stopped early: every row finished, then pads


def test_generate_stops_rows_at_eos_and_pads(heads6):
    pt, fx, _ = heads6
    ids, mask = generation_batch(pt.config.vocab_size)
    free = np.asarray(fx.generate(ids.numpy(), mask.numpy(), max_new_tokens=6, pad_token_id=3).sequences)
    eos = int(free[0, 6])  # row 0's first new token as eos: row 0 stops there
    out = np.asarray(fx.generate(ids.numpy(), mask.numpy(), max_new_tokens=6, pad_token_id=3,
                                 eos_token_id=eos).sequences)
    ref = pt.generate(ids, attention_mask=mask, max_new_tokens=6, pad_token_id=3, eos_token_id=eos)
    assert np.array_equal(out[:, : ref.shape[1]], ref.numpy())
    assert out[0, 6] == eos and (out[0, 7:] == 3).all()


def test_sampling_is_reproducible_per_key(heads6):
    _, fx, _ = heads6
    ids, mask = generation_batch(fx.config.vocab_size)
    kwargs = dict(max_new_tokens=8, do_sample=True, temperature=1.5, top_k=30, top_p=0.95, pad_token_id=3,
                  eos_token_id=None)
    runs = [np.asarray(fx.generate(ids.numpy(), mask.numpy(), prng_key=jax.random.PRNGKey(k), **kwargs).sequences)
            for k in (0, 0, 1)]
    assert np.array_equal(runs[0], runs[1])
    assert not np.array_equal(runs[0], runs[2])
    greedy = fx.generate(ids.numpy(), mask.numpy(), max_new_tokens=8, pad_token_id=3, eos_token_id=None).sequences
    top1 = fx.generate(ids.numpy(), mask.numpy(), max_new_tokens=8, do_sample=True, top_k=1, pad_token_id=3,
                       eos_token_id=None, prng_key=jax.random.PRNGKey(7)).sequences
    assert np.array_equal(greedy, top1)  # top_k=1 leaves only the argmax to draw


def test_decode_step_compiles_once_per_shape(heads6):
    _, fx, _ = heads6
    ids, mask = generation_batch(fx.config.vocab_size)
    kwargs = dict(max_new_tokens=9, pad_token_id=3, eos_token_id=None)
    before = dict(TRACE_COUNTS)
    fx.generate(ids.numpy(), mask.numpy(), **kwargs)
    size = fx._generate_fn._cache_size()
    fx.generate((ids.numpy() + 1) % fx.config.vocab_size, mask.numpy(), **kwargs)  # new values, same shapes
    # the decode step (the while_loop's body) was traced once for 9 tokens, and not again
    assert TRACE_COUNTS["decode_step"] - before.get("decode_step", 0) == 1
    assert TRACE_COUNTS["generate"] - before.get("generate", 0) == 1
    assert fx._generate_fn._cache_size() == size
    # a hand-written loop over the cache: one compiled forward per input shape, not per token
    cache, cache_mask = fx.init_cache(3, 10), np.ones((3, 10), np.int32)
    out = fx(ids.numpy()[:, :1], cache_mask, past_key_values=cache)
    compiled = fx._forward._cache_size()
    for i in range(1, 6):
        out = fx(ids.numpy()[:, i:i + 1], cache_mask, past_key_values=out.past_key_values)
    assert fx._forward._cache_size() == compiled


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_bad_input_gets_clear_errors(heads6):
    _, fx, _ = heads6
    vocab = fx.config.vocab_size
    ids = np.array([[1, 2, 3]])
    assert max_diff(fx(torch.tensor(ids)).logits, fx(ids).logits) == 0.0  # torch / numpy / jax ids alike
    with pytest.raises(ValueError, match=rf"token id {vocab}, outside the vocabulary \[0, {vocab}\)"):
        fx(np.array([[1, vocab]]))
    with pytest.raises(ValueError, match="token id -1"):
        fx(np.array([[1, -1]]))
    with pytest.raises(TypeError, match="integer token ids"):
        fx(np.array([[1.0, 2.0]]))
    with pytest.raises(ValueError, match=r"shape \(batch, sequence\)"):
        fx(np.array([1, 2, 3]))
    with pytest.raises(ValueError, match=r"attention_mask must have shape .* = \(1, 3\); got \(1, 2\)"):
        fx(ids, np.ones((1, 2), np.int32))
    cache = fx.init_cache(1, 4)
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(batch, cache capacity\)"):
        fx(ids, np.ones((1, 3), np.int32), past_key_values=cache)
    out = fx(ids, np.ones((1, 4), np.int32), past_key_values=cache)
    with pytest.raises(bloom.CacheOverflowError, match="holds 3 of 4 positions; 2 more"):
        fx(np.array([[1, 2]]), np.ones((1, 4), np.int32), past_key_values=out.past_key_values)
    with pytest.raises(ValueError, match="batch of 1 but input_ids has 2"):
        fx(np.ones((2, 1), np.int32), np.ones((2, 4), np.int32), past_key_values=cache)
    with pytest.raises(ValueError, match="past_key_values must be the dict init_cache"):
        fx(ids, past_key_values={"nope": 1})
    with pytest.raises(ValueError, match=r"outside the vocabulary"):
        fx.generate(np.array([[vocab + 5]]), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"attention_mask must have shape"):
        fx.generate(ids, np.ones((1, 5), np.int32), max_new_tokens=2)
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        fx.generate(ids, max_new_tokens=2, do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 1"):
        fx.generate(ids, max_new_tokens=0)
    with pytest.raises(ValueError, match="attention_implementation must be one of"):
        FlaxBloomForCausalLM(fx.config, attention_implementation="flash")
