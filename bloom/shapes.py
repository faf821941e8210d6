"""The shapes of the published BLOOM models (and two small ones), for random-weight models that run offline.

`bloom parity`, `bloom bench` and `bloom init` build a model of one of these shapes without downloading
anything; the numbers are those of bigscience's config.json files.
"""

from __future__ import annotations

import torch

from .config import BloomConfig

# name -> (hidden_size, n_layer, n_head, vocab_size)
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "tiny": (128, 2, 4, 1000),
    "small": (512, 6, 8, 8000),
    "bloom-560m": (1024, 24, 16, 250880),
    "bloom-1b1": (1536, 24, 16, 250880),
    "bloom-1b7": (2048, 24, 16, 250880),
    "bloom-3b": (2560, 30, 32, 250880),
    "bloom-7b1": (4096, 30, 32, 250880),
    "bloom": (14336, 70, 112, 250880),  # BLOOM-176B
}


def shape_config(shape: str, **overrides) -> BloomConfig:
    """The BloomConfig of a named shape (`overrides`: any config field, the shape's included)."""
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {', '.join(SHAPES)}; got {shape!r}")
    hidden, layers, heads, vocab = SHAPES[shape]
    fields = dict(hidden_size=hidden, n_layer=layers, n_head=heads, vocab_size=vocab)
    return BloomConfig(**{**fields, **overrides})


def random_model(shape: str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0, cls=None, **overrides):
    """A `cls` (default BloomForCausalLM) of the named shape with transformers' random init, seeded,
    built directly on `device` in `dtype` (bloom-7b1 in fp32 would not fit a small host twice), in eval mode."""
    if cls is None:
        from .model import BloomForCausalLM as cls
    config = shape_config(shape, **overrides)
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(config)
    return model.to(dtype).eval()
