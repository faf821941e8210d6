"""What every benchmark in bench/ does the same way; each bench_<op>.py keeps only what is its own
(its peers, its byte or FLOP count, its shapes, its goals). A script imports it from its own folder:

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import _common as common

Timing     median_ms: the median of triton.testing.do_bench, which flushes L2 before every call (so each
           call reads its inputs from HBM); forward_ms / grad_ms add the warm-up call (autotuning,
           torch.compile) first. CPU fallback (bench_generate.py): wall_s, the synchronised wall time
           of one call, and best_wall_s, the best of a few calls.
Ceiling    copy_gbs: a device-to-device copy, bytes read + written / median time, in GB/s (per_second
           and gbs are the arithmetic: amount / seconds / unit).
Peers      every peer runs in this one process on the same inputs; guarded() turns a failing peer
           (out of memory, a compile error) into NaN and one line on stderr, and the run goes on.
Options    the flags the scripts share: --dtype (DTYPES), --no-<peer> skips, --out (default bench/out/);
           the row-wise kernels (bias-GeLU, LayerNorm) also share --rows, --ns, --modes.
Results    run_table measures a table (x values x peers), prints it under a line naming its unit and its
           ceiling, and writes <out>/<name>.csv (the x column, then "<peer> (<unit>)" columns; numbers as
           %.6f, a failed peer left empty), <out>/<name>.png (when matplotlib is installed) and
           <out>/results.html (the plots of this run).
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys

import torch

# the timing pieces `bloom bench` uses too (the package cannot import from bench/)
from bloom import measure as _timing  # noqa: E402

wall_s, best_wall_s, guarded = _timing.wall_s, _timing.best_wall_s, _timing.guarded

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "out")
COMPILE_SKIP = {"compiled": ("compile", "the torch.compile peer")}  # peer -> (--no-<flag>, what it is)


# ---------------------------------------------------------------------------------------------- options

def parser(doc: str, dtypes=("bf16", "fp16", "fp32"), dtype: str = "bf16", skips=None,
           out: bool = True) -> argparse.ArgumentParser:
    """An argument parser with the script's docstring as its help, --dtype (from DTYPES), a --no-<flag>
    for each peer that can be skipped ({peer: (flag, what it is)}) and --out."""
    result = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    result.add_argument("--dtype", choices=sorted(dtypes), default=dtype)
    for flag, what in (skips or {}).values():
        result.add_argument(f"--no-{flag}", action="store_true", help=f"skip {what}")
    if out:
        result.add_argument("--out", default=OUT, help="folder of the csv tables and png plots (default: %(default)s)")
    return result


def peers(providers, args, skips=None) -> list[str]:
    """The providers left after the --no-<flag> options of `skips` ({peer: (flag, what it is)})."""
    skips = skips or {}
    return [p for p in providers if not (p in skips and getattr(args, "no_" + skips[p][0].replace("-", "_")))]


def dims(text: str) -> tuple[int, ...]:
    """"4x16x2048x64" -> (4, 16, 2048, 64)."""
    return tuple(int(v) for v in text.lower().split("x"))


# ---------------------------------------------------------------------------------------------- timing

def median_ms(fn, **kwargs) -> float:
    """Median milliseconds of fn() by triton.testing.do_bench (L2 flushed before every call)."""
    from triton.testing import do_bench

    return do_bench(fn, return_mode="median", **kwargs)


def forward_ms(fn, *inputs) -> float:
    """Median ms of fn(*inputs) without autograd, after one warm-up call (autotuning, compilation)."""
    with torch.no_grad():
        fn(*inputs)
        return median_ms(lambda: fn(*inputs))


def grad_ms(outputs, inputs, grads) -> float:
    """Median ms of torch.autograd.grad(outputs, inputs, grads) on a kept graph, after a warm-up call."""
    def grad():
        return torch.autograd.grad(outputs, inputs, grads, retain_graph=True)
    grad()
    return median_ms(grad)


def per_second(amount: float, ms: float, unit: float = 1e9) -> float:
    """`amount` (bytes, FLOPs) done in `ms` milliseconds, per second, in `unit`s (1e9: GB/s, 1e12: T.../s)."""
    return amount / (ms * 1e-3) / unit


def gbs(nbytes: float, ms: float) -> float:
    """GB/s of moving `nbytes` in `ms` milliseconds."""
    return per_second(nbytes, ms, 1e9)


def copy_gbs(x: torch.Tensor) -> float:
    """The ceiling: GB/s of a device-to-device copy of x, counting bytes read + written (2 x.nbytes)."""
    out = torch.empty_like(x)
    return gbs(2 * x.numel() * x.element_size(), median_ms(lambda: out.copy_(x)))


def copy_ceiling_gbs(nbytes: int = 1 << 29) -> float:
    """copy_gbs of a 512 MiB buffer: the GPU's copy bandwidth, measured now."""
    return copy_gbs(torch.empty(nbytes, device="cuda", dtype=torch.uint8))


# ---------------------------------------------------------------------------------------------- peers

_COMPILED: dict = {}


def compiled(fn):
    """The torch.compile peer of an eager function: fullgraph, static shapes, built once per function."""
    if fn not in _COMPILED:
        _COMPILED[fn] = torch.compile(fn, fullgraph=True, dynamic=False)
    return _COMPILED[fn]


def start(args, script: str, needs: str, recompiles: int | None = None, force_triton: bool = False) -> bool:
    """Ready a GPU run: False (and why on stderr) without a GPU; else the Triton backend (forced, or as a
    default), `recompiles` graphs per compiled function allowed, and the --out folder made."""
    if not torch.cuda.is_available():
        print(f"{script} needs a CUDA GPU ({needs}); none found.", file=sys.stderr)
        return False
    if recompiles is not None:
        import torch._dynamo as dynamo

        dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, recompiles)
        if hasattr(dynamo.config, "recompile_limit"):
            dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, recompiles)
    if force_triton:
        os.environ["BLOOM_KERNELS_BACKEND"] = "triton"
    else:
        os.environ.setdefault("BLOOM_KERNELS_BACKEND", "triton")
    os.makedirs(args.out, exist_ok=True)
    return True


def describe(*parts: str) -> str:
    """One line: the GPU, the run's own parts (dtype, sizes, ceilings), torch and triton versions."""
    import triton

    return ", ".join([torch.cuda.get_device_name(), *parts, f"torch {torch.__version__}",
                      f"triton {triton.__version__}"])


def report_goals(title: str, misses) -> None:
    print(f"\n== goals ({title}) ==")
    print("all met" if not misses else "MISSED:\n  " + "\n  ".join(misses))


# ---------------------------------------------------------------------------------------------- results

def cell(value) -> str:
    """A csv cell: numbers as %.6f, NaN/None empty, anything else as text."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.6f}"
    return str(value)


class Table:
    """One result table: a value per (x, peer) in `unit`; `labels` renames peers in the columns."""

    def __init__(self, name: str, x_name: str, peers, unit: str, labels=None):
        self.name, self.x_name, self.peers, self.unit = name, x_name, list(peers), unit
        self.labels = dict(labels or {})
        self.rows: dict = {}  # x -> [value per peer]

    def add(self, x, values) -> None:
        self.rows[x] = list(values)

    def column(self, peer: str) -> str:
        return f"{self.labels.get(peer, peer)} ({self.unit})"

    def value(self, x, peer: str) -> float:
        return self.rows[x][self.peers.index(peer)]

    def columns(self) -> list[str]:
        return [self.x_name] + [self.column(p) for p in self.peers]

    def write_csv(self, path: str) -> None:
        with open(path, "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(self.columns())
            writer.writerows([cell(x), *(cell(v) for v in values)] for x, values in self.rows.items())

    def text(self) -> str:
        """The table as printed: one row per x, one right-aligned column per peer."""
        def show(v):
            return v if isinstance(v, str) else ("NaN" if math.isnan(v) else f"{v:.6g}")
        lines = [self.columns()] + [[show(x), *(show(v) for v in values)] for x, values in self.rows.items()]
        widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
        return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in lines)


_PLOTS: list[str] = []  # this run's png files, for results.html


def plot(table: Table, out: str, xlabel: str | None = None, x_log=False, y_log=False) -> bool:
    """<out>/<name>.png: one line per peer against x; False (and a note) without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib is not installed: no {table.name}.png)")
        return False
    fig, ax = plt.subplots()
    xs = list(table.rows)
    for i, peer in enumerate(table.peers):
        ax.plot(xs, [table.rows[x][i] for x in xs], label=table.column(peer))
    ax.legend()
    ax.set_xlabel(xlabel or table.x_name)
    ax.set_ylabel(table.unit)
    ax.set_xscale("log" if x_log else "linear")
    ax.set_yscale("log" if y_log else "linear")
    fig.savefig(os.path.join(out, f"{table.name}.png"))
    plt.close(fig)
    _PLOTS.append(f"{table.name}.png")
    return True


def write_html(out: str) -> None:
    """<out>/results.html: the plots of this run."""
    with open(os.path.join(out, "results.html"), "w") as html:
        html.write("<html><body>\n" + "".join(f'<image src="{png}"/>\n' for png in _PLOTS) + "</body></html>\n")


def run_table(out: str, name: str, x_name: str, x_vals, peers, measure, unit: str, ceiling: str, *,
              title: str | None = None, lower_is_better=False, labels=None, xlabel=None, x_log=False,
              y_log=False) -> Table:
    """measure(x, peer) for every x, peer (in that order), printed under a line naming the unit and the
    ceiling, and written to <out>/<name>.csv, .png and results.html."""
    print(f"\n== {title or name} ({unit}; {'lower' if lower_is_better else 'higher'} is better; "
          f"ceiling: {ceiling}) ==")
    table = Table(name, x_name, peers, unit, labels)
    for x in x_vals:
        table.add(x, [measure(x, peer) for peer in table.peers])
    print(f"{name}:\n{table.text()}")
    table.write_csv(os.path.join(out, f"{name}.csv"))
    plot(table, out, xlabel, x_log, y_log)
    write_html(out)
    return table


# ------------------------------------------------------------- row-wise memory-bound kernels (issue 5)

ROW_NS = [1024, 2048, 4096, 8192, 14336, 16384, 32768, 57344]


def rowwise_parser(doc: str, skips, ns_help: str = "N: row lengths") -> argparse.ArgumentParser:
    """parser() plus --rows (M), --ns (N values) and --modes (fwd, bwd) of a row-wise kernel."""
    result = parser(doc, skips=skips)
    result.add_argument("--rows", type=int, default=8192, help="M: rows of x (tokens)")
    result.add_argument("--ns", nargs="+", type=int, default=ROW_NS, help=ns_help)
    result.add_argument("--modes", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"])
    return result


def run_rowwise(args, script: str, kind: str, providers, skips, measure, detail: str = "") -> dict | None:
    """The GB/s tables of a row-wise kernel, one per mode (x: N; the "copy" peer of x is the ceiling),
    then the summary against issue 5's goals; None without a GPU. measure(mode, m, n, provider, args);
    `detail` is added to the summary's title."""
    if not start(args, script, "Triton kernels, inductor peers", recompiles=64):
        return None
    names = peers(providers, args, skips)
    print(describe(args.dtype, f"M = {args.rows}"))
    tables = {mode: run_table(args.out, f"{kind}-{mode}-{args.dtype}-M{args.rows}", "N", args.ns, names,
                              lambda n, p, mode=mode: measure(mode, args.rows, n, p, args), "GB/s",
                              "the copy column (a copy of x at the same N)", title=mode,
                              xlabel="N (row length)", x_log=True)
              for mode in args.modes}
    rowwise_summary(tables, args, names, detail)
    return tables


def rowwise_summary(tables: dict, args, names, detail: str = "") -> None:
    """Each N as % of the copy; goals (issue 5, H100, bf16, 8192 x 4096): forward >= 85% of the copy and
    never slower than compiled at any N; backward >= 70% of the copy."""
    print(f"\n== summary ({args.dtype}, M = {args.rows}{detail}; % = of the copy measured at the same N) ==")
    misses = []
    for mode, table in tables.items():
        for n in args.ns:
            copy, ours = table.value(n, "copy"), table.value(n, "bloom_kernels")
            cells = " | ".join(f"{p} {table.value(n, p):6.0f} GB/s" for p in names)
            print(f"{mode} N={n:6d}: bloom_kernels {100 * ours / copy:5.1f}% of copy | {cells}")
            compiled = table.value(n, "compiled") if "compiled" in names else None
            if mode == "fwd" and compiled is not None and ours < compiled:
                misses.append(f"fwd N={n}: {ours:.0f} GB/s < compiled {compiled:.0f} GB/s")
            if args.rows == 8192 and n == 4096:
                goal = 0.85 if mode == "fwd" else 0.70
                if not ours >= goal * copy:
                    misses.append(f"{mode} 8192x4096: {100 * ours / copy:.1f}% of copy (goal >= {100 * goal:.0f}%)")
    report_goals("issue 5, H100, bf16", misses)
