"""Fused (residual-add +) LayerNorm over the last dim, forward and backward, as Triton kernels.

    h     = x + residual                (fp32; just x without a residual)
    y     = (h - mean) * rstd * weight + bias,   mean = E[h],  rstd = 1 / sqrt(Var[h] + eps)
    s     = h rounded to x.dtype        (returned only with a residual: the next residual stream)

Backward, with g = dL/dy, gs = dL/ds (zero when s is unused), xhat = (h - mean) * rstd, wg = weight * g:
    dh    = rstd * (wg - xhat * mean(xhat * wg) - mean(wg)) + gs,   dx = dresidual = dh (one tensor)
    dweight = sum over rows of g * xhat,   dbias = sum over rows of g

Dtypes: x and residual fp32 / fp16 / bf16 (residual in x's dtype, as ops.py checks), weight and bias
any of those (they may differ from x); statistics and all math in fp32; y, s, dx and dresidual in
x.dtype, dweight/dbias in weight/bias dtype; mean and rstd are kept in fp32 for the backward.
Shapes: x (..., N) with any leading shape, weight/bias (N,), 1 <= N <= 65,536 (MAX_N). Inputs are read
through their row stride; a last dim that is not unit-stride is copied once.

Kernels:
  _ln_fwd_kernel       BLOCK_M rows per program. A row whose next power of two is <= _MAX_FUSED_BLOCK
                       (16,384) is normalised from registers (x, residual read once); longer rows are
                       walked in BLOCK_N chunks twice: once for the statistics (per-chunk mean and M2
                       merged by Chan's rule, no E[h^2] - E[h]^2 cancellation), once to normalise.
  _ln_bwd_kernel       a (row group, column block) grid; each program walks ROWS_PER_PROG rows and
                       writes dh plus fp32 partial column sums for dweight/dbias into (groups, N)
                       buffers that one torch `.sum(0)` reduces: no atomics, deterministic. When the
                       row fits one tile (next power of two <= _MAX_FUSED_BLOCK_BWD, 8,192) the two row
                       means above come from the tile itself (one pass); for longer rows (BLOOM-176B's
                       14,336 included) _ln_bwd_row_dots_kernel computes them first, reading dy, x and
                       residual once more.
Registered as torch.ops.bloom_kernels.layer_norm / layer_norm_backward (custom ops with fake
implementations and autograd) for torch.compile(fullgraph=True) and CUDA graphs. On the GPU launch
parameters are autotuned per (N, bucketed M, dtypes) on the first call of a key: warm up before
capturing a CUDA graph.
"""

from __future__ import annotations


import torch
import triton
import triton.language as tl
from torch import Tensor

from ._tuning import autotune, mark_spills, spill_free
from ._launch import empty, row_bucket, rows_2d, sm_count, triton_interpreting

MAX_N = 65_536  # longest row the op accepts (BLOOM-176B: hidden 14,336)
# Rows whose next power of two is at most this are held in registers (forward / backward); longer
# ones are walked in _LOOP_CHUNK-wide tiles (forward, backward row means) and _BWD_TILE_N-wide column
# blocks (backward). The backward keeps two more fp32 rows live (the dweight/dbias accumulators):
# at 16,384 it spills registers on sm_90 (ptxas, 16 or 32 warps), at 8,192 it does not. Module-level
# so tests can force the looped paths on small rows.
_MAX_FUSED_BLOCK = 16_384
_MAX_FUSED_BLOCK_BWD = 8_192
_LOOP_CHUNK = 4_096
_BWD_TILE_N = 1_024


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
def _configs(spills=()) -> list[triton.Config]:
    """Autotune candidates (BLOCK_M, warps); exactly one when interpreting (no timer there). `spills`:
    the (BLOCK_M, BLOCK_N, warps) where this kernel spills registers on sm_80 or sm_90 (a config's
    case is the launch's BLOCK_N, see _tuning.mark_spills)."""
    if triton_interpreting():
        return [triton.Config({"BLOCK_M": 2}, num_warps=4)]
    return [mark_spills(triton.Config({"BLOCK_M": m}, num_warps=w),
                        spills={n for sm, n, sw in spills if (sm, sw) == (m, w)})
            for m in (1, 2, 4, 8, 16) for w in (4, 8, 16, 32)]


def _pruner(max_tile: int):
    """Keep the tiles that do not spill at this BLOCK_N, of at most max_tile fp32 values (register
    budget) with 8 to 32 of them per thread (at least one 16-byte vector of a 16-bit dtype, at most
    32 registers per live tile)."""
    def prune(configs, named_args, **kwargs):
        block_n = kwargs["BLOCK_N"]
        configs = spill_free(configs, arch=None, case=block_n)
        kept = []
        for c in configs:
            tile, threads = c.kwargs["BLOCK_M"] * block_n, 32 * c.num_warps
            if tile <= max(max_tile, block_n) and tile // 32 <= threads <= max(tile // 8, 128):
                kept.append(c)
        return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"], -c.num_warps))]
    return prune


@triton.jit
def _load_h(x_ptrs, r_ptrs, mask, HAS_RESIDUAL: tl.constexpr):
    """x (+ residual) in fp32; 0 where masked."""
    h = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        h += tl.load(r_ptrs, mask=mask, other=0.0).to(tl.float32)
    return h


@autotune(configs=_configs(), key=["N", "M_BUCKET"],
          prune_configs_by={"early_config_prune": _pruner(16_384)})
@triton.heuristics({"ONE_TILE": lambda a: a["BLOCK_N"] >= a["N"]})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _ln_fwd_kernel(
    x_ptr,  # (M, N), row stride stride_xm, unit column stride
    r_ptr,  # (M, N) residual, row stride stride_rm (any valid pointer when not HAS_RESIDUAL)
    w_ptr, b_ptr,  # (N,)
    y_ptr,  # (M, N) normed output, row stride stride_om
    s_ptr,  # (M, N) x + residual in x.dtype, row stride stride_om (written only with HAS_RESIDUAL)
    mean_ptr, rstd_ptr,  # (M,) fp32
    M, N, stride_xm, stride_rm, stride_om, eps,
    M_BUCKET,  # autotune key only: bucketed M
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_TILE: tl.constexpr,  # BLOCK_N >= N: the whole row is one tile
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    x_rows = x_ptr + rows[:, None] * stride_xm
    r_rows = r_ptr + rows[:, None] * stride_rm
    y_rows = y_ptr + rows[:, None] * stride_om
    s_rows = s_ptr + rows[:, None] * stride_om
    cols0 = tl.arange(0, BLOCK_N)
    if ONE_TILE:  # whole row in registers: read once, write once
        col_mask = cols0 < N
        mask = row_mask[:, None] & col_mask[None, :]
        h = _load_h(x_rows + cols0[None, :], r_rows + cols0[None, :], mask, HAS_RESIDUAL)
        if HAS_RESIDUAL:
            tl.store(s_rows + cols0[None, :], h.to(s_ptr.dtype.element_ty), mask=mask)
        mean = tl.sum(h, axis=1) / N
        d = tl.where(mask, h - mean[:, None], 0.0)
        # the deviations scaled by their largest magnitude s before squaring: d² overflows fp32 for
        # |d| > ~1.8e19, (d/s)² never does; rstd = rsqrt(mean((d/s)²) + eps/s²) / s is the same number
        # (s >= sqrt(eps) keeps eps/s² finite), as reference._layer_norm_scaled
        # (d is replaced by d/s, not kept beside it: one tile fewer in registers, no spill at 16,384)
        scale = tl.maximum(tl.max(tl.abs(d), axis=1), tl.sqrt(eps))
        d = d * (1.0 / scale)[:, None]
        rstd_scaled = 1.0 / tl.sqrt(tl.sum(d * d, axis=1) / N + eps / (scale * scale))
        rstd = rstd_scaled / scale
        w = tl.load(w_ptr + cols0, mask=col_mask, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + cols0, mask=col_mask, other=0.0).to(tl.float32)
        y = d * rstd_scaled[:, None] * w[None, :] + b[None, :]
        tl.store(y_rows + cols0[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        # Pass 1: running (count, mean, M2) per row, merged chunk by chunk (Chan et al.). M2 is kept in
        # units of scale² (m2s = M2 / scale², scale the largest |deviation| or |mean shift| met so far,
        # >= sqrt(eps)): squares of deviations past ~1.8e19 overflow fp32, their ratios to scale never do.
        count = tl.zeros([BLOCK_M], dtype=tl.float32)
        mean = tl.zeros([BLOCK_M], dtype=tl.float32)
        m2s = tl.zeros([BLOCK_M], dtype=tl.float32)
        scale = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.sqrt(eps)
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            mask = row_mask[:, None] & (cols < N)[None, :]
            h = _load_h(x_rows + cols[None, :], r_rows + cols[None, :], mask, HAS_RESIDUAL)
            if HAS_RESIDUAL:
                tl.store(s_rows + cols[None, :], h.to(s_ptr.dtype.element_ty), mask=mask)
            n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
            mean_b = tl.sum(h, axis=1) / n_b
            d = tl.where(mask, h - mean_b[:, None], 0.0)
            delta = mean_b - mean
            new_scale = tl.maximum(tl.maximum(scale, tl.abs(delta)), tl.max(tl.abs(d), axis=1))
            inv = 1.0 / new_scale
            d = d * inv[:, None]
            shrink = scale * inv
            frac = n_b / (count + n_b)
            mean += delta * frac
            m2s = m2s * shrink * shrink + tl.sum(d * d, axis=1) + (delta * inv) * (delta * inv) * count * frac
            scale = new_scale
            count += n_b
        rstd = 1.0 / tl.sqrt(m2s / N + (eps / scale) / scale) / scale
        # Pass 2: normalise (x and residual are read again: the fp32 sum, not the rounded s).
        for start in range(0, N, BLOCK_N):
            cols = start + cols0
            col_mask = cols < N
            mask = row_mask[:, None] & col_mask[None, :]
            h = _load_h(x_rows + cols[None, :], r_rows + cols[None, :], mask, HAS_RESIDUAL)
            w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            b = tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
            y = (h - mean[:, None]) * rstd[:, None] * w[None, :] + b[None, :]
            tl.store(y_rows + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_mask)
    tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@autotune(configs=_configs(), key=["N", "M_BUCKET"],
          prune_configs_by={"early_config_prune": _pruner(8_192)})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _ln_bwd_row_dots_kernel(
    dy_ptr,  # (M, N) dL/dy, row stride stride_dym
    x_ptr, r_ptr,  # (M, N), row strides stride_xm / stride_rm
    w_ptr,  # (N,)
    mean_ptr, rstd_ptr,  # (M,) fp32
    c1_ptr, c2_ptr,  # (M,) fp32 out: mean(xhat * w * dy), mean(w * dy) over each row
    M, N, stride_dym, stride_xm, stride_rm,
    M_BUCKET,  # autotune key only
    HAS_RESIDUAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < M
    mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
    rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
    acc1 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc2 = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        col_mask = cols < N
        mask = row_mask[:, None] & col_mask[None, :]
        h = _load_h(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                    r_ptr + rows[:, None] * stride_rm + cols[None, :], mask, HAS_RESIDUAL)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
        w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        wdy = w[None, :] * dy.to(tl.float32)  # 0 where masked
        acc1 += (h - mean[:, None]) * rstd[:, None] * wdy
        acc2 += wdy
    tl.store(c1_ptr + rows, tl.sum(acc1, axis=1) / N, mask=row_mask)
    tl.store(c2_ptr + rows, tl.sum(acc2, axis=1) / N, mask=row_mask)


# BLOCK_M=8 BLOCK_N=1024 w16 (128 registers a thread) spills with a residual and dL/ds: 16 B on sm_80
# (N=14,336, looped) and 8 B on sm_90 (N=1,024, one tile; ptxas, Triton 3.6, bf16 and fp16). The same
# tile at 8 warps (232-254 registers) or 32 (62-64), and BLOCK_M=4 at 16 (95-99), do not.
@autotune(configs=_configs(spills={(8, 1024, 16)}), key=["N", "M_BUCKET"],
          prune_configs_by={"early_config_prune": _pruner(8_192)})
@triton.heuristics({"ONE_TILE": lambda a: a["BLOCK_N"] >= a["N"]})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _ln_bwd_kernel(
    dy_ptr,  # (M, N) dL/dy, row stride stride_dym
    ds_ptr,  # (M, N) dL/ds, row stride stride_dsm (read only with HAS_DSUM)
    x_ptr, r_ptr,  # (M, N), row strides stride_xm / stride_rm (r only with HAS_RESIDUAL)
    w_ptr,  # (N,)
    mean_ptr, rstd_ptr,  # (M,) fp32
    c1_ptr, c2_ptr,  # (M,) fp32 row means from _ln_bwd_row_dots_kernel (read only if BLOCK_N < N)
    dx_ptr,  # (M, N) x.dtype, row stride stride_om: dL/dx = dL/dresidual
    dw_part_ptr, db_part_ptr,  # (cdiv(M, ROWS_PER_PROG), N) fp32, contiguous: per-group column sums
    M, N, stride_dym, stride_dsm, stride_xm, stride_rm, stride_om,
    ROWS_PER_PROG,  # rows walked by one program (grid axis 0 = row groups, axis 1 = column blocks)
    M_BUCKET,  # autotune key only
    HAS_RESIDUAL: tl.constexpr, HAS_DSUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ONE_TILE: tl.constexpr,  # BLOCK_N >= N: the row means come from the tile itself
):
    group = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = group * ROWS_PER_PROG
    row_end = tl.minimum(row_start + ROWS_PER_PROG, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        h = _load_h(x_ptr + rows[:, None] * stride_xm + cols[None, :],
                    r_ptr + rows[:, None] * stride_rm + cols[None, :], mask, HAS_RESIDUAL)
        mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)  # 0 on padded rows -> xhat = 0
        xhat = (h - mean[:, None]) * rstd[:, None]
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        wdy = w[None, :] * dy  # 0 where masked, so the row sums below need no mask
        if ONE_TILE:
            c1 = tl.sum(xhat * wdy, axis=1) / N
            c2 = tl.sum(wdy, axis=1) / N
        else:
            c1 = tl.load(c1_ptr + rows, mask=row_mask, other=0.0)
            c2 = tl.load(c2_ptr + rows, mask=row_mask, other=0.0)
        dh = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DSUM:
            dh += tl.load(ds_ptr + rows[:, None] * stride_dsm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows[:, None] * stride_om + cols[None, :], dh.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    tl.store(dw_part_ptr + group * N + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    tl.store(db_part_ptr + group * N + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _row_block(n: int, limit: int) -> int:
    """BLOCK_N: the whole row when it fits in registers (next power of two <= limit), else a chunk."""
    block = triton.next_power_of_2(n)
    return block if block <= limit else _LOOP_CHUNK


def _forward(x: Tensor, weight: Tensor, bias: Tensor, eps: float, residual: Tensor | None):
    n = x.shape[-1]
    weight, bias = weight.contiguous(), bias.contiguous()  # the kernels index them as dense (N,) vectors
    x2 = rows_2d(x, n)
    m = x2.shape[0]
    r2 = x2 if residual is None else rows_2d(residual, n)
    y = empty((m, n), x.dtype, x.device)
    s = empty((m, n) if residual is not None else (0,), x.dtype, x.device)
    mean = empty((m,), torch.float32, x.device)
    rstd = empty((m,), torch.float32, x.device)
    if m > 0:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
        _ln_fwd_kernel[grid](
            x2, r2, weight, bias, y, s if residual is not None else y, mean, rstd,
            m, n, x2.stride(0), r2.stride(0), y.stride(0), eps, row_bucket(m),
            HAS_RESIDUAL=residual is not None, BLOCK_N=_row_block(n, _MAX_FUSED_BLOCK),
        )
    lead = x.shape[:-1]
    return y.view(x.shape), (s.view(x.shape) if residual is not None else s), mean.view(lead), rstd.view(lead)


def _backward(dy, dsum, x, residual, weight, mean, rstd, bias_dtype):
    n = x.shape[-1]
    weight = weight.contiguous()
    x2, dy2 = rows_2d(x, n), rows_2d(dy, n)
    m = x2.shape[0]
    r2 = x2 if residual is None else rows_2d(residual, n)
    ds2 = dy2 if dsum is None else rows_2d(dsum, n)
    dx = empty((m, n), x.dtype, x.device)
    mean, rstd = mean.reshape(-1), rstd.reshape(-1)
    if m == 0:
        return (dx.view(x.shape), torch.zeros(n, dtype=weight.dtype, device=x.device),
                torch.zeros(n, dtype=bias_dtype, device=x.device))

    block_n = _row_block(n, _MAX_FUSED_BLOCK_BWD)
    c1 = c2 = mean  # placeholders: the fused kernel computes the row means itself
    if block_n < n:
        block_n = _BWD_TILE_N
        c1 = empty((m,), torch.float32, x.device)
        c2 = empty((m,), torch.float32, x.device)
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]),)
        _ln_bwd_row_dots_kernel[grid](
            dy2, x2, r2, weight, mean, rstd, c1, c2, m, n, dy2.stride(0), x2.stride(0), r2.stride(0),
            row_bucket(m), HAS_RESIDUAL=residual is not None, BLOCK_N=_LOOP_CHUNK,
        )
    col_blocks = triton.cdiv(n, block_n)
    # Row groups: one program per SM for whole rows (Liger's choice: the fp32 partials, written and
    # read once more, stay 3-4% of the traffic at 8192 x 4096), about two per SM for column blocks.
    programs = sm_count(x.device, interpreter_sms=2) * (1 if col_blocks == 1 else 2)
    groups = min(m, triton.cdiv(programs, col_blocks))
    rows_per_prog = triton.cdiv(m, groups)
    groups = triton.cdiv(m, rows_per_prog)
    dw_part = empty((groups, n), torch.float32, x.device)
    db_part = empty((groups, n), torch.float32, x.device)
    _ln_bwd_kernel[(groups, col_blocks)](
        dy2, ds2, x2, r2, weight, mean, rstd, c1, c2, dx, dw_part, db_part,
        m, n, dy2.stride(0), ds2.stride(0), x2.stride(0), r2.stride(0), dx.stride(0), rows_per_prog,
        row_bucket(m), HAS_RESIDUAL=residual is not None, HAS_DSUM=dsum is not None, BLOCK_N=block_n,
    )
    dweight = dw_part.sum(0).to(weight.dtype)
    dbias = db_part.sum(0).to(bias_dtype)
    return dx.view(x.shape), dweight, dbias


# --------------------------------------------------------------------------------------------------
# Custom ops + autograd
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("bloom_kernels::layer_norm", mutates_args=())
def _layer_norm_op(x: Tensor, weight: Tensor, bias: Tensor, eps: float,
                   residual: Tensor | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (y, s, mean, rstd); s = x + residual in x.dtype, or an empty (0,) tensor without residual."""
    return _forward(x, weight, bias, eps, residual)


@_layer_norm_op.register_fake
def _(x, weight, bias, eps, residual):
    lead = x.shape[:-1]
    s = x.new_empty(x.shape) if residual is not None else x.new_empty((0,))
    return (x.new_empty(x.shape), s, x.new_empty(lead, dtype=torch.float32),
            x.new_empty(lead, dtype=torch.float32))


@torch.library.custom_op("bloom_kernels::layer_norm_backward", mutates_args=())
def _layer_norm_backward_op(dy: Tensor, dsum: Tensor | None, x: Tensor, residual: Tensor | None,
                            weight: Tensor, mean: Tensor, rstd: Tensor,
                            bias_dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """-> (dx, dweight, dbias); with a residual, dx is also dL/dresidual."""
    return _backward(dy, dsum, x, residual, weight, mean, rstd, bias_dtype)


@_layer_norm_backward_op.register_fake
def _(dy, dsum, x, residual, weight, mean, rstd, bias_dtype):
    return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape, dtype=bias_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, _eps, residual = inputs
    _, s, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    if residual is None:
        ctx.mark_non_differentiable(s)
    ctx.save_for_backward(x, residual, weight, mean, rstd)
    ctx.bias_dtype = bias.dtype


def _autograd_backward(ctx, dy, dsum, _dmean, _drstd):
    x, residual, weight, mean, rstd = ctx.saved_tensors
    if residual is None:
        dsum = None
    if dy is None:  # only the sum was used
        dy = torch.zeros_like(x)
    dx, dweight, dbias = _layer_norm_backward_op(dy, dsum, x, residual, weight, mean, rstd, ctx.bias_dtype)
    need = ctx.needs_input_grad
    # d(x + residual)/dx = d(x + residual)/dresidual = 1: both inputs get the same gradient tensor
    return (dx if need[0] else None, dweight if need[1] else None, dbias if need[2] else None, None,
            dx if residual is not None and need[4] else None)


_layer_norm_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Entry points used by _dispatch (arguments already validated by ops.py)
# --------------------------------------------------------------------------------------------------
def layer_norm(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5,
               residual: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """LayerNorm over the last dim; with `residual` returns (LN(x + residual), x + residual)."""
    y, s, _, _ = _layer_norm_op(x, weight, bias, float(eps), residual)
    return y if residual is None else (y, s)


def layer_norm_unsupported(x: Tensor, weight: Tensor, bias: Tensor, eps: float = 1e-5,
                           residual: Tensor | None = None) -> str | None:
    """Why the kernel cannot take these (already validated) arguments, or None."""
    n = x.shape[-1]
    if n > MAX_N:
        return f"rows of x must have at most {MAX_N} elements; got x of shape {tuple(x.shape)} (last dim {n})"
    if n == 0:
        return f"x must have a non-empty last dim; got shape {tuple(x.shape)}"
    return None
