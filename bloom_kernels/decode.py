"""Split-KV (flash-decoding) ALiBi attention for short query lengths against a long KV cache.

Same op and semantics as attention.py (which calls `decode_forward` when Sq <= 16): q (B, H, Sq, D)
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

from ._tuning import autotune
from ._launch import sm_count, triton_interpreting

MAX_SPLITS = 64  # the combine holds (splits x BLOCK_D) fp32 in registers


def _decode_configs():
    if triton_interpreting():  # the interpreter cannot time configs: exactly one
        return [triton.Config({"BLOCK_N": 16}, num_warps=4, num_stages=1)]
    # (BLOCK_N, warps, stages, where): None everywhere; False not on the tight key (head dim below
    # BLOCK_D, i.e. masked columns, with a padding mask and one split), True only there. On the tight
    # key BLOCK_N=128 w8 s3 spills 4 B (128 registers) on sm_80 and sm_90 and BLOCK_N=64 w8 s4 spills
    # 4 B (80 registers) on sm_90 (ptxas, Triton 3.6, head dims 80 and 96, bf16 and fp16); one stage
    # fewer does not: BLOCK_N=128 w8 s2 and BLOCK_N=64 w8 s3 take their place there.
    rows = [(32, 4, 3, None), (64, 4, 3, None), (64, 4, 4, None), (128, 4, 3, None),
            (128, 8, 3, False), (128, 8, 2, True), (64, 8, 4, False), (64, 8, 3, True)]
    configs = []
    for bn, w, s, tight in rows:
        config = triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
        config.tight = tight  # read by _prune_decode
        configs.append(config)
    return configs


def _prune_decode(configs, named_args, **kwargs):
    """Keep the configs of this key's kind (see _decode_configs); the key holds HEAD_DIM, HAS_MASK and
    SPLIT, so every launch of a key keeps the same list."""
    args = {**named_args, **kwargs}
    tight = args["HEAD_DIM"] < args["BLOCK_D"] and bool(args["HAS_MASK"]) and not args["SPLIT"]
    return [c for c in configs if getattr(c, "tight", None) in (None, tight)] or configs[:1]


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
    part_lse_ptr,  # (B, H, NUM_SPLITS, Sq) fp32 contiguous (written only with SPLIT)
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_ob, stride_oh, stride_om, stride_od,
    qk_scale,  # scale * log2(e)
    NUM_HEADS, Q_LEN, K_LEN, KEYS_PER_SPLIT, NUM_SPLITS, K_BUCKET,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    HAS_MASK: tl.constexpr, SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr,
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
    d_ok = offs_d[None, :] < HEAD_DIM

    q = tl.load(q_ptr + off_b * stride_qb + off_h * stride_qh + rows[:, None] * stride_qm
                + offs_d[None, :] * stride_qd, mask=(rows[:, None] < Q_LEN) & d_ok, other=0.0)
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
    k_rel = offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_rel = offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd
    pos_base = pos_ptr + off_b * stride_pb
    slope2 = tl.load(slopes_ptr + off_h) * 1.4426950408889634

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: all-masked rows stay NaN-free
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        in_split = offs_n < hi  # keys past hi belong to the next split
        k = tl.load(k_base + tl.cast(start_n, tl.int64) * stride_kn + k_rel, mask=in_split[:, None] & d_ok,
                    other=0.0)
        v = tl.load(v_base + tl.cast(start_n, tl.int64) * stride_vn + v_rel, mask=in_split[:, None] & d_ok,
                    other=0.0)
        if HAS_MASK:
            pos = tl.load(pos_base + offs_n * stride_pn, mask=in_split, other=-1.0)
            bias = tl.where(pos >= 0, slope2 * (pos - key_off.to(tl.float32)), float("-inf"))
        else:
            bias = slope2 * (offs_n - key_off).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias[None, :]
        visible = (key_off + rows[:, None] >= offs_n[None, :]) & in_split[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = m_i + tl.math.log2(l_safe)
    row_ok = rows < Q_LEN
    if SPLIT:
        part = ((off_b * NUM_HEADS + off_h) * NUM_SPLITS + split) * Q_LEN + rows
        tl.store(part_lse_ptr + part, tl.where(has_key, lse, float("-inf")), mask=row_ok)
        tl.store(part_o_ptr + part[:, None] * BLOCK_D + offs_d[None, :], out, mask=row_ok[:, None])
    else:
        lse = tl.where(has_key, lse - slope2 * rows.to(tl.float32), float("inf"))
        tl.store(lse_ptr + (off_b * NUM_HEADS + off_h) * Q_LEN + rows, lse, mask=row_ok)
        tl.store(out_ptr + off_b * stride_ob + off_h * stride_oh + rows[:, None] * stride_om
                 + offs_d[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & d_ok)


@triton.jit
def _combine_kernel(
    part_o_ptr,  # (B, H, NUM_SPLITS, Sq, BLOCK_D) fp32 contiguous
    part_lse_ptr,  # (B, H, NUM_SPLITS, Sq) fp32 contiguous, -inf for a split with no visible key
    slopes_ptr,  # (H,) fp32
    out_ptr,  # (B, H, Sq, D) q.dtype, any strides
    lse_ptr,  # (B, H, Sq) fp32 contiguous
    stride_ob, stride_oh, stride_om, stride_od,
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
    w = tl.math.exp2(lse_s - m)
    w_sum = tl.sum(w, 0)
    o_s = tl.load(part_o_ptr + part[:, None] * BLOCK_D + offs_d[None, :],
                  mask=offs_s[:, None] < NUM_SPLITS, other=0.0)
    out = tl.sum(w[:, None] * o_s, 0) / tl.where(w_sum > 0.0, w_sum, 1.0)
    slope2 = tl.load(slopes_ptr + off_h) * 1.4426950408889634
    lse = tl.where(w_sum > 0.0, m + tl.math.log2(w_sum) - slope2 * row.to(tl.float32), float("inf"))
    tl.store(lse_ptr + (off_b * NUM_HEADS + off_h) * Q_LEN + row, lse)
    tl.store(out_ptr + off_b * stride_ob + off_h * stride_oh + row.to(tl.int64) * stride_om
             + offs_d * stride_od, out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


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


def decode_forward(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, positions: Tensor | None,
                   scale: float, out: Tensor, lse: Tensor, alloc) -> None:
    """Fill out (B, H, Sq, D) and lse (B, H, Sq) fp32; `alloc(shape, dtype, device)` gives scratch."""
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    block_d = max(16, triton.next_power_of_2(head_dim))
    splits, keys_per_split = num_splits(batch * heads, k_len, q.device)
    split = splits > 1
    if split:
        part_o = alloc((batch, heads, splits, q_len, block_d), torch.float32, q.device)
        part_lse = alloc((batch, heads, splits, q_len), torch.float32, q.device)
    else:
        part_o = part_lse = lse  # never touched
    if positions is None:
        pos, stride_pb, stride_pn = slopes, 0, 0  # never read
    else:
        pos, (stride_pb, stride_pn) = positions, positions.stride()
    _decode_kernel[(splits, heads, batch)](
        q, k, v, slopes, pos, out, lse, part_o, part_lse,
        *q.stride(), *k.stride(), *v.stride(), stride_pb, stride_pn, *out.stride(),
        scale * 1.4426950408889634, heads, q_len, k_len, keys_per_split, splits,
        min(triton.next_power_of_2(k_len), 65536),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=max(16, triton.next_power_of_2(q_len)),
        HAS_MASK=positions is not None, SPLIT=split,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    if split:
        _combine_kernel[(q_len, heads, batch)](
            part_o, part_lse, slopes, out, lse, *out.stride(), heads, q_len, splits,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(splits),
        )
