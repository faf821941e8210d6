"""THE one place that decides, per call, whether an op runs its Triton kernel or the eager reference.

    BLOOM_KERNELS_BACKEND=auto       (default) Triton for CUDA tensors the kernel supports, else reference;
                                     a kernel that cannot compile or launch here falls back (below)
    BLOOM_KERNELS_BACKEND=triton     always Triton; with TRITON_INTERPRET=1 this runs on CPU tensors;
                                     an input the kernel cannot take is an error, not a silent fallback
    BLOOM_KERNELS_BACKEND=reference  always the eager reference

The variable is read on every call, so tests and users can switch it at run time. `TRITON_OPS` maps
each op to the module of its kernel under bloom_kernels/triton/ (a name that shadows no public op),
imported on the first call that may take the kernel; the module provides `<op>`, a callable with the
op's signature, and `<op>_unsupported(*args, **kwargs) -> str | None`, the reason an (already
validated) input cannot take the kernel. Kernel modules never import this module or the public ops:
the arrow points one way, ops -> _dispatch -> triton/<kernel>. Nothing here imports triton at import
time: a CPU-only install without triton still works, and `auto` on CPU tensors never imports it.

Fallback on a GPU the kernels were not tested on (`auto` only). The kernel call `select` returns is
guarded: if it raises an error that means "this kernel cannot be built or launched here" (see
`_is_kernel_failure`: Triton compilation errors, out-of-resources, ptxas and autotuner errors, and CUDA
errors saying there is no usable kernel image / PTX for this GPU or too many resources for the launch),
the call warns once with a `KernelFallbackWarning` (op, tensor shapes and dtypes, device, error), runs
the reference, and records the case in a registry so that later calls of that case go straight to the
reference with no retry and no warning. Any other error (bad arguments, a device-side assert, out of
memory, a bug) propagates. With `triton` the original error propagates, with a note naming the case.
`dispatch_counts[(op, "fallback")]` counts the calls that ran the reference this way;
`reset_kernel_failures()` forgets every recorded case.

A case is (op, device, dtypes, exact shapes of the tensor arguments). The kernels specialise on shapes
in op-specific ways (block sizes, unmasked variants, autotune keys) that only their modules know, so
the exact shapes are the one key that never sends a case the kernel could run to the reference. The
exception is an error saying the GPU cannot run the kernel's code at all (no kernel image, invalid
image, unsupported PTX toolchain, unsupported architecture): it is recorded for every shape of that
(op, device, dtypes), so a decode loop whose key length grows each step does not recompile and warn
every step.

Limitations: the forward is guarded, not the backward. The kernels are torch custom ops whose backward
launches other kernels when autograd runs it, long after this call returned; a backward kernel that
fails raises. A forward that fell back is the differentiable reference, so its gradients are right.
Under torch.compile the compiled graph calls the kernel itself (tracing only sees fake tensors), so a
failure there raises too; a case already recorded traces to the reference.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import os
import sys
import warnings
from collections import Counter
from types import ModuleType
from typing import Callable

import torch

from . import cpu_attention, cpu_routes, reference
from .triton._launch import triton_interpreting

BACKEND_ENV = "BLOOM_KERNELS_BACKEND"
BACKENDS = ("auto", "triton", "reference")

# op name -> module holding its Triton kernel (attributes `<op>` and `<op>_unsupported`).
TRITON_OPS: dict[str, str] = {
    "alibi_attention": "bloom_kernels.triton.attention",
    "alibi_attention_at": "bloom_kernels.triton.attention",  # the model's entry (unchecked.py)
    "bias_gelu": "bloom_kernels.triton.bias_gelu",
    "layer_norm": "bloom_kernels.triton.layer_norm",
    "int8_linear": "bloom_kernels.triton.int8_linear",
}

# How many times each (op, backend) was chosen; tests read it to prove which path ran.
# backend "fallback": the reference ran because the kernel failed for that case (see the docstring).
dispatch_counts: Counter = Counter()


def _count(op: str, path: str) -> None:
    # Not while torch.compile traces: a counter the graph mutated would be a guard that changes every
    # call (a recompilation per step). Calls inside compiled code are not counted.
    if not torch.compiler.is_compiling():
        dispatch_counts[(op, path)] += 1


class KernelFallbackWarning(RuntimeWarning):
    """A Triton kernel could not compile or launch for a case; the eager reference runs for it."""


def requested_backend() -> str:
    value = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)}; got {value!r}")
    return value


@contextlib.contextmanager
def use_backend(name: str):
    """BLOOM_KERNELS_BACKEND=name inside the block, the previous value after it. Every call reads the
    variable (requested_backend), so this switches what runs without rebuilding anything."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}")
    saved = os.environ.get(BACKEND_ENV)
    os.environ[BACKEND_ENV] = name
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(BACKEND_ENV, None)
        else:
            os.environ[BACKEND_ENV] = saved


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
    return importlib.import_module(name)


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


# --------------------------------------------------------------------------------------------------
# Kernel failures: what counts as one, and the cases that fell back
# --------------------------------------------------------------------------------------------------
# (op, device, dtypes, shapes or None = every shape) -> the error, "Type: first line"
_failures: dict[tuple, str] = {}

# Lower-case message fragments of RuntimeErrors (torch's "CUDA error: ...", Triton's launcher
# "Triton Error [CUDA]: ...", MLIR pass failures) that mean the kernel cannot be built or launched here.
# The CUDA driver/runtime wording of NO_BINARY_FOR_GPU, INVALID_IMAGE, UNSUPPORTED_PTX_VERSION,
# INVALID_PTX, JIT_COMPILER_NOT_FOUND and LAUNCH_OUT_OF_RESOURCES.
_DEVICE_WIDE_MESSAGES = (  # the GPU cannot run this code at all: any shape fails
    "no kernel image is available",
    "device kernel image is invalid",
    "unsupported toolchain",
    "unsupported ptx version",
    "ptx jit compiler library not found",
    "unsupported architecture",
    "not supported on this architecture",
)
_CASE_MESSAGES = (  # this compiled specialisation cannot run: other shapes may
    "a ptx jit compilation failed",
    "too many resources requested for launch",
    "out of resources",
    "passmanager::run failed",
)
# Never a fallback, whatever else the message says: the GPU state or the program is wrong.
_NEVER_MESSAGES = ("device-side assert", "illegal memory access", "out of memory")

_triton_failure_types: tuple[type[BaseException], ...] | None = None


def _triton_errors() -> tuple[type[BaseException], ...]:
    """Triton's compile/launch error classes, imported on first use (only after a kernel raised, when
    triton is already imported). InterpreterError is left out: it wraps whatever the interpreted
    kernel raised (bugs included) and the interpreter is a debugging tool, not a GPU to fall back on."""
    global _triton_failure_types
    if _triton_failure_types is None:
        from triton.compiler.errors import CompilationError  # and its subclasses
        from triton.runtime.errors import AutotunerError, OutOfResources, PTXASError

        types: list[type[BaseException]] = [CompilationError, OutOfResources, PTXASError, AutotunerError]
        try:  # the NVIDIA backend's own name for it (the same class in triton 3.6)
            from triton.backends.nvidia.compiler import PTXASError as NvidiaPTXASError
            types.append(NvidiaPTXASError)
        except ImportError:
            pass
        _triton_failure_types = tuple(types)
    return _triton_failure_types


def _is_kernel_failure(error: BaseException) -> bool:
    """The error means "this kernel cannot compile or launch here", not bad arguments or a bug."""
    if isinstance(error, (ValueError, TypeError)) or "triton" not in sys.modules:
        return False
    if isinstance(error, _triton_errors()):
        return True
    if not isinstance(error, RuntimeError):  # torch.AcceleratorError is a RuntimeError too
        return False
    message = str(error).lower()
    if any(m in message for m in _NEVER_MESSAGES):
        return False
    return any(m in message for m in _DEVICE_WIDE_MESSAGES + _CASE_MESSAGES)


def _device_wide(error: BaseException) -> bool:
    message = str(error).lower()
    return isinstance(error, RuntimeError) and any(m in message for m in _DEVICE_WIDE_MESSAGES)


def _case_key(op: str, tensors: tuple[torch.Tensor, ...], every_shape: bool) -> tuple:
    shapes = None if every_shape else tuple(tuple(t.shape) for t in tensors)
    return (op, tensors[0].device, tuple(t.dtype for t in tensors), shapes)


def _failed_before(op: str, tensors: tuple[torch.Tensor, ...]) -> bool:
    return _case_key(op, tensors, True) in _failures or _case_key(op, tensors, False) in _failures


def kernel_failures() -> dict[tuple, str]:
    """The recorded cases: (op, device, dtypes, shapes or None for every shape) -> error."""
    return dict(_failures)


def reset_kernel_failures() -> None:
    """Forget every recorded failure: each case tries its kernel again (and warns again if it fails)."""
    _failures.clear()


def _describe_case(op: str, args: tuple, kwargs: dict) -> str:
    """'q (2, 16, 128, 64) bfloat16, k ...': the tensor arguments of the call, named as in the op."""
    try:
        named = inspect.signature(getattr(reference, op)).bind(*args, **kwargs).arguments.items()
    except TypeError:  # a call the reference's signature does not describe: number them
        named = [(f"arg{i}", a) for i, a in enumerate(args)] + list(kwargs.items())
    return ", ".join(
        f"{name} {tuple(value.shape)} {str(value.dtype).removeprefix('torch.')}"
        for name, value in named if isinstance(value, torch.Tensor)
    )


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} ({device}, sm_{major}{minor})"
    return f"{device} (Triton interpreter)" if triton_interpreting() else str(device)


def _first_line(error: BaseException) -> str:
    """'Type: first line'. Triton's errors keep the cause in `error_message` (a CompilationError's str
    starts with the source position, 'at 12:4:')."""
    text = (getattr(error, "error_message", None) or str(error)).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def _record_failure(op: str, tensors: tuple[torch.Tensor, ...], error: BaseException, case: str) -> None:
    every_shape = _device_wide(error)
    _failures[_case_key(op, tensors, every_shape)] = _first_line(error)
    scope = (f"every {op} call with these dtypes on this device" if every_shape
             else "this case (these shapes and dtypes)")
    warnings.warn(
        f"bloom_kernels: the Triton kernel for {op} failed on {_describe_device(tensors[0].device)} "
        f"for {case}: {_first_line(error)}. The eager reference runs for {scope} from now on; "
        f"set {BACKEND_ENV}=triton to raise instead.",
        KernelFallbackWarning,
        stacklevel=4,  # _record_failure <- run <- ops.<op> <- the caller
    )


def _guarded(op: str, kernel_fn: Callable, tensors: tuple[torch.Tensor, ...], fall_back: bool) -> Callable:
    """kernel_fn, but a kernel failure falls back to the reference (fall_back, i.e. auto) or raises
    with a note naming the case (triton). One try/except: free until something raises."""

    def run(*args, **kwargs):
        try:
            return kernel_fn(*args, **kwargs)
        except Exception as error:
            if not _is_kernel_failure(error):
                raise
            case = _describe_case(op, args, kwargs)
            if not fall_back:
                error.add_note(f"bloom_kernels: raised by the Triton kernel for {op} on {case}; "
                               f"{BACKEND_ENV}=auto would run the eager reference for this case instead")
                raise
            _record_failure(op, tensors, error, case)
        # outside the except block: an error of the reference is not chained to the kernel's
        _count(op, "fallback")
        return getattr(reference, op)(*args, **kwargs)

    return run


# --------------------------------------------------------------------------------------------------
# The dispatch
# --------------------------------------------------------------------------------------------------
def _kernel_eligible(mode: str, tensors: tuple[torch.Tensor, ...]) -> bool:
    """Whether this call may use the kernel at all: auto only for CUDA tensors (so auto on CPU tensors
    never even imports triton), triton always (select raises if it cannot run), reference never.
    Tests patch it to exercise auto's kernel path on the CPU through the interpreter."""
    if mode == "auto":
        return all(t.is_cuda for t in tensors)
    return mode == "triton"


def select(op: str, tensors: tuple[torch.Tensor, ...], *args, **kwargs) -> Callable:
    """Return the implementation of `op` to run on these arguments (the kernel or the reference).

    `tensors` are the op's tensor arguments (their devices decide `auto`); `args`/`kwargs` are the full
    call, passed to the kernel's `unsupported` check.
    """
    mode = requested_backend()
    kernel = _kernel_module(op) if _kernel_eligible(mode, tensors) else None
    if kernel is None:
        if mode == "triton" and op in TRITON_OPS and importlib.util.find_spec("triton") is None:
            raise RuntimeError(f"{BACKEND_ENV}=triton but triton is not installed (needed by {op})")
        _count(op, "reference")
        return getattr(reference, op)

    if mode == "auto" and _failures and _failed_before(op, tensors):
        _count(op, "fallback")  # a recorded case: no retry, no second warning
        return getattr(reference, op)

    reason = getattr(kernel, f"{op}_unsupported")(*args, **kwargs)
    if mode == "triton":
        if not all(t.is_cuda for t in tensors) and not triton_interpreting():
            devices = sorted({str(t.device) for t in tensors})
            raise RuntimeError(
                f"{BACKEND_ENV}=triton needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                f"imported to run the kernels on the CPU; {op} got tensors on {devices}"
            )
        if reason is not None:
            raise ValueError(f"{op}: the Triton kernel does not support this input: {reason}")
    elif reason is not None:
        _count(op, "reference")
        return getattr(reference, op)
    _count(op, "triton")
    kernel_fn = getattr(kernel, op)
    if torch.compiler.is_compiling():
        return kernel_fn  # tracing runs fake kernels: nothing to catch here (see the docstring)
    return _guarded(op, kernel_fn, tensors, fall_back=mode == "auto")


def _cpu_route(tensors: tuple[torch.Tensor, ...]) -> bool:
    """CPU tensors that may not take the kernel run the measured routes of cpu_routes.py under `auto`
    (`reference` forces the reference; `triton` with the interpreter means the kernels, what tests of
    them through a model want)."""
    mode = requested_backend()
    return mode == "auto" and tensors[0].device.type == "cpu" and not _kernel_eligible(mode, tensors)


def attention_on_cpu_route(slopes: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a forward's attention runs cpu_attention's SDPA route (decided once per forward)."""
    if dtype in cpu_attention.DTYPES and _cpu_route((slopes,)):
        _count("alibi_attention_at", "cpu")
        return True
    return False


def select_int8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None) -> Callable:
    """int8_linear's implementation: the measured CPU route (cpu_routes.int8_linear) for CPU tensors
    under auto, else the kernel or the reference as `select` picks."""
    tensors = (x, weight_int8, scale) if bias is None else (x, weight_int8, scale, bias)
    if _cpu_route(tensors):
        _count("int8_linear", "cpu")
        return cpu_routes.int8_linear
    return select("int8_linear", tensors, x, weight_int8, scale, bias)


def select_linear(x: torch.Tensor) -> Callable:
    """The implementation of `linear` for this input: the measured CPU route (cpu_routes.linear) for
    CPU tensors (unless the reference is forced), else the reference (F.linear: cuBLAS on a GPU)."""
    if x.device.type == "cpu" and requested_backend() != "reference":
        _count("linear", "cpu")
        return cpu_routes.linear
    _count("linear", "reference")
    return reference.linear
