"""Causal ALiBi flash attention in Triton: prefill forward, backward, autograd and the custom op.

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
constant and the scores keep their low bits. The saved log-sum-exp L (B, H, Sq) fp32 is relative to
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

import contextlib
import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import decode, reference
from ._tuning import autotune
from ._launch import config_arch, smem_per_block, triton_interpreting

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128
DECODE_MAX_QUERIES = 16  # Sq up to this runs the split-KV decode kernel


def _empty(shape, dtype, device) -> Tensor:
    """Every output buffer is allocated here (tests replace it to poison the buffers with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _bucket(n: int) -> int:
    """Autotune key of a length: its next power of two, capped (lengths within a bucket share a config)."""
    return min(triton.next_power_of_2(max(int(n), 1)), 16384)


def _key_lengths(q_len: int, k_len: int) -> tuple[int, int, int]:
    """(Q_BUCKET, K_BUCKET, ALIGNED) of the autotune key. ALIGNED: both lengths are multiples of 128,
    hence of every block size, so no config needs a boundary mask; the pruner keeps only the configs
    that run masked without spilling otherwise, for every length of the bucket alike."""
    return _bucket(q_len), _bucket(k_len), int(q_len % 128 == 0 and k_len % 128 == 0)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # tf32 is ignored by fp16/bf16 dots


# --------------------------------------------------------------------------------------------------
# autotune configs: exactly one when interpreting (the interpreter cannot time configs), a small
# pruned list on the GPU, keyed on bucketed lengths and the head dim
# --------------------------------------------------------------------------------------------------
def _configs(gpu_lists, interp):
    if triton_interpreting():
        bm, bn = interp
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    configs = []
    for arch, rows in gpu_lists.items():
        for bm, bn, warps, stages, tiles, masked_tiles in rows:
            config = triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)
            config.arch, config.tiles, config.masked_tiles = arch, tiles, masked_tiles  # read by _pruner
            configs.append(config)
    return configs


# Per architecture (80: Ampere and Ada, mma.sync; 90: Hopper, wgmma), rows of
#   (BLOCK_M, BLOCK_N, warps, stages, BLOCK_D tiles it runs unmasked, BLOCK_D tiles it runs masked)
# where "masked" means a padding mask or lengths that do not divide the blocks (more live registers),
# and a BLOCK_D tile is 64 (head dims <= 64) or 128 (BLOOM's 80, 96 and 128). A tile left out of a
# row is one where that config spills registers: read off the ahead-of-time compile for sm_80 / sm_90
# (python -m bloom_kernels.compile_targets; Triton 3.6, bf16, BLOOM's shapes), which the test
# tests/test_compile_targets.py re-checks. Shared memory is pruned per device (_pruner).
ANY, D64, NONE = (64, 128), (64,), ()
_FWD_CONFIGS = {
    90: [(128, 64, 8, 3, ANY, ANY), (128, 64, 8, 4, ANY, ANY), (128, 128, 8, 3, ANY, D64),
         (64, 64, 4, 3, ANY, ANY), (64, 32, 4, 4, ANY, ANY), (128, 64, 4, 3, D64, D64),
         (128, 32, 4, 3, D64, D64)],
    80: [(128, 64, 8, 3, ANY, D64), (128, 64, 8, 4, ANY, D64), (64, 64, 8, 3, ANY, ANY),
         (64, 64, 4, 3, ANY, ANY), (64, 32, 4, 4, ANY, ANY), (128, 32, 8, 3, ANY, (128,)),
         (128, 32, 4, 3, D64, D64)],
}
_DKDV_CONFIGS = {
    90: [(32, 128, 8, 3, ANY, ANY), (64, 64, 8, 3, ANY, D64), (64, 128, 8, 3, D64, D64),
         (32, 64, 4, 3, ANY, D64), (16, 128, 4, 3, D64, D64), (64, 128, 8, 2, D64, D64),
         (32, 64, 8, 3, ANY, ANY), (16, 128, 8, 3, ANY, ANY)],
    80: [(16, 128, 8, 3, ANY, ANY), (16, 64, 4, 3, ANY, ANY), (32, 64, 8, 3, ANY, (128,)),
         (64, 64, 8, 3, (128,), (128,)), (32, 64, 4, 3, ANY, NONE), (32, 128, 8, 3, D64, NONE),
         (32, 128, 8, 2, D64, D64), (16, 128, 4, 3, D64, D64)],
}
_DQ_CONFIGS = {
    90: [(128, 32, 8, 3, ANY, ANY), (128, 64, 8, 2, ANY, ANY), (64, 64, 8, 3, ANY, ANY),
         (64, 32, 4, 3, ANY, ANY), (128, 128, 8, 2, D64, D64), (128, 32, 4, 3, D64, D64)],
    80: [(128, 32, 8, 3, ANY, ANY), (64, 32, 4, 3, ANY, ANY), (64, 32, 8, 3, ANY, ANY),
         (128, 32, 4, 3, D64, NONE), (128, 64, 8, 2, ANY, NONE), (64, 64, 8, 3, ANY, (128,))],
}


def _pruner(staged_elements):
    """Early config prune for one kernel: keep the rows of this device's architecture that run this
    BLOCK_D tile (masked or not) without spilling, are not much larger than the problem, and whose
    shared memory (staged_elements(BM, BN, BD, stages) * element size, the tiles the pipeline keeps)
    fits the device, e.g. not fp32 with large tiles.
    """
    def prune(configs, named_args, **kwargs):
        if not hasattr(configs[0], "arch"):  # the interpreter's single config
            return configs
        args = {**named_args, **kwargs}
        q, block_d = args["q_ptr"], args["BLOCK_D"]
        limit = smem_per_block(q.device)
        arch, tile = config_arch(q.device), 64 if block_d <= 64 else 128
        q_len, k_len = args["Q_LEN"], args["K_LEN"]
        q_cap, k_cap = max(64, triton.next_power_of_2(q_len)), max(64, triton.next_power_of_2(k_len))
        mine = [c for c in configs if c.arch == arch]
        masked = args["HAS_MASK"] or not args["ALIGNED"]  # the same for every length in this key

        def fits(c):
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            return (tile in (c.masked_tiles if masked else c.tiles) and bm <= q_cap and bn <= k_cap
                    and staged_elements(bm, bn, block_d, c.num_stages) * q.element_size() <= limit - 2048)

        kept = [c for c in mine if fits(c)]
        return kept or [min(mine, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]
    return prune


# q tile + pipelined K and V tiles; K and V tile + pipelined Q and dO tiles; Q and dO + K and V
_prune_fwd = _pruner(lambda bm, bn, bd, stages: bm * bd + stages * 2 * bn * bd)
_prune_dkdv = _pruner(lambda bm, bn, bd, stages: 2 * bn * bd + stages * 2 * bm * bd)
_prune_dq = _pruner(lambda bm, bn, bd, stages: 2 * bm * bd + stages * 2 * bn * bd)


_EVEN = {
    "EVEN_M": lambda a: a["Q_LEN"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["K_LEN"] % a["BLOCK_N"] == 0,
}
_KEY = ["Q_BUCKET", "K_BUCKET", "ALIGNED", "HEAD_DIM", "HAS_MASK"]


# --------------------------------------------------------------------------------------------------
# shared jit helpers
# --------------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; the masks exist only where the sizes need them (constexpr)."""
    if MASK_ROWS:
        if BLOCK_D != HEAD_DIM:
            t = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            t = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    else:
        if BLOCK_D != HEAD_DIM:
            t = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
        else:
            t = tl.load(ptrs)
    return t


@triton.jit
def _key_pos(pos_ptrs, offs_n, k_len, HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr):
    """fp32 (BLOCK_N,) ALiBi position of each key: pos[b, j] (-1 at padding) or j without a mask.
    pos_ptrs (BLOCK_N,) point at pos[b, offs_n] (never read without a mask)."""
    if HAS_MASK:
        if MASK_KEYS:
            pos = tl.load(pos_ptrs, mask=offs_n < k_len, other=-1.0)
        else:
            pos = tl.load(pos_ptrs)
    else:
        pos = offs_n.to(tl.float32)
    return pos


@triton.jit
def _bias(pos, ref, slope2, HAS_MASK: tl.constexpr):
    """Base-2 ALiBi bias slope2 * (pos - ref), -inf at padded keys (pos < 0).

    pos and ref are integers held exactly in fp32, so the difference is exact and the multiply
    rounds once, at the magnitude of the distance to ref rather than of the absolute position.
    """
    bias = slope2 * (pos - ref.to(tl.float32))
    if HAS_MASK:
        bias = tl.where(pos >= 0, bias, float("-inf"))
    return bias


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _key_block_scores(q, k_base, v_base, pos_ptrs, k_rel, v_rel, start_n, offs_n, offs_d, ref, slope2,
                      qk_scale, stride_kn, stride_vn, K_LEN, HEAD_DIM: tl.constexpr,
                      BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr,
                      DOT_PRECISION: tl.constexpr):
    """Load the key block at start_n (K, V tiles) and return (base-2 scores with ALiBi bias, K, V)."""
    k = _load_tile(k_base + tl.cast(start_n, tl.int64) * stride_kn + k_rel, offs_n, K_LEN, offs_d,
                   MASK_KEYS, HEAD_DIM, BLOCK_D)
    v = _load_tile(v_base + tl.cast(start_n, tl.int64) * stride_vn + v_rel, offs_n, K_LEN, offs_d,
                   MASK_KEYS, HEAD_DIM, BLOCK_D)
    pos = _key_pos(pos_ptrs, offs_n, K_LEN, HAS_MASK, MASK_KEYS)
    bias = _bias(pos, ref, slope2, HAS_MASK)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias[None, :]
    return s, k, v


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, pos_base, k_rel, v_rel, offs_m, offs_n0, offs_d,
               lo, hi, ref, slope2, qk_scale, stride_kn, stride_vn, stride_pn, key_off, K_LEN,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
               DIAGONAL: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax over key blocks [lo, hi); DIAGONAL adds the causal mask and key bounds."""
    MASK_KEYS: tl.constexpr = DIAGONAL and not EVEN_N
    BLOCK_N: tl.constexpr = offs_n0.shape[0]
    # the key positions are read through a pointer advanced once per block: an offset recomputed from
    # start_n (sign-extended to 64 bits) lands on the path that skips an empty stage, which makes
    # ptxas serialise the wgmma pipeline on sm_90 (C7515)
    pos_ptrs = pos_base + (lo + offs_n0) * stride_pn
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        s, k, v = _key_block_scores(q, k_base, v_base, pos_ptrs, k_rel, v_rel, start_n, offs_n, offs_d,
                                    ref, slope2, qk_scale, stride_kn, stride_vn, K_LEN,
                                    HEAD_DIM, BLOCK_D, HAS_MASK, MASK_KEYS, DOT_PRECISION)
        pos_ptrs += BLOCK_N * stride_pn
        if DIAGONAL:
            # query i sits at key position key_off + i; this also hides keys >= K_LEN from real rows
            s = tl.where(key_off + offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@autotune(configs=_configs(_FWD_CONFIGS, (32, 16)), key=_KEY,
          prune_configs_by={"early_config_prune": _prune_fwd})
@triton.heuristics(_EVEN)
@triton.jit
def _attn_fwd_kernel(
    q_ptr, k_ptr, v_ptr,  # (B, H, Sq, D), (B, H, Sk, D), (B, H, Sk, D); any strides
    slopes_ptr,  # (H,) fp32
    pos_ptr,  # (B, Sk) fp32 key positions, -1 at padding (read only if HAS_MASK)
    out_ptr,  # (B, H, Sq, D) q.dtype, any strides
    lse_ptr,  # (B, H, Sq) fp32 contiguous: base-2 log-sum-exp relative to the row's position
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_pb, stride_pn,
    stride_ob, stride_oh, stride_om, stride_od,
    qk_scale,  # scale * log2(e)
    NUM_HEADS, Q_LEN, K_LEN, Q_BUCKET, K_BUCKET, ALIGNED,  # the last three: autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    # the last query blocks have the most keys: launch them first so the tail of the grid is short
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    key_off = K_LEN - Q_LEN
    q0 = start_m * BLOCK_M
    offs_m = q0 + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh + q0.to(tl.int64) * stride_qm
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
    pos_base = pos_ptr + off_b * stride_pb
    rows = tl.arange(0, BLOCK_M)
    q = _load_tile(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, offs_m, Q_LEN,
                   offs_d, not EVEN_M, HEAD_DIM, BLOCK_D)
    k_rel = offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_rel = offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd
    slope2 = tl.load(slopes_ptr + off_h) * 1.4426950408889634
    ref = key_off + q0  # position of the block's first query: scores are biased relative to it

    # finite start for the running max: a row whose keys are all -inf keeps l = 0 without NaNs
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # stage 1: key blocks every query of this block sees in full (all inside [0, K_LEN))
    diag_lo = tl.maximum(key_off + q0, 0) // BLOCK_N * BLOCK_N  # >= 0 provably (see _fwd_inner)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, pos_base, k_rel, v_rel, offs_m,
                               offs_n0, offs_d, 0, diag_lo, ref, slope2, qk_scale, stride_kn,
                               stride_vn, stride_pn, key_off, K_LEN, HEAD_DIM, BLOCK_D, HAS_MASK,
                               False, EVEN_N, DOT_PRECISION)
    # stage 2: the blocks crossing the diagonal, causal mask on
    diag_hi = tl.minimum(key_off + q0 + BLOCK_M, K_LEN)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, pos_base, k_rel, v_rel, offs_m,
                               offs_n0, offs_d, diag_lo, diag_hi, ref, slope2, qk_scale, stride_kn,
                               stride_vn, stride_pn, key_off, K_LEN, HEAD_DIM, BLOCK_D, HAS_MASK,
                               True, EVEN_N, DOT_PRECISION)

    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    out = acc / l_safe[:, None]
    # rebase the log-sum-exp from `ref` to each row's own position key_off + i
    lse = tl.where(has_key, m_i + tl.math.log2(l_safe) - slope2 * rows.to(tl.float32), float("inf"))
    o_ptrs = (out_ptr + off_b * stride_ob + off_h * stride_oh + q0.to(tl.int64) * stride_om
              + rows[:, None] * stride_om + offs_d[None, :] * stride_od)
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


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess_kernel(
    out_ptr, do_ptr,  # (B, H, Sq, D), any strides
    delta_ptr,  # (B, H, Sq) fp32 contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    NUM_HEADS, Q_LEN,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(out_ptr + off_b * stride_ob + off_h * stride_oh + offs_m[:, None].to(tl.int64)
                   * stride_om + offs_d[None, :] * stride_od, offs_m, Q_LEN, offs_d, True, HEAD_DIM, BLOCK_D)
    do = _load_tile(do_ptr + off_b * stride_db + off_h * stride_dh + offs_m[:, None].to(tl.int64)
                    * stride_dm + offs_d[None, :] * stride_dd, offs_m, Q_LEN, offs_d, True, HEAD_DIM, BLOCK_D)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(delta_ptr + (off_b * NUM_HEADS + off_h) * Q_LEN + offs_m, delta, mask=offs_m < Q_LEN)


@triton.jit
def _dkdv_inner(dk, dv, k, v, pos, q_base, do_base, q_rel, do_rel, lse_base, delta_base, offs_n,
                offs_d, lo, hi, slope2, qk_scale, stride_qm, stride_dm, key_off, Q_LEN,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
                HAS_MASK: tl.constexpr, DIAGONAL: tl.constexpr, EVEN_M: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [lo, hi), transposed (keys x queries)."""
    rows = tl.arange(0, BLOCK_M)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + rows
        q = _load_tile(q_base + tl.cast(start_m, tl.int64) * stride_qm + q_rel, offs_m, Q_LEN, offs_d,
                       not EVEN_M, HEAD_DIM, BLOCK_D)
        do = _load_tile(do_base + tl.cast(start_m, tl.int64) * stride_dm + do_rel, offs_m, Q_LEN, offs_d,
                        not EVEN_M, HEAD_DIM, BLOCK_D)
        if EVEN_M:
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
        else:  # rows past Q_LEN: lse = +inf makes their probabilities 0
            lse = tl.load(lse_base + offs_m, mask=offs_m < Q_LEN, other=float("inf"))
            delta = tl.load(delta_base + offs_m, mask=offs_m < Q_LEN, other=0.0)
        # bias and log-sum-exp both relative to ref = position of the block's first query
        bias = _bias(pos, key_off + start_m, slope2, HAS_MASK)
        lse = lse + slope2 * rows.to(tl.float32)
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION) * qk_scale + bias[:, None]
        p_t = tl.math.exp2(s_t - lse[None, :])
        if DIAGONAL:
            p_t = tl.where(key_off + offs_m[None, :] >= offs_n[:, None], p_t, 0.0)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@autotune(configs=_configs(_DKDV_CONFIGS, (16, 32)), key=_KEY,
          prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.heuristics(_EVEN)
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # (B, H, Sq, D), (B, H, Sk, D) x2, (B, H, Sq, D); any strides
    slopes_ptr, pos_ptr,  # (H,) fp32, (B, Sk) fp32 (-1 at padding; read only if HAS_MASK)
    lse_ptr, delta_ptr,  # (B, H, Sq) fp32 contiguous
    dk_ptr, dv_ptr,  # (B, H, Sk, D) k.dtype, any strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_pb, stride_pn,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
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

    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh + start_n.to(tl.int64) * stride_kn
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh + start_n.to(tl.int64) * stride_vn
    k = _load_tile(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, offs_n, K_LEN,
                   offs_d, not EVEN_N, HEAD_DIM, BLOCK_D)
    v = _load_tile(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, offs_n, K_LEN,
                   offs_d, not EVEN_N, HEAD_DIM, BLOCK_D)
    pos = _key_pos(pos_ptr + off_b * stride_pb + offs_n * stride_pn, offs_n, K_LEN, HAS_MASK, not EVEN_N)
    slope2 = tl.load(slopes_ptr + off_h) * 1.4426950408889634
    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh
    do_base = do_ptr + off_b * stride_db + off_h * stride_dh
    q_rel = rows[:, None] * stride_qm + offs_d[None, :] * stride_qd
    do_rel = rows[:, None] * stride_dm + offs_d[None, :] * stride_dd
    lse_base = lse_ptr + (off_b * NUM_HEADS + off_h) * Q_LEN
    delta_base = delta_ptr + (off_b * NUM_HEADS + off_h) * Q_LEN

    # queries that see key start_n: i >= start_n - key_off; those that see the whole key block
    # (no causal mask needed): i >= start_n + BLOCK_N - 1 - key_off
    m_lo = tl.maximum(start_n - key_off, 0) // BLOCK_M * BLOCK_M
    m_mid = (tl.maximum(start_n + BLOCK_N - 1 - key_off, 0) + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    m_mid = tl.maximum(tl.minimum(m_mid, (Q_LEN + BLOCK_M - 1) // BLOCK_M * BLOCK_M), 0)  # provably >= 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dk, dv = _dkdv_inner(dk, dv, k, v, pos, q_base, do_base, q_rel, do_rel, lse_base, delta_base,
                         offs_n, offs_d, m_lo, m_mid, slope2, qk_scale, stride_qm, stride_dm, key_off,
                         Q_LEN, HEAD_DIM, BLOCK_D, BLOCK_M, HAS_MASK, True, EVEN_M, DOT_PRECISION)
    dk, dv = _dkdv_inner(dk, dv, k, v, pos, q_base, do_base, q_rel, do_rel, lse_base, delta_base,
                         offs_n, offs_d, m_mid, Q_LEN, slope2, qk_scale, stride_qm, stride_dm, key_off,
                         Q_LEN, HEAD_DIM, BLOCK_D, BLOCK_M, HAS_MASK, False, EVEN_M, DOT_PRECISION)
    dk = dk * scale

    dk_ptrs = (dk_ptr + off_b * stride_dkb + off_h * stride_dkh + start_n.to(tl.int64) * stride_dkn
               + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
    dv_ptrs = (dv_ptr + off_b * stride_dvb + off_h * stride_dvh + start_n.to(tl.int64) * stride_dvn
               + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd)
    if EVEN_N and BLOCK_D == HEAD_DIM:
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty))
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty))
    else:
        mask = (offs_n[:, None] < K_LEN) & (offs_d[None, :] < HEAD_DIM)
        tl.store(dk_ptrs, dk.to(dk_ptr.dtype.element_ty), mask=mask)
        tl.store(dv_ptrs, dv.to(dv_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, pos_base, k_rel, v_rel, offs_m, offs_n0, offs_d,
              lo, hi, ref, slope2, qk_scale, stride_kn, stride_vn, stride_pn, key_off, K_LEN,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
              DIAGONAL: tl.constexpr, EVEN_N: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Accumulate dQ of one query block over key blocks [lo, hi); lse is relative to ref."""
    MASK_KEYS: tl.constexpr = DIAGONAL and not EVEN_N
    BLOCK_N: tl.constexpr = offs_n0.shape[0]
    pos_ptrs = pos_base + (lo + offs_n0) * stride_pn  # advanced per block, as in _fwd_inner
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        s, k, v = _key_block_scores(q, k_base, v_base, pos_ptrs, k_rel, v_rel, start_n, offs_n, offs_d,
                                    ref, slope2, qk_scale, stride_kn, stride_vn, K_LEN,
                                    HEAD_DIM, BLOCK_D, HAS_MASK, MASK_KEYS, DOT_PRECISION)
        pos_ptrs += BLOCK_N * stride_pn
        p = tl.math.exp2(s - lse[:, None])
        if DIAGONAL:
            p = tl.where(key_off + offs_m[:, None] >= offs_n[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@autotune(configs=_configs(_DQ_CONFIGS, (32, 16)), key=_KEY,
          prune_configs_by={"early_config_prune": _prune_dq})
@triton.heuristics(_EVEN)
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr,  # (B, H, Sq, D), (B, H, Sk, D) x2, (B, H, Sq, D); any strides
    slopes_ptr, pos_ptr,  # (H,) fp32, (B, Sk) fp32 (-1 at padding; read only if HAS_MASK)
    lse_ptr, delta_ptr,  # (B, H, Sq) fp32 contiguous
    dq_ptr,  # (B, H, Sq, D) q.dtype, any strides
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_pb, stride_pn,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    scale, qk_scale,
    NUM_HEADS, Q_LEN, K_LEN, Q_BUCKET, K_BUCKET, ALIGNED,  # the last three: autotune key only
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows first
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    key_off = K_LEN - Q_LEN
    q0 = start_m * BLOCK_M
    rows = tl.arange(0, BLOCK_M)
    offs_m = q0 + rows
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)

    q_base = q_ptr + off_b * stride_qb + off_h * stride_qh + q0.to(tl.int64) * stride_qm
    do_base = do_ptr + off_b * stride_db + off_h * stride_dh + q0.to(tl.int64) * stride_dm
    q = _load_tile(q_base + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd, offs_m, Q_LEN,
                   offs_d, not EVEN_M, HEAD_DIM, BLOCK_D)
    do = _load_tile(do_base + rows[:, None] * stride_dm + offs_d[None, :] * stride_dd, offs_m, Q_LEN,
                    offs_d, not EVEN_M, HEAD_DIM, BLOCK_D)
    stats = (off_b * NUM_HEADS + off_h) * Q_LEN + offs_m
    if EVEN_M:
        lse = tl.load(lse_ptr + stats)
        delta = tl.load(delta_ptr + stats)
    else:
        lse = tl.load(lse_ptr + stats, mask=offs_m < Q_LEN, other=float("inf"))
        delta = tl.load(delta_ptr + stats, mask=offs_m < Q_LEN, other=0.0)
    slope2 = tl.load(slopes_ptr + off_h) * 1.4426950408889634
    ref = key_off + q0
    lse = lse + slope2 * rows.to(tl.float32)  # rebased from each row's position to ref
    k_base = k_ptr + off_b * stride_kb + off_h * stride_kh
    v_base = v_ptr + off_b * stride_vb + off_h * stride_vh
    pos_base = pos_ptr + off_b * stride_pb
    k_rel = offs_n0[:, None] * stride_kn + offs_d[None, :] * stride_kd
    v_rel = offs_n0[:, None] * stride_vn + offs_d[None, :] * stride_vd

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    diag_lo = tl.maximum(key_off + q0, 0) // BLOCK_N * BLOCK_N  # >= 0 provably (see _fwd_inner)
    diag_hi = tl.minimum(key_off + q0 + BLOCK_M, K_LEN)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, pos_base, k_rel, v_rel, offs_m, offs_n0,
                   offs_d, 0, diag_lo, ref, slope2, qk_scale, stride_kn, stride_vn, stride_pn, key_off,
                   K_LEN, HEAD_DIM, BLOCK_D, HAS_MASK, False, EVEN_N, DOT_PRECISION)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, pos_base, k_rel, v_rel, offs_m, offs_n0,
                   offs_d, diag_lo, diag_hi, ref, slope2, qk_scale, stride_kn, stride_vn, stride_pn,
                   key_off, K_LEN, HEAD_DIM, BLOCK_D, HAS_MASK, True, EVEN_N, DOT_PRECISION)
    dq = (dq * scale).to(dq_ptr.dtype.element_ty)

    dq_ptrs = (dq_ptr + off_b * stride_dqb + off_h * stride_dqh + q0.to(tl.int64) * stride_dqm
               + rows[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
    if EVEN_M and BLOCK_D == HEAD_DIM:
        tl.store(dq_ptrs, dq)
    else:
        tl.store(dq_ptrs, dq, mask=(offs_m[:, None] < Q_LEN) & (offs_d[None, :] < HEAD_DIM))


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def _device_guard(t: Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _block_d(head_dim: int) -> int:
    return max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16


def _positions_arg(positions: Tensor | None, slopes: Tensor):
    """(tensor, stride_b, stride_n, HAS_MASK): without a mask the kernels never read the pointer."""
    if positions is None:
        return slopes, 0, 0, False
    return positions, positions.stride(0), positions.stride(1), True


def _transposed_empty(batch, length, heads, head_dim, dtype, device) -> Tensor:
    """(B, H, S, D) view of a (B, S, H, D) buffer: the layout the model merges heads from for free."""
    return _empty((batch, length, heads, head_dim), dtype, device).transpose(1, 2)


def _forward(q, k, v, slopes, positions, scale):
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    out = _transposed_empty(batch, q_len, heads, head_dim, q.dtype, q.device)
    lse = _empty((batch, heads, q_len), torch.float32, q.device)
    if out.numel() == 0:
        return out, lse
    pos, stride_pb, stride_pn, has_mask = _positions_arg(positions, slopes)
    with _device_guard(q):
        if q_len <= DECODE_MAX_QUERIES:
            decode.decode_forward(q, k, v, slopes, positions, scale, out, lse, _empty)
            return out, lse
        grid = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), heads, batch)
        _attn_fwd_kernel[grid](
            q, k, v, slopes, pos, out, lse,
            *q.stride(), *k.stride(), *v.stride(), stride_pb, stride_pn, *out.stride(),
            scale * LOG2E, heads, q_len, k_len, *_key_lengths(q_len, k_len),
            HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), HAS_MASK=has_mask,
            DOT_PRECISION=_dot_precision(q.dtype),
        )
    return out, lse


def _backward(grad_out, q, k, v, out, lse, slopes, positions, scale):
    batch, heads, q_len, head_dim = q.shape
    k_len = k.shape[2]
    dq = _transposed_empty(batch, q_len, heads, head_dim, q.dtype, q.device)
    dk = _transposed_empty(batch, k_len, heads, head_dim, k.dtype, k.device)
    dv = _transposed_empty(batch, k_len, heads, head_dim, v.dtype, v.device)
    if dq.numel() == 0:  # no query: nothing attends to the keys
        return dq, dk.zero_(), dv.zero_()
    pos, stride_pb, stride_pn, has_mask = _positions_arg(positions, slopes)
    block_d = _block_d(head_dim)
    common = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "HAS_MASK": has_mask,
              "DOT_PRECISION": _dot_precision(q.dtype)}
    delta = _empty((batch, heads, q_len), torch.float32, q.device)
    with _device_guard(q):
        pre_m = 16 if triton_interpreting() else 64
        _bwd_preprocess_kernel[(triton.cdiv(q_len, pre_m), heads, batch)](
            out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, q_len,
            HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_M=pre_m,
        )
        shared = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), stride_pb, stride_pn)
        sizes = (scale, scale * LOG2E, heads, q_len, k_len, *_key_lengths(q_len, k_len))
        grid_kv = lambda meta: (triton.cdiv(k_len, meta["BLOCK_N"]), heads, batch)
        _attn_bwd_dkdv_kernel[grid_kv](
            q, k, v, grad_out, slopes, pos, lse, delta, dk, dv,
            *shared, *dk.stride(), *dv.stride(), *sizes, **common,
        )
        grid_q = lambda meta: (triton.cdiv(q_len, meta["BLOCK_M"]), heads, batch)
        _attn_bwd_dq_kernel[grid_q](
            q, k, v, grad_out, slopes, pos, lse, delta, dq,
            *shared, *dq.stride(), *sizes, **common,
        )
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
def key_positions(attention_mask: Tensor) -> Tensor:
    """fp32 (B, Sk): the reference's ALiBi position cumsum(mask) - 1 at tokens, -1 at padding."""
    batch, key_len = attention_mask.shape
    pos = reference.alibi_positions(attention_mask, batch, key_len, attention_mask.device)
    return torch.where(attention_mask != 0, pos, -1.0)


def alibi_attention(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor,
                    attention_mask: Tensor | None = None, scale: float | None = None) -> Tensor:
    """Triton ALiBi attention with the semantics of `reference.alibi_attention` (args validated)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    slopes = slopes.detach().to(torch.float32).contiguous()  # (H,); the slopes take no gradient
    positions = None if attention_mask is None else key_positions(attention_mask)
    out, _ = _attention_fwd_op(q, k, v, slopes, positions, scale)
    return out


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
