"""Fused bias + BLOOM tanh-GeLU, forward and backward, as Triton kernels behind a PyTorch custom op.

    y      = gelu(h),  h = x + bias,  gelu(h) = h * 0.5 * (1 + tanh(sqrt(2/pi) * h * (1 + 0.044715 h^2)))
    dx     = dy * gelu'(h)            (BLOOM's hand-written derivative, see reference.gelu_backward_fp32)
    dbias  = sum over all rows of dx  (in fp32, then cast to bias.dtype)

Dtypes: x and bias fp32 / fp16 / bf16 (they may differ); all math in fp32; y and dx in x.dtype, dbias
in bias.dtype. Shapes: x (..., N) with any leading shape, bias (N,), 1 <= N <= 65,536 (MAX_N). x is
viewed as a 2-D (M, N) matrix through its row stride; only a last dimension that is not unit-stride (or
leading dims that cannot be flattened into one stride) is copied, once, by `reshape`/`contiguous`.

0.5 * (1 + tanh(u)) is computed as sigmoid(2u) = 1 / (1 + 2^(-2u * log2(e))): the same function without
the cancellation of 1 + tanh(u) for negative u, and one exp2 instead of a tanh. The derivative uses
1 - tanh(u)^2 = 4 s (1 - s) with s = sigmoid(2u).

The forward is a 2-D tiled elementwise kernel (BLOCK_M rows x BLOCK_N columns per program). The
backward runs a (row group, column block) grid: each program walks ROWS_PER_PROG rows of its column
block, writes dx, and writes its fp32 partial column sums of dx to a (row groups, N) buffer that one
torch `.sum(0)` reduces: no atomics, deterministic.

Registered as `torch.ops.bloom_kernels.bias_gelu` / `bias_gelu_backward` (custom ops with fake
implementations and autograd), so it runs under torch.compile(fullgraph=True) and in CUDA graphs. On
the GPU the block sizes are autotuned per (N, bucketed M, dtypes) on the first call of each key: warm up
before capturing a CUDA graph.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor

from .. import reference
from ._tuning import autotune
from ._launch import empty, row_bucket, rows_2d, sm_count, triton_interpreting

MAX_N = 65_536  # longest row the op accepts (BLOOM-176B's MLP width is 57,344)

_SQRT_2_OVER_PI = tl.constexpr(reference.GELU_SQRT_2_OVER_PI)
_CUBIC = tl.constexpr(reference.GELU_CUBIC)
_DERIV_CUBIC = tl.constexpr(reference.GELU_DERIV_CUBIC)
_TWO_LOG2E = tl.constexpr(2.0 * math.log2(math.e))


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
def _configs(backward: bool) -> list[triton.Config]:
    """Autotune candidates (BLOCK_M, BLOCK_N, warps); exactly one when interpreting (no timer there)."""
    if triton_interpreting():
        return [triton.Config({"BLOCK_M": 4, "BLOCK_N": 512}, num_warps=4)]
    shapes = [(1, 4096, 8), (2, 2048, 8), (4, 1024, 4), (4, 1024, 8), (8, 1024, 8), (8, 512, 4),
              (16, 256, 4), (4, 2048, 8)]
    if backward:  # three streams in flight per element: smaller tiles, more of them
        shapes = [(1, 2048, 8), (2, 1024, 4), (4, 1024, 8), (4, 512, 4), (8, 512, 8), (8, 256, 4),
                  (16, 256, 8)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w) for m, n, w in shapes]


def _prune(configs, named_args, **kwargs):
    """Drop tiles wider than the row (they only add masked lanes); keep at least the narrowest."""
    width = max(triton.next_power_of_2(named_args["N"]), 256)
    kept = [c for c in configs if c.kwargs["BLOCK_N"] <= width]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_N"])]


@autotune(configs=_configs(backward=False), key=["N", "M_BUCKET"],
          prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({
    "EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0,
})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _bias_gelu_fwd_kernel(
    x_ptr,  # (M, N), row stride stride_xm, unit column stride
    bias_ptr,  # (N,)
    y_ptr,  # (M, N), row stride stride_ym
    M, N, stride_xm, stride_ym,
    M_BUCKET,  # autotune key only: bucketed M (row_bucket)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + cols[None, :]
    y_ptrs = y_ptr + rows[:, None] * stride_ym + cols[None, :]
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    if EVEN_N:
        b = tl.load(bias_ptr + cols).to(tl.float32)
    else:
        b = tl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    if EVEN_M and EVEN_N:
        x = tl.load(x_ptrs)
    else:
        x = tl.load(x_ptrs, mask=mask, other=0.0)
    h = x.to(tl.float32) + b[None, :]
    u = _SQRT_2_OVER_PI * h * (1.0 + _CUBIC * h * h)
    y = h / (1.0 + tl.exp2(-_TWO_LOG2E * u))  # h * sigmoid(2u) == h * 0.5 * (1 + tanh(u))
    if EVEN_M and EVEN_N:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty))
    else:
        tl.store(y_ptrs, y.to(y_ptr.dtype.element_ty), mask=mask)


@autotune(configs=_configs(backward=True), key=["N", "M_BUCKET"],
          prune_configs_by={"early_config_prune": _prune})
@triton.heuristics({"EVEN_N": lambda a: a["N"] % a["BLOCK_N"] == 0})
@triton.jit(do_not_specialize=["M_BUCKET"])
def _bias_gelu_bwd_kernel(
    dy_ptr,  # (M, N), row stride stride_dym
    x_ptr,  # (M, N), row stride stride_xm
    bias_ptr,  # (N,)
    dx_ptr,  # (M, N), row stride stride_dxm
    dbias_part_ptr,  # (cdiv(M, ROWS_PER_PROG), N) fp32, contiguous: this program's row = column sums
    M, N, stride_dym, stride_xm, stride_dxm,
    ROWS_PER_PROG,  # rows of one program (grid axis 0 = row groups)
    M_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
):
    group = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if EVEN_N:
        b = tl.load(bias_ptr + cols).to(tl.float32)
    else:
        b = tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    row_start = group * ROWS_PER_PROG
    row_end = tl.minimum(row_start + ROWS_PER_PROG, M)
    for m0 in range(row_start, row_end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & col_mask[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
        dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
        h = x.to(tl.float32) + b[None, :]
        u = _SQRT_2_OVER_PI * h * (1.0 + _CUBIC * h * h)
        s = 1.0 / (1.0 + tl.exp2(-_TWO_LOG2E * u))  # sigmoid(2u) = 0.5 * (1 + tanh(u))
        # 0.5 h (1 - tanh^2)(a + b h^2) + 0.5 (1 + tanh)  with  1 - tanh^2 = 4 s (1 - s)
        dgelu = 2.0 * h * s * (1.0 - s) * (_SQRT_2_OVER_PI + _DERIV_CUBIC * h * h) + s
        dh = dgelu * dy.to(tl.float32)  # masked lanes: dy = 0 -> dh = 0, so acc needs no mask
        tl.store(dx_ptr + rows[:, None] * stride_dxm + cols[None, :], dh.to(dx_ptr.dtype.element_ty),
                 mask=mask)
        acc += dh
    tl.store(dbias_part_ptr + group * N + cols, tl.sum(acc, axis=0), mask=col_mask)


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _rows_per_program(m: int, n: int, device: torch.device) -> int:
    """Rows one backward program walks: ~4 programs per SM at 1024-wide column blocks, at least 32
    rows (so the fp32 partials stay a few % of the traffic), a multiple of every BLOCK_M."""
    groups = max(1, 4 * sm_count(device, interpreter_sms=2) // triton.cdiv(n, 1024))
    return min(max(triton.next_power_of_2(triton.cdiv(m, groups)), 32), 4096)


def _forward(x: Tensor, bias: Tensor) -> Tensor:
    n = x.shape[-1]
    bias = bias.contiguous()  # the kernels index it as a dense (N,) vector
    x2 = rows_2d(x, n)
    m = x2.shape[0]
    y = empty((m, n), x.dtype, x.device)
    if m > 0 and n > 0:
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]))
        _bias_gelu_fwd_kernel[grid](x2, bias, y, m, n, x2.stride(0), y.stride(0), row_bucket(m))
    return y.view(x.shape)


def _backward(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    n = x.shape[-1]
    bias = bias.contiguous()
    x2 = rows_2d(x, n)
    dy2 = rows_2d(dy, n)
    m = x2.shape[0]
    dx = empty((m, n), x.dtype, x.device)
    if m == 0 or n == 0:
        return dx.view(x.shape), torch.zeros(n, dtype=bias.dtype, device=bias.device)
    rows_per_prog = _rows_per_program(m, n, x.device)
    groups = triton.cdiv(m, rows_per_prog)
    dbias_part = empty((groups, n), torch.float32, x.device)
    grid = lambda meta: (groups, triton.cdiv(n, meta["BLOCK_N"]))
    _bias_gelu_bwd_kernel[grid](dy2, x2, bias, dx, dbias_part, m, n, dy2.stride(0), x2.stride(0),
                                dx.stride(0), rows_per_prog, row_bucket(m))
    return dx.view(x.shape), dbias_part.sum(0).to(bias.dtype)


# --------------------------------------------------------------------------------------------------
# Custom ops + autograd
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("bloom_kernels::bias_gelu", mutates_args=())
def _bias_gelu_op(x: Tensor, bias: Tensor) -> Tensor:
    return _forward(x, bias)


@_bias_gelu_op.register_fake
def _(x, bias):
    return x.new_empty(x.shape)


@torch.library.custom_op("bloom_kernels::bias_gelu_backward", mutates_args=())
def _bias_gelu_backward_op(dy: Tensor, x: Tensor, bias: Tensor) -> tuple[Tensor, Tensor]:
    return _backward(dy, x, bias)


@_bias_gelu_backward_op.register_fake
def _(dy, x, bias):
    return x.new_empty(x.shape), bias.new_empty(bias.shape)


def _setup_context(ctx, inputs, output):
    x, bias = inputs
    ctx.save_for_backward(x, bias)


def _autograd_backward(ctx, dy):
    x, bias = ctx.saved_tensors
    dx, dbias = _bias_gelu_backward_op(dy, x, bias)
    return (dx if ctx.needs_input_grad[0] else None), (dbias if ctx.needs_input_grad[1] else None)


_bias_gelu_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Entry points used by _dispatch (arguments already validated by ops.py)
# --------------------------------------------------------------------------------------------------
def bias_gelu(x: Tensor, bias: Tensor) -> Tensor:
    """gelu_tanh(x + bias) with BLOOM's constants; x (..., N), bias (N,) -> x.shape in x.dtype."""
    return _bias_gelu_op(x, bias)


def bias_gelu_unsupported(x: Tensor, bias: Tensor) -> str | None:
    """Why the kernel cannot take these (already validated) arguments, or None."""
    n = x.shape[-1]
    if n > MAX_N:
        return f"rows of x must have at most {MAX_N} elements; got x of shape {tuple(x.shape)} (last dim {n})"
    return None
