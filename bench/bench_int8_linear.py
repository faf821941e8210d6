"""int8 weight-only linear on the GPU: bloom_kernels.int8_linear vs bf16 F.linear and the usual recipes.

    python bench/bench_int8_linear.py                          # the issue's grid, bf16
    python bench/bench_int8_linear.py --ms 1 16 --shapes 4096x4096 --dtype fp16
    python bench/bench_int8_linear.py --no-compile             # skip the torch.compile peer (slow to build)

All peers run in this one process on the same x, int8 weight W (N, K) and fp32 scale s (N,):
  bloom_kernels   bloom_kernels.ops.int8_linear(x, W, s), Triton backend (tuned on a warm-up call)
  bf16 F.linear   F.linear(x, W_deq) with the dequantised weight stored in x's dtype (2 bytes/weight)
  compiled        torch.compile(lambda x: F.linear(x, W.to(x.dtype)) * s): gpt-fast / torchao's recipe
  eager dequant   F.linear(x, W.to(x.dtype) * s[:, None]) without compilation
Times are medians of triton.testing.do_bench (which flushes L2 before every call, so each call reads
its weight from HBM, as a decode step does). Weight bandwidth = bytes of THAT provider's weight (int8:
N·K; bf16: 2·N·K) / time, against the device-to-device copy ceiling measured in this run (bytes read +
written). Tables (csv) and plots (png, µs against M per weight shape) go to bench/out/ (or --out);
timing, the copy ceiling and the tables are bench/_common.py's.

Goals (issue 7, H100): for M <= 16, bloom_kernels >= 1.8x faster than bf16 F.linear and >= 80% of the
copy ceiling in int8 weight bytes; at M = 2048 at most 1.15x bf16 F.linear's time.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/_common.py
import _common as common  # noqa: E402

MS = [1, 2, 4, 8, 16, 64, 256, 2048]
SHAPES = ["4096x4096", "4096x16384", "16384x4096", "1024x250880", "14336x43008"]  # KxN
PROVIDERS = ["bloom_kernels", "bf16 F.linear", "compiled", "eager dequant"]
SKIPS = {**common.COMPILE_SKIP, "eager dequant": ("eager", "the eager-dequant peer")}


def parse_args(argv=None):
    parser = common.parser(__doc__, dtypes=("bf16", "fp16"), skips=SKIPS)
    parser.add_argument("--ms", nargs="+", type=int, default=MS, help="rows of x (tokens)")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="KxN weight shapes (in x out features)")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the compiled peer (e.g. max-autotune-no-cudagraphs)")
    return parser.parse_args(argv)


class Weights:
    """One weight shape: int8 weight + scale, the bf16 copy, and the compiled recipe (built once)."""

    def __init__(self, k: int, n: int, dtype, compile_mode: str | None):
        import torch.nn.functional as F

        import bloom_kernels

        gen = torch.Generator(device="cuda").manual_seed(0)
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=dtype) * 0.02
        self.q, self.s = bloom_kernels.quantize_int8(w)
        del w
        self.w_deq = (self.q.to(dtype) * self.s[:, None].to(dtype)).contiguous()
        self.k, self.n, self.dtype = k, n, dtype
        q, s = self.q, self.s
        self.compiled = None
        if compile_mode is not None:
            def recipe(x):
                return F.linear(x, q.to(x.dtype)) * s.to(x.dtype)
            self.compiled = torch.compile(recipe, mode=None if compile_mode == "default" else compile_mode,
                                          fullgraph=True, dynamic=False)

    def provider(self, name: str):
        import torch.nn.functional as F

        from bloom_kernels import ops

        q, s, w_deq = self.q, self.s, self.w_deq
        return {
            "bloom_kernels": lambda x: ops.int8_linear(x, q, s),
            "bf16 F.linear": lambda x: F.linear(x, w_deq),
            "compiled": self.compiled,
            "eager dequant": lambda x: F.linear(x, q.to(x.dtype) * s[:, None].to(x.dtype)),
        }[name]

    def weight_bytes(self, name: str) -> int:
        return self.n * self.k * (2 if name == "bf16 F.linear" else 1)


_WEIGHTS: dict[tuple, Weights] = {}


def time_us(shape: str, m: int, provider: str, args) -> float:
    """Median µs of one provider on x (M, K) against the weight of `shape`."""
    dtype = common.DTYPES[args.dtype]
    key = (shape, args.dtype)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()  # one weight shape resident at a time (14336x43008 is 1.8 GB with its bf16 copy)
        torch.cuda.empty_cache()
        _WEIGHTS[key] = Weights(*common.dims(shape), dtype, None if args.no_compile else args.compile_mode)
    weights = _WEIGHTS[key]
    fn = weights.provider(provider)
    if fn is None:
        return float("nan")
    x = torch.randn(m, weights.k, device="cuda", dtype=dtype)

    def run():
        with torch.no_grad():
            y = fn(x)  # warm-up: bloom_kernels tunes this key here, torch.compile builds here
            if provider == "bloom_kernels":  # sanity: same numbers as the bf16 path (both round once)
                ref = torch.nn.functional.linear(x.float(), weights.w_deq.float()).to(dtype)
                err = (y.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)
                if err > 2e-2:
                    print(f"  WARNING {shape} M={m}: bloom_kernels differs from F.linear by {err:.3g} (relative)",
                          file=sys.stderr)
            return 1e3 * common.median_ms(lambda: fn(x))

    return common.guarded(f"{provider} {shape} M={m}", run)


def summary(tables, args, providers, copy_gbs: float) -> None:
    print(f"\n== summary ({args.dtype}; speed-up = bf16 F.linear time / time; weight GB/s = that provider's "
          f"weight bytes / time; ceiling = copy {copy_gbs:.0f} GB/s) ==")
    head = f"{'K x N':>12s} {'M':>5s} | " + " | ".join(f"{p:>30s}" for p in providers)
    print(head)
    print("-" * len(head))
    misses = []
    for shape in args.shapes:
        k, n = common.dims(shape)
        table = tables[shape]
        for m in args.ms:
            base = table.value(m, "bf16 F.linear")
            cells = []
            for p in providers:
                us = table.value(m, p)
                gbs = common.gbs(n * k * (2 if p == "bf16 F.linear" else 1), us * 1e-3)
                cells.append(f"{us:8.1f}µs {base / us:5.2f}x {gbs:5.0f}GB/s {100 * gbs / copy_gbs:3.0f}%")
            print(f"{shape:>12s} {m:5d} | " + " | ".join(f"{c:>30s}" for c in cells))
            ours = table.value(m, "bloom_kernels")
            if m <= 16:
                gbs = common.gbs(n * k, ours * 1e-3)
                if not (base / ours >= 1.8 and gbs >= 0.8 * copy_gbs):
                    misses.append(f"{shape} M={m}: {base / ours:.2f}x bf16, {100 * gbs / copy_gbs:.0f}% "
                                  "of copy (goal >= 1.8x and >= 80%)")
            if m == 2048 and not ours <= 1.15 * base:
                misses.append(f"{shape} M=2048: {ours / base:.2f}x bf16's time (goal <= 1.15x)")
    common.report_goals("issue 7, H100", misses)


def main(argv=None) -> int:
    args = parse_args(argv)
    # one compiled recipe per weight shape, recompiled per M: keep dynamo from giving up on it
    if not common.start(args, "bench_int8_linear.py", "Triton kernels, cuBLAS and inductor peers", recompiles=256):
        return 1
    providers = common.peers(PROVIDERS, args, SKIPS)
    copy_gbs = common.copy_ceiling_gbs()
    print(common.describe(args.dtype) + f"; copy ceiling {copy_gbs / 1e3:.2f} TB/s (read + write)")
    tables = {}
    for shape in args.shapes:
        tables[shape] = common.run_table(
            args.out, f"int8-linear-{shape}-{args.dtype}", "M", args.ms, providers,
            lambda m, p, shape=shape: time_us(shape, m, p, args), "µs",
            f"copy {copy_gbs:.0f} GB/s, against each provider's weight bytes (summary)", title=f"K x N = {shape}",
            lower_is_better=True, xlabel="M (rows of x)", x_log=True, y_log=True)
    summary(tables, args, providers, copy_gbs)
    print(f"\ntables (csv) and plots (png) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
