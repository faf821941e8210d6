"""Checks of the model's forward arguments: wrong input gets an error naming the argument."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .cache import BloomCache
from .config import BloomConfig


def _shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def check_token_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    if not isinstance(ids, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of token ids, got {type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer token ids (torch.long); got dtype {ids.dtype}")
    if ids.dtype not in (torch.int64, torch.int32):  # what the embedding's lookup takes
        raise TypeError(f"{name} must hold int64 (torch.long) or int32 token ids; got dtype {ids.dtype}")
    if ids.is_meta:
        raise ValueError(f"{name} is on the meta device (a shape without values); pass real token ids")
    if ids.dim() != 2:
        raise ValueError(f"{name} must have shape (batch, sequence); got {_shape(ids)}")
    if ids.numel() == 0:
        raise ValueError(f"{name} is empty (shape {_shape(ids)}); give at least one token")
    lo, hi = int(ids.min()), int(ids.max())  # one host sync: an out-of-range id must not reach the GPU
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {vocab_size})")


def check_forward_inputs(config: BloomConfig, input_ids, inputs_embeds, attention_mask, cache,
                         head_mask, embedding_weight: Tensor) -> Tensor | None:
    """Validate a forward call; return head_mask normalised to (n_layer, n_head) (or None)."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids or inputs_embeds"
                         + (" (got both)" if input_ids is not None else " (got neither)"))
    if input_ids is not None:
        check_token_ids("input_ids", input_ids, config.vocab_size)
        batch, seq = input_ids.shape
    else:
        if not isinstance(inputs_embeds, Tensor) or not inputs_embeds.is_floating_point():
            raise TypeError("inputs_embeds must be a floating-point tensor (batch, sequence, hidden_size)")
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != config.hidden_size:
            raise ValueError(f"inputs_embeds must have shape (batch, sequence, {config.hidden_size}); "
                             f"got {_shape(inputs_embeds)}")
        if inputs_embeds.dtype != embedding_weight.dtype:
            raise TypeError(f"inputs_embeds has dtype {inputs_embeds.dtype} but the model is "
                            f"{embedding_weight.dtype}")
        batch, seq = inputs_embeds.shape[:2]

    past = 0
    if cache is not None:
        if not isinstance(cache, BloomCache):
            raise TypeError(f"past_key_values must be a BloomCache or legacy tuples, got {type(cache).__name__}")
        past = cache.length
        if cache.batch_size != batch:
            raise ValueError(f"past_key_values holds a batch of {cache.batch_size} but the input has {batch}")
        if len(cache) != config.n_layer:
            raise ValueError(f"past_key_values has {len(cache)} layers; the model has {config.n_layer}")
        heads, head_dim = cache.keys[0].shape[1], cache.keys[0].shape[3]
        if (heads, head_dim) != (config.n_head, config.head_dim):
            raise ValueError(f"past_key_values holds {heads} heads of dim {head_dim}; the model has "
                             f"{config.n_head} heads of dim {config.head_dim}")
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if _shape(attention_mask) != (batch, past + seq):
            raise ValueError(
                f"attention_mask must have shape (batch, past + sequence) = ({batch}, {past + seq}) "
                f"(past_key_values holds {past} positions); got {_shape(attention_mask)}"
            )
    if head_mask is None:
        return None
    if not isinstance(head_mask, Tensor):
        raise TypeError(f"head_mask must be a torch.Tensor, got {type(head_mask).__name__}")
    if _shape(head_mask) == (config.n_head,):
        return head_mask.expand(config.n_layer, config.n_head)
    if _shape(head_mask) == (config.n_layer, config.n_head):
        return head_mask
    raise ValueError(f"head_mask must have shape ({config.n_head},) or ({config.n_layer}, {config.n_head}); "
                     f"got {_shape(head_mask)}")


def check_labels(labels: Tensor, expected: tuple[int, int], vocab_size: int, name: str = "labels") -> None:
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise TypeError(f"{name} must be an integer tensor of token ids (-100 = ignored)")
    if tuple(labels.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape (batch, sequence) = {tuple(expected)}; got {_shape(labels)}")
    valid = labels[labels != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= vocab_size):
        raise ValueError(f"{name} must be -100 or in [0, {vocab_size})")


def check_class_labels(labels, num_labels: int, shape: tuple[int, ...], name: str = "labels") -> None:
    """Class indices for a cross-entropy loss: an integer tensor of `shape` (any layout with that many
    elements, as transformers flattens it), each -100 (ignored) or in [0, num_labels)."""
    if not isinstance(labels, Tensor) or labels.dtype.is_floating_point or labels.dtype.is_complex \
            or labels.dtype == torch.bool:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"{name} must be an integer tensor of class indices (-100 = ignored); got {got}")
    if labels.numel() != math.prod(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {_shape(labels)}")
    valid = labels[labels != -100]
    if valid.numel() and (int(valid.min()) < 0 or int(valid.max()) >= num_labels):
        bad = int(valid.min()) if int(valid.min()) < 0 else int(valid.max())
        raise ValueError(f"{name} must be -100 or class indices in [0, {num_labels}); got {bad}")


def check_logits_to_keep(value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"logits_to_keep must be an int >= 0 (0: every position); got {value!r}")
