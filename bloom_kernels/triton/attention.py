"""Causal ALiBi flash attention in Triton: the op's entry, its custom ops and autograd. The kernels are
in attention_fwd.py (prefill), decode.py (Sq <= DECODE_MAX_QUERIES) and attention_bwd.py; their shared
arithmetic in _alibi.py, their configs in _attention_launch.py.

    out[b,h,i] = sum_j softmax_j(scale * q[b,h,i]·k[b,h,j] + slopes[h] * pos[b,j]) v[b,h,j]
    over the keys j <= Sk - Sq + i that are not padding (queries are aligned to the END of the keys).

dtypes: fp16, bf16 and fp32 (fp32 dots in IEEE precision); scores, softmax statistics and every
accumulator in fp32, one rounding to q.dtype at each store. Shapes: q (B, H, Sq, D), k/v (B, H, Sk, D),
Sq <= Sk, any B and H, head dim D <= 128 (BLOOM: 64, 80, 96, 128; a D that is not a power of two runs
in a BLOCK_D = next_power_of_2(D) tile with the extra columns masked). q, k, v are read through their
strides (BLOOM's fused QKV projection, a slice of a KV cache buffer): nothing is copied.

Positions: pos[b, j] = cumsum(mask)[b, j] - 1 with an attention mask, else j. The launcher turns the
mask into one fp32 (B, Sk) tensor holding pos at tokens and -1 at padding (a tiny torch op on the
device, no host sync); the kernels add slope * pos per key column, and -inf where pos < 0.

Numerics: the kernels work in base 2 (exp2 with log2(e) folded into the scale and the slopes). The
ALiBi bias grows with the position (slope * pos reaches thousands), so each program subtracts a
reference position R from pos before multiplying by the slope; softmax is unchanged by a per-row
constant and the scores keep their low bits. Scores past fp32's range (|q|·|k| ~ 1e19 each and up, inf
and inf - inf = NaN, though the softmax is finite): the fp32 prefill and the fp32/bf16 decode shift
each program's q tile by a power of two first and multiply it back after subtracting the row max
(_alibi.query_shift; exact for ordinary inputs); the backward does not (its gradients need scores
within fp32's range), nor the bf16 prefill (see attention_fwd.forward: registers). The saved log-sum-exp L (B, H, Sq) fp32 is relative to
each row's own position Sk - Sq + i, so backward programs can rebase it to their own R. A row with no
visible key (a query at a padded position) has l = 0: it writes zeros and L = +inf, so backward's
exp2(s - L) is 0 there.

Kernels: the forward walks one block of BLOCK_M queries over its keys in two stages (the tutorial's
causal split): blocks wholly below the diagonal without any causal or boundary mask, then the blocks
crossing it with the mask. Query lengths <= DECODE_MAX_QUERIES go to the split-KV kernel of decode.py.
Backward: delta = rowsum(dO * O), a dK/dV kernel (one key block, loop over query blocks) and a dQ
kernel (one query block, loop over key blocks), no atomics, deterministic.

Outputs: out, dq, dk, dv are (B, H, S, D) views of (B, S, H, D) buffers, so the model's
`out.transpose(1, 2).reshape(B, S, H * D)` is free. Block sizes are autotuned on the GPU (a pruned
list per kernel, keyed on power-of-two buckets of Sq and Sk, the head dim and the mask flag; timings
cached on disk): the first call of each bucket compiles and times the configs, so warm up before a
CUDA-graph capture. Limits: B and H at most 65535 each (grid), bf16 not in the CPU interpreter.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import reference
from . import attention_bwd, attention_fwd, decode
from ._launch import device_guard, empty

MAX_HEAD_DIM = 128
DECODE_MAX_QUERIES = 16  # Sq up to this runs the split-KV decode kernel


def _transposed_empty(batch, length, heads, head_dim, dtype, device) -> Tensor:
    """(B, H, S, D) view of a (B, S, H, D) buffer: the layout the model merges heads from for free."""
    return empty((batch, length, heads, head_dim), dtype, device).transpose(1, 2)


def _forward(q, k, v, slopes, positions, scale):
    batch, heads, q_len, head_dim = q.shape
    out = _transposed_empty(batch, q_len, heads, head_dim, q.dtype, q.device)
    lse = empty((batch, heads, q_len), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    kernels = decode if q_len <= DECODE_MAX_QUERIES else attention_fwd
    with device_guard(q):
        kernels.forward(q, k, v, slopes, positions, scale, out, lse)
    return out, lse


def _backward(grad_out, q, k, v, out, lse, slopes, positions, scale):
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    dq = _transposed_empty(batch, q_len, heads, head_dim, q.dtype, q.device)
    dk = _transposed_empty(batch, k_len, heads, head_dim, k.dtype, k.device)
    dv = _transposed_empty(batch, k_len, heads, head_dim, v.dtype, v.device)
    if dq.numel() == 0:  # no query: nothing attends to the keys
        return dq, dk.zero_(), dv.zero_()
    with device_guard(q):
        attention_bwd.backward(grad_out, q, k, v, out, lse, slopes, positions, scale, dq, dk, dv)
    return dq, dk, dv


# --------------------------------------------------------------------------------------------------
# custom op + autograd (opaque to torch.compile, capturable in CUDA graphs)
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("bloom_kernels::alibi_attention_fwd", mutates_args=())
def _attention_fwd_op(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, positions: Tensor | None,
                      scale: float) -> tuple[Tensor, Tensor]:
    """(out (B, H, Sq, D) over a (B, Sq, H, D) buffer, lse (B, H, Sq) fp32)."""
    return _forward(q, k, v, slopes, positions, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, slopes, positions, scale):
    batch, heads, q_len, head_dim = q.shape
    out = q.new_empty((batch, q_len, heads, head_dim)).transpose(1, 2)
    return out, q.new_empty((batch, heads, q_len), dtype=torch.float32)


@torch.library.custom_op("bloom_kernels::alibi_attention_bwd", mutates_args=())
def _attention_bwd_op(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                      slopes: Tensor, positions: Tensor | None,
                      scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _backward(grad_out, q, k, v, out, lse, slopes, positions, scale)


@_attention_bwd_op.register_fake
def _(grad_out, q, k, v, out, lse, slopes, positions, scale):
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    return (q.new_empty((batch, q_len, heads, head_dim)).transpose(1, 2),
            k.new_empty((batch, k_len, heads, head_dim)).transpose(1, 2),
            v.new_empty((batch, k_len, heads, head_dim)).transpose(1, 2))


def _setup_context(ctx, inputs, output):
    q, k, v, slopes, positions, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, slopes, positions)
    ctx.scale = scale


def _autograd_backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, slopes, positions = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(grad_out, q, k, v, out, lse, slopes, positions, ctx.scale)
    return dq, dk, dv, None, None, None  # no gradient for the slopes, positions or scale


_attention_fwd_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# the entry points used by _dispatch
# --------------------------------------------------------------------------------------------------
def alibi_attention(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor,
                    attention_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Triton ALiBi attention with the semantics of `reference.alibi_attention` (args validated)."""
    positions = None if attention_mask is None else reference.alibi_key_positions(attention_mask)
    return alibi_attention_at(q, k, v, slopes, positions, scale)


def alibi_attention_at(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, key_positions: Tensor | None,
                       scale: float | None = None) -> Tensor:
    """`reference.alibi_attention_at` in Triton: key_positions fp32 (B, Sk), -1 at padding, or None."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    slopes = slopes.detach().to(torch.float32).contiguous()  # (H,); the slopes take no gradient
    if key_positions is not None:
        key_positions = key_positions.to(torch.float32)
    out, _ = _attention_fwd_op(q, k, v, slopes, key_positions, scale)
    return out


def alibi_attention_at_unsupported(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor,
                                   key_positions: Tensor | None, scale: float | None = None) -> str | None:
    return alibi_attention_unsupported(q, k, v, slopes, None, scale)


def alibi_attention_unsupported(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor,
                                attention_mask: Tensor | None = None,
                                scale: float | None = None) -> str | None:
    """Why the kernel cannot take these (already validated) arguments, or None if it can."""
    batch, heads, _, head_dim = q.shape
    if head_dim > MAX_HEAD_DIM:
        return (f"head dim D={head_dim} is larger than the kernel's {MAX_HEAD_DIM} "
                "(BLOOM uses 64, 80, 96 and 128)")
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"dtype {q.dtype} is not one of float16, bfloat16, float32"
    if q.dtype == torch.bfloat16 and not q.is_cuda:
        return "bfloat16 cannot run in Triton's CPU interpreter (its tl.dot mis-computes bf16)"
    if batch > 65535 or heads > 65535:
        return f"B={batch} and H={heads} must each be at most 65535 (CUDA grid limit)"
    return None
