"""End-to-end greedy generation: bloom vs transformers' BloomForCausalLM, same random weights, one process.

    python bench/bench_generate.py                       # bloom-560m-like shape, CPU, batch 1 and 8
    python bench/bench_generate.py --device cuda --dtype bf16 --preset bloom-560m

Prints tokens/s (generated tokens of all rows / wall time of generate, prompt included) for both
models and the ratio. Both decode greedily with the same prompt, the same number of new tokens (eos
disabled), and a warm-up call first. The outputs are checked to be identical before timing.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/_common.py
import _common as common  # noqa: E402

PRESETS = {
    # hidden, layers, heads, vocab
    "bloom-560m": (1024, 24, 16, 250880),
    "small": (512, 8, 8, 250880),
    "tiny": (128, 2, 4, 1000),
}


def build_models(preset: str, device, dtype):
    import transformers

    from bloom import BloomConfig, BloomForCausalLM

    hidden, layers, heads, vocab = PRESETS[preset]
    cfg = dict(hidden_size=hidden, n_layer=layers, n_head=heads, vocab_size=vocab)
    torch.manual_seed(0)
    theirs = transformers.BloomForCausalLM(transformers.BloomConfig(**cfg)).eval()
    ours = BloomForCausalLM(BloomConfig(**cfg)).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours.to(device, dtype), theirs.to(device, dtype)


def main(argv=None) -> None:
    parser = common.parser(__doc__, dtype="fp32", out=False)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="bloom-560m")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    device, dtype = torch.device(args.device), common.DTYPES[args.dtype]
    with torch.inference_mode():
        run(args, device, dtype)


def run(args, device, dtype) -> None:

    ours, theirs = build_models(args.preset, device, dtype)
    vocab = ours.config.vocab_size
    print(f"preset {args.preset} {PRESETS[args.preset]} (hidden, layers, heads, vocab), {args.dtype} on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}, "
          f"{torch.get_num_threads()} threads, prompt {args.prompt_len}, {args.new_tokens} new tokens")
    print(f"{'batch':>5} | {'bloom tok/s':>12} | {'transformers tok/s':>18} | {'ratio':>6}")
    for batch in args.batch:
        ids = torch.randint(4, vocab, (batch, args.prompt_len), generator=torch.Generator().manual_seed(1))
        ids = ids.to(device)
        mask = torch.ones_like(ids)
        kw = dict(max_new_tokens=args.new_tokens)

        def run_ours():
            return ours.generate(ids, mask, eos_token_id=[], **kw)

        def run_theirs():
            return theirs.generate(ids, attention_mask=mask, do_sample=False, min_new_tokens=args.new_tokens,
                                   pad_token_id=0, **kw)

        same = torch.equal(run_ours().cpu(), run_theirs().cpu())
        t_ours = common.best_wall_s(run_ours, device, args.repeats)
        t_theirs = common.best_wall_s(run_theirs, device, args.repeats)
        tokens = batch * args.new_tokens
        print(f"{batch:>5} | {tokens / t_ours:>12.1f} | {tokens / t_theirs:>18.1f} | "
              f"{t_theirs / t_ours:>5.2f}x" + ("" if same else "  (outputs differ!)"))


if __name__ == "__main__":
    main()
