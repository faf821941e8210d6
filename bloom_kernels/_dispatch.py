"""THE one place that decides, per call, whether an op runs its Triton kernel or the eager reference.

    BLOOM_KERNELS_BACKEND=auto       (default) Triton for CUDA tensors the kernel supports, else reference
    BLOOM_KERNELS_BACKEND=triton     always Triton; with TRITON_INTERPRET=1 this runs on CPU tensors;
                                     an input the kernel cannot take is an error, not a silent fallback
    BLOOM_KERNELS_BACKEND=reference  always the eager reference

The variable is read on every call, so tests and users can switch it at run time. A kernel module
registers itself in `TRITON_OPS` and provides, for its op, a callable `run` with the op's signature and
`unsupported(*args, **kwargs) -> str | None` giving the reason an input cannot take the kernel.
Nothing here imports triton at import time: a CPU-only install without triton still works.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from collections import Counter
from types import ModuleType
from typing import Callable

import torch

from . import reference

BACKEND_ENV = "BLOOM_KERNELS_BACKEND"
BACKENDS = ("auto", "triton", "reference")

# op name -> module holding its Triton kernel (attributes `<op>` and `<op>_unsupported`).
# An op whose module does not exist (yet) always runs the reference.
TRITON_OPS: dict[str, str] = {
    "alibi_attention": "bloom_kernels.attention",
    "bias_gelu": "bloom_kernels.bias_gelu",
    "layer_norm": "bloom_kernels.layer_norm",
    "int8_linear": "bloom_kernels.int8_linear",
}

# How many times each (op, backend) was chosen; tests read it to prove which path ran.
dispatch_counts: Counter = Counter()


def requested_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}; got {value!r}")
    return value


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_kernel_modules: dict[str, ModuleType | None] = {}


def _kernel_module(op: str) -> ModuleType | None:
    if op not in _kernel_modules:
        _kernel_modules[op] = _find_kernel_module(op)
    return _kernel_modules[op]


def _find_kernel_module(op: str) -> ModuleType | None:
    """The module of op's Triton kernel, or None if it has none or triton is not installed.

    Any other import error of a kernel module propagates: a broken kernel must not hide behind the
    reference.
    """
    name = TRITON_OPS.get(op)
    if name is None or importlib.util.find_spec(name) is None:
        return None
    if importlib.util.find_spec("triton") is None:
        return None
    module = importlib.import_module(name)
    # Importing bloom_kernels.<op> binds the submodule as the package attribute <op>, hiding the
    # public function of the same name: put the public op back.
    package = sys.modules[__package__]
    if getattr(package, op, None) is module:
        setattr(package, op, getattr(importlib.import_module(".ops", __package__), op))
    return module


def kernels_usable_here() -> bool:
    """Triton is installed and has something to run on: a GPU, or its CPU interpreter."""
    return importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or triton_interpreting()
    )


def preload_kernels() -> None:
    """Import every kernel module now. torch.compile cannot trace an import, so a first call made
    inside a compiled region must find its kernel module already loaded."""
    for op in TRITON_OPS:
        _kernel_module(op)


def select(op: str, tensors: tuple[torch.Tensor, ...], *args, **kwargs) -> Callable:
    """Return the implementation of `op` to run on these arguments (the kernel or the reference).

    `tensors` are the op's tensor arguments (their devices decide `auto`); `args`/`kwargs` are the full
    call, passed to the kernel's `unsupported` check.
    """
    mode = requested_backend()
    on_cuda = all(t.is_cuda for t in tensors)
    # auto on CPU tensors never even imports triton: the reference is the CPU path.
    skip_kernel = mode == "reference" or (mode == "auto" and not on_cuda)
    kernel = None if skip_kernel else _kernel_module(op)
    if kernel is None:
        if mode == "triton" and op in TRITON_OPS and importlib.util.find_spec("triton") is None:
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed (needed by {op})")
        dispatch_counts[(op, "reference")] += 1
        return getattr(reference, op)

    reason = getattr(kernel, f"{op}_unsupported")(*args, **kwargs)
    if mode == "triton":
        if not on_cuda and not triton_interpreting():
            devices = sorted({str(t.device) for t in tensors})
            raise RuntimeError(
                f"{BACKEND_ENV}=triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                f"imported to run the kernels on the CPU; {op} got tensors on {devices}"
            )
        if reason is not None:
            raise ValueError(f"{op}: the Triton kernel does not support this input: {reason}")
    elif reason is not None:
        dispatch_counts[(op, "reference")] += 1
        return getattr(reference, op)
    dispatch_counts[(op, "triton")] += 1
    return getattr(kernel, op)
