"""Small helpers shared by the tests (imported as `helpers`; pytest puts tests/ on sys.path)."""

import torch

HAS_CUDA = torch.cuda.is_available()
# The device the Triton kernels run on in this session: the GPU, or the CPU through the interpreter.
KERNEL_DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")


def triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


# --- random BLOOM weights and batches ----------------------------------------------------------------
def peaked_causal_lm_pair(config: dict, noise: float, seed: int = 0):
    """(ours, transformers') BloomForCausalLM on the same weights: transformers' random init plus
    `noise` x N(0, 1) on every parameter, so next-token distributions are peaked (greedy is not a coin
    toss) and still differ between beams. Needs transformers."""
    import transformers

    from bloom import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    theirs = transformers.BloomForCausalLM(transformers.BloomConfig(**config)).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(noise * torch.randn_like(p))
    ours = BloomForCausalLM(BloomConfig(**config)).eval()
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def randomize_(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights that keep the network well conditioned (LN weights near 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "layernorm" in name or "ln_f" in name:
                p.copy_(1.0 + 0.1 * noise if name.endswith("weight") else 0.1 * noise)
            else:
                p.copy_(0.05 * noise)


def left_padding_mask(key_len: int, *, lengths=None, pads=None, dtype=torch.int64, device="cpu") -> torch.Tensor:
    """(B, Sk) 0/1 attention mask of a left-padded batch, as batched generation makes it: row b has
    `lengths[b]` real tokens at the end (1) after `pads[b] = Sk - lengths[b]` padding slots (0).
    Give either `lengths` or `pads`; B is their count."""
    if (lengths is None) == (pads is None):
        raise TypeError("left_padding_mask: give exactly one of lengths= and pads=")
    pads = [key_len - n for n in lengths] if pads is None else list(pads)
    mask = torch.ones(len(pads), key_len, dtype=dtype)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
    return mask.to(device)


def left_padded_batch(vocab: int, lengths=(9, 6, 3), seed: int = 1, pad_id: int = 3):
    """Random token ids (B, max(lengths)) left padded with `pad_id`, and their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    total = max(lengths)
    ids = torch.randint(4, vocab, (len(lengths), total), generator=gen)
    mask = left_padding_mask(total, lengths=lengths)
    ids[mask == 0] = pad_id
    return ids, mask


# --- a tiny BLOOM-like tokenizer, trained offline --------------------------------------------------
# The package's (bloom.tokenization.train: `bloom init` writes the same one), under the names the tests
# use. Resolved on first use, so that conftest's `import helpers` does not import bloom at collection.
_TOKENIZER_NAMES = {
    "BLOOM_CONFIG": "BLOOM_TOKENIZER_CONFIG",  # BLOOM's own tokenizer_config.json, padding on the left
    "BLOOM_SPLIT_REGEX": "BLOOM_SPLIT_REGEX",
    "CORPUS": "SAMPLE_TEXT",
    "SPECIAL_TOKENS": "SPECIAL_TOKENS",
    "train_bloom_like_tokenizer": "train_bloom_like_tokenizer",
    "write_tokenizer_dir": "write_tokenizer_dir",
}


def __getattr__(name: str):
    if name in _TOKENIZER_NAMES:
        from bloom.tokenization import train

        return getattr(train, _TOKENIZER_NAMES[name])
    raise AttributeError(f"module 'helpers' has no attribute {name!r}")
