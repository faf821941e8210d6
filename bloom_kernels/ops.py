"""The public ops: validate the arguments once, then run what `_dispatch.select` picks."""

from __future__ import annotations

import torch
from torch import Tensor

from . import reference
from ._checks import check_same_device, check_same_dtype, check_shape, check_tensor
from ._dispatch import select, select_int8_linear, select_linear


def alibi_key_positions(attention_mask: Tensor) -> Tensor:
    """fp32 (B, Sk): each key's ALiBi position, cumsum(mask) - 1, at tokens and -1 at padding; what the
    attention kernels read for a mask (see reference.alibi_key_positions)."""
    check_tensor("attention_mask", attention_mask, ndim=2, dtypes=None)
    return reference.alibi_key_positions(attention_mask)


def alibi_slopes(n_head: int, device: torch.device | str | None = None) -> Tensor:
    """ALiBi slope of each head, fp32 (n_head,); any head count (see reference.alibi_slopes)."""
    return reference.alibi_slopes(n_head, device)


def _check_attention(q, k, v, slopes, attention_mask, scale) -> None:
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    check_tensor("v", v, ndim=4)
    check_same_dtype(q=q, k=k, v=v)
    batch, heads, q_len, head_dim = q.shape
    key_len = k.shape[2]
    check_shape("k", k, (batch, heads, None, head_dim), "(B, H, Sk, D) matching q (B, H, Sq, D)")
    check_shape("v", v, (batch, heads, key_len, head_dim), "same as k")
    if q_len > key_len:
        raise ValueError(
            f"q has {q_len} queries but k has only {key_len} keys; queries are aligned to the end of "
            "the keys, so Sq must be <= Sk"
        )
    check_tensor("slopes", slopes, dtypes=None)
    check_shape("slopes", slopes, (heads,), "one slope per head")
    if attention_mask is not None:
        # int/bool/float 0-1 masks are all accepted, as in transformers
        check_tensor("attention_mask", attention_mask, dtypes=None)
        check_shape("attention_mask", attention_mask, (batch, key_len), "(B, Sk): 1 = token, 0 = padding")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    check_same_device(q=q, k=k, v=v, slopes=slopes, attention_mask=attention_mask)


def alibi_attention(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor,
                    attention_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Causal ALiBi attention; q (B, H, Sq, D), k/v (B, H, Sk, D) -> (B, H, Sq, D).

    Queries are aligned to the end of the keys (query i sees keys <= Sk - Sq + i); key j's bias is
    slopes[h] * (cumsum(attention_mask) - 1)[j]; padded keys get no weight.
    """
    _check_attention(q, k, v, slopes, attention_mask, scale)
    tensors = (q, k, v, slopes) if attention_mask is None else (q, k, v, slopes, attention_mask)
    impl = select("alibi_attention", tensors, q, k, v, slopes, attention_mask, scale)
    return impl(q, k, v, slopes, attention_mask, scale)


def alibi_attention_probs(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor,
                          attention_mask: Tensor | None = None, scale: float | None = None,
                          dropout_p: float = 0.0) -> tuple[Tensor, Tensor]:
    """alibi_attention that also returns the (B, H, Sq, Sk) probabilities, with optional dropout.

    Always the eager reference: a fused kernel never materialises the probabilities.
    """
    _check_attention(q, k, v, slopes, attention_mask, scale)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p!r}")
    return reference.alibi_attention_probs(q, k, v, slopes, attention_mask, scale, dropout_p)


def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """BLOOM's tanh GeLU of x + bias; x (..., N), bias (N,)."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("bias", bias)
    check_shape("bias", bias, (x.shape[-1],), "the last dim of x")
    check_same_device(x=x, bias=bias)
    return select("bias_gelu", (x, bias), x, bias)(x, bias)


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5,
               residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim; with `residual` returns (LN(x + residual), x + residual)."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight)
    check_tensor("bias", bias)
    hidden = x.shape[-1]
    check_shape("weight", weight, (hidden,), "the last dim of x")
    check_shape("bias", bias, (hidden,), "the last dim of x")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
        raise ValueError(f"eps must be a positive float, got {eps!r}")
    if residual is not None:
        check_tensor("residual", residual)
        if residual.shape != x.shape:
            raise ValueError(f"residual must have the shape of x {tuple(x.shape)}; got {tuple(residual.shape)}")
        check_same_dtype(x=x, residual=residual)
    check_same_device(x=x, weight=weight, bias=bias, residual=residual)
    tensors = (x, weight, bias) if residual is None else (x, weight, bias, residual)
    return select("layer_norm", tensors, x, weight, bias, eps, residual)(x, weight, bias, eps, residual)


def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """Symmetric per-output-channel absmax int8: (N, K) -> (int8 (N, K), fp32 scale (N,))."""
    check_tensor("weight", weight, ndim=2)
    return reference.quantize_int8(weight)


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) · dequant(weight_int8 (N, K), scale (N,))ᵀ + bias (N,) -> (..., N) in x.dtype."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight_int8", weight_int8, ndim=2, dtypes=(torch.int8,))
    out_features, in_features = weight_int8.shape
    if x.shape[-1] != in_features:
        raise ValueError(
            f"x's last dim must equal weight_int8's in_features {in_features}; got x of shape {tuple(x.shape)}"
        )
    check_tensor("scale", scale)
    check_shape("scale", scale, (out_features,), "one scale per output channel")
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, (out_features,), "one bias per output channel")
    check_same_device(x=x, weight_int8=weight_int8, scale=scale, bias=bias)
    return select_int8_linear(x, weight_int8, scale, bias)(x, weight_int8, scale, bias)


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) · weight (N, K)ᵀ + bias (N,) in x.dtype: F.linear, or on the CPU the route measured
    fastest for decode-sized inputs of this shape (cpu_routes.py). On the GPU it is F.linear (cuBLAS)."""
    check_tensor("x", x, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x's last dim must equal weight's in_features {weight.shape[1]}; "
                         f"got x of shape {tuple(x.shape)}")
    if bias is not None:
        check_tensor("bias", bias)
        check_shape("bias", bias, (weight.shape[0],), "one bias per output feature")
    check_same_device(x=x, weight=weight, bias=bias)
    check_same_dtype(x=x, weight=weight, bias=bias)
    return select_linear(x)(x, weight, bias)
