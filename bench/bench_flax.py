"""Decode speed: bloom.flax's FlaxBloomForCausalLM vs the PyTorch bloom.BloomForCausalLM, same weights,
same device (jax's default backend and torch's CPU path), one process.

    python bench/bench_flax.py                                    # small (hidden 512, 6 layers, vocab 8000)
    python bench/bench_flax.py --preset small bloom-560m --batch 1 8 --new-tokens 64 --repeats 5

Both engines: greedy, eos disabled (every row makes --new-tokens tokens), a random prompt of
--prompt-len ids without padding. The Flax model is built from the PyTorch model's state dict
(FlaxBloomForCausalLM.from_pretrained(None, config=..., state_dict=...)), fp32 on both sides.
PyTorch runs bloom.BloomForCausalLM.generate (decode="auto": eager on the CPU); Flax runs its one
jax.jit-compiled program (prefill + lax.while_loop decode), compiled in the untimed warm-up.

Measured per batch size, the engines interleaved within each repeat (pytorch, flax, pytorch, flax, ...:
on a noisy machine both see the same disturbances):
  prefill   wall time of generate with max_new_tokens=1, best and median over --repeats
  decode    tok/s = batch * (new_tokens - 1) / (T_generate - T_prefill), "best" from the best times and
            "median" from the median times; the ratio is flax / pytorch (> 1: Flax faster)
Before timing, the greedy tokens are compared ("(outputs differ!)" when they do not agree).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch

from bloom.shapes import SHAPES, random_model


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", nargs="+", default=["small"], choices=sorted(SHAPES),
                   help="model shapes of bloom.shapes.SHAPES (default: small)")
    p.add_argument("--batch", nargs="+", type=int, default=[1, 4])
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    for name in ("prompt_len", "repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.new_tokens < 2:
        p.error("--new-tokens must be >= 2 (decode speed is measured over the tokens after the first)")
    if any(b < 1 for b in args.batch):
        p.error("--batch values must be >= 1")
    return args


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def engines(pt, fx, ids: torch.Tensor):
    """{name: generate(n) -> (B, prompt + n) numpy tokens, synchronised}."""
    ids_np = ids.numpy().astype(np.int32)

    def torch_generate(n):
        return pt.generate(ids, max_new_tokens=n, eos_token_id=[]).numpy()

    def flax_generate(n):
        out = fx.generate(ids_np, max_new_tokens=n, eos_token_id=[]).sequences
        return np.asarray(out.block_until_ready())

    return {"pytorch": torch_generate, "flax": flax_generate}


def bench_batch(pt, fx, batch: int, args) -> dict:
    gen = torch.Generator().manual_seed(args.seed + batch)
    ids = torch.randint(0, pt.config.vocab_size, (batch, args.prompt_len), generator=gen)
    runs = engines(pt, fx, ids)
    outputs = {name: run(args.new_tokens) for name, run in runs.items()}  # warm-up (and jit compile)
    for run in runs.values():
        run(1)
    same = np.array_equal(outputs["pytorch"], outputs["flax"])
    times = {name: {"prefill": [], "generate": []} for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():  # interleaved
            times[name]["prefill"].append(timed(lambda: run(1)))
            times[name]["generate"].append(timed(lambda: run(args.new_tokens)))
    made = batch * (args.new_tokens - 1)
    result = {"batch": batch, "outputs_identical": same, "engines": {}}
    def rate(generate_s, prefill_s):  # noise can make the difference <= 0 for very few tokens: no number
        return made / (generate_s - prefill_s) if generate_s > prefill_s else float("nan")

    for name, t in times.items():
        best = rate(min(t["generate"]), min(t["prefill"]))
        median = rate(statistics.median(t["generate"]), statistics.median(t["prefill"]))
        result["engines"][name] = {"prefill_ms_best": 1e3 * min(t["prefill"]),
                                   "prefill_ms_median": 1e3 * statistics.median(t["prefill"]),
                                   "decode_tok_s_best": best, "decode_tok_s_median": median}
    return result


def main(argv=None) -> int:
    args = parse(argv)
    try:
        import jax

        from bloom.flax import FlaxBloomForCausalLM
    except ImportError as err:
        print(f"bench_flax needs the flax extra (pip install 'bloom-kernels[flax]'): {err}", file=sys.stderr)
        return 1
    print(f"jax {jax.__version__} on {jax.default_backend()} ({jax.devices()[0].device_kind}); torch "
          f"{torch.__version__} on cpu, {torch.get_num_threads()} threads; fp32, greedy, prompt {args.prompt_len}, "
          f"{args.new_tokens} new tokens, {args.repeats} repeats interleaved")
    for preset in args.preset:
        pt = random_model(preset, seed=args.seed)
        fx = FlaxBloomForCausalLM.from_pretrained(None, config=pt.config, state_dict=pt.state_dict())
        hidden, layers, heads, vocab = SHAPES[preset]
        print(f"\n{preset}: hidden {hidden}, {layers} layers, {heads} heads, vocab {vocab}")
        print(f"{'batch':>5}  {'engine':<8} {'prefill ms best/med':>20}  {'decode tok/s best/med':>22}  "
              f"{'flax/pytorch':>12}")
        for batch in args.batch:
            r = bench_batch(pt, fx, batch, args)
            e = r["engines"]
            for name in ("pytorch", "flax"):
                x = e[name]
                ratio = ""
                if name == "flax":
                    ratio = (f"{x['decode_tok_s_best'] / e['pytorch']['decode_tok_s_best']:.2f}x / "
                             f"{x['decode_tok_s_median'] / e['pytorch']['decode_tok_s_median']:.2f}x")
                print(f"{batch:>5}  {name:<8} {x['prefill_ms_best']:>9.1f} / {x['prefill_ms_median']:<8.1f}  "
                      f"{x['decode_tok_s_best']:>10.1f} / {x['decode_tok_s_median']:<9.1f}  {ratio:>12}")
            if not r["outputs_identical"]:
                print("       (outputs differ!)")
        del pt, fx
    return 0


if __name__ == "__main__":
    sys.exit(main())
