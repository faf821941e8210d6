"""BLOOM: transformers' module tree and parameter names, computed with bloom_kernels' ops.

Residual adds are fused into the LayerNorm that follows them: a block hands on (delta, residual) and
the next LayerNorm computes LN(delta + residual) and the sum in one op. The h->4h bias is fused into
the GeLU. Attention reads q/k/v as strided views of the fused QKV projection. The block's projections
are BloomLinear (bloom_kernels.linear) or, once quantised, Int8Linear (bloom_kernels.int8_linear):
both are called as `linear(x, with_bias=...)` and give Megatron's slices via `partial_product`.

Shapes: B batch, S new tokens, L = past + S keys, H heads, D head dim, E hidden size.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
import torch.nn.functional as F
from torch import Tensor, nn

import bloom_kernels as bk

from .cache import BloomCache
from .config import BloomConfig
from .generation_config import GenerationConfig
from .outputs import BaseModelOutputWithPast, CausalLMOutputWithPast
from .pretrained import BloomPreTrainedModel
from .validation import check_forward_inputs, check_labels, check_logits_to_keep


class BloomLinear(nn.Linear):
    """A float nn.Linear (same parameters, state_dict keys and init) whose forward runs bloom_kernels.linear.

    `with_bias=False` leaves the bias out (the h->4h projection: its bias goes into the fused GeLU).
    """

    def forward(self, x: Tensor, with_bias: bool = True) -> Tensor:
        # unchecked: the model validated its inputs, and the weight is this module's own
        return bk.unchecked.linear(x, self.weight, self.bias if with_bias else None)

    def partial_product(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """x[..., lo:hi] · W[:, lo:hi]ᵀ, no bias: one input slice of Megatron's pretraining_tp product."""
        return F.linear(x[..., lo:hi], self.weight[:, lo:hi])


def tp_sliced_linear(x: Tensor, linear: nn.Module, tp: int) -> Tensor:
    """`linear(x)`; for tp > 1, Megatron's product: the sum of per-slice partial products, then the bias.

    The slice bounds are transformers' (int(i * in / tp)). Unlike transformers, the bias is KEPT:
    Megatron added it after the all-reduce; transformers drops it on this path (a bug).
    """
    if tp <= 1:
        return linear(x)
    in_features = linear.weight.shape[1]
    slice_width = in_features / tp
    out = None
    for i in range(tp):
        part = linear.partial_product(x, int(i * slice_width), int((i + 1) * slice_width))
        out = part if out is None else out + part
    return out + linear.bias if linear.bias is not None else out


@dataclass
class LayerInputs:
    """What every block of one forward shares, computed once in BloomModel.run."""

    attention: bk.unchecked.AttentionInputs  # slopes, key positions (cumsum of the mask), CPU bias
    attention_mask: Tensor | None            # (B, L), for the eager probabilities path only
    write_position: Tensor | None            # static decode: long (S,) cache slots of the new keys


class BloomAttention(nn.Module):
    def __init__(self, config: BloomConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hidden_size = config.hidden_size
        self.num_heads = config.n_head
        self.head_dim = config.hidden_size // config.n_head
        self.exact_tp = config.pretraining_tp if config.slow_but_exact else 1
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.query_key_value = BloomLinear(self.hidden_size, 3 * self.hidden_size, bias=True)
        self.dense = BloomLinear(self.hidden_size, self.hidden_size)
        self.attention_dropout = nn.Dropout(config.attention_dropout)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x: Tensor, shared: LayerInputs, cache: BloomCache | None,
                head_mask: Tensor | None, output_attentions: bool) -> tuple[Tensor, Tensor | None]:
        batch, seq, _ = x.shape
        fused = self.query_key_value(x).view(batch, seq, self.num_heads, 3, self.head_dim)
        q, k, v = (fused[..., i, :].transpose(1, 2) for i in range(3))  # (B, H, S, D) strided views
        k, v = bk.unchecked.zero_padded_new(k, v, shared.attention)
        if cache is not None:
            # (B, H, L, D) views of the cache; a static step attends over the whole capacity
            k, v = cache.update(self.layer_idx, k, v, at=shared.write_position)

        dropout_p = self.attention_dropout.p if self.training else 0.0
        probs = None
        if output_attentions or dropout_p > 0.0:
            # Only the eager path can return (or drop) probabilities.
            ctx, probs = bk.alibi_attention_probs(q, k, v, shared.attention.slopes, shared.attention_mask,
                                                  self.scale, dropout_p)
        else:
            ctx = bk.unchecked.alibi_attention(q, k, v, shared.attention, self.scale)  # (B, H, S, D)
        if head_mask is not None:
            ctx = ctx * head_mask.to(ctx.dtype).view(1, -1, 1, 1)
            if probs is not None:
                probs = probs * head_mask.to(probs.dtype).view(1, -1, 1, 1)
        ctx = ctx.transpose(1, 2).reshape(batch, seq, self.hidden_size)

        out = tp_sliced_linear(ctx, self.dense, self.exact_tp)
        return F.dropout(out, self.hidden_dropout, self.training), probs


class BloomMLP(nn.Module):
    def __init__(self, config: BloomConfig):
        super().__init__()
        self.exact_tp = config.pretraining_tp if config.slow_but_exact else 1
        self.dense_h_to_4h = BloomLinear(config.hidden_size, 4 * config.hidden_size)
        self.dense_4h_to_h = BloomLinear(4 * config.hidden_size, config.hidden_size)
        self.hidden_dropout = config.hidden_dropout

    def forward(self, x: Tensor) -> Tensor:
        # The h->4h bias is added inside the fused GeLU, not by the linear.
        h = bk.unchecked.bias_gelu(self.dense_h_to_4h(x, with_bias=False), self.dense_h_to_4h.bias)
        out = tp_sliced_linear(h, self.dense_4h_to_h, self.exact_tp)
        return F.dropout(out, self.hidden_dropout, self.training)


def fused_layer_norm(ln: nn.LayerNorm, delta: Tensor, residual: Tensor | None) -> tuple[Tensor, Tensor]:
    """(LN(delta + residual), delta + residual); with no residual, (LN(delta), delta)."""
    if residual is None:
        return bk.unchecked.layer_norm(delta, ln.weight, ln.bias, ln.eps), delta
    return bk.unchecked.layer_norm(delta, ln.weight, ln.bias, ln.eps, residual=residual)


class BloomBlock(nn.Module):
    def __init__(self, config: BloomConfig, layer_idx: int):
        super().__init__()
        eps = config.layer_norm_epsilon
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.self_attention = BloomAttention(config, layer_idx)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=eps)
        self.mlp = BloomMLP(config)
        self.residual_post_ln = config.apply_residual_connection_post_layernorm

    def forward(self, delta: Tensor, residual_stream: Tensor | None, shared: LayerInputs,
                cache: BloomCache | None, head_mask: Tensor | None, output_attentions: bool):
        """The block's input hidden state is delta + residual_stream (just delta when that is None).

        Returns (mlp_out, residual_stream, block_input, attention_probs); the block's output hidden
        state is mlp_out + residual_stream, summed by the next LayerNorm.
        """
        attention_in, block_input = fused_layer_norm(self.input_layernorm, delta, residual_stream)
        attention_out, probs = self.self_attention(attention_in, shared, cache, head_mask, output_attentions)
        # What each sub-layer's output is added to: the sum before its LayerNorm (BLOOM's default), or,
        # with apply_residual_connection_post_layernorm, that LayerNorm's output.
        residual_stream = attention_in if self.residual_post_ln else block_input
        mlp_in, after_attention = fused_layer_norm(self.post_attention_layernorm, attention_out, residual_stream)
        residual_stream = mlp_in if self.residual_post_ln else after_attention
        return self.mlp(mlp_in), residual_stream, block_input, probs


# What transformers' Trainer, loss utilities and generation pass to forward and BLOOM ignores (its ALiBi
# positions come from the attention mask, the cache knows its own length; the loss arguments are used by
# BloomForCausalLM and, as in transformers, by no other head). Any other unknown argument is a TypeError.
IGNORED_FORWARD_ARGS = ("num_items_in_batch", "shift_labels", "cache_position", "position_ids")


class BloomModel(BloomPreTrainedModel):
    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.word_embeddings_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.h = nn.ModuleList([BloomBlock(config, i) for i in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self._slopes: dict[torch.device, Tensor] = {}
        self.gradient_checkpointing = False  # PreTrainedModel.gradient_checkpointing_enable sets it
        self._checkpoint_kwargs: dict = {}
        self.init_weights()

    def alibi_slopes(self, device: torch.device) -> Tensor:
        """fp32 (H,) slopes, made once per device (kept out of the state dict and of .to(dtype)). Tensor
        parallel: this rank's heads' slice of the GLOBAL slopes."""
        if device not in self._slopes:
            slopes = bk.alibi_slopes(self.config.n_head, device)
            if self.tp is not None:
                slopes = slopes[self.tp.head_lo:self.tp.head_hi].contiguous()
            self._slopes[device] = slopes
        return self._slopes[device]

    @property
    def local_heads(self) -> int:
        """Heads this process computes (all of them, or a tensor-parallel rank's share)."""
        return self.config.n_head if self.tp is None else self.tp.local_heads

    def new_cache(self, batch_size: int, capacity: int, *, dtype: torch.dtype, device,
                  growable: bool = False) -> BloomCache:
        c = self.config
        return BloomCache(c.n_layer, batch_size, self.local_heads, c.head_dim, capacity, dtype=dtype,
                          device=device, growable=growable)

    def forward(
        self,
        input_ids: Tensor | None = None,
        past_key_values=None,
        attention_mask: Tensor | None = None,
        head_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ):
        config = self.config
        if past_key_values is None and "cache" in kwargs:  # transformers 5 spelling
            past_key_values = kwargs.pop("cache")
        for name in IGNORED_FORWARD_ARGS:
            kwargs.pop(name, None)
        if kwargs:
            raise TypeError(f"forward() got unexpected keyword arguments: {', '.join(sorted(kwargs))}")
        output_attentions = config.output_attentions if output_attentions is None else output_attentions
        output_hidden_states = (config.output_hidden_states if output_hidden_states is None
                                else output_hidden_states)
        return_dict = config.return_dict if return_dict is None else return_dict
        if use_cache is None:  # a cache is only worth building for inference
            use_cache = config.use_cache and not self.training

        if past_key_values is not None and not isinstance(past_key_values, BloomCache):
            past_key_values = BloomCache.from_legacy_cache(past_key_values, self.local_heads)
        tp = self.tp
        head_mask = check_forward_inputs(config, input_ids, inputs_embeds, attention_mask,
                                         past_key_values if tp is None else tp.checked_cache(past_key_values),
                                         head_mask, self.word_embeddings.weight)
        if tp is not None and head_mask is not None:
            head_mask = head_mask[:, tp.head_lo:tp.head_hi]
        if self.word_embeddings.weight.dtype == torch.float64 and not self.__dict__.get("_said_float64"):
            self.__dict__["_said_float64"] = True  # once per model, not per forward
            warnings.warn("BloomModel in float64: LayerNorm, attention and softmax compute in fp32 at most, so "
                          "the results carry fp32 accuracy in float64 tensors", stacklevel=2)

        embeds = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        cache = past_key_values
        if cache is None and use_cache:
            cache = self.new_cache(embeds.shape[0], embeds.shape[1], dtype=embeds.dtype,
                                   device=embeds.device, growable=True)
        hidden, all_hidden, all_attentions = self.run(
            embeds, cache, attention_mask, head_mask, output_attentions, output_hidden_states
        )
        if tp is not None and all_attentions:  # every head's probabilities, as one process returns them
            all_attentions = tuple(tp.all_gather(p, dim=1) for p in all_attentions)
        out = BaseModelOutputWithPast(hidden, cache, all_hidden, all_attentions)
        return out if return_dict else out.to_tuple()

    def run(self, embeds: Tensor, cache: BloomCache | None, attention_mask: Tensor | None,
            head_mask: Tensor | None = None, output_attentions: bool = False,
            output_hidden_states: bool = False, write_position: Tensor | None = None):
        """The blocks on validated inputs: embeds (B, S, E) -> (hidden (B, S, E), hiddens, attentions).

        With a cache, writes this call's keys/values into it and advances it by S. With
        `write_position` (long (S,), a static decode step) the keys/values go to those slots instead,
        attention runs over the cache's whole capacity, attention_mask (B, capacity) hides the slots
        not written yet, and the cache's length is not touched: every call has the same shapes.
        """
        batch, seq = embeds.shape[:2]
        if write_position is not None:
            key_len = cache.capacity
        elif cache is not None:
            cache.reserve(seq)
            key_len = cache.length + seq
        else:
            key_len = seq
        attention = bk.unchecked.prepare_attention(
            self.alibi_slopes(embeds.device), attention_mask, batch, seq, key_len, embeds.dtype,
            new_slots=write_position, cached_padding_zeroed=cache is None or cache.padding_zeroed)
        shared = LayerInputs(attention, attention_mask, write_position)
        ln = self.word_embeddings_layernorm
        delta = bk.unchecked.layer_norm(embeds, ln.weight, ln.bias, ln.eps)
        residual_stream = None
        all_hidden = () if output_hidden_states else None
        all_attentions = () if output_attentions else None
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled() and cache is None
        for i, block in enumerate(self.h):
            args = (delta, residual_stream, shared, cache, None if head_mask is None else head_mask[i],
                    output_attentions)
            if checkpointing:
                delta, residual_stream, block_input, probs = torch.utils.checkpoint.checkpoint(
                    block, *args, **self._checkpoint_kwargs)
            else:
                delta, residual_stream, block_input, probs = block(*args)
            if output_hidden_states:
                all_hidden += (block_input,)
            if output_attentions:
                all_attentions += (probs,)
        hidden, _ = fused_layer_norm(self.ln_f, delta, residual_stream)
        if output_hidden_states:
            all_hidden += (hidden,)
        if cache is not None and write_position is None:
            cache.advance(seq)
        return hidden, all_hidden, all_attentions


class BloomForCausalLM(BloomPreTrainedModel):
    _tied_weights = {"lm_head.weight": "transformer.word_embeddings.weight"}

    def __init__(self, config: BloomConfig):
        super().__init__(config)
        self.transformer = BloomModel(config)
        self.lm_head = BloomLinear(config.hidden_size, config.vocab_size, bias=False)
        self.generation_config = GenerationConfig.from_model_config(config)
        self.tie_weights()

    def tie_weights(self) -> None:
        # An int8 lm_head (bloom.quantization) holds its own quantised copy: nothing to tie.
        if getattr(self.config, "tie_word_embeddings", True) and isinstance(self.lm_head, nn.Linear):
            self.lm_head.weight = self.transformer.word_embeddings.weight

    def next_token_logits(self, input_ids: Tensor, cache: BloomCache, attention_mask: Tensor | None,
                          write_position: Tensor | None = None) -> Tensor:
        """fp32 logits (B, V) of the last position only (the lm_head runs on B rows, not B * S).

        No input checks: generation's own tokens. `write_position`: a static decode step (see
        BloomModel.run).
        """
        hidden, _, _ = self.transformer.run(self.transformer.word_embeddings(input_ids), cache, attention_mask,
                                            write_position=write_position)
        return self.lm_head(hidden[:, -1]).float()

    def generate(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None, *, generation_config=None,
                 **kwargs) -> Tensor:
        """Prompt + new tokens; see bloom.generation.generate for the options (max_new_tokens, ...).
        Defaults come from `generation_config` (ours, transformers' or a dict) or else the model's
        (`model.generation_config`, read from generation_config.json); keywords win over both."""
        from .generation import generate

        defaults = GenerationConfig.from_any(generation_config if generation_config is not None
                                             else self.generation_config).generate_kwargs()
        if self.tp is not None:  # every rank must sample the same tokens: rank 0's seed for all
            kwargs["generator"] = self.tp.shared_seed(kwargs.get("generator"))
        return generate(self, input_ids, attention_mask, **{**defaults, **kwargs})

    def forward(
        self,
        input_ids: Tensor | None = None,
        past_key_values=None,
        attention_mask: Tensor | None = None,
        head_mask: Tensor | None = None,
        inputs_embeds: Tensor | None = None,
        labels: Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int = 0,
        **kwargs,
    ):
        """`logits_to_keep=n` computes logits for the last n positions only (0: all). The loss takes
        transformers' `num_items_in_batch` (summed, then divided by it: gradient accumulation) and
        `shift_labels` (labels already shifted, e.g. by a sequence-parallel trainer)."""
        return_dict = self.config.return_dict if return_dict is None else return_dict
        check_logits_to_keep(logits_to_keep)
        num_items_in_batch = kwargs.pop("num_items_in_batch", None)
        shift_labels = kwargs.pop("shift_labels", None)
        out = self.transformer(
            input_ids, past_key_values, attention_mask, head_mask, inputs_embeds, use_cache,
            output_attentions, output_hidden_states, return_dict=True, **kwargs,
        )
        hidden = out.last_hidden_state
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)

        loss = None
        if labels is not None or shift_labels is not None:
            for name, given in (("labels", labels), ("shift_labels", shift_labels)):
                if given is not None:
                    check_labels(given, logits.shape[:2], self.config.vocab_size, name)
            loss = causal_lm_loss(logits, labels, num_items_in_batch, shift_labels)
        result = CausalLMOutputWithPast(loss, logits, out.past_key_values, out.hidden_states, out.attentions)
        return result if return_dict else result.to_tuple()


def causal_lm_loss(logits: Tensor, labels: Tensor | None, num_items_in_batch=None,
                   shift_labels: Tensor | None = None) -> Tensor:
    """Next-token cross-entropy in fp32: position t predicts labels[t + 1] (or shift_labels[t]); -100
    is ignored. The mean over the counted tokens, or with num_items_in_batch (transformers' gradient
    accumulation) their sum divided by it."""
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=-100)[:, 1:]
    reduction = "mean" if num_items_in_batch is None else "sum"
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                           shift_labels.to(logits.device).reshape(-1), ignore_index=-100, reduction=reduction)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    return loss
