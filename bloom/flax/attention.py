"""ALiBi attention in JAX, mirroring bloom_kernels/reference.py (the PyTorch model's definition).

Shapes: B batch, S queries, L key slots (S without a cache, the cache's capacity with one), H heads,
D head dim. Keys carry their ALiBi position (cumsum of the attention mask - 1, as transformers) or -1
at padding; query i sits at key slot `start + i` (start: the cache's write index, 0 without a cache).

Two routes:
- `explicit`: fp32 scores + slope * key position, causal / padding mask, softmax, probabilities @ v.
  The reference's formula term for term (its per-row power-of-two rescaling is exact and only matters
  near fp32 overflow, so it is left out). Returns the probabilities too (output_attentions, dropout).
- `jax.nn.dot_product_attention` ("xla" or "cudnn"): the fused cuDNN kernel takes an additive bias on
  a GPU in fp16/bf16. The bias is ALiBi *relative to the query's own position*: softmax does not change
  under a per-row constant, and relative values stay small where half precision is exact enough
  (absolute positions up to 2048 would keep only ~3 significant bits in fp16).
A query with no visible key (left padding) gets a zero output on both routes, as in the reference.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

IMPLEMENTATIONS = ("auto", "explicit", "xla", "cudnn")


def alibi_slopes(n_head: int) -> np.ndarray:
    """(H,) fp32 slopes, bit for bit the PyTorch model's (bloom_kernels.reference.alibi_slopes)."""
    from bloom_kernels.reference import alibi_slopes as torch_slopes

    return torch_slopes(n_head).numpy()


def alibi_key_positions(attention_mask: jax.Array) -> jax.Array:
    """fp32 (B, L): each key's ALiBi position (cumsum(mask) - 1) at tokens, -1 at padding."""
    mask = (attention_mask != 0).astype(jnp.int32)
    return jnp.where(mask != 0, jnp.cumsum(mask, axis=-1) - 1, -1).astype(jnp.float32)


def resolve_implementation(implementation: str, dtype, head_dim: int, need_probs: bool) -> str:
    """The route for one call (decided while tracing, from static facts only)."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention_implementation must be one of {IMPLEMENTATIONS}; got {implementation!r}")
    if need_probs:  # probabilities (output_attentions) and dropout on them exist on the explicit route only
        return "explicit"
    if implementation == "auto":
        # cuDNN's fused attention: GPU, half precision, head dims it supports (multiples of 8, <= 128)
        fused = (jax.default_backend() == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)
                 and head_dim % 8 == 0 and head_dim <= 128)
        return "cudnn" if fused else "explicit"
    return implementation


def visibility(key_positions: jax.Array, start, q_len: int) -> jax.Array:
    """bool (B, 1, S, L): key slot j visible to query i (causal: j <= start + i; not padding)."""
    key_len = key_positions.shape[-1]
    q_slot = start + jnp.arange(q_len)
    causal = jnp.arange(key_len)[None, :] <= q_slot[:, None]  # (S, L)
    return causal[None, None] & (key_positions >= 0)[:, None, None, :]


def explicit_attention(q, k, v, slopes, key_positions, start, scale: float, dropout=None):
    """softmax(q·k·scale + slope·pos_k) v in fp32, cast to q.dtype; returns (out (B, S, H, D), probs
    (B, H, S, L) fp32). `dropout`: a function applied to the probabilities (training), or None."""
    # bf16/fp16 products are exact in fp32: accumulate there, as the reference's upcast does
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    pos = jnp.maximum(key_positions, 0.0)
    scores = scores + jnp.asarray(slopes)[None, :, None, None] * pos[:, None, None, :]
    allowed = visibility(key_positions, start, q.shape[1])
    scores = jnp.where(allowed, scores, -jnp.inf)
    top = jnp.max(scores, axis=-1, keepdims=True)
    hidden_row = jnp.isneginf(top)  # a query with no visible key (left padding): all-zero weights
    weights = jnp.exp(scores - jnp.where(hidden_row, 0.0, top))
    total = jnp.sum(weights, axis=-1, keepdims=True)
    probs = weights / jnp.where(hidden_row, 1.0, total)  # no 0/0: its gradient would be NaN
    if dropout is not None:
        probs = dropout(probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v.astype(jnp.float32))
    return out.astype(q.dtype), probs


def fused_attention(q, k, v, slopes, key_positions, start, scale: float, implementation: str):
    """The same attention through jax.nn.dot_product_attention (out (B, S, H, D) only)."""
    q_len = q.shape[1]
    allowed = visibility(key_positions, start, q_len)  # (B, 1, S, L)
    pos = jnp.maximum(key_positions, 0.0)
    q_pos = jax.lax.dynamic_slice_in_dim(pos, start, q_len, axis=1)  # the queries' own positions
    relative = pos[:, None, :] - q_pos[:, :, None]  # (B, S, L), <= 0 where visible
    bias = jnp.asarray(slopes)[None, :, None, None] * relative[:, None]  # (B, H, S, L)
    batch, heads = q.shape[0], q.shape[2]
    bias = jnp.broadcast_to(bias, (batch, heads, q_len, k.shape[1])).astype(q.dtype)
    out = jax.nn.dot_product_attention(q, k, v, bias=bias, mask=allowed, scale=scale,
                                       implementation=implementation)
    # a row with every key masked is a uniform average (xla) or undefined (cudnn): the reference's 0
    any_visible = jnp.any(allowed, axis=-1)[:, 0, :, None, None]  # (B, S, 1, 1)
    return jnp.where(any_visible, out, 0).astype(q.dtype)


def attention(q, k, v, slopes, key_positions, start, *, implementation: str, need_probs: bool,
              dropout=None):
    """(out (B, S, H, D), probs (B, H, S, L) or None) by the route `resolve_implementation` picks."""
    head_dim = q.shape[-1]
    scale = 1.0 / math.sqrt(head_dim)
    route = resolve_implementation(implementation, q.dtype, head_dim, need_probs or dropout is not None)
    if route == "explicit":
        out, probs = explicit_attention(q, k, v, slopes, key_positions, start, scale, dropout)
        return out, (probs if need_probs else None)
    return fused_attention(q, k, v, slopes, key_positions, start, scale, route), None
