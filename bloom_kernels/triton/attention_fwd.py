"""Prefill forward of causal ALiBi flash attention (see attention.py for the op, its numerics and
layouts): one program per BLOCK_M queries of one (batch, head), walking its keys in the Triton
tutorial's two causal stages.

    stage 1  key blocks every query of the block sees in full: no causal or boundary mask
    stage 2  the blocks crossing the diagonal: causal mask, keys past K_LEN masked when the length
             does not divide BLOCK_N

Writes out (q.dtype) and the base-2 log-sum-exp relative to each row's own position (fp32), which
the backward rebases to its own reference positions.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _attention_launch as tiles
from ._alibi import (LOG2E, attend, head_ptr, head_slope, key_tiles, load_rows, query_block, query_shift,
                     softmax_finish, softmax_init, tile_ptrs)
from ._launch import dot_precision, head_dim_block


@tiles.autotuned(tiles.FWD, (32, 16), tiles.prune_fwd)
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, Sq, D), (B, H, Sk, D), (B, H, Sk, D); any strides
    slopes_ptr,  # (H,) fp32
    pos_ptr,  # (B, Sk) fp32 key positions, -1 at padding (read only if HAS_MASK)
    out_ptr,  # (B, H, Sq, D) q.dtype, any strides
    lse_ptr,  # (B, H, Sq) fp32 contiguous: base-2 log-sum-exp relative to the row's position
    q_strides, k_strides, v_strides, pos_strides, out_strides,  # each tensor's .stride()
    qk_scale,  # scale * log2(e)
    NUM_HEADS, Q_LEN, K_LEN, Q_BUCKET, K_BUCKET, ALIGNED,  # the last three: autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SCALED: tl.constexpr,  # SCALED: q·k may pass fp32's range (not fp16)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    off_b, off_h, q0, rows = query_block(BLOCK_M)
    key_off = K_LEN - Q_LEN  # query i sits at key position key_off + i
    offs_m = q0 + rows
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = load_rows(q_ptr, q_strides, off_b, off_h, q0, rows, offs_d, Q_LEN, not EVEN_M, HEAD_DIM, BLOCK_D)
    keys = key_tiles(k_ptr, v_ptr, k_strides, v_strides, off_b, off_h, offs_n0, offs_d)
    pos_base, stride_pn = pos_ptr + off_b * pos_strides[0], pos_strides[1]
    slope2 = head_slope(slopes_ptr, off_h)
    q, down, up = query_shift(q, SCALED)  # scores and bias in units of 2^c inside the loops
    ref = key_off + q0  # position of the block's first query: scores are biased relative to it

    acc, l_i, m_i = softmax_init(BLOCK_M, BLOCK_D)
    # stage 1: key blocks every query of this block sees in full (all inside [0, K_LEN))
    diag_lo = tl.maximum(key_off + q0, 0) // BLOCK_N * BLOCK_N  # >= 0 provably: clamped stage bounds
    acc, l_i, m_i = attend(acc, l_i, m_i, q, keys, pos_base, stride_pn, offs_m, offs_n0, offs_d,
                           0, diag_lo, K_LEN, key_off, ref, slope2 * down, qk_scale, up, SCALED,
                           HEAD_DIM, BLOCK_D, HAS_MASK, CAUSAL=False, MASK_KEYS=False, SPLIT_END=False,
                           CARRY_POS=True, DOT_PRECISION=DOT_PRECISION)
    # stage 2: the blocks crossing the diagonal, causal mask on
    diag_hi = tl.minimum(key_off + q0 + BLOCK_M, K_LEN)
    acc, l_i, m_i = attend(acc, l_i, m_i, q, keys, pos_base, stride_pn, offs_m, offs_n0, offs_d,
                           diag_lo, diag_hi, K_LEN, key_off, ref, slope2 * down, qk_scale, up, SCALED,
                           HEAD_DIM, BLOCK_D, HAS_MASK, CAUSAL=True, MASK_KEYS=not EVEN_N, SPLIT_END=False,
                           CARRY_POS=True, DOT_PRECISION=DOT_PRECISION)

    out, lse, has_key = softmax_finish(acc, l_i, m_i, up)
    # rebase the log-sum-exp from `ref` to each row's own position key_off + i; +inf: no visible key
    lse = tl.where(has_key, lse - slope2 * rows.to(tl.float32), float("inf"))
    o_ptrs = tile_ptrs(head_ptr(out_ptr, out_strides, off_b, off_h) + q0.to(tl.int64) * out_strides[2],
                      rows, offs_d, out_strides)
    lse_ptrs = lse_ptr + (off_b * NUM_HEADS + off_h) * Q_LEN + offs_m
    out = out.to(out_ptr.dtype.element_ty)
    if EVEN_M:
        tl.store(lse_ptrs, lse)
        if BLOCK_D == HEAD_DIM:
            tl.store(o_ptrs, out)
        else:
            tl.store(o_ptrs, out, mask=offs_d[None, :] < HEAD_DIM)
    else:
        tl.store(lse_ptrs, lse, mask=offs_m < Q_LEN)
        tl.store(o_ptrs, out, mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < HEAD_DIM))


def forward(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, positions: Tensor | None, scale: float,
            out: Tensor, lse: Tensor) -> None:
    """Fill out (B, H, Sq, D) and lse (B, H, Sq) fp32; positions (B, Sk) fp32 or None (no mask)."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    pos, pos_strides, has_mask = tiles.positions_arg(positions, slopes)
    grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    _attn_fwd_kernel[grid](
        q, k, v, slopes, pos, out, lse, q.stride(), k.stride(), v.stride(), pos_strides, out.stride(),
        scale * LOG2E.value, heads, q_len, k_len, *tiles.key_lengths(q_len, k_len),
        HEAD_DIM=head_dim, BLOCK_D=head_dim_block(head_dim), HAS_MASK=has_mask,
        DOT_PRECISION=dot_precision(q.dtype),
        # fp32 only: bf16 could overflow too, but a q tile computed in registers instead of loaded stays in
        # registers for sm_90's wgmma (+28 registers a thread on average, fewer CTAs per SM in 6 of 31
        # tuned variants; ptxas, Triton 3.6), a price the prefill would pay for inputs BLOOM's
        # LayerNorm + projections cannot produce. Decode (no wgmma at 16 rows) scales bf16 too.
        SCALED=q.dtype == torch.float32,
    )

