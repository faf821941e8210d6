"""Generation for FlaxBloomForCausalLM: one jax.jit-compiled program per (shape, options).

The cache is sized for prompt + max_new_tokens; the attention mask covers that whole capacity (ones
past the prompt: causality hides the slots not written yet). The prefill runs the prompt (logits of
the last position only), then a `lax.while_loop` runs the same fixed-shape decode step per token until
max_new_tokens or until every row has emitted eos. Nothing returns to the host in between, and the
step is traced once per compiled program, not per token.

Logit processing mirrors bloom/logits.py (transformers' order: temperature, top-k, top-p); greedy is
the first argmax, as torch's. Sampling draws with jax.random from `prng_key` folded with the step, so
the same key gives the same tokens. The result is transformers' Flax one: `sequences` (B, prompt +
max_new_tokens), a row padded with pad_token_id after its eos (and after an early stop).
"""

from __future__ import annotations

import collections
import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..generation import GenerationOptions, check_length_limits, new_token_limits
from .checks import check_attention_mask, check_input_ids
from .modeling import empty_cache

# How many times each jitted piece was traced (a Python side effect runs once per trace, never per
# token): the tests read it to prove the decode step compiles once per generation shape.
TRACE_COUNTS: collections.Counter = collections.Counter()


# --------------------------------------------------------------------------------------------------
# Logit processing (fixed shapes: runs inside the loop)
# --------------------------------------------------------------------------------------------------
def apply_temperature(logits, temperature: float):
    """logits / T; where that overflows to +inf (a tiny T), the row minus its max, divided (same
    softmax, argmax as the limit): bloom.logits.apply_temperature."""
    scaled = logits / temperature
    if temperature < 1.0:
        shifted = (logits - logits.max(-1, keepdims=True)) / temperature
        scaled = jnp.where(jnp.isposinf(scaled.max(-1, keepdims=True)), shifted, scaled)
    return scaled


def top_k_filter(logits, k: int):
    """The k largest logits of each row kept (ties with the k-th kept), the rest -inf."""
    kth = jax.lax.top_k(logits, min(k, logits.shape[-1]))[0][:, -1:]
    return jnp.where(logits < kth, -jnp.inf, logits)


def top_p_filter(logits, p: float):
    """The smallest set of most likely tokens whose probability reaches p (at least one) kept."""
    order = jnp.argsort(logits, axis=-1)  # ascending, as bloom.logits.top_p_filter
    sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
    cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
    remove_sorted = (cumulative <= (1 - p)).at[:, -1].set(False)  # the most likely token always stays
    rows = jnp.arange(logits.shape[0])[:, None]
    remove = jnp.zeros_like(remove_sorted).at[rows, order].set(remove_sorted)
    return jnp.where(remove, -jnp.inf, logits)


def choose_tokens(logits, opts: GenerationOptions, key):
    """(B,) next tokens from fp32 logits (B, V)."""
    if not opts.do_sample:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if opts.temperature != 1.0:
        logits = apply_temperature(logits, opts.temperature)
    if opts.top_k is not None and opts.top_k > 0:
        logits = top_k_filter(logits, opts.top_k)
    if opts.top_p is not None and opts.top_p < 1.0:
        logits = top_p_filter(logits, opts.top_p)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# --------------------------------------------------------------------------------------------------
# The compiled program
# --------------------------------------------------------------------------------------------------
class _StaticOptions:
    """GenerationOptions as a hashable static argument of jax.jit (equal options: same program)."""

    def __init__(self, opts: GenerationOptions):
        self.opts = opts
        self.key = opts.static_key() + (opts.max_new_tokens,)

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, _StaticOptions) and self.key == other.key


def _run(module, config, cache_dtype, params, input_ids, attention_mask, prng_key, static: _StaticOptions):
    opts = static.opts
    TRACE_COUNTS["generate"] += 1
    batch, prompt_len = input_ids.shape
    total = prompt_len + opts.max_new_tokens
    cache = empty_cache(config, batch, total, cache_dtype, causal_lm=True)
    mask = jnp.concatenate([attention_mask.astype(jnp.int32), jnp.ones((batch, opts.max_new_tokens), jnp.int32)],
                           axis=1)
    eos = jnp.asarray(opts.eos_ids or [-1], jnp.int32)

    def next_logits(tokens, cache):
        (logits, _, _), updated = module.apply({"params": params, "cache": cache}, tokens, mask,
                                               logits_to_keep=1, mutable=["cache"])
        return logits[:, -1].astype(jnp.float32), updated["cache"]

    def pick(logits, step, finished):
        token = choose_tokens(logits, opts, jax.random.fold_in(prng_key, step))
        token = jnp.where(finished, opts.pad_id, token)  # a finished row only pads
        return token, finished | jnp.isin(token, eos)

    logits, cache = next_logits(input_ids.astype(jnp.int32), cache)
    token, finished = pick(logits, 0, jnp.zeros((batch,), bool))
    sequences = jnp.full((batch, total), opts.pad_id, jnp.int32)
    sequences = jax.lax.dynamic_update_slice(sequences, input_ids.astype(jnp.int32), (0, 0))
    sequences = sequences.at[:, prompt_len].set(token)

    def cond(state):
        step, _, _, _, finished = state
        return (step < opts.max_new_tokens) & ~(jnp.all(finished) & bool(opts.eos_ids))

    def body(state):
        TRACE_COUNTS["decode_step"] += 1
        step, cache, sequences, token, finished = state
        logits, cache = next_logits(token[:, None], cache)
        token, finished = pick(logits, step, finished)
        sequences = jax.lax.dynamic_update_slice(sequences, token[:, None], (0, prompt_len + step))
        return step + 1, cache, sequences, token, finished

    state = (jnp.array(1, jnp.int32), cache, sequences, token, finished)
    return jax.lax.while_loop(cond, body, state)[2]


def compiled_generate(module, config, cache_dtype):
    """The jitted program for one model (its module, config and cache dtype baked in)."""
    return jax.jit(functools.partial(_run, module, config, cache_dtype), static_argnames=("static",))


# --------------------------------------------------------------------------------------------------
# The public entry: validation on the host, then one call of the compiled program
# --------------------------------------------------------------------------------------------------
def generate(model, input_ids, attention_mask=None, *, max_new_tokens: int | None = None,
             max_length: int | None = None, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, eos_token_id=None, pad_token_id=None,
             prng_key=None, params=None):
    config = model.config
    check_input_ids("input_ids", input_ids, config.vocab_size)
    batch, prompt_len = np.shape(input_ids)
    max_new_tokens, _ = new_token_limits(np.asarray(input_ids), max_new_tokens, 0, max_length, None)
    opts = GenerationOptions(config, max_new_tokens=max_new_tokens, min_new_tokens=0, do_sample=do_sample,
                             temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=1.0,
                             eos_token_id=eos_token_id, pad_token_id=pad_token_id, num_return_sequences=1)
    check_length_limits(config, prompt_len + opts.max_new_tokens)
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if attention_mask is None:
        # As transformers: padding is inferred from pad tokens when pad differs from eos.
        if opts.pad_id not in opts.eos_ids and bool(jnp.any(input_ids == opts.pad_id)):
            attention_mask = (input_ids != opts.pad_id).astype(jnp.int32)
        else:
            attention_mask = jnp.ones_like(input_ids)
    check_attention_mask(attention_mask, (batch, prompt_len), "(batch, sequence) of input_ids")
    if prng_key is None:
        prng_key = jax.random.PRNGKey(0)  # transformers' Flax default
    params = model.params if params is None else params
    if params is None:
        raise ValueError("the model was made with _do_init=False: pass params= to generate")
    return model._generate_fn(params, input_ids, jnp.asarray(attention_mask, jnp.int32), prng_key,
                              static=_StaticOptions(opts))
