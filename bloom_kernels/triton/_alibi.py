"""@triton.jit building blocks of causal ALiBi attention, shared by the prefill forward, the backward and
the split-KV decode kernel, so that each piece of the arithmetic exists once.

Conventions (all kernels): base 2 (exp2, with log2(e) folded into the score scale and the slopes);
key positions are fp32 (-1 at padding); a bias is taken relative to a reference position `ref` so that
slope * (pos - ref) rounds at the magnitude of the distance, not of the absolute position (see
attention.py). Every (B, H, S, D) tensor comes with its strides as one tuple (the launchers pass
`t.stride()`); key tiles are described by a tuple `keys` (see `key_tiles`). Tuples are compile-time
structures: passing them costs nothing in the generated code, and each stride is specialised (== 1,
divisible by 16) as a scalar argument would be.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)  # log2(e): exp(x) = exp2(x * LOG2E)


@triton.jit
def head_ptr(ptr, strides, off_b, off_h):
    """ptr moved to (batch off_b, head off_h) of a (B, H, ...) tensor with these strides."""
    return ptr + off_b * strides[0] + off_h * strides[1]


@triton.jit
def tile_offsets(rows, cols, strides):
    """Offsets of a (rows, cols) tile of a (B, H, S, D) tensor: rows along S, cols along D."""
    return rows[:, None] * strides[2] + cols[None, :] * strides[3]


@triton.jit
def tile_ptrs(base, rows, cols, strides):
    """Pointers to a (rows, cols) tile of a (B, H, S, D) tensor from base (its (b, h) start or later):
    rows along S, cols along D. Added to the pointer one term at a time, as the kernels always did:
    summing the offsets first changes ptxas' register allocation (a 4 B spill in dQ on sm_80)."""
    return base + rows[:, None] * strides[2] + cols[None, :] * strides[3]


@triton.jit
def load_rows(ptr, strides, off_b, off_h, start, local, offs_d, n_rows, MASK_ROWS: tl.constexpr,
              HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Rows start + local (a (rows, BLOCK_D) tile) of (batch off_b, head off_h) of a (B, H, S, D)
    tensor; with MASK_ROWS the rows >= n_rows read as zeros."""
    base = head_ptr(ptr, strides, off_b, off_h) + start.to(tl.int64) * strides[2]
    return load_tile(tile_ptrs(base, local, offs_d, strides), start + local, n_rows, offs_d, MASK_ROWS,
                     HEAD_DIM, BLOCK_D)


@triton.jit
def query_block(BLOCK_M: tl.constexpr):
    """(off_b, off_h, q0, rows) of a program over one block of BLOCK_M queries, grid (query blocks,
    H, B). The last query blocks have the most keys: they are launched first, so the tail of the grid
    is short."""
    start_m = tl.num_programs(0) - 1 - tl.program_id(0)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    return off_b, off_h, start_m * BLOCK_M, tl.arange(0, BLOCK_M)


@triton.jit
def key_tiles(k_ptr, v_ptr, k_strides, v_strides, off_b, off_h, offs_n0, offs_d):
    """keys = (k_base, v_base, k_rel, v_rel, stride_kn, stride_vn): the (batch, head) base pointers of K
    and V, the offsets of one (BLOCK_N, BLOCK_D) tile from a block's first key, and the key strides."""
    return (head_ptr(k_ptr, k_strides, off_b, off_h), head_ptr(v_ptr, v_strides, off_b, off_h),
            tile_offsets(offs_n0, offs_d, k_strides), tile_offsets(offs_n0, offs_d, v_strides),
            k_strides[2], v_strides[2])


@triton.jit
def load_tile(ptrs, rows, n_rows, cols, MASK_ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
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
def load_key_tile(ptrs, rows, n_rows, cols, pos, MASK_ROWS: tl.constexpr, HAS_MASK: tl.constexpr,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """load_tile of K or V rows; with HAS_MASK the rows of padded keys (pos < 0, which includes the
    rows >= n_rows) read as zeros. A NaN or inf stored at a padded position then never meets a zero
    weight (0 * NaN = NaN in p·v, do·vᵀ, ds·k) and q·k there is 0, so the -inf bias hides it exactly.
    Predicated loads, not a select after the load: a select on the tile costs registers (spills in
    the masked prefill variants on sm_80/sm_90)."""
    if HAS_MASK:
        if BLOCK_D != HEAD_DIM:
            t = tl.load(ptrs, mask=(pos[:, None] >= 0) & (cols[None, :] < HEAD_DIM), other=0.0)
        else:
            t = tl.load(ptrs, mask=pos[:, None] >= 0, other=0.0)
    else:
        t = load_tile(ptrs, rows, n_rows, cols, MASK_ROWS, HEAD_DIM, BLOCK_D)
    return t


@triton.jit
def head_slope(slopes_ptr, off_h):
    """The head's ALiBi slope in base 2 (slope * log2(e)), fp32."""
    return tl.load(slopes_ptr + off_h) * LOG2E


@triton.jit
def key_positions(pos_ptrs, offs_n, k_end, HAS_MASK: tl.constexpr, MASK_KEYS: tl.constexpr):
    """fp32 (BLOCK_N,) ALiBi position of each key: pos[b, j] (-1 at padding and past k_end) or j
    without a mask. pos_ptrs (BLOCK_N,) point at pos[b, offs_n] (never read without a mask)."""
    if HAS_MASK:
        if MASK_KEYS:
            pos = tl.load(pos_ptrs, mask=offs_n < k_end, other=-1.0)
        else:
            pos = tl.load(pos_ptrs)
    else:
        pos = offs_n.to(tl.float32)
    return pos


@triton.jit
def alibi_bias(pos, ref, slope2, HAS_MASK: tl.constexpr):
    """Base-2 ALiBi bias slope2 * (pos - ref), -inf at padded keys (pos < 0).

    pos and ref are integers held exactly in fp32, so the difference is exact and the multiply
    rounds once, at the magnitude of the distance to ref rather than of the absolute position.
    """
    bias = slope2 * (pos - ref.to(tl.float32))
    if HAS_MASK:
        bias = tl.where(pos >= 0, bias, float("-inf"))
    return bias


@triton.jit
def key_block_scores(q, keys, pos_ptrs, start_n, offs_n, offs_d, k_end, ref, slope2, qk_scale,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr,
                     MASK_KEYS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Load the key block at start_n (K and V tiles, keys >= k_end masked when MASK_KEYS) and return
    (base-2 scores q·kᵀ * qk_scale plus the ALiBi bias, K, V)."""
    k_base, v_base, k_rel, v_rel, stride_kn, stride_vn = keys
    pos = key_positions(pos_ptrs, offs_n, k_end, HAS_MASK, MASK_KEYS)
    k = load_key_tile(k_base + tl.cast(start_n, tl.int64) * stride_kn + k_rel, offs_n, k_end, offs_d, pos,
                      MASK_KEYS, HAS_MASK, HEAD_DIM, BLOCK_D)
    v = load_key_tile(v_base + tl.cast(start_n, tl.int64) * stride_vn + v_rel, offs_n, k_end, offs_d, pos,
                      MASK_KEYS, HAS_MASK, HEAD_DIM, BLOCK_D)
    bias = alibi_bias(pos, ref, slope2, HAS_MASK)
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale + bias[None, :]
    return s, k, v


@triton.jit
def query_shift(q, SCALED: tl.constexpr):
    """(q * 2^-c, 2^-c, 2^c): the query tile scaled down by a power of two so that q·k cannot overflow fp32.

    Scores past fp32's range (|q|·|k| ~ 1e19 each and up) are inf, and inf - inf is NaN, though their
    softmax is finite. With every |q * 2^-c| < 2^-10, |q'·k| < D * 2^-10 * max|k| <= max|k| / 8 for
    D <= 128, whatever k holds; c = max(0, floor(log2 max|q|) + 11), at most 126. The softmax then runs
    on s' = s * 2^-c and multiplies the shift back after subtracting the row max (softmax_step), where
    a product past fp32's range is -inf and weighs 0 as it should. Powers of two scale exactly, so
    ordinary inputs get the rounding they had. One c per program (the max over its query rows, NaN and
    inf ignored); fp16 (SCALED False) cannot overflow: |s| <= D * 65504^2."""
    if SCALED:
        magnitude = tl.abs(q.to(tl.float32))
        q_max = tl.max(tl.max(tl.where(magnitude < float("inf"), magnitude, 0.0), 1), 0)
        exponent = ((q_max.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2), -127 at 0
        c = tl.minimum(tl.maximum(exponent + 11, 0), 126)
        down = ((127 - c) << 23).to(tl.float32, bitcast=True)  # 2^-c, built from its exponent bits
        up = ((127 + c) << 23).to(tl.float32, bitcast=True)
        q = (q.to(tl.float32) * down).to(q.dtype)
    else:
        down = 1.0
        up = 1.0
    return q, down, up


@triton.jit
def softmax_step(acc, l_i, m_i, s, v, up, SCALED: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """One online-softmax step: fold the scores s (BLOCK_M, BLOCK_N) and values v into the running
    max m_i, sum l_i and output acc (rescaled by 2^(m_old - m_new)). With SCALED, s and m are the
    scores times 2^-c and `up` = 2^c is multiplied back into each difference (query_shift)."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    if SCALED:
        p = tl.math.exp2((s - m_new[:, None]) * up)
        alpha = tl.math.exp2((m_i - m_new) * up)
    else:
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=DOT_PRECISION)
    return acc, l_i, m_new


@triton.jit
def attend(acc, l_i, m_i, q, keys, pos_base, stride_pn, offs_m, offs_n0, offs_d, lo, hi, k_end, key_off,
           ref, slope2, qk_scale, up, SCALED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
           HAS_MASK: tl.constexpr,
           CAUSAL: tl.constexpr, MASK_KEYS: tl.constexpr, SPLIT_END: tl.constexpr,
           CARRY_POS: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Online softmax of the query rows offs_m over the key blocks [lo, hi). With SCALED, q and
    slope2 come scaled by 2^-c and up = 2^c (query_shift).

    CAUSAL applies the causal mask (query i sits at key position key_off + i). MASK_KEYS masks the
    loads and positions of keys >= k_end; a key there gets no weight from a query the causal mask
    stops before k_end, which holds for k_end = K_LEN. SPLIT_END: k_end is the end of a decode split,
    with keys of the next split inside the causal window, so the scores are masked there too.
    The prefill forward runs one stage without the causal mask (blocks wholly below the diagonal)
    and one with it; decode runs one with all three.

    CARRY_POS: read the key positions through a pointer advanced once per block (prefill), else
    through offsets recomputed from each block's start (decode). On sm_90 the recomputed offset
    (sign-extended to 64 bits) lands on the path that skips an empty stage and ptxas serialises the
    wgmma pipeline (C7515); decode's 16-row tiles use no wgmma, and there the carried pointers, kept
    for every pipeline stage, cost 8-58 more registers a thread (ptxas, Triton 3.6).
    """
    BLOCK_N: tl.constexpr = offs_n0.shape[0]
    pos_ptrs = pos_base + (lo + offs_n0) * stride_pn
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + offs_n0
        if not CARRY_POS:
            pos_ptrs = pos_base + offs_n * stride_pn
        s, k, v = key_block_scores(q, keys, pos_ptrs, start_n, offs_n, offs_d, k_end, ref, slope2,
                                   qk_scale, HEAD_DIM, BLOCK_D, HAS_MASK, MASK_KEYS, DOT_PRECISION)
        pos_ptrs += BLOCK_N * stride_pn
        if CAUSAL:
            visible = key_off + offs_m[:, None] >= offs_n[None, :]
            if SPLIT_END and not HAS_MASK:  # with a mask, keys >= k_end already have pos -1 (-inf)
                visible = visible & (offs_n[None, :] < k_end)
            s = tl.where(visible, s, float("-inf"))
        acc, l_i, m_i = softmax_step(acc, l_i, m_i, s, v, up, SCALED, DOT_PRECISION)
    return acc, l_i, m_i


@triton.jit
def softmax_init(BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """(acc, l, m) before the first key block. The running max starts finite, so a row whose keys are
    all -inf keeps l = 0 without NaNs."""
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    return acc, l_i, m_i


@triton.jit
def softmax_finish(acc, l_i, m_i, up):
    """(normalised output, base-2 log-sum-exp, has_key) of the rows; a row with no visible key
    (l = 0) gets zeros and an lse to be replaced by the caller. The lse is in true units (m * up):
    +inf where the largest score itself is past fp32's range."""
    has_key = l_i > 0.0
    l_safe = tl.where(has_key, l_i, 1.0)
    return acc / l_safe[:, None], m_i * up + tl.math.log2(l_safe), has_key
