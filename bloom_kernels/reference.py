"""Eager PyTorch definition of every bloom_kernels op.

This file is the truth: the Triton kernels and the CPU routes of cpu.py are tested against it, and it
is the path every op takes on the CPU (linear: cpu.py's route). Each op upcasts to fp32, computes, and
casts back to the input dtype once, so a kernel that keeps fp32 inside and rounds once at the store
should agree with it to the last bit or two.

Ops:
    alibi_slopes(n_head)                                    -> (H,) fp32
    alibi_attention(q, k, v, slopes, attention_mask, scale) -> (B, H, Sq, D)
    alibi_key_positions(attention_mask)                     -> (B, Sk) fp32, -1 at padding
    alibi_attention_at(q, k, v, slopes, key_positions, scale) -> (B, H, Sq, D)
    alibi_attention_probs(...)                              -> ((B, H, Sq, D), (B, H, Sq, Sk) probs)
    bias_gelu(x, bias)                                      -> x.shape
    layer_norm(x, weight, bias, eps, residual)              -> y  or  (y, x + residual)
    quantize_int8(weight)                                   -> (int8 (N, K), fp32 (N,))
    int8_linear(x, weight_int8, scale, bias)                -> (..., N)
    linear(x, weight, bias)                                 -> (..., N)   (F.linear, in x.dtype)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

# BLOOM's tanh-GeLU constants, kept exactly as Megatron-DeepSpeed and transformers write them:
# sqrt(2/pi) rounded to 0.79788456, and 0.1070322243 = 0.79788456 * 3 * 0.044715 for the derivative.
GELU_SQRT_2_OVER_PI = 0.79788456
GELU_CUBIC = 0.044715
GELU_DERIV_CUBIC = 0.1070322243

INT8_MAX = 127.0

# --------------------------------------------------------------------------------------------------
# ALiBi
# --------------------------------------------------------------------------------------------------
def alibi_slopes(n_head: int, device: torch.device | str | None = None) -> Tensor:
    """The ALiBi slope of each head, fp32, shape (n_head,).

    For a power of two n the slopes are 2^(-8/n * k), k = 1..n. For any other n (BLOOM-176B: 112) the
    first 2^floor(log2 n) heads take that rule and the rest take every other slope (odd powers) of the
    rule for twice that power of two — the interleaving of the ALiBi paper and of transformers.
    """
    if isinstance(n_head, bool) or not isinstance(n_head, int) or n_head < 1:
        raise ValueError(f"alibi_slopes: n_head must be a positive int, got {n_head!r}")
    closest = 2 ** math.floor(math.log2(n_head))
    # Same float32 pow as transformers so the slopes agree bit for bit.
    base = torch.tensor(2 ** (-(2 ** -(math.log2(closest) - 3))), dtype=torch.float32, device=device)
    slopes = torch.pow(base, torch.arange(1, closest + 1, dtype=torch.int32, device=device))
    if closest != n_head:
        extra_base = torch.tensor(
            2 ** (-(2 ** -(math.log2(2 * closest) - 3))), dtype=torch.float32, device=device
        )
        remaining = min(closest, n_head - closest)
        extra_powers = torch.arange(1, 2 * remaining + 1, 2, dtype=torch.int32, device=device)
        slopes = torch.cat([slopes, torch.pow(extra_base, extra_powers)])
    return slopes


def alibi_positions(attention_mask: Tensor | None, batch: int, key_len: int, device) -> Tensor:
    """Position of every key for the ALiBi bias, fp32 (B, Sk): cumsum(mask) - 1 (0 at padding).

    This is transformers' rule. With left padding the first real token gets position 0, so a padded
    row sees exactly the biases it would see unpadded.
    """
    if attention_mask is None:
        return torch.arange(key_len, device=device, dtype=torch.float32).expand(batch, key_len)
    mask = (attention_mask != 0).to(torch.int64)  # any non-zero value is a token, as for `allowed`
    return ((mask.cumsum(-1) - 1) * mask).to(torch.float32)


def alibi_key_positions(attention_mask: Tensor) -> Tensor:
    """The one tensor the attention ops take for a mask, fp32 (B, Sk): the key's ALiBi position
    (alibi_positions) at tokens and -1 at padding. A model computes it once per forward."""
    batch, key_len = attention_mask.shape
    pos = alibi_positions(attention_mask, batch, key_len, attention_mask.device)
    return torch.where(attention_mask != 0, pos, -1.0)


def _attention_scores(q, k, slopes, key_positions, scale) -> tuple[Tensor, Tensor]:
    """(scores (B, H, Sq, Sk) fp32 with ALiBi bias, causal mask and key padding applied (-inf), each
    query row divided by 2^shift; shift (B, H, Sq, 1) int). `_masked_softmax` multiplies the shift back
    after subtracting the row max.

    Why: q·k overflows fp32 once |q|·|k| passes ~1e18 per element (and inf - inf is NaN), though the
    softmax of such scores is finite. Each query row is scaled by a power of two (exact, so ordinary
    inputs get the very same rounding) so that |q'| < 2^-(1 + log2 D): then |q'·k| < max|k| / 2."""
    batch, _, q_len, head_dim = q.shape
    key_len = k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    q = q.float()
    with torch.no_grad():
        _, exponent = torch.frexp(q.abs().amax(-1, keepdim=True))  # max|q_row| < 2^exponent
        shift = (exponent + 1 + math.ceil(math.log2(max(head_dim, 1)))).clamp(min=0)
        down = torch.ldexp(torch.ones_like(q[..., :1]), -shift)
    scores = torch.matmul(q * down, _zero_padded_keys(k, key_positions).transpose(-1, -2)) * scale
    if key_positions is None:
        pos = alibi_positions(None, batch, key_len, q.device)
    else:
        pos = key_positions.float().clamp(min=0)
    scores = scores + slopes.float().view(1, -1, 1, 1) * pos[:, None, None, :] * down
    # Queries are aligned to the END of the keys: query i is at absolute position Sk - Sq + i.
    q_abs = torch.arange(key_len - q_len, key_len, device=q.device)
    allowed = torch.arange(key_len, device=q.device)[None, :] <= q_abs[:, None]  # (Sq, Sk)
    allowed = allowed[None, None]
    if key_positions is not None:
        allowed = allowed & (key_positions >= 0)[:, None, None, :]
    return scores.masked_fill(~allowed, float("-inf")), shift


def _zero_padded_keys(t: Tensor, key_positions: Tensor | None) -> Tensor:
    """k or v (B, H, Sk, D) in fp32 with the rows of padded keys set to 0: whatever a padded position
    holds (NaN, inf) must not reach a real output or gradient (0 * NaN = NaN in p·v and ds·k)."""
    t = t.float()
    if key_positions is None:
        return t
    return t.masked_fill((key_positions < 0)[:, None, :, None], 0.0)


def _masked_softmax(scores: Tensor, shift: Tensor) -> Tensor:
    """Softmax over keys of scores * 2^shift (see _attention_scores); a row with no visible key (a
    padded query) gets all-zero weights."""
    if scores.shape[-1] == 0:  # no keys (hence no queries): nothing to normalise
        return scores
    top = scores.amax(-1, keepdim=True)
    # Only rows where every key is hidden are zeroed: a NaN/inf coming from the inputs stays visible.
    hidden_row = torch.isneginf(top)
    half = shift // 2  # 2^shift itself may pass fp32's range (shift <= 137): multiply in two steps
    up_a = torch.ldexp(torch.ones_like(top), half)
    up_b = torch.ldexp(torch.ones_like(top), shift - half)
    weights = torch.exp((scores - top.masked_fill(hidden_row, 0.0)) * up_a * up_b)
    probs = weights / weights.sum(-1, keepdim=True)
    return probs.masked_fill(hidden_row, 0.0)


def alibi_attention(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, attention_mask: Tensor | None = None,
                    scale: float | None = None) -> Tensor:
    """softmax(q kᵀ·scale + slope_h·pos_j, causal, padded keys excluded) v, in fp32, cast to q.dtype.

    q (B, H, Sq, D), k/v (B, H, Sk, D) with Sq <= Sk, any strides; slopes (H,);
    attention_mask (B, Sk) 1 = token, 0 = padding; scale defaults to 1/sqrt(D).
    Rows with no visible key (queries at padded positions) return zeros.
    """
    positions = None if attention_mask is None else alibi_key_positions(attention_mask)
    return alibi_attention_at(q, k, v, slopes, positions, scale)


def alibi_attention_at(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, key_positions: Tensor | None,
                       scale: float | None = None) -> Tensor:
    """alibi_attention with the mask already turned into key positions (alibi_key_positions: fp32
    (B, Sk), -1 at padding; None = no padding)."""
    probs = _masked_softmax(*_attention_scores(q, k, slopes, key_positions, scale))
    return torch.matmul(probs, _zero_padded_keys(v, key_positions)).to(q.dtype)


def alibi_attention_probs(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, attention_mask: Tensor | None = None,
                          scale: float | None = None, dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """alibi_attention that also returns the probabilities, with optional dropout on them.

    Dropout is applied to the probabilities in q.dtype with the same call and shape transformers
    uses, so under the same RNG seed both drop the same entries. Returns (out, probs).
    """
    positions = None if attention_mask is None else alibi_key_positions(attention_mask)
    probs = _masked_softmax(*_attention_scores(q, k, slopes, positions, scale)).to(q.dtype)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p, training=True)
    out = torch.matmul(probs.float(), _zero_padded_keys(v, positions)).to(q.dtype)
    return out, probs


# --------------------------------------------------------------------------------------------------
# bias + GeLU
# --------------------------------------------------------------------------------------------------
def gelu_forward_fp32(h: Tensor) -> Tensor:
    """BLOOM's tanh GeLU on an fp32 tensor."""
    return h * 0.5 * (1.0 + torch.tanh(GELU_SQRT_2_OVER_PI * h * (1.0 + GELU_CUBIC * h * h)))


def gelu_backward_fp32(grad: Tensor, h: Tensor) -> Tensor:
    """BLOOM's hand-written derivative of its tanh GeLU (Megatron's bias_gelu_back), fp32."""
    t = torch.tanh(GELU_SQRT_2_OVER_PI * h * (1.0 + GELU_CUBIC * h * h))
    dgelu = 0.5 * h * ((1.0 - t * t) * (GELU_SQRT_2_OVER_PI + GELU_DERIV_CUBIC * h * h)) + 0.5 * (1.0 + t)
    return dgelu * grad


class _BiasGelu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor) -> Tensor:
        ctx.save_for_backward(x, bias)
        return gelu_forward_fp32(x.float() + bias.float()).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, bias = ctx.saved_tensors
        dh = gelu_backward_fp32(grad_out.float(), x.float() + bias.float())
        dx = dh.to(x.dtype) if ctx.needs_input_grad[0] else None
        dbias = dh.reshape(-1, bias.shape[-1]).sum(0).to(bias.dtype) if ctx.needs_input_grad[1] else None
        return dx, dbias


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """gelu_tanh(x + bias) with BLOOM's constants; bias (N,) broadcasts over x (..., N)."""
    return _BiasGelu.apply(x, bias)


# --------------------------------------------------------------------------------------------------
# (residual-add +) LayerNorm
# --------------------------------------------------------------------------------------------------
def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-5,
    residual: Tensor | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim in fp32. With `residual`: returns (LN(x + residual), x + residual).

    The sum is formed in fp32 and normalised before rounding; it is returned in x.dtype (it is the
    next residual stream).
    """
    h = x.float() if residual is None else x.float() + residual.float()
    if h.numel() == 0 or (h.device.type == "cpu" and not torch.compiler.is_compiling() and not _overflows(h)):
        y = F.layer_norm(h, (h.shape[-1],), weight.float(), bias.float(), eps)
    else:
        y = _layer_norm_scaled(h, weight, bias, eps)
    y = y.to(x.dtype)
    if residual is None:
        return y
    return y, h.to(x.dtype)


def _layer_norm_scaled(h: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LayerNorm of fp32 h with each row's deviations divided by their largest magnitude s before
    squaring: (d/s)² stays O(1) where d² overflows fp32 (|d| > ~1.8e19), and
    rstd = rsqrt(mean((d/s)²) + eps/s²) / s is the same number. s >= sqrt(eps) keeps eps/s² finite
    (a constant row: rstd = 1/sqrt(eps), as unscaled). s is a constant to autograd: the result does not
    depend on it, so its derivative in d is the exact one. Used on the CPU for rows F.layer_norm cannot
    take (LAYER_NORM_SCALED_ABOVE) and wherever checking first would cost a device sync or a graph
    break (a GPU, where this reference is the fallback; a compiled graph, where inductor fuses it)."""
    d = h - h.mean(-1, keepdim=True)
    scale = d.detach().abs().amax(-1, keepdim=True).clamp(min=eps ** 0.5)
    dn = d / scale
    rstd = torch.rsqrt((dn * dn).mean(-1, keepdim=True) + eps / (scale * scale))
    return dn * rstd * weight.float() + bias.float()


# Rows past this magnitude can overflow F.layer_norm's fp32 sum of squares (N * (2|h|)^2 > 3.4e38 for
# N in the tens of thousands): it then returns a finite but wrong row (rstd = 0) or NaN gradients.
LAYER_NORM_SCALED_ABOVE = 2.0**50


def _overflows(h: Tensor) -> bool:
    """Whether any row of fp32 h is large enough to need the scaled LayerNorm (a CPU check, no sync)."""
    return bool((h.abs().amax(-1) > LAYER_NORM_SCALED_ABOVE).any())


# --------------------------------------------------------------------------------------------------
# int8 weight-only linear
# --------------------------------------------------------------------------------------------------
def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel absmax quantisation of a (N, K) weight.

    Returns (weight_int8 (N, K) int8, scale (N,) fp32) with weight ≈ weight_int8 * scale[:, None].
    An all-zero row gets scale 0 and zeros (no division by zero); so does a row of no elements (K = 0).
    """
    w = weight.detach().float()
    absmax = w.abs().amax(dim=-1) if w.shape[-1] else w.new_zeros(w.shape[:-1])
    scale = absmax / INT8_MAX
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(weight_int8: Tensor, scale: Tensor) -> Tensor:
    """fp32 (N, K) weight from its int8 form."""
    return weight_int8.float() * scale.float()[:, None]


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """y = x · (weight_int8 * scale)ᵀ + bias in fp32, cast to x.dtype. x (..., K) -> (..., N)."""
    y = torch.matmul(x.float(), dequantize_int8(weight_int8, scale).t())
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


# --------------------------------------------------------------------------------------------------
# float linear (the model's projections)
# --------------------------------------------------------------------------------------------------
def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias), computed in x.dtype like nn.Linear (the CPU routes are in cpu.py)."""
    return F.linear(x, weight, bias)