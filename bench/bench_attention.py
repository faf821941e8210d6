"""Causal ALiBi attention on the GPU: bloom_kernels vs FlexAttention, SDPA + dense bias, SDPA flash.

    python bench/bench_attention.py                    # forward, forward+backward, backward, decode
    python bench/bench_attention.py --mode fwd --dtype fp16
    python bench/bench_attention.py --mode decode --fused-layout

All peers run in this one process on the same inputs:
  bloom_kernels   bloom_kernels.alibi_attention, Triton backend forced
  flex            torch.compile'd FlexAttention, ALiBi score_mod (score + slope_h * kv_idx) and a causal
                  block mask (for Sq < Sk the mask is offset so queries sit at the end of the keys)
  sdpa+bias       F.scaled_dot_product_attention with a dense (1, H, Sq, Sk) ALiBi + causal bias
  sdpa flash      SDPA's flash kernel, is_causal, NO ALiBi: the speed of light for "ALiBi for free"
Units: TFLOP/s with FLOPs = 2·B·H·S²·D for a causal forward (half of 4·B·H·S²·D), 3.5x that for
forward + backward and 2.5x for the backward alone; decode TB/s with bytes = K and V read once.
Ceilings measured in the same run: a bf16/fp16 8192³ matmul (TFLOP/s) and a device-to-device copy
(bytes read + written, TB/s). Times are medians of triton.testing.do_bench. Tables and PNG plots go to
bench/out/ (or --out).
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PREFILL_SHAPES = ["4x16x2048x64", "1x32x4096x128", "2x16x8192x64", "8x16x1024x64", "2x32x2048x80",
                  "2x16x2048x96"]
DECODE_SHAPES = ["1x32x4096x128", "16x32x4096x128", "64x16x2048x64", "1x32x16384x128", "8x112x2048x128"]
PROVIDERS = ["bloom_kernels", "flex", "sdpa+bias", "sdpa flash", "ceiling"]
# issue 6's goals on an H100, bf16: (mode, shape, provider to beat, ratio)
GOALS = [("fwd", s, p, r) for s in PREFILL_SHAPES[:3] for p, r in (("flex", 1.3), ("sdpa flash", 0.85))]
GOALS += [("bwd", s, "flex", 1.3) for s in PREFILL_SHAPES[:3]]
GOALS += [("decode", "1x32x4096x128", "ceiling", 0.8), ("decode", "16x32x4096x128", "sdpa+bias", 1.0)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd", "bwd", "decode", "all"], default="all")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--shapes", nargs="+", help="BxHxSxD (decode: BxHxLxD); default: the issue's shapes")
    parser.add_argument("--fused-layout", action="store_true",
                        help="feed bloom_kernels q/k/v as strided views of a fused (B, S, H, 3, D) "
                             "projection (prefill) or a slice of a larger KV cache (decode), as the model does")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "out"))
    return parser.parse_args(argv)


def _shape(text: str) -> tuple[int, int, int, int]:
    batch, heads, seq, head_dim = (int(x) for x in text.split("x"))
    return batch, heads, seq, head_dim


def measure_ceilings(dtype) -> tuple[float, float]:
    """(matmul TFLOP/s, copy TB/s) of this GPU, measured now."""
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    ms = do_bench(lambda: a @ b, return_mode="median")
    matmul = 2 * 8192**3 / (ms * 1e-3) / 1e12
    x = torch.empty(1 << 29, device="cuda", dtype=torch.uint8)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), return_mode="median")
    copy = 2 * x.numel() / (ms * 1e-3) / 1e12
    return matmul, copy


class Case:
    """Inputs and the callables of every provider for one shape."""

    def __init__(self, shape: str, dtype, decode: bool, fused_layout: bool):
        import bloom_kernels as bk

        batch, heads, seq, head_dim = _shape(shape)
        q_len = 1 if decode else seq
        self.batch, self.heads, self.q_len, self.k_len, self.head_dim = batch, heads, q_len, seq, head_dim
        gen = torch.Generator(device="cuda").manual_seed(0)

        def randn(*size):
            return torch.randn(*size, generator=gen, device="cuda", dtype=dtype)

        self.q, self.k, self.v = randn(batch, heads, q_len, head_dim), randn(batch, heads, seq, head_dim), \
            randn(batch, heads, seq, head_dim)
        self.slopes = bk.alibi_slopes(heads, device="cuda")
        self.ours_qkv = (self.q, self.k, self.v)
        if fused_layout and not decode:  # BLOOM's fused QKV: (B, S, H, 3, D) viewed per head
            fused = randn(batch, seq, heads, 3, head_dim)
            self.ours_qkv = tuple(fused[..., i, :].transpose(1, 2) for i in range(3))
        elif fused_layout:  # k/v as the first seq positions of a longer cache buffer
            cache = randn(2, batch, heads, seq + 1024, head_dim)
            self.ours_qkv = (self.q, cache[0, :, :, :seq], cache[1, :, :, :seq])
        self.scale = 1.0 / math.sqrt(head_dim)

    def ours(self, q, k, v):
        import bloom_kernels as bk
        return bk.alibi_attention(q, k, v, self.slopes)

    def flex(self):
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention

        slopes, offset = self.slopes, self.k_len - self.q_len

        def alibi(score, b, h, q_idx, kv_idx):
            return score + slopes[h] * kv_idx

        def causal(b, h, q_idx, kv_idx):
            return q_idx + offset >= kv_idx

        block_mask = create_block_mask(causal, None, None, self.q_len, self.k_len, device="cuda")
        compiled = torch.compile(flex_attention, dynamic=False)
        return lambda q, k, v: compiled(q, k, v, score_mod=alibi, block_mask=block_mask, scale=self.scale)

    def sdpa_bias(self):
        import torch.nn.functional as F

        pos = torch.arange(self.k_len, device="cuda", dtype=torch.float32)
        bias = self.slopes.view(-1, 1, 1) * pos.view(1, 1, -1)  # (H, 1, Sk)
        q_abs = torch.arange(self.k_len - self.q_len, self.k_len, device="cuda")
        allowed = torch.arange(self.k_len, device="cuda")[None, :] <= q_abs[:, None]  # (Sq, Sk)
        bias = bias.masked_fill(~allowed, float("-inf")).to(self.q.dtype)[None]  # (1, H, Sq, Sk)
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)

    def sdpa_flash(self):
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        def run(q, k, v):
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                return F.scaled_dot_product_attention(q, k, v, is_causal=self.q_len > 1, scale=self.scale)
        return run


def time_provider(case: Case, provider: str, mode: str) -> float:
    """Median milliseconds of one call of `mode` (fwd, fwd+bwd, bwd, decode); NaN if it fails."""
    from triton.testing import do_bench

    if provider == "bloom_kernels":
        fn, inputs = case.ours, case.ours_qkv
    else:
        fn = {"flex": case.flex, "sdpa+bias": case.sdpa_bias, "sdpa flash": case.sdpa_flash}[provider]()
        inputs = (case.q, case.k, case.v)
    try:
        if mode in ("fwd", "decode"):
            with torch.no_grad():
                return do_bench(lambda: fn(*inputs), return_mode="median")
        leaves = [t.detach().requires_grad_() for t in inputs]  # detach keeps a view's strides
        grad = torch.randn_like(case.q)
        if mode == "fwd+bwd":
            return do_bench(lambda: fn(*leaves).backward(grad), grad_to_none=leaves, return_mode="median")
        out = fn(*leaves)
        return do_bench(lambda: out.backward(grad, retain_graph=True), grad_to_none=leaves, return_mode="median")
    except Exception as error:  # noqa: BLE001 - e.g. out of memory (dense bias at 8192), a head dim a peer lacks
        print(f"  {provider} {mode} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}",
              file=sys.stderr)
        torch.cuda.empty_cache()
        return float("nan")


def make_benchmark(mode: str, shapes, dtype_name: str, fused_layout: bool, ceilings):
    import triton

    decode = mode == "decode"
    unit = "TB/s" if decode else "TFLOP/s"
    ceiling_value = ceilings[1] if decode else ceilings[0]
    flop_factor = {"fwd": 1.0, "fwd+bwd": 3.5, "bwd": 2.5}.get(mode)

    @triton.testing.perf_report(triton.testing.Benchmark(
        x_names=["shape"], x_vals=shapes, line_arg="provider", line_vals=PROVIDERS,
        line_names=[p if p != "ceiling" else ("copy ceiling" if decode else "matmul ceiling") for p in PROVIDERS],
        ylabel=unit, xlabel="B x H x L x D" if decode else "B x H x S x D",
        plot_name=f"attention-{mode.replace('+', '-')}-{dtype_name}", args={}))
    def bench(shape, provider):
        if provider == "ceiling":
            return ceiling_value
        case = Case(shape, DTYPES[dtype_name], decode, fused_layout)
        ms = time_provider(case, provider, mode)
        batch, heads, seq, head_dim = _shape(shape)
        if decode:
            return 2 * batch * heads * seq * head_dim * case.k.element_size() / (ms * 1e-3) / 1e12
        return flop_factor * 2 * batch * heads * seq * seq * head_dim / (ms * 1e-3) / 1e12

    return bench


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (Triton kernels, FlexAttention and SDPA flash); none found.",
              file=sys.stderr)
        return 1
    os.environ["BLOOM_KERNELS_BACKEND"] = "triton"
    os.makedirs(args.out, exist_ok=True)
    dtype = DTYPES[args.dtype]
    ceilings = measure_ceilings(dtype)
    print(f"{torch.cuda.get_device_name()}, {args.dtype}, torch {torch.__version__}; ceilings: "
          f"{args.dtype} matmul {ceilings[0]:.0f} TFLOP/s, copy {ceilings[1]:.2f} TB/s")
    modes = ["fwd", "fwd+bwd", "bwd", "decode"] if args.mode == "all" else [args.mode]
    results = {}
    for mode in modes:
        shapes = args.shapes or (DECODE_SHAPES if mode == "decode" else PREFILL_SHAPES)
        bench = make_benchmark(mode, shapes, args.dtype, args.fused_layout, ceilings)
        unit = "TB/s" if mode == "decode" else "TFLOP/s"
        print(f"\n== {mode} ({unit}; higher is better) ==")
        results[mode] = bench.run(print_data=True, save_path=args.out, return_df=True)
    print("\n== goals (issue 6, H100 bf16) ==")
    for mode, shape, peer, ratio in GOALS:
        if mode not in results:
            continue
        df = results[mode]
        row = df[df["shape"] == shape]
        if row.empty:
            continue
        ours = float(row.iloc[0][f"bloom_kernels ({'TB/s' if mode == 'decode' else 'TFLOP/s'})"])
        peer_col = next(c for c in df.columns if c.startswith("copy ceiling" if peer == "ceiling" else peer))
        theirs = float(row.iloc[0][peer_col])
        verdict = "ok" if ours >= ratio * theirs else "MISSED"
        print(f"{mode:7s} {shape:16s} bloom_kernels {ours:8.2f} vs {ratio:.2f} x {peer_col} {theirs:8.2f}"
              f" -> {ours / theirs:5.2f}x  {verdict}")
    print(f"\ntables (csv) and plots (png) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
