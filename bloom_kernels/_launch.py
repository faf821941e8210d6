"""Small helpers shared by the kernel launchers: 2-D row views, autotune buckets, the GPU's SM count
and shared memory (or those of a GPU planned for ahead of time). Tuning that persists is in _tuning.py."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import triton
from torch import Tensor

from ._dispatch import triton_interpreting

__all__ = ["triton_interpreting", "rows_2d", "row_bucket", "GpuSpec", "planning_for", "gpu_spec", "sm_count",
           "smem_per_block", "config_arch"]


def rows_2d(t: Tensor, n: int) -> Tensor:
    """t (..., n) as an (M, n) view with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    return t2 if n <= 1 or t2.stride(1) == 1 else t2.contiguous()


def row_bucket(m: int) -> int:
    """Autotune key for a row count: powers of two, all M >= 8192 alike."""
    return min(triton.next_power_of_2(m), 8192)


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
    return _cuda_spec(device.index if device.index is not None else torch.cuda.current_device())


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
