"""Backward of causal ALiBi flash attention (see attention.py for the op, its numerics and layouts):
delta = rowsum(dO * O), then a dK/dV kernel (one key block, looping over the query blocks that see it)
and a dQ kernel (one query block, looping over its key blocks): no atomics, deterministic.

Each kernel recomputes the probabilities from the forward's base-2 log-sum-exp, rebased from each
row's own position to the program's reference position. Both walk the causal stages explicitly: the
blocks wholly on one side of the diagonal without the causal mask, the blocks crossing it with it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _attention_launch as tiles
from ._alibi import (LOG2E, alibi_bias, head_ptr, head_slope, key_block_scores, key_positions, key_tiles,
                     load_key_tile, load_rows, load_tile, query_block, tile_offsets, tile_ptrs)
from ._launch import dot_precision, empty, head_dim_block, triton_interpreting


@triton.jit
def _bwd_preprocess_kernel(
    out_ptr, do_ptr,  # (B, H, Sq, D), any strides
    delta_ptr,  # (B, H, Sq) fp32 contiguous: rowsum(dO * O)
    out_strides, do_strides,
    NUM_HEADS, Q_LEN,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)
    o = load_tile(tile_ptrs(head_ptr(out_ptr, out_strides, off_b, off_h), rows, offs_d, out_strides),
                  offs_m, Q_LEN, offs_d, True, HEAD_DIM, BLOCK_D)
    do = load_tile(tile_ptrs(head_ptr(do_ptr, do_strides, off_b, off_h), rows, offs_d, do_strides),
                   offs_m, Q_LEN, offs_d, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + (off_b * NUM_HEADS + off_h) * Q_LEN + offs_m, delta, mask=offs_m < Q_LEN)


# --------------------------------------------------------------------------------------------------
# dK, dV
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dkdv_inner(dk, dv, k, v, pos, queries, offs_n, offs_d, lo, hi, slope2, qk_scale, key_off, Q_LEN,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, EVEN_M: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi), transposed (keys x queries).
    queries = (q_base, do_base, q_rel, do_rel, lse_base, delta_base, stride_qm, stride_dm)."""
    q_base, do_base, q_rel, do_rel, lse_base, delta_base, stride_qm, stride_dm = queries
    rows = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + rows
        q = load_tile(q_base + tl.cast(start_m, tl.int64) * stride_qm + q_rel, offs_m, Q_LEN, offs_d,
                      not EVEN_M, HEAD_DIM, BLOCK_D)
        do = load_tile(do_base + tl.cast(start_m, tl.int64) * stride_dm + do_rel, offs_m, Q_LEN, offs_d,
                       not EVEN_M, HEAD_DIM, BLOCK_D)
        if EVEN_M:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        else:  # rows past Q_LEN: lse = +inf makes their probabilities 0
            lse = tl.load(lse_base + offs_m, mask=offs_m < Q_LEN, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < Q_LEN, other=0.0)
        # bias and log-sum-exp both relative to ref = position of the block's first query
        bias = alibi_bias(pos, key_off + start_m, slope2, HAS_MASK)
        lse = lse + slope2 * rows.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale + bias[:, None]
        p_t = tl.math.exp2(s_t - lse[None, :])
        if CAUSAL:
            p_t = tl.where(key_off + offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@tiles.autotuned(tiles.DKDV, (16, 32), tiles.prune_dkdv)
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # (B, H, Sq, D), (B, H, Sk, D) x2, (B, H, Sq, D); any strides
    slopes_ptr, pos_ptr, lse_ptr, delta_ptr,  # (H,), (B, Sk) (-1 at padding), (B, H, Sq) x2: fp32
    dk_ptr, dv_ptr,  # (B, H, Sk, D) k.dtype, any strides
    q_strides, k_strides, v_strides, do_strides, pos_strides, dk_strides, dv_strides,
    scale, qk_scale,
    NUM_HEADS, Q_LEN, K_LEN, Q_BUCKET, K_BUCKET, ALIGNED,  # the last three: autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK_N
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    key_off = K_LEN - Q_LEN
    cols = tl.arange(0, BLOCK_N)
    offs_n = start_n + cols
    offs_d = tl.arange(0, BLOCK_D)
    rows = tl.arange(0, BLOCK_M)

    pos = key_positions(pos_ptr + off_b * pos_strides[0] + offs_n * pos_strides[1], offs_n, K_LEN, HAS_MASK,
                        not EVEN_N)
    k_rows = head_ptr(k_ptr, k_strides, off_b, off_h) + start_n.to(tl.int64) * k_strides[2]
    v_rows = head_ptr(v_ptr, v_strides, off_b, off_h) + start_n.to(tl.int64) * v_strides[2]
    k = load_key_tile(tile_ptrs(k_rows, cols, offs_d, k_strides), offs_n, K_LEN, offs_d, pos, not EVEN_N, HAS_MASK,
                      HEAD_DIM, BLOCK_D)
    v = load_key_tile(tile_ptrs(v_rows, cols, offs_d, v_strides), offs_n, K_LEN, offs_d, pos, not EVEN_N, HAS_MASK,
                      HEAD_DIM, BLOCK_D)
    slope2 = head_slope(slopes_ptr, off_h)
    stats = (off_b * NUM_HEADS + off_h) * Q_LEN
    queries = (head_ptr(q_ptr, q_strides, off_b, off_h), head_ptr(do_ptr, do_strides, off_b, off_h),
               tile_offsets(rows, offs_d, q_strides), tile_offsets(rows, offs_d, do_strides),
               lse_ptr + stats, delta_ptr + stats, q_strides[2], do_strides[2])

    # queries that see key start_n: i >= start_n - key_off; those that see the whole key block
    # (no causal mask needed): i >= start_n + BLOCK_N - 1 - key_off
    m_lo = tl.maximum(start_n - key_off, 0) // BLOCK_M * BLOCK_M
    m_mid = (tl.maximum(start_n + BLOCK_N - 1 - key_off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    m_mid = tl.maximum(tl.minimum(m_mid, (Q_LEN + BLOCK_M - 1) // BLOCK_M * BLOCK_M), 0)  # provably >= 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    # stage 1: the query blocks crossing the diagonal, causal mask on
    dk, dv = _dkdv_inner(dk, dv, k, v, pos, queries, offs_n, offs_d, m_lo, m_mid, slope2, qk_scale,
                         key_off, Q_LEN, HEAD_DIM, BLOCK_D, BLOCK_M, HAS_MASK, CAUSAL=True, EVEN_M=EVEN_M,
                         DOT_PRECISION=DOT_PRECISION)
    # stage 2: the query blocks that see every key of this block
    dk, dv = _dkdv_inner(dk, dv, k, v, pos, queries, offs_n, offs_d, m_mid, Q_LEN, slope2, qk_scale,
                         key_off, Q_LEN, HEAD_DIM, BLOCK_D, BLOCK_M, HAS_MASK, CAUSAL=False, EVEN_M=EVEN_M,
                         DOT_PRECISION=DOT_PRECISION)
    dk = dk * scale

    dk_ptrs = tile_ptrs(head_ptr(dk_ptr, dk_strides, off_b, off_h) + start_n.to(tl.int64) * dk_strides[2],
                      cols, offs_d, dk_strides)
    dv_ptrs = tile_ptrs(head_ptr(dv_ptr, dv_strides, off_b, off_h) + start_n.to(tl.int64) * dv_strides[2],
                      cols, offs_d, dv_strides)
    if EVEN_N and BLOCK_D == HEAD_DIM:
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty))
    else:
        mask = (offs_n[:, None] < K_LEN) & (offs_d[None, :] < HEAD_DIM)
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# dQ
# --------------------------------------------------------------------------------------------------
@triton.jit
def _dq_inner(dq, q, do, lse, delta, keys, pos_base, stride_pn, offs_m, offs_n0, offs_d, lo, hi, ref,
              slope2, qk_scale, key_off, K_LEN, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
              HAS_MASK: tl.constexpr, CAUSAL: tl.constexpr, MASK_KEYS: tl.constexpr,
              DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi); lse is relative to ref."""
    BLOCK_N: tl.constexpr = offs_n0.shape[0]
    pos_ptrs = pos_base + (lo + offs_n0) * stride_pn  # advanced per block, as in _alibi.attend
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        s, k, v = key_block_scores(q, keys, pos_ptrs, start_n, offs_n, offs_d, K_LEN, ref, slope2,
                                   qk_scale, HEAD_DIM, BLOCK_D, HAS_MASK, MASK_KEYS, DOT_PRECISION)
        pos_ptrs += BLOCK_N * stride_pn
        p = tl.math.exp2(s - lse[:, None])
        if CAUSAL:
            p = tl.where(key_off + offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@tiles.autotuned(tiles.DQ, (32, 16), tiles.prune_dq)
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # (B, H, Sq, D), (B, H, Sk, D) x2, (B, H, Sq, D); any strides
    slopes_ptr, pos_ptr, lse_ptr, delta_ptr,  # (H,), (B, Sk) (-1 at padding), (B, H, Sq) x2: fp32
    dq_ptr,  # (B, H, Sq, D) q.dtype, any strides
    q_strides, k_strides, v_strides, do_strides, pos_strides, dq_strides,
    scale, qk_scale,
    NUM_HEADS, Q_LEN, K_LEN, Q_BUCKET, K_BUCKET, ALIGNED,  # the last three: autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    off_b, off_h, q0, rows = query_block(BLOCK_M)
    key_off = K_LEN - Q_LEN
    offs_m = q0 + rows
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = load_rows(q_ptr, q_strides, off_b, off_h, q0, rows, offs_d, Q_LEN, not EVEN_M, HEAD_DIM, BLOCK_D)
    do = load_rows(do_ptr, do_strides, off_b, off_h, q0, rows, offs_d, Q_LEN, not EVEN_M, HEAD_DIM, BLOCK_D)
    stats = (off_b * NUM_HEADS + off_h) * Q_LEN + offs_m
    if EVEN_M:
        lse = tl.load(lse_ptr + stats)
        delta = tl.load(delta_ptr + stats)
    else:
        lse = tl.load(lse_ptr + stats, mask=offs_m < Q_LEN, other=float("inf"))
        delta = tl.load(delta_ptr + stats, mask=offs_m < Q_LEN, other=0.0)
    slope2 = head_slope(slopes_ptr, off_h)
    ref = key_off + q0
    lse = lse + slope2 * rows.to(tl.float32)  # rebased from each row's position to ref
    keys = key_tiles(k_ptr, v_ptr, k_strides, v_strides, off_b, off_h, offs_n0, offs_d)
    pos_base, stride_pn = pos_ptr + off_b * pos_strides[0], pos_strides[1]

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # stage 1: key blocks every query of this block sees in full; stage 2: those crossing the diagonal
    diag_lo = tl.maximum(key_off + q0, 0) // BLOCK_N * BLOCK_N  # >= 0 provably: clamped stage bounds
    diag_hi = tl.minimum(key_off + q0 + BLOCK_M, K_LEN)
    dq = _dq_inner(dq, q, do, lse, delta, keys, pos_base, stride_pn, offs_m, offs_n0, offs_d, 0, diag_lo,
                   ref, slope2, qk_scale, key_off, K_LEN, HEAD_DIM, BLOCK_D, HAS_MASK, CAUSAL=False,
                   MASK_KEYS=False, DOT_PRECISION=DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, keys, pos_base, stride_pn, offs_m, offs_n0, offs_d, diag_lo,
                   diag_hi, ref, slope2, qk_scale, key_off, K_LEN, HEAD_DIM, BLOCK_D, HAS_MASK, CAUSAL=True,
                   MASK_KEYS=not EVEN_N, DOT_PRECISION=DOT_PRECISION)
    dq = (dq * scale).to(dq_ptr.dtype.element_ty)

    dq_ptrs = tile_ptrs(head_ptr(dq_ptr, dq_strides, off_b, off_h) + q0.to(tl.int64) * dq_strides[2],
                      rows, offs_d, dq_strides)
    if EVEN_M and BLOCK_D == HEAD_DIM:
        tl.store(dq_ptrs, dq)
    else:
        tl.store(dq_ptrs, dq, mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < HEAD_DIM))


def backward(grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, slopes: Tensor,
             positions: Tensor | None, scale: float, dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    """Fill dq (B, H, Sq, D), dk and dv (B, H, Sk, D) from the forward's out and lse."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    pos, pos_strides, has_mask = tiles.positions_arg(positions, slopes)
    block_d = head_dim_block(head_dim)
    common = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "HAS_MASK": has_mask,
              "DOT_PRECISION": dot_precision(q.dtype)}
    delta = empty((batch, heads, q_len), torch.float32, q.device)
    pre_m = 16 if triton_interpreting() else 64
    _bwd_preprocess_kernel[(triton.cdiv(q_len, pre_m), heads, batch)](
        out, grad_out, delta, out.stride(), grad_out.stride(), heads, q_len,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_m,
    )
    strides = (q.stride(), k.stride(), v.stride(), grad_out.stride(), pos_strides)
    sizes = (scale, scale * LOG2E.value, heads, q_len, k_len, *tiles.key_lengths(q_len, k_len))
    grid_kv = lambda meta: (triton.cdiv(k_len, meta["BLOCK_N"]), heads, batch)  # noqa: E731
    _attn_bwd_dkdv_kernel[grid_kv](
        q, k, v, grad_out, slopes, pos, lse, delta, dk, dv, *strides, dk.stride(), dv.stride(), *sizes, **common,
    )
    grid_q = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    _attn_bwd_dq_kernel[grid_q](
        q, k, v, grad_out, slopes, pos, lse, delta, dq, *strides, dq.stride(), *sizes, **common,
    )
