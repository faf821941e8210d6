"""Outputs of the Flax models: transformers' Flax output classes (field names and order), as pytrees.

They behave like bloom.outputs.ModelOutput (`out.logits`, `out["logits"]`, `out[0]`, `to_tuple()`) and
are flax.struct dataclasses, so they can be returned from jax.jit-compiled functions.
"""

from __future__ import annotations

from typing import Any

import flax.struct

from ..outputs import ModelOutput


@flax.struct.dataclass
class FlaxBaseModelOutputWithPast(ModelOutput):
    last_hidden_state: Any = None
    past_key_values: Any = None  # the "cache" collection (init_cache's dict), when one was passed
    hidden_states: Any = None    # n_layer + 1 arrays (B, S, E): each block's input, then ln_f's output
    attentions: Any = None       # n_layer arrays (B, H, S, L) of attention probabilities


@flax.struct.dataclass
class FlaxCausalLMOutputWithPast(ModelOutput):
    logits: Any = None
    past_key_values: Any = None
    hidden_states: Any = None
    attentions: Any = None


@flax.struct.dataclass
class FlaxGenerateOutput(ModelOutput):
    """transformers' FlaxGreedySearchOutput / FlaxSampleOutput: `sequences` (B, prompt + max_new_tokens),
    each row padded with pad_token_id after its eos."""

    sequences: Any = None
