"""BLOOM as flax.linen modules: transformers 4.x's Flax parameter tree, the PyTorch model's numerics.

Parameter tree (what `flax_model.msgpack` files of transformers 4.x hold):
    transformer/word_embeddings/embedding (V, E), transformer/word_embeddings_layernorm/{scale,bias},
    transformer/h/<i>/{input_layernorm, self_attention/{query_key_value, dense}, post_attention_layernorm,
    mlp/{dense_h_to_4h, dense_4h_to_h}}, transformer/ln_f; lm_head/kernel (E, V) only when untied.
Dense kernels are (in, out): the transpose of PyTorch's Linear weights (see bloom/flax/convert.py).

The KV cache is the "cache" collection, transformers' layout: per layer cached_key / cached_value
(B, capacity, H, D) and cache_index (int32 (), slots written). With a cache, attention_mask covers the
whole capacity (B, capacity): its slots past the ones written are hidden by causality whatever they hold.

Shapes: B batch, S new tokens, L key slots, E hidden, H heads, D head dim, V vocabulary.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bloom_kernels.reference import GELU_CUBIC, GELU_SQRT_2_OVER_PI

from ..config import BloomConfig
from .attention import alibi_key_positions, alibi_slopes, attention


def bloom_gelu(h: jax.Array) -> jax.Array:
    """BLOOM's tanh GeLU with Megatron's constants, in fp32 (reference.gelu_forward_fp32)."""
    return h * 0.5 * (1.0 + jnp.tanh(GELU_SQRT_2_OVER_PI * h * (1.0 + GELU_CUBIC * h * h)))


class FlaxBloomAttention(nn.Module):
    config: BloomConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = "auto"

    @nn.compact
    def __call__(self, x, key_positions, deterministic: bool = True, init_cache: bool = False,
                 output_attentions: bool = False):
        c = self.config
        batch, seq, hidden = x.shape
        heads, head_dim = c.n_head, hidden // c.n_head
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=jax.nn.initializers.normal(c.initializer_range))
        fused = nn.Dense(3 * hidden, name="query_key_value", **dense)(x)
        fused = fused.reshape(batch, seq, heads, 3, head_dim)  # Megatron's per-head [q k v] interleave
        q, k, v = fused[..., 0, :], fused[..., 1, :], fused[..., 2, :]  # (B, S, H, D)

        start = 0
        has_cache = self.has_variable("cache", "cached_key")
        if has_cache or init_cache:
            cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
            cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
            cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, dtype=jnp.int32))
        if has_cache:  # write the new keys/values at [start, start + S) and attend over the capacity
            start = cache_index.value
            new_pos = jax.lax.dynamic_slice_in_dim(key_positions, start, seq, axis=1)
            # padded positions are stored as zeros, as the PyTorch model's cache holds them
            padded = (new_pos < 0)[:, :, None, None]
            k, v = jnp.where(padded, 0, k), jnp.where(padded, 0, v)
            k = jax.lax.dynamic_update_slice(cached_key.value, k.astype(cached_key.value.dtype), (0, start, 0, 0))
            v = jax.lax.dynamic_update_slice(cached_value.value, v.astype(cached_value.value.dtype),
                                             (0, start, 0, 0))
            cached_key.value, cached_value.value = k, v
            cache_index.value = start + seq
            k, v = k.astype(q.dtype), v.astype(q.dtype)

        dropout = None
        if not deterministic and c.attention_dropout > 0.0:
            drop = nn.Dropout(c.attention_dropout)
            dropout = lambda p: drop(p, deterministic=False)  # noqa: E731
        slopes = alibi_slopes(heads)
        ctx, probs = attention(q, k, v, slopes, key_positions, start, implementation=self.attention_implementation,
                               need_probs=output_attentions, dropout=dropout)
        out = nn.Dense(hidden, name="dense", **dense)(ctx.reshape(batch, seq, hidden))
        return nn.Dropout(c.hidden_dropout)(out, deterministic=deterministic), probs


class FlaxBloomMLP(nn.Module):
    config: BloomConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        c = self.config
        dense = dict(dtype=self.dtype, param_dtype=self.param_dtype,
                     kernel_init=jax.nn.initializers.normal(c.initializer_range))
        h = nn.Dense(4 * c.hidden_size, name="dense_h_to_4h", **dense)(x)
        h = bloom_gelu(h.astype(jnp.float32)).astype(self.dtype)  # GeLU in fp32, one rounding (reference)
        out = nn.Dense(c.hidden_size, name="dense_4h_to_h", **dense)(h)
        return nn.Dropout(c.hidden_dropout)(out, deterministic=deterministic)


def layer_norm(name: str, config: BloomConfig, dtype, param_dtype) -> nn.LayerNorm:
    # use_fast_variance=False: the two-pass variance of torch's LayerNorm, not E[x²] - E[x]²
    return nn.LayerNorm(epsilon=config.layer_norm_epsilon, dtype=dtype, param_dtype=param_dtype,
                        use_fast_variance=False, name=name)


def add_and_norm(ln: nn.LayerNorm, delta, residual, dtype):
    """(LN(delta + residual), delta + residual); with no residual, (LN(delta), delta). The sum is formed
    in fp32 and normalised before it is rounded to `dtype`: the PyTorch model's fused residual
    LayerNorm (reference.layer_norm), so bf16 rounds where it does."""
    h = delta.astype(jnp.float32) if residual is None else delta.astype(jnp.float32) + residual.astype(jnp.float32)
    return ln(h).astype(dtype), (delta if residual is None else h.astype(dtype))


class FlaxBloomBlock(nn.Module):
    """One block on (delta, residual): its input hidden state is delta + residual (delta alone when
    residual is None). Returns (mlp_out, residual, block_input, probs); the block's output hidden state
    is mlp_out + residual, summed by the next LayerNorm (as the PyTorch model does)."""

    config: BloomConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = "auto"

    @nn.compact
    def __call__(self, delta, residual, key_positions, deterministic: bool = True, init_cache: bool = False,
                 output_attentions: bool = False):
        c, dt = self.config, self.dtype
        ln1 = layer_norm("input_layernorm", c, dt, self.param_dtype)
        attention_in, block_input = add_and_norm(ln1, delta, residual, dt)
        attention_out, probs = FlaxBloomAttention(c, dt, self.param_dtype, self.attention_implementation,
                                                  name="self_attention")(
            attention_in, key_positions, deterministic, init_cache, output_attentions)
        # What each sub-layer's output is added to: its input (BLOOM's default) or, with
        # apply_residual_connection_post_layernorm, the LayerNorm's output.
        post = c.apply_residual_connection_post_layernorm
        ln2 = layer_norm("post_attention_layernorm", c, dt, self.param_dtype)
        mlp_in, after_attention = add_and_norm(ln2, attention_out, attention_in if post else block_input, dt)
        mlp_out = FlaxBloomMLP(c, dt, self.param_dtype, name="mlp")(mlp_in, deterministic)
        return mlp_out, (mlp_in if post else after_attention), block_input, probs


class FlaxBloomBlockCollection(nn.Module):
    """The blocks, named "0", "1", ... under "h" (transformers' tree); ends with ln_f's input summed."""

    config: BloomConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = "auto"

    @nn.compact
    def __call__(self, x, key_positions, deterministic=True, init_cache=False, output_attentions=False,
                 output_hidden_states=False):
        """x (B, S, E) -> (delta, residual, hiddens, attentions): the last block's output is delta + residual."""
        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        delta, residual = x, None
        for i in range(self.config.n_layer):
            delta, residual, block_input, probs = FlaxBloomBlock(
                self.config, self.dtype, self.param_dtype, self.attention_implementation, name=str(i))(
                delta, residual, key_positions, deterministic, init_cache, output_attentions)
            if output_hidden_states:
                all_hidden += (block_input,)
            if output_attentions:
                all_attentions += (probs,)
        return delta, residual, all_hidden, all_attentions


class FlaxBloomModule(nn.Module):
    """The base model: (input_ids (B, S), attention_mask) -> (hidden (B, S, E), hiddens, attentions)."""

    config: BloomConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = "auto"

    def setup(self):
        c = self.config
        self.word_embeddings = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                                        embedding_init=jax.nn.initializers.normal(c.initializer_range))
        self.word_embeddings_layernorm = layer_norm("word_embeddings_layernorm", c, self.dtype, self.param_dtype)
        self.h = FlaxBloomBlockCollection(c, self.dtype, self.param_dtype, self.attention_implementation)
        self.ln_f = layer_norm("ln_f", c, self.dtype, self.param_dtype)

    def __call__(self, input_ids, attention_mask=None, deterministic: bool = True, init_cache: bool = False,
                 output_attentions: bool = False, output_hidden_states: bool = False):
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, jnp.int32)
        key_positions = alibi_key_positions(attention_mask)  # once per forward, shared by every block
        embeds = self.word_embeddings(input_ids.astype(jnp.int32))
        x, _ = add_and_norm(self.word_embeddings_layernorm, embeds, None, self.dtype)
        delta, residual, all_hidden, all_attentions = self.h(x, key_positions, deterministic, init_cache,
                                                             output_attentions, output_hidden_states)
        x, _ = add_and_norm(self.ln_f, delta, residual, self.dtype)
        if output_hidden_states:
            all_hidden += (x,)
        return x, all_hidden, all_attentions

    def attend(self, hidden):
        """hidden @ embeddingᵀ: the tied lm_head."""
        return self.word_embeddings.attend(hidden)


class FlaxBloomForCausalLMModule(nn.Module):
    """The model and its lm_head (tied to the embeddings unless config.tie_word_embeddings is False).

    `logits_to_keep=n` computes logits for the last n positions only (0: all); generation uses 1.
    """

    config: BloomConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    attention_implementation: str = "auto"

    def setup(self):
        c = self.config
        self.transformer = FlaxBloomModule(c, self.dtype, self.param_dtype, self.attention_implementation)
        if not getattr(c, "tie_word_embeddings", True):
            self.lm_head = nn.Dense(c.vocab_size, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                                    kernel_init=jax.nn.initializers.normal(c.initializer_range))

    def __call__(self, input_ids, attention_mask=None, deterministic: bool = True, init_cache: bool = False,
                 output_attentions: bool = False, output_hidden_states: bool = False, logits_to_keep: int = 0):
        hidden, all_hidden, all_attentions = self.transformer(
            input_ids, attention_mask, deterministic, init_cache, output_attentions, output_hidden_states)
        last = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        if getattr(self.config, "tie_word_embeddings", True):
            logits = self.transformer.attend(last)
        else:
            logits = self.lm_head(last)
        return logits, all_hidden, all_attentions


def empty_cache(config: BloomConfig, batch_size: int, capacity: int, dtype, causal_lm: bool) -> dict:
    """The "cache" collection for `capacity` positions: zero keys/values, index 0 in every layer
    (what transformers' init_cache returns, built directly instead of by running the model)."""
    shape = (batch_size, capacity, config.n_head, config.head_dim)
    layers = {str(i): {"self_attention": {"cached_key": jnp.zeros(shape, dtype),
                                          "cached_value": jnp.zeros(shape, dtype),
                                          "cache_index": jnp.array(0, dtype=jnp.int32)}}
              for i in range(config.n_layer)}
    tree = {"h": layers}
    return {"transformer": tree} if causal_lm else tree
