"""The `bloom` command line.

    bloom generate MODEL "prompt" [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P]
                   [--repetition-penalty R] [--seed S] [--device D] [--dtype bf16|fp16|fp32] [--int8]
                   [--tensor-parallel]   (under torchrun --nproc-per-node N: the model split over N ranks)
    bloom parity [MODEL] [--shape S] [--dtype bf16|fp16|fp32] [--int8] [--device D] [--json FILE] ...
                                        fused path vs reference (and transformers), per layer
    bloom bench [MODEL] [--shape S] [--dtype ...] [--batch B ...] [--json FILE] [--plot FILE] ...
                                        prefill latency, decode tokens/s, peak memory vs transformers
    bloom init DIR [--shape S]          a local random-weight checkpoint + tokenizer to try the rest on
    bloom tune --model NAME [--dtype bf16|fp16] [--batch B ...] [--seq S ...] [--max-new-tokens N]
               [--backward] [--int8] [--dry-run]         (= python -m bloom_kernels.tune)
    bloom --version

Errors print one line on stderr and exit with status 1 (2 for bad command-line arguments).
"""

from __future__ import annotations

import argparse
import importlib
import sys

DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}

# name, module (with add_arguments(parser) and run(args) -> exit status), one-line help
SUBCOMMANDS = (
    ("parity", "bloom.parity", "compare the fused path with the reference (and transformers), layer by layer"),
    ("bench", "bloom.benchmark", "prefill latency, decode tokens/s and peak memory against transformers"),
    ("init", "bloom.init_checkpoint", "write a random-weight checkpoint + tokenizer to a local directory"),
)
SUBCOMMAND_MODULES = {name: module for name, module, _ in SUBCOMMANDS}


def package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("bloom-kernels")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


def resolve_device(text: str | None):
    """`--device` as a torch.device this machine has (None: cuda if available, else cpu).

    Checked when the command runs, not by argparse, so a bad value is one line (`bloom: error: ...`)
    rather than the usage text."""
    import torch

    if text is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {text!r} is not a device: expected cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {text!r}: bloom runs on cpu or cuda devices")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"--device {text!r}: CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {text!r}: this machine has {count} CUDA device(s)")
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=None, metavar="D",
                        help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bloom", description="Run BLOOM models on bloom-kernels (Triton on GPUs, PyTorch on CPUs)."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    gen = commands.add_parser(
        "generate",
        help="generate text from a prompt, streamed to stdout",
        description="Generate text from a prompt and stream it to stdout. Greedy decoding unless "
                    "--temperature, --top-k or --top-p is given, which switch to sampling.",
    )
    gen.add_argument("model", metavar="MODEL",
                     help="a local directory (config.json, weights, tokenizer.json) or a hub id such as "
                          "bigscience/bloom-560m")
    gen.add_argument("prompt", metavar="PROMPT", help="the text to continue")
    gen.add_argument("--max-new-tokens", type=int, default=50, metavar="N",
                     help="number of tokens to generate at most (default: 50)")
    gen.add_argument("--min-new-tokens", type=int, default=0, metavar="N",
                     help="do not stop at end-of-sequence before N new tokens (default: 0)")
    gen.add_argument("--temperature", type=float, default=None, metavar="T",
                     help="sampling temperature > 0 (enables sampling)")
    gen.add_argument("--top-k", type=int, default=None, metavar="K",
                     help="sample among the K most likely tokens (enables sampling; 0 = no top-k limit, "
                          "as in transformers)")
    gen.add_argument("--top-p", type=float, default=None, metavar="P",
                     help="nucleus sampling: smallest token set with probability >= P (enables sampling)")
    gen.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                     help="penalise tokens already present (1.0 = off, default)")
    gen.add_argument("--num-beams", type=int, default=1, metavar="N",
                     help="beam search over N beams (prints the best sequence at the end; default 1: off)")
    gen.add_argument("--no-repeat-ngram-size", type=int, default=0, metavar="N",
                     help="never repeat an N-gram (default 0: off)")
    gen.add_argument("--seed", type=int, default=None, metavar="S",
                     help="random seed for sampling (reproducible output)")
    add_device_argument(gen)
    gen.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                     help="weights/activations dtype (default: bf16 on a GPU, fp32 on the CPU)")
    gen.add_argument("--int8", action="store_true",
                     help="quantise the weights to int8 while loading (weight-only, per output channel)")
    gen.add_argument("--tensor-parallel", action="store_true",
                     help="split the model over the processes of `torchrun --nproc-per-node N` (NCCL on GPUs, "
                          "one per rank; gloo on CPUs); rank 0 prints")
    gen.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    gen.add_argument("--local-files-only", action="store_true",
                     help="never download: use the local directory or the hub cache only")

    for name, module, summary in SUBCOMMANDS:
        command_module = importlib.import_module(module)
        sub = commands.add_parser(name, help=summary, description=command_module.__doc__.split("\n\n")[0])
        command_module.add_arguments(sub)

    from bloom_kernels import tune

    tune_cmd = commands.add_parser(
        "tune",
        help="pre-tune the GPU kernels for a model's shapes (cached on disk)",
        description=tune.__doc__.split("\n\n")[0] + " Same as python -m bloom_kernels.tune.",
    )
    tune.add_arguments(tune_cmd)
    return parser


def run_generate(args: argparse.Namespace) -> None:
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    device = resolve_device(args.device)
    if args.tensor_parallel:
        import torch.distributed as dist

        from .parallel import init_distributed, shutdown

        started = not dist.is_initialized()
        device = init_distributed(device if args.device else None)
        try:
            return _generate(args, device, printing=dist.get_rank() == 0, tensor_parallel=True)
        finally:
            if started:
                shutdown()
    return _generate(args, device)


def _generate(args: argparse.Namespace, device, printing: bool = True, tensor_parallel: bool = False) -> None:
    import torch

    from .hub import HubOptions
    from .model import BloomForCausalLM
    from .streaming import TextStreamer
    from .tokenization import BloomTokenizerFast

    dtype = DTYPE_NAMES[args.dtype] if args.dtype else ("bfloat16" if device.type == "cuda" else "float32")
    hub = HubOptions(revision=args.revision, local_files_only=args.local_files_only).to_kwargs()

    tokenizer = BloomTokenizerFast.from_pretrained(args.model, **hub)
    load = dict(torch_dtype=dtype, device=device, **hub)
    if args.int8:
        load["quantization"] = "int8"
    if tensor_parallel:
        load["tensor_parallel"] = True
    model = BloomForCausalLM.from_pretrained(args.model, **load)

    encoded = tokenizer(args.prompt, return_tensors="pt")
    if encoded["input_ids"].shape[1] == 0:
        raise ValueError("the prompt is empty after tokenisation")
    sample = any(v is not None for v in (args.temperature, args.top_k, args.top_p))
    generator = None
    if args.seed is not None:
        generator = torch.Generator(device=device).manual_seed(args.seed)
    beams = args.num_beams != 1
    out = model.generate(
        encoded["input_ids"], encoded["attention_mask"], max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens, do_sample=sample,
        temperature=1.0 if args.temperature is None else args.temperature,
        top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        num_beams=args.num_beams, no_repeat_ngram_size=args.no_repeat_ngram_size or None,
        generator=generator, streamer=None if beams or not printing else TextStreamer(tokenizer),
    )
    if beams and printing:  # the best beam is known only at the end: no streaming
        print(tokenizer.decode(out[0], skip_special_tokens=True))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            run_generate(args)
        elif args.command in SUBCOMMAND_MODULES:
            return importlib.import_module(SUBCOMMAND_MODULES[args.command]).run(args)
        elif args.command == "tune":
            from bloom_kernels import tune

            return tune.run(args)
    except KeyboardInterrupt:
        print("\nbloom: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line, not a traceback
        message = " ".join(line.strip() for line in str(err).strip().splitlines()) or type(err).__name__
        print(f"bloom: error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
