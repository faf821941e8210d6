"""Small helpers shared by the kernel launchers: 2-D row views, autotune buckets, SM counts."""

from __future__ import annotations

import functools

import torch
import triton
from torch import Tensor

from ._dispatch import triton_interpreting

__all__ = ["triton_interpreting", "rows_2d", "row_bucket", "sm_count"]


def rows_2d(t: Tensor, n: int) -> Tensor:
    """t (..., n) as an (M, n) view with unit column stride; copies only when no such view exists."""
    t2 = t.reshape(-1, n)
    return t2 if n <= 1 or t2.stride(1) == 1 else t2.contiguous()


def row_bucket(m: int) -> int:
    """Autotune key for a row count: powers of two, all M >= 8192 alike."""
    return min(triton.next_power_of_2(m), 8192)


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device, interpreter_sms: int) -> int:
    """Streaming multiprocessors of a CUDA device; `interpreter_sms` stands in on the CPU interpreter
    (small, so small test shapes still exercise the multi-program reductions)."""
    if device.type != "cuda":
        return interpreter_sms
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_sm_count(index)
