"""Text generation: greedy and sampled decoding over a KV cache allocated once per call.

The cache, the token buffer and the attention-mask buffer are sized for prompt + max_new_tokens before
the first step and written in place. The first step runs the whole prompt, each later step one token
per row; logits are computed for the last position only. Logit processing follows transformers' order
and rules (repetition penalty, min new tokens, then temperature, top-k, top-p), so greedy output equals
transformers' token for token.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor

from .cache import CacheOverflowError
from .validation import check_token_ids

# Config keys that, where a config has them, bound the total sequence length.
LENGTH_LIMIT_KEYS = ("max_position_embeddings", "n_positions", "seq_length")


class Streamer(Protocol):
    """transformers' streamer protocol: put(prompt ids) once, put(new tokens) each step, end()."""

    def put(self, value: Tensor) -> None: ...

    def end(self) -> None: ...


# --------------------------------------------------------------------------------------------------
# Logit processing (each takes and returns fp32 logits (B, V))
# --------------------------------------------------------------------------------------------------
def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on every token already in the row: divide positive logits, multiply negative."""
    score = logits.gather(1, seen)
    score = torch.where(score < 0, score * penalty, score / penalty)
    return logits.scatter(1, seen, score)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep the k largest logits of each row (ties with the k-th kept), the rest -inf."""
    k = min(k, logits.shape[-1])
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (at least one)."""
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(-1).cumsum(-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -1] = False  # the most likely token always stays
    remove = remove_sorted.scatter(1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def process_logits(logits: Tensor, tokens: Tensor, new_tokens: int, opts: "GenerationOptions") -> Tensor:
    if opts.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, tokens, opts.repetition_penalty)
    if new_tokens < opts.min_new_tokens and opts.eos_ids:
        logits[:, opts.eos_ids] = float("-inf")
    if opts.do_sample:
        if opts.temperature != 1.0:
            logits = logits / opts.temperature
        if opts.top_k is not None and opts.top_k > 0:
            logits = top_k_filter(logits, opts.top_k)
        if opts.top_p is not None and opts.top_p < 1.0:
            logits = top_p_filter(logits, opts.top_p)
    return logits


def choose_tokens(logits: Tensor, do_sample: bool, generator: torch.Generator | None) -> Tensor:
    if not do_sample:
        return logits.argmax(-1)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


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
@torch.inference_mode()
def generate(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, max_new_tokens: int,
             min_new_tokens: int = 0, do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             num_return_sequences: int = 1, generator: torch.Generator | None = None,
             streamer: Streamer | None = None) -> Tensor:
    """Prompt + generated tokens (B * num_return_sequences, S + n), n <= max_new_tokens.

    Rows are left-padded (attention_mask 0 on the left); a row that emits eos is padded with
    pad_token_id afterwards; the loop stops when every row has finished or at max_new_tokens.
    """
    config = model.config
    opts = GenerationOptions(
        config, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, num_return_sequences=num_return_sequences,
    )
    device = model.device
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

    # Everything the loop writes is allocated here, once.
    cache = model.transformer.new_cache(batch, total, dtype=model.dtype, device=device)
    tokens = torch.full((batch, total), opts.pad_id, dtype=torch.long, device=device)
    tokens[:, :prompt_len] = input_ids
    mask = torch.ones((batch, total), dtype=attention_mask.dtype, device=device)
    mask[:, :prompt_len] = attention_mask
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    eos = torch.tensor(opts.eos_ids, dtype=torch.long, device=device)
    if streamer is not None:
        streamer.put(input_ids.cpu())

    step_ids = input_ids
    length = prompt_len
    for step in range(opts.max_new_tokens):
        logits = model.next_token_logits(step_ids, cache, mask[:, :length])  # (B, V) fp32
        logits = process_logits(logits, tokens[:, :length], step, opts)
        next_tokens = choose_tokens(logits, opts.do_sample, generator)
        next_tokens = torch.where(finished, opts.pad_id, next_tokens)
        tokens[:, length] = next_tokens
        length += 1
        if streamer is not None:
            streamer.put(next_tokens.cpu())
        if eos.numel():
            finished |= torch.isin(next_tokens, eos)
            if bool(finished.all()):
                break
        step_ids = next_tokens[:, None]
    if streamer is not None:
        streamer.end()
    return tokens[:, :length]
