"""Split-KV (flash-decoding) ALiBi attention for short query lengths against a long KV cache.

Same op and semantics as attention.py (which calls `forward` here when Sq <= DECODE_MAX_QUERIES): q (B, H, Sq, D)
with Sq <= 16, k/v (B, H, Sk, D) read through their strides (typically `cache[:, :, :L]` of a
(B, H, max_len, D) buffer), queries aligned to the end of the keys, ALiBi bias slope * pos per key,
padded keys (pos = -1 in the positions tensor) excluded. fp16 / bf16 / fp32, fp32 inside.

One query block (all Sq <= 16 queries, padded to BLOCK_M = 16 rows for tl.dot) cannot fill a GPU
with B * H programs when B is small, so the KV length is cut into NUM_SPLITS contiguous ranges of
KEYS_PER_SPLIT keys, one program each (grid (NUM_SPLITS, H, B), sized for ~4 waves of the SMs). Each
writes its normalised partial output o_s (fp32) and base-2 log-sum-exp lse_s; the combine kernel
merges them: out = sum_s 2^(lse_s - M) o_s / sum_s 2^(lse_s - M), M = max_s lse_s. With one split
the decode kernel writes the output directly and no combine runs.

Every log-sum-exp here is relative to the reference position R = Sk - Sq (the bias is
slope * (pos_j - R)); the saved per-row LSE is rebased to each row's own position Sk - Sq + i, as
attention.py's backward expects.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _attention_launch as tiles
from ._alibi import (LOG2E, attend, head_ptr, head_slope, key_tiles, load_tile, query_shift, softmax_finish,
                     softmax_init, tile_ptrs)
from ._launch import (dot_precision, empty, head_dim_block, length_bucket, scores_may_overflow, sm_count,
                      triton_interpreting)
from ._tuning import autotune, mark_spills, spill_free

MAX_SPLITS = 64  # the combine holds (splits x BLOCK_D) fp32 in registers


def _decode_configs():
    if triton_interpreting():  # the interpreter cannot time configs: exactly one
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # (BLOCK_N, warps, stages, the cases where it spills, the architecture or None for both). The case is
    # "tight" (head dim below BLOCK_D, i.e. masked columns, with a padding mask and one split) or "loose"
    # (any other). On the tight case BLOCK_N=128 w8 s3 spills 4 B (128 registers) on sm_80 and sm_90 and
    # BLOCK_N=64 w8 s4 spills 4 B (80 registers) on sm_90 (ptxas, Triton 3.6, head dims 80 and 96, bf16
    # and fp16); one stage fewer does not: BLOCK_N=128 w8 s2 and BLOCK_N=64 w8 s3 take their place there
    # (and only there) — BLOCK_N=128 w8 s2 on sm_90 only since the query shift (query_shift: 8 B on
    # sm_80 at head dim 80).
    rows = [(32, 4, 3, (), None), (64, 4, 3, (), None), (64, 4, 4, (), None), (128, 4, 3, (), None),
            (128, 8, 3, ("tight",), None), (128, 8, 2, ("loose",), 90), (64, 8, 4, ("tight",), None),
            (64, 8, 3, ("loose",), None)]
    return [mark_spills(triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s), arch=arch, spills=spills)
            for bn, w, s, spills, arch in rows]


def _prune_decode(configs, named_args, **kwargs):
    """Keep the configs that do not spill in this key's case (see _decode_configs); the key holds
    HEAD_DIM, HAS_MASK and SPLIT, so every launch of a key keeps the same list."""
    args = {**named_args, **kwargs}
    tight = args["HEAD_DIM"] < args["BLOCK_D"] and bool(args["HAS_MASK"]) and not args["SPLIT"]
    return spill_free(configs, arch=None, case="tight" if tight else "loose")


@autotune(configs=_decode_configs(), key=["K_BUCKET", "HEAD_DIM", "HAS_MASK", "SPLIT"],
          prune_configs_by={"early_config_prune": _prune_decode})
@triton.jit
def _decode_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, Sq, D), (B, H, Sk, D), (B, H, Sk, D); any strides
    slopes_ptr,  # (H,) fp32
    pos_ptr,  # (B, Sk) fp32 key positions, -1 at padding (read only if HAS_MASK)
    out_ptr,  # (B, H, Sq, D) q.dtype, any strides (written only without SPLIT)
    lse_ptr,  # (B, H, Sq) fp32 contiguous (written only without SPLIT)
    part_o_ptr,  # (B, H, NUM_SPLITS, Sq, BLOCK_D) fp32 contiguous (written only with SPLIT)
    part_lse_ptr,  # (B, H, NUM_SPLITS, Sq) fp32 contiguous (written only with SPLIT), in units of 2^c
    part_up_ptr,  # (B, H) fp32: 2^c of query_shift, the same for every split (written only with SPLIT)
    q_strides, k_strides, v_strides, pos_strides, out_strides,  # each tensor's .stride()
    qk_scale,  # scale * log2(e)
    NUM_HEADS, Q_LEN, K_LEN, KEYS_PER_SPLIT, NUM_SPLITS, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, SCALED: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    split = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    key_off = K_LEN - Q_LEN  # query i sits at key position key_off + i; also the bias reference
    lo = split * KEYS_PER_SPLIT
    hi = tl.minimum(lo + KEYS_PER_SPLIT, K_LEN)
    rows = tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q = load_tile(tile_ptrs(head_ptr(q_ptr, q_strides, off_b, off_h), rows, offs_d, q_strides), rows,
                  Q_LEN, offs_d, True, HEAD_DIM, BLOCK_D)
    keys = key_tiles(k_ptr, v_ptr, k_strides, v_strides, off_b, off_h, offs_n0, offs_d)
    slope2 = head_slope(slopes_ptr, off_h)
    q, down, up = query_shift(q, SCALED)  # the same q, so the same shift, in every split

    # one causal stage over this split's keys [lo, hi): keys past hi belong to the next split
    acc, l_i, m_i = softmax_init(BLOCK_M, BLOCK_D)
    acc, l_i, m_i = attend(acc, l_i, m_i, q, keys, pos_ptr + off_b * pos_strides[0], pos_strides[1], rows, offs_n0,
                           offs_d, lo, hi, hi, key_off, key_off, slope2 * down, qk_scale, up, SCALED,
                           HEAD_DIM, BLOCK_D,
                           HAS_MASK, CAUSAL=True, MASK_KEYS=True, SPLIT_END=True, CARRY_POS=False,
                           DOT_PRECISION=DOT_PRECISION)

    row_ok = rows < Q_LEN
    if SPLIT:
        # partial log-sum-exp in units of 2^c (m + log2(l) / 2^c): finite even where the true one is not
        out, _, has_key = softmax_finish(acc, l_i, m_i, up)
        lse = m_i + tl.math.log2(tl.where(has_key, l_i, 1.0)) * down
        part = ((off_b * NUM_HEADS + off_h) * NUM_SPLITS + split) * Q_LEN + rows
        tl.store(part_up_ptr + off_b * NUM_HEADS + off_h, up)
        tl.store(part_lse_ptr + part, tl.where(has_key, lse, float("-inf")), mask=row_ok)
        tl.store(part_o_ptr + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
    else:
        out, lse, has_key = softmax_finish(acc, l_i, m_i, up)
        lse = tl.where(has_key, lse - slope2 * rows.to(tl.float32), float("inf"))
        tl.store(lse_ptr + (off_b * NUM_HEADS + off_h) * Q_LEN + rows, lse, mask=row_ok)
        tl.store(tile_ptrs(head_ptr(out_ptr, out_strides, off_b, off_h), rows, offs_d, out_strides),
                 out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))


@triton.jit
def _combine_kernel(
    part_o_ptr,  # (B, H, NUM_SPLITS, Sq, BLOCK_D) fp32 contiguous
    part_lse_ptr,  # (B, H, NUM_SPLITS, Sq) fp32 contiguous, -inf for a split with no visible key
    part_up_ptr,  # (B, H) fp32: the partial lse are in units of 2^c = part_up
    slopes_ptr,  # (H,) fp32
    out_ptr,  # (B, H, Sq, D) q.dtype, any strides
    lse_ptr,  # (B, H, Sq) fp32 contiguous
    out_strides,
    NUM_HEADS, Q_LEN, NUM_SPLITS,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    row = tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    part = ((off_b * NUM_HEADS + off_h) * NUM_SPLITS + offs_s) * Q_LEN + row
    lse_s = tl.load(part_lse_ptr + part, mask=offs_s < NUM_SPLITS, other=float("-inf"))
    m = tl.max(lse_s, 0)
    m = tl.where(m > float("-inf"), m, 0.0)  # a row with no visible key anywhere: weights all 0
    up = tl.load(part_up_ptr + off_b * NUM_HEADS + off_h)
    w = tl.math.exp2((lse_s - m) * up)
    w_sum = tl.sum(w, 0)
    o_s = tl.load(part_o_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
                  mask=offs_s[:, None] < NUM_SPLITS, other=0.0)
    out = tl.sum(w[:, None] * o_s, 0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    slope2 = head_slope(slopes_ptr, off_h)
    lse = tl.where(w_sum > 0.0, m * up + tl.math.log2(w_sum) - slope2 * row.to(tl.float32), float("inf"))
    tl.store(lse_ptr + (off_b * NUM_HEADS + off_h) * Q_LEN + row, lse)
    tl.store(head_ptr(out_ptr, out_strides, off_b, off_h) + row.to(tl.int64) * out_strides[2]
             + offs_d * out_strides[3], out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


def num_splits(batch_heads: int, k_len: int, device: torch.device) -> tuple[int, int]:
    """(number of splits, keys per split) for B*H query blocks over k_len keys; from shapes only.

    Enough programs for ~4 waves of the SMs when B*H alone fills fewer than 2; each split a multiple
    of the granule (a multiple of every BLOCK_N) so no block straddles two splits.
    """
    granule = 32 if triton_interpreting() else 128
    sms = sm_count(device, interpreter_sms=4)
    want = 1 if batch_heads >= 2 * sms else triton.cdiv(4 * sms, batch_heads)
    want = max(1, min(want, MAX_SPLITS, triton.cdiv(k_len, granule)))
    keys = triton.cdiv(triton.cdiv(k_len, want), granule) * granule
    return triton.cdiv(k_len, keys), keys


def forward(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, positions: Tensor | None, scale: float,
            out: Tensor, lse: Tensor) -> None:
    """Fill out (B, H, Sq, D) and lse (B, H, Sq) fp32 for Sq <= 16 queries."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    block_d = head_dim_block(head_dim)
    splits, keys_per_split = num_splits(batch * heads, k_len, q.device)
    split = splits > 1
    if split:
        part_o = empty((batch, heads, splits, q_len, block_d), torch.float32, q.device)
        part_lse = empty((batch, heads, splits, q_len), torch.float32, q.device)
        part_up = empty((batch, heads), torch.float32, q.device)
    else:
        part_o = part_lse = part_up = lse  # never touched
    pos, pos_strides, has_mask = tiles.positions_arg(positions, slopes)
    _decode_kernel[(splits, heads, batch)](
        q, k, v, slopes, pos, out, lse, part_o, part_lse, part_up,
        q.stride(), k.stride(), v.stride(), pos_strides, out.stride(),
        scale * LOG2E.value, heads, q_len, k_len, keys_per_split, splits, length_bucket(k_len, 65536),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=max(16, triton.next_power_of_2(q_len)),
        HAS_MASK=has_mask, SPLIT=split, DOT_PRECISION=dot_precision(q.dtype),
        SCALED=scores_may_overflow(q.dtype),
    )
    if split:
        _combine_kernel[(q_len, heads, batch)](
            part_o, part_lse, part_up, slopes, out, lse, out.stride(), heads, q_len, splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
        )
