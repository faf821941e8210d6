"""The BLOOM family's layer shapes: what the kernels are compiled, tuned and benchmarked for.

Only sizes, no model code: the ahead-of-time compile check (`compile_targets.py`) and the pre-tuner
(`tune.py`) both enumerate kernel launches from this table. Values are those of the bigscience
checkpoints' config.json files (hidden size, heads, layers); head dim = hidden / heads, MLP = 4 x hidden.
"""

from __future__ import annotations

from dataclasses import dataclass

VOCAB_SIZE = 250_880


@dataclass(frozen=True)
class BloomShape:
    name: str
    hidden: int
    heads: int
    layers: int

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def ffn(self) -> int:
        return 4 * self.hidden

    @property
    def projections(self) -> tuple[tuple[int, int, bool], ...]:
        """(N, K, has a bias) of a block's four linears: QKV, dense, h -> 4h (its bias is fused into the
        bias-GeLU, not the linear), 4h -> h."""
        h = self.hidden
        return (3 * h, h, True), (h, h, True), (4 * h, h, False), (h, 4 * h, True)


BLOOM_SHAPES: dict[str, BloomShape] = {s.name: s for s in (
    BloomShape("bloom-560m", 1024, 16, 24),
    BloomShape("bloom-1b1", 1536, 16, 24),
    BloomShape("bloom-1b7", 2048, 16, 24),
    BloomShape("bloom-3b", 2560, 32, 30),
    BloomShape("bloom-7b1", 4096, 32, 30),
    BloomShape("bloom", 14336, 112, 70),  # BLOOM-176B
)}


def bloom_shape(name: str) -> BloomShape:
    """The shape of a model by name ('bloom-7b1', 'bigscience/bloom-7b1'; 'bloom-176b' = 'bloom')."""
    key = name.strip().lower().removeprefix("bigscience/")
    key = "bloom" if key in ("bloom-176b", "bloom176b") else key
    if key not in BLOOM_SHAPES:
        raise ValueError(f"unknown BLOOM model {name!r}; expected one of {', '.join(BLOOM_SHAPES)}")
    return BLOOM_SHAPES[key]
