"""Fused bias-GeLU bandwidth on the GPU: bloom_kernels.bias_gelu vs eager, transformers, torch.compile.

    python bench/bench_bias_gelu.py                          # bf16, 8192 rows, N = 1024 ... 57344, fwd + bwd
    python bench/bench_bias_gelu.py --dtype fp16 --rows 4096 --ns 4096 16384 --modes fwd
    python bench/bench_bias_gelu.py --no-compile --no-hf     # skip the slow-to-build / slow peers

All peers run in this one process on the same x (M, N) and bias (N,):
  bloom_kernels   bloom_kernels.ops.bias_gelu (Triton backend; autotuned on its warm-up call)
  compiled        torch.compile(gelu(x + bias, tanh)), fullgraph, static shapes
  eager           F.gelu(x + bias, approximate="tanh")
  transformers    bloom_gelu_forward(x + bias) (forward) / GeLUFunction (backward), as in BloomMLP
  copy            a device-to-device copy of x: the ceiling
The backward is timed as torch.autograd.grad(y, (x, bias), dy) on a kept graph (dx and dbias).
GB/s = bytes / median time of triton.testing.do_bench (which flushes L2 before every call), with the
same minimal byte count for every peer (see BYTES below): what a perfect fused kernel must move.
Tables (csv) and plots (png) go to bench/out/ (or --out).

Goals (issue 5, H100, bf16, 8192 x 4096): forward >= 85% of the copy and never slower than compiled at
any N; backward >= 70% of the copy.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NS = [1024, 2048, 4096, 8192, 14336, 16384, 32768, 57344]
PROVIDERS = ["bloom_kernels", "compiled", "eager", "transformers", "copy"]

# Bytes a fused kernel must move, es = element size. dbias/bias are O(N): counted, negligible.
BYTES = {
    "fwd": lambda m, n, es: (2 * m * n + n) * es,  # x read + y written (+ bias read)
    "bwd": lambda m, n, es: (3 * m * n + 2 * n) * es,  # dy, x read + dx written (+ bias read, dbias written)
    "copy": lambda m, n, es: 2 * m * n * es,  # x read + copy written
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--rows", type=int, default=8192, help="M: rows of x (tokens)")
    parser.add_argument("--ns", nargs="+", type=int, default=NS, help="N: row lengths")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers peer")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    return parser.parse_args(argv)


def eager_bias_gelu(x, bias):
    return torch.nn.functional.gelu(x + bias, approximate="tanh")


_COMPILED = None


def peer(name: str, mode: str):
    """(x, bias) -> y for one provider, or None when it is skipped."""
    global _COMPILED
    if name == "bloom_kernels":
        from bloom_kernels import ops
        return ops.bias_gelu
    if name == "eager":
        return eager_bias_gelu
    if name == "compiled":
        if _COMPILED is None:
            _COMPILED = torch.compile(eager_bias_gelu, fullgraph=True, dynamic=False)
        return _COMPILED
    if name == "transformers":
        from transformers.models.bloom import modeling_bloom as hf
        if mode == "fwd":
            return lambda x, bias: hf.bloom_gelu_forward(x + bias)
        return lambda x, bias: hf.GeLUFunction.apply(x + bias)
    raise ValueError(name)


RESULTS: dict[tuple, float] = {}  # (mode, N, provider) -> GB/s


def measure(mode: str, m: int, n: int, provider: str, args) -> float:
    from triton.testing import do_bench

    dtype = DTYPES[args.dtype]
    es = torch.finfo(dtype).bits // 8
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen)
    try:
        if provider == "copy":
            out = torch.empty_like(x)
            ms = do_bench(lambda: out.copy_(x), return_mode="median")
            gbs = BYTES["copy"](m, n, es) / (ms * 1e-3) / 1e9
        else:
            fn = peer(provider, mode)
            if mode == "fwd":
                with torch.no_grad():
                    fn(x, bias)  # warm-up: autotune / compile happen here
                    ms = do_bench(lambda: fn(x, bias), return_mode="median")
            else:
                x.requires_grad_()
                bias.requires_grad_()
                y = fn(x, bias)
                dy = torch.randn_like(y)
                grad = lambda: torch.autograd.grad(y, (x, bias), dy, retain_graph=True)
                grad()  # warm-up
                ms = do_bench(grad, return_mode="median")
            gbs = BYTES[mode](m, n, es) / (ms * 1e-3) / 1e9
    except Exception as error:  # noqa: BLE001 - one failing peer (out of memory, a build error) must not end the run
        print(f"  {provider} {mode} N={n} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}",
              file=sys.stderr)
        gbs = float("nan")
    RESULTS[(mode, n, provider)] = gbs
    return gbs


def make_benchmark(mode: str, args, providers):
    import triton

    @triton.testing.perf_report(triton.testing.Benchmark(
        x_names=["N"], x_vals=args.ns, x_log=True, line_arg="provider", line_vals=providers,
        line_names=providers, ylabel="GB/s", xlabel="N (row length)",
        plot_name=f"bias-gelu-{mode}-{args.dtype}-M{args.rows}", args={"mode": mode}))
    def bench(N, provider, mode):
        return measure(mode, args.rows, N, provider, args)

    return bench


def summary(args, providers) -> None:
    print(f"\n== summary ({args.dtype}, M = {args.rows}; % = of the copy measured at the same N) ==")
    misses = []
    for mode in args.modes:
        for n in args.ns:
            copy = RESULTS.get((mode, n, "copy"), RESULTS.get(("fwd", n, "copy"), float("nan")))
            ours = RESULTS.get((mode, n, "bloom_kernels"), float("nan"))
            cells = " | ".join(f"{p} {RESULTS.get((mode, n, p), float('nan')):6.0f} GB/s" for p in providers)
            print(f"{mode} N={n:6d}: bloom_kernels {100 * ours / copy:5.1f}% of copy | {cells}")
            compiled = RESULTS.get((mode, n, "compiled"))
            if mode == "fwd" and compiled is not None and ours < compiled:
                misses.append(f"fwd N={n}: {ours:.0f} GB/s < compiled {compiled:.0f} GB/s")
            if args.rows == 8192 and n == 4096:
                goal = 0.85 if mode == "fwd" else 0.70
                if not ours >= goal * copy:
                    misses.append(f"{mode} 8192x4096: {100 * ours / copy:.1f}% of copy (goal >= {100 * goal:.0f}%)")
    print("\n== goals (issue 5, H100, bf16) ==")
    print("all met" if not misses else "MISSED:\n  " + "\n  ".join(misses))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_bias_gelu.py needs a CUDA GPU (Triton kernels, inductor peers); none found.", file=sys.stderr)
        return 1
    import torch._dynamo as dynamo
    import triton

    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)  # one graph per N (static)
    os.environ.setdefault("BLOOM_KERNELS_BACKEND", "triton")
    os.makedirs(args.out, exist_ok=True)
    providers = [p for p in PROVIDERS if not (p == "compiled" and args.no_compile)
                 and not (p == "transformers" and args.no_hf)]
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, M = {args.rows}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    for mode in args.modes:
        make_benchmark(mode, args, providers).run(print_data=True, save_path=args.out)
    summary(args, providers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
