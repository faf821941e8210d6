"""Text generation: greedy and sampled decoding on a static decode step (bloom/decode_step.py).

The cache, the token buffer and the attention-mask buffer are sized for prompt + max_new_tokens (a
capacity bucket) and written in place; they are kept on the model for the next call of that shape.
The prefill runs the whole prompt (logits of the last position only); each later step is the same
fixed-shape function: eager, compiled, or on CUDA one captured CUDA graph (all layers, logit
processing and the choice of the token) replayed per token. Logit processing follows transformers'
order and rules (bloom/logits.py), so greedy output equals transformers' token for token.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .cache import CacheOverflowError
from .decode_step import decoder_for, resolve_mode
from .validation import check_token_ids

# Config keys that, where a config has them, bound the total sequence length.
LENGTH_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "seq_length")


class Streamer(Protocol):
    """transformers' streamer protocol: put(prompt ids) once, put(new tokens) each step, end()."""

    def put(self, value: Tensor) -> None: ...

    def end(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# Options and validation
# --------------------------------------------------------------------------------------------------
class GenerationOptions:
    def __init__(self, config, *, max_new_tokens, min_new_tokens, do_sample, temperature, top_k, top_p,
                 repetition_penalty, eos_token_id, pad_token_id, num_return_sequences):
        def positive_int(name, value, minimum):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an int >= {minimum}; got {value!r}")

        positive_int("max_new_tokens", max_new_tokens, 1)
        positive_int("min_new_tokens", min_new_tokens, 0)
        positive_int("num_return_sequences", num_return_sequences, 1)
        if min_new_tokens > max_new_tokens:
            raise ValueError(f"min_new_tokens ({min_new_tokens}) > max_new_tokens ({max_new_tokens})")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0; got {temperature!r}")
        if top_k is not None:
            positive_int("top_k", top_k, 0)
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
        if not repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0; got {repetition_penalty!r}")
        if num_return_sequences > 1 and not do_sample:
            raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy rows would be identical)")

        eos = config.eos_token_id if eos_token_id is None else eos_token_id
        self.eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        for token in self.eos_ids:
            if not (isinstance(token, int) and 0 <= token < config.vocab_size):
                raise ValueError(f"eos_token_id must be in [0, {config.vocab_size}); got {eos!r}")
        pad = config.pad_token_id if pad_token_id is None else pad_token_id
        if pad is None:
            pad = self.eos_ids[0] if self.eos_ids else 0
        if not (isinstance(pad, int) and 0 <= pad < config.vocab_size):
            raise ValueError(f"pad_token_id must be in [0, {config.vocab_size}); got {pad!r}")
        self.pad_id = pad
        self.max_new_tokens, self.min_new_tokens = max_new_tokens, min_new_tokens
        self.do_sample, self.temperature = do_sample, float(temperature)
        self.top_k, self.top_p = top_k, top_p
        self.repetition_penalty = float(repetition_penalty)
        self.num_return_sequences = num_return_sequences

    def static_key(self) -> tuple:
        """What a compiled or captured step bakes in as constants."""
        return (tuple(self.eos_ids), self.pad_id, self.min_new_tokens > 0, self.do_sample, self.temperature,
                self.top_k, self.top_p, self.repetition_penalty)


def check_length_limits(config, total: int) -> None:
    for key in LENGTH_LIMIT_KEYS:
        limit = getattr(config, key, None)
        if isinstance(limit, int) and total > limit:
            raise CacheOverflowError(
                f"prompt + max_new_tokens = {total} exceeds the model's {key} = {limit}"
            )


# --------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------
def _new_token_limits(input_ids, max_new_tokens, min_new_tokens, max_length, min_length) -> tuple[int, int]:
    """(max_new_tokens, min_new_tokens) from transformers' two ways of saying them."""
    prompt_len = input_ids.shape[-1] if isinstance(input_ids, Tensor) and input_ids.dim() else 0
    if max_new_tokens is None:
        if max_length is None:
            raise ValueError("generate needs max_new_tokens or max_length (which counts the prompt)")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= prompt_len:
            raise ValueError(f"max_length ({max_length!r}) counts the prompt and must exceed its length "
                             f"({prompt_len}); or pass max_new_tokens")
        max_new_tokens = max_length - prompt_len
    if min_new_tokens is None:
        if min_length is not None and (isinstance(min_length, bool) or not isinstance(min_length, int)):
            raise ValueError(f"min_length must be an int; got {min_length!r}")
        min_new_tokens = 0 if min_length is None else min(max(0, min_length - prompt_len), max_new_tokens)
    return max_new_tokens, min_new_tokens


@torch.inference_mode()
def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int | None = None,
             min_new_tokens: int | None = None, max_length: int | None = None, min_length: int | None = None,
             do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             num_return_sequences: int = 1, generator: torch.Generator | None = None,
             streamer: Streamer | None = None, decode: str = "auto", compile_backend="inductor",
             use_cache: bool = True) -> Tensor:
    """Prompt + generated tokens (B * num_return_sequences, S + n), n <= max_new_tokens.

    Rows are left-padded (attention_mask 0 on the left); a row that emits eos is padded with
    pad_token_id afterwards; the loop stops when every row has finished or at max_new_tokens.
    `decode`: how each step after the prefill runs: "eager", "compile" (torch.compile fullgraph with
    `compile_backend`), "cuda_graph" (captured once per shape, replayed), or "auto" (cuda_graph on CUDA,
    eager on the CPU). Sampling draws from a seed taken from `generator` (or torch's global RNG).
    `max_length` / `min_length` count the prompt, as in transformers (max_new_tokens / min_new_tokens
    win when both are given); one of max_new_tokens and max_length is required. `use_cache=False`
    (transformers' slow path): every step runs the whole sequence, no KV cache; the same tokens.
    """
    config = model.config
    max_new_tokens, min_new_tokens = _new_token_limits(input_ids, max_new_tokens, min_new_tokens, max_length,
                                                       min_length)
    opts = GenerationOptions(
        config, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, num_return_sequences=num_return_sequences,
    )
    device = model.device
    if not use_cache and decode not in ("auto", "eager"):
        raise ValueError(f"use_cache=False runs the uncached eager step; decode={decode!r} needs the cache")
    mode = resolve_mode(decode if use_cache else "uncached", device)
    check_token_ids("input_ids", input_ids, config.vocab_size)
    input_ids = input_ids.to(device)
    if attention_mask is None:
        # As transformers: padding is inferred from pad tokens when pad differs from eos.
        if opts.pad_id not in opts.eos_ids and bool((input_ids == opts.pad_id).any()):
            attention_mask = (input_ids != opts.pad_id).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    elif tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                         f"got {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.to(device)
    if streamer is not None and input_ids.shape[0] * opts.num_return_sequences != 1:
        raise ValueError("streamer supports a single sequence (batch 1, num_return_sequences=1)")

    if opts.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(opts.num_return_sequences, 0)
        attention_mask = attention_mask.repeat_interleave(opts.num_return_sequences, 0)
    batch, prompt_len = input_ids.shape
    total = prompt_len + opts.max_new_tokens
    check_length_limits(config, total)
    # 2 x 32 bits, drawn on the CPU: the same seed gives the same tokens on every device
    seed = torch.randint(0, 2**32, (2,), generator=generator, dtype=torch.long,
                         device=generator.device if generator is not None else "cpu")

    decoder = decoder_for(model, batch, total, opts, mode, compile_backend)
    if streamer is not None:
        streamer.put(input_ids.cpu())
    decoder.start(input_ids, attention_mask, seed.to(device))  # the prefill and the first token
    generated = 1
    while True:
        if streamer is not None:
            streamer.put(decoder.next_tokens.cpu())
        if generated == opts.max_new_tokens or (opts.eos_ids and bool(decoder.finished.all())):
            break
        decoder.step()
        generated += 1
    if streamer is not None:
        streamer.end()
    return decoder.tokens[:, : prompt_len + generated].clone()
