"""Checks of the Flax models' inputs on the host: wrong input gets an error naming the argument, as on
the PyTorch side (bloom/validation.py). Values inside a caller's own jax.jit (tracers) have no value to
check: only their shapes are."""

from __future__ import annotations

import jax
import numpy as np

from ..cache import CacheOverflowError


def is_traced(x) -> bool:
    return isinstance(x, jax.core.Tracer)


def check_input_ids(name: str, ids, vocab_size: int) -> None:
    host = None if is_traced(ids) else np.asarray(ids)  # one host read (numpy, jax, torch or lists)
    shape = tuple(np.shape(ids))
    dtype = np.dtype(ids.dtype if host is None else host.dtype)
    if not np.issubdtype(dtype, np.integer):
        raise TypeError(f"{name} must hold integer token ids (int32 or int64); got dtype {dtype}")
    if len(shape) != 2:
        raise ValueError(f"{name} must have shape (batch, sequence); got {shape}")
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {shape}); give at least one token")
    if host is None:
        return
    # an out-of-range id must be refused here: jax's gather would clamp it silently
    lo, hi = int(host.min()), int(host.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(f"{name} holds token id {lo if lo < 0 else hi}, outside the vocabulary [0, {vocab_size})")


def check_attention_mask(mask, expected: tuple[int, int], why: str) -> None:
    shape = tuple(np.shape(mask))
    if shape != tuple(expected):
        raise ValueError(f"attention_mask must have shape {why} = {tuple(expected)}; got {shape}")


def cache_layers(cache: dict, causal_lm: bool) -> dict:
    """The per-layer dicts of an init_cache tree; ValueError naming past_key_values if it is not one."""
    tree = cache.get("transformer", cache) if isinstance(cache, dict) and causal_lm else cache
    layers = tree.get("h") if isinstance(tree, dict) else None
    if not isinstance(layers, dict) or not layers:
        raise ValueError("past_key_values must be the dict init_cache(batch_size, max_length) returns (or a "
                         f"previous call's past_key_values); got {type(cache).__name__}")
    return layers


def check_cache(cache: dict, config, batch: int, seq: int, causal_lm: bool) -> int:
    """The cache's capacity, after checking it matches the model and the input and has room for `seq`
    more positions (else CacheOverflowError: a write past the end would be clamped, not refused)."""
    layers = cache_layers(cache, causal_lm)
    if len(layers) != config.n_layer:
        raise ValueError(f"past_key_values has {len(layers)} layers; the model has {config.n_layer}")
    attn = layers["0"]["self_attention"]
    b, capacity, heads, head_dim = np.shape(attn["cached_key"])
    if b != batch:
        raise ValueError(f"past_key_values holds a batch of {b} but input_ids has {batch}")
    if (heads, head_dim) != (config.n_head, config.head_dim):
        raise ValueError(f"past_key_values holds {heads} heads of dim {head_dim}; the model has "
                         f"{config.n_head} heads of dim {config.head_dim}")
    index = attn["cache_index"]
    if not is_traced(index):
        filled = int(np.asarray(index))  # one host read per call (generate checks up front instead)
        if filled + seq > capacity:
            raise CacheOverflowError(f"past_key_values holds {filled} of {capacity} positions; {seq} more "
                                     f"do not fit (make the cache with init_cache(batch_size, max_length) "
                                     f"for a larger max_length)")
    return capacity
