"""The CPU route of ALiBi attention: PyTorch's fused scaled_dot_product_attention with the ALiBi bias,
the causal mask and the key padding folded into one additive tensor.

The reference rebuilds positions, biases and masks and materialises fp32 scores in every call and
every layer (~0.2 ms of small ops per call at decode). A model builds this bias ONCE per forward
(`attention_bias`, through `unchecked.prepare_attention`) and every layer passes it to SDPA, as
transformers does. Only for fp32: the reference computes in fp32 whatever the input dtype, and SDPA
would compute a bf16/fp16 input in that dtype, so those stay on the reference.

Hidden keys get the dtype's most negative finite value, not -inf, so a row with no visible key (a
query at a left-padded position) stays finite; its output is then zeroed (query_valid), which is the
reference's rule for such rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference

DTYPES = (torch.float32,)


def attention_bias(slopes: Tensor, key_positions: Tensor | None, batch: int, q_len: int,
                   key_len: int) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """(bias (B, H, Sq, Sk) fp32, query_valid (B, 1, Sq, 1) bool or None when every query sees a key,
    padded_keys (B, 1, Sk, 1) bool or None without padding).

    bias = slope_h * pos_j where key j is visible to query i (j <= Sk - Sq + i and not padding), the
    most negative fp32 elsewhere. Positions as reference.alibi_key_positions (-1 at padding).
    """
    device = slopes.device
    if key_positions is None:
        pos = reference.alibi_positions(None, batch, key_len, device)
        visible_key = None
    else:
        pos = key_positions.clamp(min=0)
        visible_key = key_positions >= 0  # (B, Sk)
    bias = slopes.view(1, -1, 1, 1) * pos[:, None, None, :]  # (B, H, 1, Sk)
    q_abs = torch.arange(key_len - q_len, key_len, device=device)
    allowed = (torch.arange(key_len, device=device)[None, :] <= q_abs[:, None])[None]  # (1, Sq, Sk)
    if visible_key is not None:
        allowed = allowed & visible_key[:, None, :]  # (B, Sq, Sk)
    hidden = torch.finfo(torch.float32).min
    bias = bias.masked_fill(~allowed[:, None], hidden)
    query_valid = padded_keys = None
    if visible_key is not None:
        query_valid = allowed.any(-1)[:, None, :, None]
        padded_keys = ~visible_key[:, None, :, None]
    return bias, query_valid, padded_keys


def alibi_attention_biased(q: Tensor, k: Tensor, v: Tensor, bias: Tensor, query_valid: Tensor | None,
                           scale: float | None, padded_keys: Tensor | None = None) -> Tensor:
    """reference.alibi_attention_at's result (fp32 rounding aside) from a prebuilt `attention_bias`.
    Padded keys' K and V rows are zeroed and rows without a visible key selected to 0 (not multiplied):
    a NaN or inf at a padded position must not reach a real output (NaN + bias = NaN, 0 * NaN = NaN)."""
    if padded_keys is not None:
        k, v = k.masked_fill(padded_keys, 0.0), v.masked_fill(padded_keys, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
    return out if query_valid is None else torch.where(query_valid, out, 0.0)
