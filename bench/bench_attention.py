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
bench/out/ (or --out); timing, the copy ceiling and the tables are bench/_common.py's.
"""

from __future__ import annotations

import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/_common.py
import _common as common  # noqa: E402

PREFILL_SHAPES = ["4x16x2048x64", "1x32x4096x128", "2x16x8192x64", "8x16x1024x64", "2x32x2048x80",
                  "2x16x2048x96"]
DECODE_SHAPES = ["1x32x4096x128", "16x32x4096x128", "64x16x2048x64", "1x32x16384x128", "8x112x2048x128"]
PROVIDERS = ["bloom_kernels", "flex", "sdpa+bias", "sdpa flash", "ceiling"]
# issue 6's goals on an H100, bf16: (mode, shape, provider to beat, ratio)
GOALS = [("fwd", s, p, r) for s in PREFILL_SHAPES[:3] for p, r in (("flex", 1.3), ("sdpa flash", 0.85))]
GOALS += [("bwd", s, "flex", 1.3) for s in PREFILL_SHAPES[:3]]
GOALS += [("decode", "1x32x4096x128", "ceiling", 0.8), ("decode", "16x32x4096x128", "sdpa+bias", 1.0)]
FLOP_FACTOR = {"fwd": 1.0, "fwd+bwd": 3.5, "bwd": 2.5}  # x the causal forward's 2·B·H·S²·D


def parse_args(argv=None):
    parser = common.parser(__doc__, dtypes=("bf16", "fp16"))
    parser.add_argument("--mode", choices=["fwd", "fwd+bwd", "bwd", "decode", "all"], default="all")
    parser.add_argument("--shapes", nargs="+", help="BxHxSxD (decode: BxHxLxD); default: the issue's shapes")
    parser.add_argument("--fused-layout", action="store_true",
                        help="feed bloom_kernels q/k/v as strided views of a fused (B, S, H, 3, D) "
                             "projection (prefill) or a slice of a larger KV cache (decode), as the model does")
    return parser.parse_args(argv)


def measure_ceilings(dtype) -> tuple[float, float]:
    """(matmul TFLOP/s, copy TB/s) of this GPU, measured now."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    matmul = common.per_second(2 * 8192**3, common.median_ms(lambda: a @ b), 1e12)
    return matmul, common.copy_ceiling_gbs() / 1e3


class Case:
    """Inputs and the callables of every provider for one shape."""

    def __init__(self, shape: str, dtype, decode: bool, fused_layout: bool):
        import bloom_kernels as bk

        batch, heads, seq, head_dim = common.dims(shape)
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
    if provider == "bloom_kernels":
        fn, inputs = case.ours, case.ours_qkv
    else:
        fn = {"flex": case.flex, "sdpa+bias": case.sdpa_bias, "sdpa flash": case.sdpa_flash}[provider]()
        inputs = (case.q, case.k, case.v)

    def run():
        if mode in ("fwd", "decode"):
            with torch.no_grad():
                return common.median_ms(lambda: fn(*inputs))
        leaves = [t.detach().requires_grad_() for t in inputs]  # detach keeps a view's strides
        grad = torch.randn_like(case.q)
        if mode == "fwd+bwd":
            return common.median_ms(lambda: fn(*leaves).backward(grad), grad_to_none=leaves)
        out = fn(*leaves)
        return common.median_ms(lambda: out.backward(grad, retain_graph=True), grad_to_none=leaves)

    # e.g. out of memory (dense bias at 8192), a head dim a peer lacks
    return common.guarded(f"{provider} {mode}", run)


def unit(mode: str) -> str:
    return "TB/s" if mode == "decode" else "TFLOP/s"


def run_mode(mode: str, shapes, args, ceilings):
    """One table: TFLOP/s (prefill) or TB/s (decode) of every provider at every shape."""
    decode = mode == "decode"
    ceiling_value = ceilings[1] if decode else ceilings[0]
    ceiling_name = "copy ceiling" if decode else "matmul ceiling"

    def measure(shape, provider):
        if provider == "ceiling":
            return ceiling_value
        case = Case(shape, common.DTYPES[args.dtype], decode, args.fused_layout)
        ms = time_provider(case, provider, mode)
        batch, heads, seq, head_dim = common.dims(shape)
        if decode:
            return common.per_second(2 * batch * heads * seq * head_dim * case.k.element_size(), ms, 1e12)
        return common.per_second(FLOP_FACTOR[mode] * 2 * batch * heads * seq * seq * head_dim, ms, 1e12)

    return common.run_table(
        args.out, f"attention-{mode.replace('+', '-')}-{args.dtype}", "shape", shapes, PROVIDERS, measure,
        unit(mode), f"{ceiling_name} {ceiling_value:.2f} {unit(mode)} (its column)", title=mode,
        labels={"ceiling": ceiling_name}, xlabel="B x H x L x D" if decode else "B x H x S x D")


def main(argv=None) -> int:
    args = parse_args(argv)
    if not common.start(args, "bench_attention.py", "Triton kernels, FlexAttention and SDPA flash",
                        force_triton=True):
        return 1
    ceilings = measure_ceilings(common.DTYPES[args.dtype])
    print(common.describe(args.dtype) + f"; ceilings: {args.dtype} matmul {ceilings[0]:.0f} TFLOP/s, "
          f"copy {ceilings[1]:.2f} TB/s")
    modes = ["fwd", "fwd+bwd", "bwd", "decode"] if args.mode == "all" else [args.mode]
    tables = {mode: run_mode(mode, args.shapes or (DECODE_SHAPES if mode == "decode" else PREFILL_SHAPES),
                             args, ceilings) for mode in modes}
    print("\n== goals (issue 6, H100 bf16) ==")
    for mode, shape, peer, ratio in GOALS:
        table = tables.get(mode)
        if table is None or shape not in table.rows:
            continue
        ours, theirs = table.value(shape, "bloom_kernels"), table.value(shape, peer)
        verdict = "ok" if ours >= ratio * theirs else "MISSED"
        print(f"{mode:7s} {shape:16s} bloom_kernels {ours:8.2f} vs {ratio:.2f} x {table.column(peer)} {theirs:8.2f}"
              f" -> {ours / theirs:5.2f}x  {verdict}")
    print(f"\ntables (csv) and plots (png) in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
