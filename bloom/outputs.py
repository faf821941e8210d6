"""Model outputs that behave like transformers' ModelOutput (see ModelOutput)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from torch import Tensor


class ModelOutput:
    """Dataclass base that behaves like transformers' ModelOutput (an ordered dict of the fields that
    are not None): `out.logits`, `out["logits"]` (KeyError for a field that is None), `out[0]` and
    slices over those fields, `len`, `keys()/values()/items()`, `get`, `in`, iteration over the keys
    (so `a, b = out` unpacks keys, as in transformers), `to_tuple()`; `out["logits"] = t` sets the
    attribute."""

    def to_tuple(self) -> tuple[Any, ...]:
        return tuple(value for _, value in self.items())

    def keys(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def values(self) -> list[Any]:
        return [getattr(self, name) for name in self.keys()]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, getattr(self, name)) for name in self.keys()]

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self.keys() else default

    def __getitem__(self, key: str | int | slice) -> Any:
        if isinstance(key, str):
            if key not in self.keys():
                raise KeyError(key)
            return getattr(self, key)
        return self.to_tuple()[key]

    def __setitem__(self, key: str, value: Any) -> None:
        if key not in {f.name for f in fields(self)}:
            raise KeyError(f"{type(self).__name__} has no field {key!r}")
        setattr(self, key, value)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self.keys())


@dataclass
class BaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class CausalLMOutputWithPast(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class SequenceClassifierOutputWithPast(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    past_key_values: Any = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class TokenClassifierOutput(ModelOutput):
    loss: Tensor | None = None
    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class QuestionAnsweringModelOutput(ModelOutput):
    loss: Tensor | None = None
    start_logits: Tensor | None = None
    end_logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None


@dataclass
class GenerateDecoderOnlyOutput(ModelOutput):
    """generate(return_dict_in_generate=True) for greedy and sampled decoding (transformers 5's fields):
    `scores` the processed scores of each step, `logits` the raw ones (each a tuple of (B, V) fp32),
    `cache` the KV cache (with use_cache)."""
    sequences: Tensor | None = None
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Any = None


@dataclass
class GenerateBeamDecoderOnlyOutput(ModelOutput):
    """generate(num_beams > 1, return_dict_in_generate=True): `sequences_scores` the length-penalised
    score of each returned sequence (with output_scores), `beam_indices` (B * num_return_sequences,
    new tokens) the flat beam each token came from (-1 past the sequence's end)."""
    sequences: Tensor | None = None
    sequences_scores: Tensor | None = None
    scores: tuple[Tensor, ...] | None = None
    logits: tuple[Tensor, ...] | None = None
    beam_indices: Tensor | None = None
    attentions: tuple | None = None
    hidden_states: tuple | None = None
    cache: Any = None
