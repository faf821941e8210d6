"""Which CPU route (cpu.py) runs `linear` / `int8_linear` for a shape: measured on this machine, not
decided by a rule, because the fastest one changes from shape to shape and machine to machine.

    BLOOM_KERNELS_CPU_ROUTE=measure   (default) the first eager call of a decode-sized shape (at most
                                      MEASURED_MAX_ROWS rows) times every route on the call's own tensors
                                      and keeps the fastest, in memory and on disk; a one-line note on
                                      stderr says so (BLOOM_KERNELS_TUNE_QUIET=1 silences it)
    BLOOM_KERNELS_CPU_ROUTE=default   no timing: DEFAULT_ROUTE (F.linear / blocked) unless a pick is
                                      already known
    BLOOM_KERNELS_CPU_ROUTE=<route>   that route for every call of an op that has it (F.linear, rowblock,
                                      gemv, dequant, blocked) that needs no gradient: to compare routes,
                                      or to pin one

Picks live in cpu_routes.json under the tuning cache folder (~/.cache/bloom_kernels, or
$BLOOM_KERNELS_CACHE_DIR), keyed by the machine (CPU model, torch version, threads), the op, the exact
row count, N, K, dtype and bias; `python -m bloom_kernels.tune --cpu --model bloom-560m` measures a
model's decode shapes ahead of time (`--remeasure` times them again: a pick timed while the machine
was busy with something else can be wrong). Nothing is timed while torch.compile traces or when
gradients are needed (the reference runs: it is what autograd differentiates). Calls of more rows
(prefill) take DEFAULT_ROUTE untimed: F.linear, and for int8 the blocked dequantization (the
reference's whole fp32 weight per call was 3-5x slower at bloom-560m's shapes), or the reference while
compiling. Inside a graph that torch.compile traces, decode-sized calls take TRACED_ROUTE (gemv; see
there why).
"""

from __future__ import annotations

import functools
import os
import platform
import time

import torch
from torch import Tensor

from . import cpu
from ._tune_cache import note_tuning, tuning_cache

ROUTE_ENV = "BLOOM_KERNELS_CPU_ROUTE"
ROUTES = {"linear": cpu.LINEAR_ROUTES, "int8_linear": cpu.INT8_LINEAR_ROUTES}
DEFAULT_ROUTE = {"linear": "F.linear", "int8_linear": "blocked"}
REFERENCE_ROUTE = {"linear": "F.linear", "int8_linear": "dequant"}  # gradients; prefill while compiling
_CHOICES = frozenset({"measure", "default"} | {name for routes in ROUTES.values() for name in routes})
MEASURED_MAX_ROWS = 16  # decode; more rows (prefill) take the default, where MKL's GEMM is at its best
TIMING_ROUNDS = 7       # rounds over all routes, interleaved; each route keeps its best round
BURST_MS = 2.0          # a round repeats a fast call for at least this long and takes the mean

# The route of every decode-sized call inside a graph torch.compile traces: the multiply-and-sum, which
# inductor fuses with its neighbours. The eagerly timed picks do not carry over: between inductor's
# kernels, the extern GEMM calls of F.linear and rowblock ran 2-5x slower than they time alone (small
# shape, one row, 2 cores: 7.5 ms a step with the eager picks, 4.5 ms with gemv everywhere; rowblock's
# batched matmul 0.53 ms in the graph vs 0.09 ms eager). A constant: no table lookup, no guard.
TRACED_ROUTE = "gemv"

# (op, rows, N, K, dtype, bias) -> route name (None: not measured, none on disk), for this process
_picks: dict[tuple, str | None] = {}


def requested() -> str:
    value = os.environ.get(ROUTE_ENV, "measure").strip() or "measure"
    if value not in _CHOICES:  # read on every call (tests and users switch it): the set is built once
        routes = sorted(_CHOICES - {"measure", "default"})
        raise ValueError(f"{ROUTE_ENV} must be measure, default or a route ({', '.join(routes)}); got {value!r}")
    return value


@functools.cache
def machine() -> str:
    """The CPU the picks belong to: its model name, the torch version (its MKL/oneDNN) and threads are
    added per key (the thread count can change at run time)."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), name)
    except OSError:
        pass
    return name


def _disk_key(key: tuple) -> str:
    op, rows, n, k, dtype, bias = key
    return (f"cpu={machine()}|torch={torch.__version__}|threads={torch.get_num_threads()}|op={op}|"
            f"rows={rows}|n={n}|k={k}|dtype={str(dtype).removeprefix('torch.')}|bias={bias}")


def _time_ms(fn) -> float:
    """Mean wall time of one call over a burst of at least BURST_MS (one call if it takes longer), in
    ms: a 20 us call timed alone is mostly timer and cache noise (tests replace this with a fake clock)."""
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - start
        if elapsed * 1e3 >= BURST_MS:
            return elapsed * 1e3 / calls


def measure(op: str, args: tuple) -> tuple[str, dict[str, float]]:
    """Time every route of `op` on `args`, interleaved over TIMING_ROUNDS rounds after one warm-up
    call each (which compiles a compiled route); the fastest by best round, and every route's time. A
    route that fails here (no C++ compiler for inductor, say) is left out."""
    routes = dict(ROUTES[op])
    for name, fn in list(routes.items()):
        try:
            fn(*args)
        except Exception:  # noqa: BLE001 - a route that cannot run here is simply not a candidate
            del routes[name]
    best = {name: float("inf") for name in routes}
    with torch.inference_mode():
        for _ in range(TIMING_ROUNDS):
            for name, fn in routes.items():
                best[name] = min(best[name], _time_ms(lambda fn=fn: fn(*args)))
    return min(best, key=best.get), best


def route(op: str, x: Tensor, weight: Tensor, bias: Tensor | None, args: tuple) -> str:
    """The route name for this call of `op` (args: the call's arguments, timed if it must measure)."""
    choice = requested()
    if torch.is_grad_enabled() and any(isinstance(a, Tensor) and a.requires_grad for a in args):
        return REFERENCE_ROUTE[op]
    if choice in ROUTES[op]:
        return choice
    k = weight.shape[1]
    key = (op, x.numel() // k if k else 0, weight.shape[0], k, x.dtype, bias is not None)
    if not 0 < key[1] <= MEASURED_MAX_ROWS:
        # traced, a block loop would unroll into the graph: the reference's one dequantization instead
        return REFERENCE_ROUTE[op] if torch.compiler.is_compiling() else DEFAULT_ROUTE[op]
    if torch.compiler.is_compiling():
        return TRACED_ROUTE
    known = _known_pick(*key)
    if known is not None:
        return known
    if choice == "default":
        return DEFAULT_ROUTE[op]
    return measure_and_keep(key, args)


def measure_and_keep(key: tuple, args: tuple) -> str:
    """Time the routes of `key` = (op, rows, N, K, dtype, has_bias) on `args`, keep the fastest in memory
    and on disk (replacing what was there), print the note once; returns it."""
    op, rows, n, k, dtype, has_bias = key
    disk = tuning_cache("cpu_routes")
    note_tuning(f"{op} (CPU route)", f"({rows} rows, N {n}, K {k}, {str(dtype).removeprefix('torch.')}"
                f"{', bias' if has_bias else ''})", machine(), str(disk.path))
    best, times = measure(op, args)
    disk.put(_disk_key(key), {"route": best, "ms": {name: round(ms, 4) for name, ms in times.items()}})
    _picks[key] = best
    return best


def _known_pick(op: str, rows: int, n: int, k: int, dtype: torch.dtype, has_bias: bool) -> str | None:
    """The pick of this key from memory, else from disk (remembered, None too: the disk is read once
    per key), else None."""
    key = (op, rows, n, k, dtype, has_bias)
    if key not in _picks:
        stored = tuning_cache("cpu_routes").get(_disk_key(key))
        ok = isinstance(stored, dict) and stored.get("route") in ROUTES[op]
        _picks[key] = stored["route"] if ok else None
    return _picks[key]


def forget() -> None:
    """Drop this process's picks (the disk file stays): the next call of a key reads the file again."""
    _picks.clear()
    tuning_cache("cpu_routes").reload()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) on the CPU through the measured route."""
    args = (x, weight, bias)
    return ROUTES["linear"][route("linear", x, weight, bias, args)](*args)


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """reference.int8_linear on the CPU through the measured route."""
    args = (x, weight_int8, scale, bias)
    return ROUTES["int8_linear"][route("int8_linear", x, weight_int8, bias, args)](*args)
