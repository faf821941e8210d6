"""int8 weight-only linear, y = x · (w_int8 * scale[:, None])ᵀ + bias, as Triton kernels behind a custom op.

    y[m, n] = scale[n] * sum_k x[m, k] * w_int8[n, k] + bias[n]      (fp32 accumulation, one cast)
    dx[m, k] = sum_n dy[m, n] * scale[n] * w_int8[n, k]               (same kernel, transposed weight)

Dtypes: x fp16 / bf16 / fp32; weight_int8 int8 (N, K); scale (N,) and bias (N,) any float dtype (read as
fp32). y and dx in x.dtype. Shapes: x (..., K) with any leading shape, viewed as (M, K) through its row
stride (copied only when no such view exists); any strides for the weight; sizes below 2^31.

One kernel, `_int8_matmul_kernel`: tiles (BLOCK_M, BLOCK_N), a K loop that loads the int8 weight tile
(K contiguous: 16-byte loads, pipelined into shared memory), converts it exactly to x's dtype in
registers and feeds tl.dot (tensor cores, fp32 accumulator); scale and bias are applied once at the end.
Two paths, i.e. two families of launch configs:
  * small M (M <= SMALL_M_MAX = 16, decode): a single row tile (x padded with masked, zero-filled rows to
    16 or 64), the weight streamed with an evict-first hint, and K split so that (N tiles x splits) fills
    2-4 waves of SMs. Splits write fp32 partials (SPLIT_K, M, N) that `_splitk_reduce_kernel` sums in a
    fixed order (deterministic, no atomics) before scale, bias and the cast.
  * large M (prefill): a tiled GEMM in grouped order (GROUP_M row tiles share each weight tile in L2).
Design choices read off this kernel's sm_90a SASS (Triton 3.6, compiled offline; not yet timed): a
CUDA-core (broadcast-multiply-reduce) variant for tiny M was tried and dropped, it needs 4.4-5.7 thread
instructions per weight byte against 3.1-4.2 for this tensor-core loop; and x is the left tl.dot operand
with the dequantised tile the right one (staged in shared memory), because the opposite "weight in
registers" (swap-AB) form costs ~1.5x the instructions (byte shuffles into the wgmma register layout).
Conversions: int8 -> bf16 by Triton's sm_90 bit trick, int8 -> fp16 and -> fp32 by adding the integer
to the bit pattern of 1152.0 / 1.5 * 2^23 (exact; cvt from int is a quarter-rate instruction on H100).
fp32 activations use tl.dot(input_precision="ieee"): correct (no TF32), not fast.

Registered as `torch.ops.bloom_kernels.int8_linear` and `int8_linear_dx` (custom ops with fake
implementations and autograd: the x gradient through the kernel above, bias and scale gradients in
plain torch, none for the int8 weight), so it works under torch.compile(fullgraph=True) and CUDA graphs.

Tuning: on a GPU the first call of each (path, dtype, M bucket, N, K) key times a short list of whole
launches (kernel + split-K reduce) with triton.testing.do_bench and keeps the fastest; that first call
synchronises. Warm up before capturing a CUDA graph: a call made while capturing takes the built-in
default config instead. BLOOM_KERNELS_INT8_TUNE=0 always uses the defaults. In the Triton interpreter
one small config per path is used, and bf16 runs its dots in fp32 (the interpreter's bf16 dot and
int -> bf16 cast are broken; bf16 x bf16 products are exact in fp32, so the result is the same).
"""

from __future__ import annotations

import math
import os
from collections import Counter

import torch
import triton
import triton.language as tl
from torch import Tensor

from ._int8_configs import Int8MatmulConfig, candidates, default_config
from ._launch import device_index, empty, triton_interpreting
from .._tune_cache import note_tuning, short_hash, tuning_cache
from ._tuning import gpu_identity, tuning_key

SMALL_M_MAX = 16  # rows handled by the streaming (decode) path by default
TUNE_ENV = "BLOOM_KERNELS_INT8_TUNE"

# Which launcher ran, by path ("small", "large", "dx"): tests read it to prove a path was taken.
path_counts: Counter = Counter()


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _int8_to(w, DTYPE: tl.constexpr):
    """Exact conversion of an int8 tile to DTYPE without cvt instructions where that matters."""
    if DTYPE == tl.float32:
        # 0x4B400000 is 1.5 * 2^23, whose fp32 ulp is 1: adding w to its bit pattern gives the float
        # 1.5 * 2^23 + w exactly (also for w < 0), and the subtraction is exact.
        return (w.to(tl.int32) + 0x4B400000).to(tl.float32, bitcast=True) - 12582912.0
    elif DTYPE == tl.float16:
        # Same trick in fp16: 0x6480 is 1152.0, ulp 1 in [1024, 2048). cvt from int8 would be one
        # I2F per element, a quarter-rate instruction on H100 (it capped the GEMM's main loop).
        return (w.to(tl.int16) + 0x6480).to(tl.float16, bitcast=True) - 1152.0
    else:
        return w.to(DTYPE)  # bf16: Triton already lowers int8 -> bf16 to bit tricks on sm_90


@triton.jit
def _int8_matmul_kernel(
    x_ptr,  # (M, K) activations
    w_ptr,  # (N, K) int8 weight (any strides: the dx problem passes a transposed view)
    scale_ptr,  # (N,) output-channel scale; (K,) when SCALE_ON_K
    bias_ptr,  # (N,); never read unless HAS_BIAS
    out_ptr,  # SPLIT_K == 1: (M, N) result in x's dtype; else (SPLIT_K, M, N) fp32 partial sums
    M, N, K,
    K_PER_SPLIT,  # K elements per split, a multiple of BLOCK_K (K itself when SPLIT_K == 1)
    stride_xm, stride_xk, stride_wn, stride_wk, stride_scale, stride_bias,
    stride_os, stride_om, stride_on,
    HAS_BIAS: tl.constexpr, SCALE_ON_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
    INPUT_PRECISION: tl.constexpr, W_EVICT: tl.constexpr, EVEN_M: tl.constexpr, EVEN_K: tl.constexpr,
    SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Grouped order: GROUP_M row tiles walk the N tiles together, so a weight tile is read from DRAM
    # about once per group and served from L2 to the others. (Small path: one row tile, no effect.)
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    num_pid_in_group = GROUP_M * num_pid_n
    first_pid_m = (pid // num_pid_in_group) * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + (pid % num_pid_in_group) % group_size_m
    pid_n = (pid % num_pid_in_group) // group_size_m

    offs_m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
    m_mask = offs_m < M  # x rows past M are masked (zero-filled, no traffic: BLOCK_M may be >> M)
    rn = offs_n % N  # weight rows past N re-read a valid row; only the store is masked
    k_lo = pid_k * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    k_base = k_lo.to(tl.int64) + offs_k
    x_ptrs = x_ptr + offs_m[:, None] * stride_xm + k_base[None, :] * stride_xk
    w_ptrs = w_ptr + rn[:, None] * stride_wn + k_base[None, :] * stride_wk
    s_ptrs = scale_ptr + k_base * stride_scale  # SCALE_ON_K only

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_lo, k_hi, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy=W_EVICT)
            if EVEN_M:
                x = tl.load(x_ptrs)
            else:
                x = tl.load(x_ptrs, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = (k + offs_k) < K
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0, eviction_policy=W_EVICT)
            x = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if SCALE_ON_K:  # dx problem: the scale runs along the reduction; fold it into the weight tile
            if EVEN_K:
                s = tl.load(s_ptrs).to(tl.float32)
            else:
                s = tl.load(s_ptrs, mask=k_mask, other=0.0).to(tl.float32)
            wd = (_int8_to(w, tl.float32) * s[None, :]).to(DOT_DTYPE)
            s_ptrs += BLOCK_K * stride_scale
        else:
            wd = _int8_to(w, DOT_DTYPE)  # exact: int8 values fit every float format
        # x is the left operand and the dequantised tile goes through shared memory as the right one:
        # in the SASS this beats the weight-in-registers (swap-AB) form by ~1.5x in instructions per
        # weight byte, which bounds this loop on an H100 at small M.
        acc = tl.dot(x.to(DOT_DTYPE), tl.trans(wd), acc, input_precision=INPUT_PRECISION)
        w_ptrs += BLOCK_K * stride_wk
        x_ptrs += BLOCK_K * stride_xk

    out_mask = m_mask[:, None] & (offs_n[None, :] < N)
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    if SPLIT_K == 1:
        if not SCALE_ON_K:
            acc *= tl.load(scale_ptr + rn * stride_scale).to(tl.float32)[None, :]
        if HAS_BIAS:
            acc += tl.load(bias_ptr + rn * stride_bias).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        tl.store(out_ptrs + pid_k.to(tl.int64) * stride_os, acc, mask=out_mask)


@triton.jit
def _splitk_reduce_kernel(
    part_ptr,  # (SPLIT_K, M, N) fp32 partial sums, contiguous
    scale_ptr,  # (N,)
    bias_ptr,  # (N,); never read unless HAS_BIAS
    out_ptr,  # (M, N) result, contiguous, x's dtype
    MN, N,  # MN = M * N, also the stride between splits
    stride_scale, stride_bias,
    HAS_SCALE: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < MN
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):  # fixed order: deterministic, unlike atomics
        acc += tl.load(part_ptr + s * MN + offs, mask=mask, other=0.0)
    n = offs % N
    if HAS_SCALE:
        acc *= tl.load(scale_ptr + n * stride_scale, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + n * stride_bias, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


# --------------------------------------------------------------------------------------------------
# Tuning: the candidates of _int8_configs.py, timed as whole launches
# --------------------------------------------------------------------------------------------------
# This process's picks, by (path, scale_on_k, device index, dtype, M bucket, N, K, bias, weight layout).
# Timed picks are also kept on disk across processes, in _tune_cache.tuning_cache("int8_linear")
# (~/.cache/bloom_kernels/int8_linear.json; BLOOM_KERNELS_CACHE_DIR moves it), keyed by _tuning.tuning_key:
# the GPU's name and capability, the Triton version, then the fields of the key above and a hash of the
# candidate list (a changed list re-times).
_TUNED: dict[tuple, Int8MatmulConfig] = {}


def _tuning_enabled() -> bool:
    return os.environ.get(TUNE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


def _m_bucket(m: int) -> int:
    return m if m <= SMALL_M_MAX else min(triton.next_power_of_2(m), 8192)


def _pick_config(path: str, x2: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None,
                 scale_on_k: bool = False) -> Int8MatmulConfig:
    """The tuned config of this key (from memory, else from the disk cache, else by timing the
    candidates on its first call, with a one-line note), else the default."""
    m, k = x2.shape
    n = weight.shape[0]
    device = x2.device
    fp32 = x2.dtype == torch.float32  # fp32 dots run on CUDA cores: correctness path, not tuned
    if device.type != "cuda" or fp32 or not _tuning_enabled():
        return default_config(path, m, n, k, device, x2.dtype)
    key = (path, scale_on_k, device_index(device), x2.dtype, _m_bucket(m), n, k, bias is not None,
           weight.stride(1) == 1)
    cfg = _TUNED.get(key)
    if cfg is not None:
        return cfg
    choices = candidates(path, m, n, k, device)
    dtype = str(x2.dtype).removeprefix("torch.")
    disk_key = tuning_key(device, dtype=dtype, path=path, problem="dx" if scale_on_k else "y",
                          m_bucket=_m_bucket(m), n=n, k=k, bias=bias is not None,
                          weight_k_contiguous=weight.stride(1) == 1, candidates=short_hash(repr(choices)))
    disk = tuning_cache("int8_linear")
    stored = disk.get(disk_key)
    try:
        cfg = Int8MatmulConfig(**stored) if isinstance(stored, dict) else None
    except TypeError:  # an entry of other fields (another version of this file): time again
        cfg = None
    if cfg not in choices:
        if torch.cuda.is_current_stream_capturing():  # timing would synchronise inside the capture
            return default_config(path, m, n, k, device, x2.dtype)
        what = f"int8_linear ({'dx' if scale_on_k else 'y'}, {path} path)"
        bias_text = ", bias" if bias is not None else ""
        note_tuning(what, f"(M bucket {_m_bucket(m)}, N {n}, K {k}, {dtype}{bias_text})",
                    gpu_identity(device), str(disk.path))
        best, best_ms = None, float("inf")
        for cand in choices:
            try:
                ms = triton.testing.do_bench(
                    lambda c=cand: _launch(x2, weight, scale, bias, c, scale_on_k=scale_on_k), warmup=5,
                    rep=20, return_mode="median")
            except Exception:  # noqa: BLE001, S112 - e.g. a tile needing more shared memory than the card has
                continue
            if ms < best_ms:
                best, best_ms = cand, ms
        if best is not None:
            disk.put(disk_key, dict(vars(best)))
        cfg = best or default_config(path, m, n, k, device, x2.dtype)
    _TUNED[key] = cfg
    return cfg


# --------------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------------
def _dot_dtype(dtype: torch.dtype):
    if dtype == torch.float16:
        return tl.float16
    if dtype == torch.bfloat16 and not triton_interpreting():
        return tl.bfloat16
    return tl.float32  # fp32 x; or bf16 in the interpreter, whose bf16 dot is broken (exact in fp32)


def _launch(x2: Tensor, weight: Tensor, scale: Tensor, bias: Tensor | None, cfg: Int8MatmulConfig,
            scale_on_k: bool = False) -> Tensor:
    """(M, N) = x2 (M, K) · (weight (N, K) * scale[:, None])ᵀ + bias, or with scale_on_k the scale
    (K,) multiplies the weight's columns instead (the dx problem)."""
    m, k = x2.shape
    n = weight.shape[0]
    k_steps = triton.cdiv(k, cfg.block_k)
    steps_per_split = triton.cdiv(k_steps, max(1, cfg.split_k))
    split = triton.cdiv(k_steps, steps_per_split)  # no empty splits
    out = empty((m, n), x2.dtype, x2.device)
    target = out if split == 1 else empty((split, m, n), torch.float32, x2.device)
    has_bias = bias is not None
    bias_arg = bias if has_bias else scale
    dot_dtype = _dot_dtype(x2.dtype)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), split)
    _int8_matmul_kernel[grid](
        x2, weight, scale, bias_arg, target,
        m, n, k, steps_per_split * cfg.block_k,
        x2.stride(0), x2.stride(1), weight.stride(0), weight.stride(1), scale.stride(0),
        bias_arg.stride(0), target.stride(0) if split > 1 else 0, target.stride(-2), target.stride(-1),
        HAS_BIAS=has_bias, SCALE_ON_K=scale_on_k, DOT_DTYPE=dot_dtype,
        INPUT_PRECISION="ieee" if dot_dtype == tl.float32 else "tf32",
        W_EVICT="evict_first" if cfg.stream_weight else "",
        EVEN_M=m % cfg.block_m == 0, EVEN_K=k % cfg.block_k == 0, SPLIT_K=split,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        block = 1024
        _splitk_reduce_kernel[(triton.cdiv(m * n, block),)](
            target, scale, bias_arg, out, m * n, n, scale.stride(0), bias_arg.stride(0),
            HAS_SCALE=not scale_on_k, HAS_BIAS=has_bias, SPLIT_K=split, BLOCK=block, num_warps=4,
        )
    return out


def _choose_path(m: int) -> str:
    return "small" if m <= SMALL_M_MAX else "large"


def int8_linear_triton(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None, *,
                       path: str | None = None, config: Int8MatmulConfig | None = None) -> Tensor:
    """The forward launcher (no autograd). `path` ("small" / "large") or `config` force a path or a
    launch config (tests, benchmarks); by default the path follows M and the config is tuned."""
    k = x.shape[-1]
    n = weight_int8.shape[0]
    m = math.prod(x.shape[:-1])
    x2 = x.reshape(m, k)  # a view when the leading dims flatten into one stride
    out_shape = (*x.shape[:-1], n)
    if m == 0 or n == 0 or k == 0:  # nothing to reduce: y = bias (or 0), no kernel
        y = torch.zeros(out_shape, dtype=torch.float32, device=x.device)
        return (y + bias.float() if bias is not None else y).to(x.dtype)
    path = path or _choose_path(m)
    if path not in ("small", "large"):
        raise ValueError(f"path must be 'small', 'large' or None; got {path!r}")
    cfg = config or _pick_config(path, x2, weight_int8, scale, bias)
    path_counts[path] += 1
    return _launch(x2, weight_int8, scale, bias, cfg).view(out_shape)


def int8_linear_dx_triton(dy: Tensor, weight_int8: Tensor, scale: Tensor,
                          config: Int8MatmulConfig | None = None) -> Tensor:
    """dx (..., K) = dy (..., N) · (weight_int8 * scale[:, None]): the same kernel on the transposed
    problem (the weight viewed as (K, N), no copy; the scale folded into each tile along N)."""
    n, k = weight_int8.shape
    m = math.prod(dy.shape[:-1])
    dy2 = dy.reshape(m, n)
    out_shape = (*dy.shape[:-1], k)
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(out_shape, dtype=dy.dtype, device=dy.device)
    w_t = weight_int8.t()
    path = _choose_path(m)
    cfg = config or _pick_config(path, dy2, w_t, scale, None, scale_on_k=True)
    path_counts["dx"] += 1
    return _launch(dy2, w_t, scale, None, cfg, scale_on_k=True).view(out_shape)


# --------------------------------------------------------------------------------------------------
# Custom ops + autograd
# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("bloom_kernels::int8_linear", mutates_args=())
def _int8_linear_op(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:
    return int8_linear_triton(x, weight_int8, scale, bias)


@_int8_linear_op.register_fake
def _(x, weight_int8, scale, bias):
    return x.new_empty((*x.shape[:-1], weight_int8.shape[0]))


@torch.library.custom_op("bloom_kernels::int8_linear_dx", mutates_args=())
def _int8_linear_dx_op(dy: Tensor, weight_int8: Tensor, scale: Tensor) -> Tensor:
    return int8_linear_dx_triton(dy, weight_int8, scale)


@_int8_linear_dx_op.register_fake
def _(dy, weight_int8, scale):
    return dy.new_empty((*dy.shape[:-1], weight_int8.shape[1]))


def _setup_context(ctx, inputs, output):
    x, weight_int8, scale, bias = inputs
    ctx.save_for_backward(x, weight_int8, scale)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _autograd_backward(ctx, dy):
    x, weight_int8, scale = ctx.saved_tensors
    n, k = weight_int8.shape
    dx = dscale = dbias = None
    if ctx.needs_input_grad[0]:
        dx = _int8_linear_dx_op(dy, weight_int8, scale)
    if ctx.needs_input_grad[2]:
        # d scale[n] = sum_m dy[m, n] * (x[m] · w_int8[n]); rarely wanted, so plain fp32 torch
        m = math.prod(x.shape[:-1])
        y_unscaled = x.reshape(m, k).float() @ weight_int8.float().t()
        dscale = (dy.reshape(m, n).float() * y_unscaled).sum(0).to(scale.dtype)
    if ctx.needs_input_grad[3]:
        dbias = dy.reshape(math.prod(dy.shape[:-1]), n).float().sum(0).to(ctx.bias_dtype)
    return dx, None, dscale, dbias  # no gradient for the int8 weight


_int8_linear_op.register_autograd(_autograd_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Entry points used by _dispatch (arguments already validated by ops.py)
# --------------------------------------------------------------------------------------------------
def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """x (..., K) · (weight_int8 (N, K) * scale (N,)[:, None])ᵀ + bias (N,) -> (..., N) in x.dtype."""
    return _int8_linear_op(x, weight_int8, scale, bias)


def int8_linear_unsupported(x: Tensor, weight_int8: Tensor, scale: Tensor,
                            bias: Tensor | None = None) -> str | None:
    """Why the kernels cannot take these (already validated) arguments, or None."""
    if x.is_cuda and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) < (8, 0):
        return "bf16 tensor-core dots need a GPU of compute capability 8.0 or newer"
    return None
