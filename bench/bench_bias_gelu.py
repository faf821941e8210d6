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
same minimal byte count for every peer (see BYTES below): what a perfect fused kernel must move; the
copy's bytes are x read + written. Tables (csv) and plots (png) go to bench/out/ (or --out); timing,
tables and the summary are bench/_common.py's.

Goals (issue 5, H100, bf16, 8192 x 4096): forward >= 85% of the copy and never slower than compiled at
any N; backward >= 70% of the copy.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/_common.py
import _common as common  # noqa: E402

PROVIDERS = ["bloom_kernels", "compiled", "eager", "transformers", "copy"]
SKIPS = {**common.COMPILE_SKIP, "transformers": ("hf", "the transformers peer")}

# Bytes a fused kernel must move, es = element size. dbias/bias are O(N): counted, negligible.
BYTES = {
    "fwd": lambda m, n, es: (2 * m * n + n) * es,  # x read + y written (+ bias read)
    "bwd": lambda m, n, es: (3 * m * n + 2 * n) * es,  # dy, x read + dx written (+ bias read, dbias written)
}


def parse_args(argv=None):
    return common.rowwise_parser(__doc__, SKIPS).parse_args(argv)


def eager_bias_gelu(x, bias):
    return torch.nn.functional.gelu(x + bias, approximate="tanh")


def peer(name: str, mode: str):
    """(x, bias) -> y for one provider."""
    if name == "bloom_kernels":
        from bloom_kernels import ops
        return ops.bias_gelu
    if name == "eager":
        return eager_bias_gelu
    if name == "compiled":
        return common.compiled(eager_bias_gelu)
    if name == "transformers":
        from transformers.models.bloom import modeling_bloom as hf
        if mode == "fwd":
            return lambda x, bias: hf.bloom_gelu_forward(x + bias)
        return lambda x, bias: hf.GeLUFunction.apply(x + bias)
    raise ValueError(name)


def measure(mode: str, m: int, n: int, provider: str, args) -> float:
    """GB/s of one provider on x (M, N) and bias (N,); the backward is dx and dbias of a kept graph."""
    dtype = common.DTYPES[args.dtype]
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(m, n, device="cuda", dtype=dtype, generator=gen)
    bias = torch.randn(n, device="cuda", dtype=dtype, generator=gen)

    def run():
        if provider == "copy":
            return common.copy_gbs(x)
        fn = peer(provider, mode)
        if mode == "fwd":
            ms = common.forward_ms(fn, x, bias)
        else:
            x.requires_grad_()
            bias.requires_grad_()
            y = fn(x, bias)
            ms = common.grad_ms(y, (x, bias), torch.randn_like(y))
        return common.gbs(BYTES[mode](m, n, x.element_size()), ms)

    return common.guarded(f"{provider} {mode} N={n}", run)


def main(argv=None) -> int:
    args = parse_args(argv)
    tables = common.run_rowwise(args, "bench_bias_gelu.py", "bias-gelu", PROVIDERS, SKIPS, measure)
    return 1 if tables is None else 0


if __name__ == "__main__":
    sys.exit(main())
