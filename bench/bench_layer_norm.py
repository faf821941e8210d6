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
same minimal byte count for every peer (nbytes below); the copy's bytes are x read + written. Tables
(csv) and plots (png) go to bench/out/ (or --out); timing, tables and the summary are bench/_common.py's.

Goals (issue 5, H100, bf16, 8192 x 4096): forward >= 85% of the copy and never slower than compiled at
any N; backward >= 70% of the copy.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/_common.py
import _common as common  # noqa: E402

PROVIDERS = ["bloom_kernels", "compiled", "eager", "copy"]
SKIPS = common.COMPILE_SKIP
EPS = 1e-5


def tensors_moved(mode: str, residual: bool) -> int:
    """(M, N) tensors a fused kernel must read + write (weight/bias and dweight/dbias are O(N))."""
    if mode == "fwd":
        return 4 if residual else 2  # x, residual read; sum, normed written  |  x read, y written
    return 5 if residual else 3  # dy, dsum, x, residual read; dx (= dresidual) written  |  dy, x read, dx written


def nbytes(mode: str, residual: bool, m: int, n: int, es: int) -> int:
    """Bytes of one call of `mode` (fwd, bwd)."""
    params = 2 if mode == "fwd" else 3  # weight, bias read  |  weight read, dweight, dbias written
    return (tensors_moved(mode, residual) * m + params) * n * es


def parse_args(argv=None):
    parser = common.rowwise_parser(__doc__, SKIPS, ns_help="N: row lengths (hidden sizes)")
    parser.add_argument("--no-residual", action="store_true", help="plain LayerNorm, no residual add")
    return parser.parse_args(argv)


def eager_add_layer_norm(x, weight, bias, residual):
    s = x if residual is None else x + residual
    return torch.nn.functional.layer_norm(s, (s.shape[-1],), weight, bias, EPS), s


def ours(x, weight, bias, residual):
    from bloom_kernels import ops
    out = ops.layer_norm(x, weight, bias, EPS, residual)
    return out if residual is not None else (out, x)


def peer(name: str):
    """(x, weight, bias, residual) -> (y, s) for one provider."""
    if name == "bloom_kernels":
        return ours
    if name == "eager":
        return eager_add_layer_norm
    if name == "compiled":
        return common.compiled(eager_add_layer_norm)
    raise ValueError(name)


def measure(mode: str, m: int, n: int, provider: str, args) -> float:
    """GB/s of one provider; the backward is the gradients of x, residual, weight and bias from both
    outputs (y and s) of a kept graph."""
    dtype = common.DTYPES[args.dtype]
    residual_on = not args.no_residual
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
    r = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen) if residual_on else None
    weight = 1 + 0.1 * torch.randn(n, device="cuda", dtype=dtype, generator=gen)
    bias = 0.1 * torch.randn(n, device="cuda", dtype=dtype, generator=gen)

    def run():
        if provider == "copy":
            return common.copy_gbs(x)
        fn = peer(provider)
        if mode == "fwd":
            ms = common.forward_ms(fn, x, weight, bias, r)
        else:
            leaves = [t.requires_grad_() for t in (x, weight, bias, r) if t is not None]
            y, s = fn(x, weight, bias, r)
            outs = (y, s) if residual_on else (y,)
            ms = common.grad_ms(outs, leaves, tuple(torch.randn_like(o) for o in outs))
        return common.gbs(nbytes(mode, residual_on, m, n, x.element_size()), ms)

    return common.guarded(f"{provider} {mode} N={n}", run)


def main(argv=None) -> int:
    args = parse_args(argv)
    residual_on = not args.no_residual
    kind = "add-layer-norm" if residual_on else "layer-norm"
    detail = (f", residual {'on' if residual_on else 'off'}; bytes = {tensors_moved('fwd', residual_on)} (fwd) / "
              f"{tensors_moved('bwd', residual_on)} (bwd) (M, N) tensors")
    tables = common.run_rowwise(args, "bench_layer_norm.py", kind, PROVIDERS, SKIPS, measure, detail)
    return 1 if tables is None else 0


if __name__ == "__main__":
    sys.exit(main())
