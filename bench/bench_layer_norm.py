"""Fused residual-add + LayerNorm bandwidth on the GPU: bloom_kernels.layer_norm vs eager and torch.compile.

    python bench/bench_layer_norm.py                          # bf16, 8192 rows, N = 1024 ... 57344, fwd + bwd
    python bench/bench_layer_norm.py --no-residual            # plain LayerNorm (vs F.layer_norm)
    python bench/bench_layer_norm.py --dtype fp16 --rows 4096 --ns 4096 14336 --modes fwd

All peers run in this one process on the same x, residual (M, N), weight and bias (N,):
  bloom_kernels   bloom_kernels.ops.layer_norm(x, w, b, eps, residual) -> (y, x + residual), Triton backend
                  (autotuned on its warm-up call)
  compiled        torch.compile of the eager peer, fullgraph, static shapes
  eager           s = x + residual; y = F.layer_norm(s, ...)  (transformers' BLOOM block does this)
  copy            a device-to-device copy of x: the ceiling
The backward is timed as torch.autograd.grad((y, s), (x, residual, weight, bias), (dy, ds)) on a kept
graph: gradients reach both outputs, as in a BLOOM block (y feeds the next layer, s the next residual).
GB/s = bytes / median time of triton.testing.do_bench (which flushes L2 before every call), with the
same minimal byte count for every peer (BYTES below). Tables (csv) and plots (png) go to bench/out/.

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
PROVIDERS = ["bloom_kernels", "compiled", "eager", "copy"]
EPS = 1e-5


def tensors_moved(mode: str, residual: bool) -> int:
    """(M, N) tensors a fused kernel must read + write (weight/bias and dweight/dbias are O(N))."""
    if mode == "fwd":
        return 4 if residual else 2  # x, residual read; sum, normed written  |  x read, y written
    return 5 if residual else 3  # dy, dsum, x, residual read; dx (= dresidual) written  |  dy, x read, dx written


def nbytes(mode: str, residual: bool, m: int, n: int, es: int) -> int:
    """Bytes of one call; "copy" is the ceiling: an (M, N) tensor read + written."""
    if mode == "copy":
        return 2 * m * n * es
    params = 2 if mode == "fwd" else 3  # weight, bias read  |  weight read, dweight, dbias written
    return (tensors_moved(mode, residual) * m + params) * n * es


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--rows", type=int, default=8192, help="M: rows of x (tokens)")
    parser.add_argument("--ns", nargs="+", type=int, default=NS, help="N: row lengths (hidden sizes)")
    parser.add_argument("--modes", nargs="+", choices=["fwd", "bwd"], default=["fwd", "bwd"])
    parser.add_argument("--no-residual", action="store_true", help="plain LayerNorm, no residual add")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile peer")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    return parser.parse_args(argv)


def eager_add_layer_norm(x, weight, bias, residual):
    s = x if residual is None else x + residual
    return torch.nn.functional.layer_norm(s, (s.shape[-1],), weight, bias, EPS), s


def ours(x, weight, bias, residual):
    from bloom_kernels import ops
    out = ops.layer_norm(x, weight, bias, EPS, residual)
    return out if residual is not None else (out, x)


_COMPILED = None


def peer(name: str):
    """(x, weight, bias, residual) -> (y, s) for one provider."""
    global _COMPILED
    if name == "bloom_kernels":
        return ours
    if name == "eager":
        return eager_add_layer_norm
    if name == "compiled":
        if _COMPILED is None:
            _COMPILED = torch.compile(eager_add_layer_norm, fullgraph=True, dynamic=False)
        return _COMPILED
    raise ValueError(name)


RESULTS: dict[tuple, float] = {}  # (mode, N, provider) -> GB/s


def measure(mode: str, m: int, n: int, provider: str, args) -> float:
    from triton.testing import do_bench

    dtype = DTYPES[args.dtype]
    es = torch.finfo(dtype).bits // 8
    residual_on = not args.no_residual
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
    r = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen) if residual_on else None
    weight = 1 + 0.1 * torch.randn(n, device="cuda", dtype=dtype, generator=gen)
    bias = 0.1 * torch.randn(n, device="cuda", dtype=dtype, generator=gen)
    try:
        if provider == "copy":
            out = torch.empty_like(x)
            ms = do_bench(lambda: out.copy_(x), return_mode="median")
            gbs = nbytes("copy", residual_on, m, n, es) / (ms * 1e-3) / 1e9
        else:
            fn = peer(provider)
            if mode == "fwd":
                with torch.no_grad():
                    fn(x, weight, bias, r)  # warm-up: autotune / compile happen here
                    ms = do_bench(lambda: fn(x, weight, bias, r), return_mode="median")
            else:
                leaves = [t.requires_grad_() for t in (x, weight, bias, r) if t is not None]
                y, s = fn(x, weight, bias, r)
                outs = (y, s) if residual_on else (y,)
                grads = tuple(torch.randn_like(o) for o in outs)
                grad = lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True)
                grad()  # warm-up
                ms = do_bench(grad, return_mode="median")
            gbs = nbytes(mode, residual_on, m, n, es) / (ms * 1e-3) / 1e9
    except Exception as error:  # noqa: BLE001 - one failing peer (out of memory, a build error) must not end the run
        print(f"  {provider} {mode} N={n} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}",
              file=sys.stderr)
        gbs = float("nan")
    RESULTS[(mode, n, provider)] = gbs
    return gbs


def make_benchmark(mode: str, args, providers):
    import triton

    kind = "layer-norm" if args.no_residual else "add-layer-norm"

    @triton.testing.perf_report(triton.testing.Benchmark(
        x_names=["N"], x_vals=args.ns, x_log=True, line_arg="provider", line_vals=providers,
        line_names=providers, ylabel="GB/s", xlabel="N (row length)",
        plot_name=f"{kind}-{mode}-{args.dtype}-M{args.rows}", args={"mode": mode}))
    def bench(N, provider, mode):
        return measure(mode, args.rows, N, provider, args)

    return bench


def summary(args, providers) -> None:
    residual_on = not args.no_residual
    print(f"\n== summary ({args.dtype}, M = {args.rows}, residual {'on' if residual_on else 'off'}; bytes = "
          f"{tensors_moved('fwd', residual_on)} (fwd) / {tensors_moved('bwd', residual_on)} (bwd) (M, N) tensors; "
          "% = of the copy measured at the same N) ==")
    misses = []
    for mode in args.modes:
        for n in args.ns:
            copy = RESULTS.get((mode, n, "copy"), float("nan"))
            ours_gbs = RESULTS.get((mode, n, "bloom_kernels"), float("nan"))
            cells = " | ".join(f"{p} {RESULTS.get((mode, n, p), float('nan')):6.0f} GB/s" for p in providers)
            print(f"{mode} N={n:6d}: bloom_kernels {100 * ours_gbs / copy:5.1f}% of copy | {cells}")
            compiled = RESULTS.get((mode, n, "compiled"))
            if mode == "fwd" and compiled is not None and ours_gbs < compiled:
                misses.append(f"fwd N={n}: {ours_gbs:.0f} GB/s < compiled {compiled:.0f} GB/s")
            if args.rows == 8192 and n == 4096:
                goal = 0.85 if mode == "fwd" else 0.70
                if not ours_gbs >= goal * copy:
                    misses.append(f"{mode} 8192x4096: {100 * ours_gbs / copy:.1f}% of copy (goal >= {100 * goal:.0f}%)")
    print("\n== goals (issue 5, H100, bf16) ==")
    print("all met" if not misses else "MISSED:\n  " + "\n  ".join(misses))


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_layer_norm.py needs a CUDA GPU (Triton kernels, inductor peers); none found.", file=sys.stderr)
        return 1
    import torch._dynamo as dynamo
    import triton

    dynamo.config.cache_size_limit = max(dynamo.config.cache_size_limit, 64)  # one graph per N (static)
    os.environ.setdefault("BLOOM_KERNELS_BACKEND", "triton")
    os.makedirs(args.out, exist_ok=True)
    providers = [p for p in PROVIDERS if not (p == "compiled" and args.no_compile)]
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, M = {args.rows}, torch {torch.__version__}, "
          f"triton {triton.__version__}")
    for mode in args.modes:
        make_benchmark(mode, args, providers).run(print_data=True, save_path=args.out)
    summary(args, providers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
