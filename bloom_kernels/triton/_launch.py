"""What every kernel launcher needs, written once: the interpreter flag, output allocation, 2-D row
views, length buckets for autotune keys, dot precision and head-dim tiles, the device guard, and the
GPU's SM count and shared memory (or those of a GPU planned for ahead of time, see `planning_for`).
Tuning that persists is in _tuning.py.

Imports neither triton nor the rest of the package: the dispatcher reads `triton_interpreting` from
here on every call, on machines where triton is not even installed.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["triton_interpreting", "empty", "poisoned_outputs", "rows_2d", "row_bucket", "length_bucket",
           "next_power_of_2", "dot_precision", "head_dim_block", "device_index", "device_guard", "GpuSpec", "planning_for",
           "gpu_spec", "sm_count", "smem_per_block", "config_arch"]


def triton_interpreting() -> bool:
    """Triton's CPU interpreter is on: TRITON_INTERPRET=1 must be set before triton is imported."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def next_power_of_2(n: int) -> int:
    """triton.next_power_of_2 without importing triton (the dispatcher imports this module)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


# Tests set this (through `poisoned_outputs`) so that every buffer a launcher allocates starts as NaN
# (floats) or -1 (integers): an element a kernel fails to write then fails the comparison.
_poison_outputs = False


@contextlib.contextmanager
def poisoned_outputs(enabled: bool = True):
    global _poison_outputs
    previous, _poison_outputs = _poison_outputs, enabled
    try:
        yield
    finally:
        _poison_outputs = previous


def empty(shape, dtype: torch.dtype, device: torch.device) -> Tensor:
    """Every buffer a launcher allocates (outputs and scratch) comes from here."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs and out.device.type != "meta":
        out.fill_(float("nan") if out.dtype.is_floating_point else -1)
    return out


def device_index(device: torch.device) -> int:
    """The CUDA device's index; "cuda" without one is the current device."""
    return device.index if device.index is not None else torch.cuda.current_device()


def device_guard(t: Tensor):
    """Launch on t's GPU whatever the current device is (a no-op on the CPU interpreter)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def length_bucket(n: int, cap: int) -> int:
    """Autotune key of a length: its next power of two, capped (lengths within a bucket share a config)."""
    return min(next_power_of_2(max(int(n), 1)), cap)


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision: IEEE for fp32 inputs (no TF32 rounding); fp16/bf16 dots ignore it."""
    return "ieee" if dtype == torch.float32 else "tf32"


def scores_may_overflow(dtype: torch.dtype) -> bool:
    """Whether q·k in this dtype can pass fp32's range (attention's SCALED, _alibi.query_shift): bf16
    and fp32 hold values up to ~3e38; fp16's 65504 keeps |q·k| <= 128 * 65504^2."""
    return dtype != torch.float16


def head_dim_block(head_dim: int) -> int:
    """BLOCK_D: the head dim's next power of two, at least 16 (tl.dot's smallest K); the extra columns
    of BLOOM's 80 and 96 are masked."""
    return max(16, next_power_of_2(head_dim))


def rows_2d(t: Tensor, n: int) -> Tensor:
    """t (..., n) as an (M, n) view with unit column stride; copies only when no such view exists.
    M is computed, not inferred: reshape(-1, 0) of an (M, 0) tensor is ambiguous and raises."""
    t2 = t.reshape(math.prod(t.shape[:-1]), n)
    return t2 if n <= 1 or t2.stride(1) == 1 else t2.contiguous()


def row_bucket(m: int) -> int:
    """Autotune key for a row count: powers of two, all M >= 8192 alike."""
    return length_bucket(m, 8192)


@dataclass(frozen=True)
class GpuSpec:
    """What the launchers need to know of a GPU to choose their grids and configs."""
    name: str
    capability: int  # 80 for sm_80, 90 for sm_90
    sms: int  # streaming multiprocessors
    smem_per_block: int  # opt-in shared memory per block, bytes


# The GPU the launchers plan for when it is not the one in this process: set only by `planning_for`,
# which the ahead-of-time compile check (compile_targets.py) uses to enumerate what the launchers
# would pick on an sm_80 or sm_90 card from a machine without one.
_planned_gpu: GpuSpec | None = None


@contextlib.contextmanager
def planning_for(spec: GpuSpec):
    global _planned_gpu
    previous, _planned_gpu = _planned_gpu, spec
    try:
        yield spec
    finally:
        _planned_gpu = previous


@functools.cache
def _cuda_spec(device_index: int) -> GpuSpec:
    props = torch.cuda.get_device_properties(device_index)
    return GpuSpec(props.name, props.major * 10 + props.minor, props.multi_processor_count,
                   getattr(props, "shared_memory_per_block_optin", 0) or 99 * 1024)


def gpu_spec(device: torch.device) -> GpuSpec | None:
    """The planned GPU if any, else the CUDA device's spec; None for a CPU (interpreter) device."""
    if _planned_gpu is not None:
        return _planned_gpu
    if device.type != "cuda":
        return None
    return _cuda_spec(device_index(device))


def sm_count(device: torch.device, interpreter_sms: int) -> int:
    """Streaming multiprocessors of a CUDA device; `interpreter_sms` stands in on the CPU interpreter
    (small, so small test shapes still exercise the multi-program reductions)."""
    spec = gpu_spec(device)
    return interpreter_sms if spec is None else spec.sms


def smem_per_block(device: torch.device) -> int:
    """Shared memory one program may use on this device (no limit in the CPU interpreter)."""
    spec = gpu_spec(device)
    return 1 << 30 if spec is None else spec.smem_per_block


def config_arch(device: torch.device) -> int:
    """Which rows of a per-architecture config table a device takes: 90 for Hopper and newer (wgmma),
    80 for Ampere and Ada (mma.sync) and for the CPU interpreter."""
    spec = gpu_spec(device)
    return 90 if spec is not None and spec.capability >= 90 else 80
