"""Write a local random-weight BLOOM checkpoint and a working tokenizer to DIR, to try the other commands offline.

    bloom init DIR [--shape tiny|small|bloom-560m|...] [--seed N] [--dtype fp32|bf16|fp16] [--force]
    bloom generate DIR "Hello"

DIR gets config.json, model.safetensors, generation_config.json (transformers' format: it loads with
bloom's and transformers' from_pretrained) and tokenizer.json, tokenizer_config.json,
special_tokens_map.json. The weights are transformers' random init for the shape (seeded: the same seed
writes the same weights), so the text generated is gibberish; the point is that every step — tokenise,
generate, decode, save, load — runs with no network. The tokenizer is a byte-level BPE with BLOOM's
pre-tokenizer and special tokens (<unk> <s> </s> <pad> = ids 0-3), trained on a short built-in
multilingual sample (bloom.tokenization.train), and the model's vocabulary is the tokenizer's (a few
hundred tokens, not the shape's 250880): a random model would otherwise pick ids that name no token,
which decode refuses (real BLOOM pads 250680 tokens to 250880 rows and was trained never to pick them).

A DIR that exists and is not empty is refused unless --force, which writes the files above over the
ones there and leaves any other file alone.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
from pathlib import Path

import torch

from .cli import DTYPE_NAMES
from .model import BloomForCausalLM
from .shapes import SHAPES, random_model, shape_config
from .tokenization import BloomTokenizerFast
from .tokenization.train import BLOOM_TOKENIZER_CONFIG, train_bloom_like_tokenizer

# The sample text has a few hundred merges to learn; a bigger target only means "as many as it has".
MAX_TOKENIZER_VOCAB = 4096
# Room left on the disk beyond the weights themselves (config and tokenizer files, file system slack).
DISK_MARGIN_BYTES = 16 * 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="DIR", help="where to write the checkpoint (created if needed)")
    parser.add_argument("--shape", choices=list(SHAPES), default="tiny",
                        help="model size (default: tiny, 2 MB in fp32); bloom-560m and up are the published "
                             "BLOOM shapes")
    parser.add_argument("--seed", type=int, default=0, metavar="N",
                        help="random seed of the weights (default: 0; the same seed writes the same weights)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default="fp32",
                        help="dtype the weights are saved in (default: fp32)")
    parser.add_argument("--force", action="store_true",
                        help="write into DIR even if it is not empty (overwrites the checkpoint's files only)")


def run(args: argparse.Namespace) -> int:
    directory = Path(args.directory)
    check_directory(directory, args.force)
    tokenizer = build_tokenizer(SHAPES[args.shape][3])
    # The config's token ids are the tokenizer's, as in bigscience's config.json (pad_token_id 3).
    token_ids = {f"{name}_id": tokenizer.convert_tokens_to_ids(getattr(tokenizer, name))
                 for name in ("bos_token", "eos_token", "pad_token")}
    token_ids["vocab_size"] = len(tokenizer)  # every id the model can pick names a token (docstring)
    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    check_disk_space(directory, weight_bytes(args.shape, dtype, token_ids))

    model = random_model(args.shape, dtype=dtype, seed=args.seed, cls=BloomForCausalLM, **token_ids)
    model.save_pretrained(directory)
    written = [*checkpoint_files(directory), *map(Path, tokenizer.save_pretrained(directory))]
    report(directory, written, args, model, tokenizer)
    return 0


def check_directory(directory: Path, force: bool) -> None:
    """ValueError (one line, naming DIR) for a path that is a file, or a non-empty directory without force."""
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"DIR {str(directory)!r} exists and is not a directory")
    if directory.is_dir() and any(directory.iterdir()) and not force:
        raise ValueError(f"DIR {str(directory)!r} is not empty; choose a new directory, or pass --force to "
                         f"write the checkpoint's files over those there")


def build_tokenizer(model_vocab_size: int):
    """BloomTokenizerFast on the built-in trained BPE, with BLOOM's tokenizer_config (left padding); its
    vocabulary fits in the model's embedding (checked: a token id past it would fail only at run time)."""
    backend = train_bloom_like_tokenizer(min(model_vocab_size, MAX_TOKENIZER_VOCAB))
    if backend.get_vocab_size() > model_vocab_size:
        raise ValueError(f"the tokenizer has {backend.get_vocab_size()} tokens but the model's vocab_size is "
                         f"{model_vocab_size}")
    special = {k: v for k, v in BLOOM_TOKENIZER_CONFIG.items() if k.endswith("_token")}
    return BloomTokenizerFast(tokenizer_object=backend, padding_side=BLOOM_TOKENIZER_CONFIG["padding_side"],
                              **special)


def weight_bytes(shape: str, dtype, overrides: dict) -> int:
    """Bytes of the weights as saved (the tied lm_head once), from a model built on the meta device."""
    with torch.device("meta"):
        model = BloomForCausalLM(shape_config(shape, **overrides))
    return model.num_parameters() * dtype.itemsize


def check_disk_space(directory: Path, needed: int) -> None:
    """Refuse up front rather than leave half a checkpoint (bloom-7b1 in fp32 is 28 GB, BLOOM 176B 700 GB)."""
    existing = next(p for p in (directory, *directory.absolute().parents) if p.exists())
    free = shutil.disk_usage(existing).free
    if free < needed + DISK_MARGIN_BYTES:
        raise ValueError(f"DIR {str(directory)!r}: the weights need {human_size(needed)} but the disk has "
                         f"{human_size(free)} free; pick a smaller --shape or a bf16/fp16 --dtype")


def human_size(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


def checkpoint_files(directory: Path) -> list[Path]:
    """The files model.save_pretrained writes (with --force, DIR may hold others: they are not listed)."""
    names = ("config.json", "generation_config.json", "model*.safetensors", "model.safetensors.index.json")
    return sorted({path for name in names for path in directory.glob(name)})


def report(directory: Path, written: list[Path], args: argparse.Namespace, model, tokenizer) -> None:
    """What was written (each file and its size) and the command to try next."""
    c = model.config
    print(f"Wrote a random-weight BLOOM ({args.shape}: hidden {c.hidden_size}, {c.n_layer} layers, {c.n_head} "
          f"heads, vocab {c.vocab_size} (the tokenizer's); {model.num_parameters():,} parameters, {args.dtype}, "
          f"seed {args.seed}) "
          f"and a tokenizer of {len(tokenizer)} tokens to {directory}:")
    for path in written:
        print(f"  {path.name:<28} {human_size(path.stat().st_size)}")
    print("The weights are random: the text will be gibberish, but every step runs offline. Try:")
    print(f"  bloom generate {shlex.quote(str(directory))} \"Hello\" --max-new-tokens 20")
