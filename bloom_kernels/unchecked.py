"""The ops without argument checks, for a caller that validated its inputs once at its own boundary.

bloom's BloomModel checks its inputs in `forward` and then runs every layer through these: the public
ops (ops.py) check shapes, dtypes and devices on every call, which in a decode step is most of the
CPU time of the small ops. Same results, same dispatch (`_dispatch.py`): only the checks are gone,
so a wrong argument here gives torch's own error (or a wrong answer), never a clear one.

Attention takes what every layer of a forward shares, prepared once by `prepare_attention`: the
slopes as the kernels want them (fp32, contiguous, on the device), the key positions (the cumsum of
the mask), and, where the CPU route runs, the additive ALiBi + mask bias of cpu_attention.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import cpu_attention, reference
from ._dispatch import attention_on_cpu_route, select, select_int8_linear, select_linear


@dataclass
class AttentionInputs:
    """What every attention layer of one forward shares (built by prepare_attention)."""

    slopes: Tensor                      # fp32 (H,), contiguous, on the device
    key_positions: Tensor | None        # fp32 (B, Sk): ALiBi position at tokens, -1 at padding; None = none
    bias: Tensor | None = None          # CPU route: additive ALiBi + mask (B, H, Sq, Sk); else None
    query_valid: Tensor | None = None   # CPU route: bool (B, 1, Sq, 1), False at queries that see no key
    padded_keys: Tensor | None = None   # CPU route: bool (B, 1, Sk, 1), True at padding
    padded_new: Tensor | None = None    # CPU route: bool (B, 1, Sq, 1), True where a new key is padding


def prepare_attention(slopes: Tensor, attention_mask: Tensor | None, batch: int, q_len: int, key_len: int,
                      dtype: torch.dtype, *, new_slots: Tensor | None = None,
                      cached_padding_zeroed: bool = False) -> AttentionInputs:
    """Once per forward: attention_mask (B, Sk) or None; q/k/v will be (B, H, Sq|Sk, D) in `dtype`.

    The new keys sit at `new_slots` (long (Sq,), a static decode step) or at the last Sq positions.
    `cached_padding_zeroed`: the keys/values before them hold zeros at every padded slot (a BloomCache
    the model filled through `zero_padded_new`), so the CPU route masks only the new ones, once, instead
    of copying the whole cache in every layer of every step."""
    slopes = slopes.to(torch.float32).contiguous()
    positions = None if attention_mask is None else reference.alibi_key_positions(attention_mask)
    if attention_on_cpu_route(slopes, dtype):
        bias, query_valid, padded_keys = cpu_attention.attention_bias(slopes, positions, batch, q_len, key_len)
        padded_new = None
        if padded_keys is not None:
            padded_new = padded_keys[:, :, -q_len:] if new_slots is None else padded_keys.index_select(2, new_slots)
            if cached_padding_zeroed:
                padded_keys = None
        return AttentionInputs(slopes, positions, bias, query_valid, padded_keys, padded_new)
    return AttentionInputs(slopes, positions)


def zero_padded_new(k: Tensor, v: Tensor, inputs: AttentionInputs) -> tuple[Tensor, Tensor]:
    """The new keys/values (B, H, Sq, D) with padded positions zeroed where the CPU route needs it
    (before they are cached): what a padded position holds must never reach a real output."""
    if inputs.padded_new is None:
        return k, v
    return k.masked_fill(inputs.padded_new, 0.0), v.masked_fill(inputs.padded_new, 0.0)


def alibi_attention(q: Tensor, k: Tensor, v: Tensor, inputs: AttentionInputs, scale: float | None) -> Tensor:
    """ops.alibi_attention on prepared inputs: q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D)."""
    if inputs.bias is not None:
        out = cpu_attention.alibi_attention_biased(q, k, v, inputs.bias, inputs.query_valid, scale,
                                                   inputs.padded_keys)
        # SDPA's fp32 scores overflow past |q|·|k| ~ 1e18 (inf - inf = NaN) though the softmax is finite:
        # then the reference, which shifts q first, answers (a non-finite input stays non-finite there).
        # A check on the output only (cheap: no K/V pass); not inside a compiled step, which cannot branch.
        if not torch.compiler.is_compiling() and not bool(torch.isfinite(out).all()):
            return reference.alibi_attention_at(q, k, v, inputs.slopes, inputs.key_positions, scale)
        return out
    positions = inputs.key_positions
    tensors = (q, k, v, inputs.slopes) if positions is None else (q, k, v, inputs.slopes, positions)
    impl = select("alibi_attention_at", tensors, q, k, v, inputs.slopes, positions, scale)
    return impl(q, k, v, inputs.slopes, positions, scale)


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    return select("bias_gelu", (x, bias), x, bias)(x, bias)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5,
               residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    tensors = (x, weight, bias) if residual is None else (x, weight, bias, residual)
    return select("layer_norm", tensors, x, weight, bias, eps, residual)(x, weight, bias, eps, residual)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    return select_linear(x)(x, weight, bias)


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    return select_int8_linear(x, weight_int8, scale, bias)(x, weight_int8, scale, bias)
