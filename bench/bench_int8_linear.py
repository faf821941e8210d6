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
written). Tables (csv) and plots (png, µs against M per weight shape) go to bench/out/ (or --out).

Goals (issue 7, H100): for M <= 16, bloom_kernels >= 1.8x faster than bf16 F.linear and >= 80% of the
copy ceiling in int8 weight bytes; at M = 2048 at most 1.15x bf16 F.linear's time.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
MS = [1, 2, 4, 8, 16, 64, 256, 2048]
SHAPES = ["4096x4096", "4096x16384", "16384x4096", "1024x250880", "14336x43008"]  # KxN
PROVIDERS = ["bloom_kernels", "bf16 F.linear", "compiled", "eager dequant"]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--ms", nargs="+", type=int, default=MS, help="rows of x (tokens)")
    parser.add_argument("--shapes", nargs="+", default=SHAPES, help="KxN weight shapes (in x out features)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager-dequant peer")
    parser.add_argument("--compile-mode", default="default",
                        help="torch.compile mode of the compiled peer (e.g. max-autotune-no-cudagraphs)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    return parser.parse_args(argv)


def _shape(text: str) -> tuple[int, int]:
    k, n = (int(v) for v in text.lower().split("x"))
    return k, n


def measure_copy_ceiling() -> float:
    """Device-to-device copy of 512 MiB, TB/s counting bytes read + written."""
    from triton.testing import do_bench

    src = torch.empty(1 << 29, device="cuda", dtype=torch.uint8)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3) / 1e12


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
TIMES: dict[tuple, float] = {}  # (shape, M, provider) -> µs


def time_us(shape: str, m: int, provider: str, args) -> float:
    from triton.testing import do_bench

    dtype = DTYPES[args.dtype]
    key = (shape, args.dtype)
    if key not in _WEIGHTS:
        _WEIGHTS.clear()  # one weight shape resident at a time (14336x43008 is 1.8 GB with its bf16 copy)
        torch.cuda.empty_cache()
        _WEIGHTS[key] = Weights(*_shape(shape), dtype, None if args.no_compile else args.compile_mode)
    weights = _WEIGHTS[key]
    fn = weights.provider(provider)
    if fn is None:
        return float("nan")
    x = torch.randn(m, weights.k, device="cuda", dtype=dtype)
    try:
        with torch.no_grad():
            y = fn(x)  # warm-up: bloom_kernels tunes this key here, torch.compile builds here
            if provider == "bloom_kernels":  # sanity: same numbers as the bf16 path (both round once)
                ref = torch.nn.functional.linear(x.float(), weights.w_deq.float()).to(dtype)
                err = (y.float() - ref.float()).abs().max().item() / max(ref.float().abs().max().item(), 1e-6)
                if err > 2e-2:
                    print(f"  WARNING {shape} M={m}: bloom_kernels differs from F.linear by {err:.3g} (relative)",
                          file=sys.stderr)
            us = 1e3 * do_bench(lambda: fn(x), return_mode="median")
    except Exception as error:  # noqa: BLE001 - e.g. out of memory, a compile failure of a peer
        print(f"  {provider} {shape} M={m} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}",
              file=sys.stderr)
        torch.cuda.empty_cache()
        us = float("nan")
    TIMES[(shape, m, provider)] = us
    return us


def make_benchmark(shape: str, args, providers):
    import triton

    @triton.testing.perf_report(triton.testing.Benchmark(
        x_names=["M"], x_vals=args.ms, x_log=True, y_log=True, line_arg="provider",
        line_vals=providers, line_names=providers, ylabel="µs", xlabel="M (rows of x)",
        plot_name=f"int8-linear-{shape}-{args.dtype}", args={"shape": shape}))
    def bench(M, provider, shape):
        return time_us(shape, M, provider, args)

    return bench


def summary(args, providers, copy_tbs: float) -> None:
    print(f"\n== summary ({args.dtype}; speed-up = bf16 F.linear time / time; weight GB/s = that provider's "
          f"weight bytes / time; ceiling = copy {copy_tbs * 1e3:.0f} GB/s) ==")
    head = f"{'K x N':>12s} {'M':>5s} | " + " | ".join(f"{p:>30s}" for p in providers)
    print(head)
    print("-" * len(head))
    misses = []
    for shape in args.shapes:
        k, n = _shape(shape)
        for m in args.ms:
            base = TIMES.get((shape, m, "bf16 F.linear"), float("nan"))
            cells = []
            for p in providers:
                us = TIMES.get((shape, m, p), float("nan"))
                gbs = n * k * (2 if p == "bf16 F.linear" else 1) / (us * 1e-6) / 1e9
                cells.append(f"{us:8.1f}µs {base / us:5.2f}x {gbs:5.0f}GB/s {100 * gbs / (copy_tbs * 1e3):3.0f}%")
            print(f"{shape:>12s} {m:5d} | " + " | ".join(f"{c:>30s}" for c in cells))
            ours = TIMES.get((shape, m, "bloom_kernels"), float("nan"))
            if m <= 16:
                gbs = n * k / (ours * 1e-6) / 1e9
                if not (base / ours >= 1.8 and gbs >= 0.8 * copy_tbs * 1e3):
                    misses.append(f"{shape} M={m}: {base / ours:.2f}x bf16, {100 * gbs / (copy_tbs * 1e3):.0f}% "
                                  "of copy (goal >= 1.8x and >= 80%)")
            if m == 2048 and not ours <= 1.15 * base:
                misses.append(f"{shape} M=2048: {ours / base:.2f}x bf16's time (goal <= 1.15x)")
    print("\n== goals (issue 7, H100) ==")
    print("all met" if not misses else "MISSED:\n  " + "\n  ".join(misses))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_int8_linear.py needs a CUDA GPU (Triton kernels, cuBLAS and inductor peers); none found.",
              file=sys.stderr)
        return 1
    import torch._dynamo as dynamo
    import triton

    # one compiled recipe per weight shape, recompiled per M: keep dynamo from giving up on it
    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 256)
    if hasattr(dynamo.config, "recompile_limit"):
        dynamo.config.recompile_limit = max(dynamo.config.recompile_limit, 256)
    os.environ.setdefault("BLOOM_KERNELS_BACKEND", "triton")
    os.makedirs(args.out, exist_ok=True)
    providers = [p for p in PROVIDERS if not (p == "compiled" and args.no_compile)
                 and not (p == "eager dequant" and args.no_eager)]
    copy_tbs = measure_copy_ceiling()
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, torch {torch.__version__}, triton {triton.__version__}; "
          f"copy ceiling {copy_tbs:.2f} TB/s (read + write)")
    for shape in args.shapes:
        print(f"\n== K x N = {shape} (µs; lower is better) ==")
        make_benchmark(shape, args, providers).run(print_data=True, save_path=args.out)
    summary(args, providers, copy_tbs)
    print(f"\ntables (csv) and plots (png) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
