"""Text generation: greedy and sampled decoding on a static decode step (bloom/decode_step.py).

The cache, the token buffer and the attention-mask buffer are sized for prompt + max_new_tokens (a
capacity bucket) and written in place; they are kept on the model for the next call of that shape.
The prefill runs the whole prompt (logits of the last position only); each later step is the same
fixed-shape function: eager, compiled, or on CUDA one captured CUDA graph (all layers, logit
processing and the choice of the token) replayed per token. Logit processing follows transformers'
order and rules (bloom/logits.py), so greedy output equals transformers' token for token.
"""

from __future__ import annotations

import contextlib
import math
from typing import Protocol

import torch
from torch import Tensor

from .cache import CacheOverflowError
from .decode_step import decoder_for, resolve_mode
from .outputs import GenerateDecoderOnlyOutput
from .processors import SearchProcessors, StoppingCriteria
from .search import beam_search, check_beam_options, sample_search
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
        def finite_positive(name, value):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0; got {value!r}")

        if not isinstance(do_sample, bool):
            raise ValueError(f"do_sample must be True or False; got {do_sample!r}")
        finite_positive("temperature", temperature)
        if top_k is not None:
            positive_int("top_k", top_k, 0)
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p!r}")
        finite_positive("repetition_penalty", repetition_penalty)
        if num_return_sequences > 1 and not do_sample:
            raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy rows would be identical)")

        eos = config.eos_token_id if eos_token_id is None else _plain_ids(eos_token_id)
        self.eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        for token in self.eos_ids:
            if not (isinstance(token, int) and 0 <= token < config.vocab_size):
                raise ValueError(f"eos_token_id must be in [0, {config.vocab_size}); got {eos!r}")
        pad = config.pad_token_id if pad_token_id is None else _plain_ids(pad_token_id)
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


def _plain_ids(value):
    """Token ids given as an integer tensor (as transformers' code passes them) as Python ints."""
    if isinstance(value, Tensor) and not value.is_floating_point() and value.dim() <= 1:
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [_plain_ids(v) for v in value]
    return value


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
def new_token_limits(input_ids, max_new_tokens, min_new_tokens, max_length, min_length) -> tuple[int, int]:
    """(max_new_tokens, min_new_tokens) from transformers' two ways of saying them; input_ids a tensor
    or array (the Flax generate's too)."""
    shape = getattr(input_ids, "shape", ())
    prompt_len = shape[-1] if len(shape) else 0
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
def generate(model, input_ids: Tensor | None, attention_mask: Tensor | None = None, *, max_new_tokens: int | None = None,
             min_new_tokens: int | None = None, max_length: int | None = None, min_length: int | None = None,
             do_sample: bool = False, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, repetition_penalty: float = 1.0,
             eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None,
             num_return_sequences: int = 1, generator: torch.Generator | None = None,
             streamer: Streamer | None = None, decode: str = "auto", compile_backend="inductor",
             use_cache: bool = True, num_beams: int = 1, length_penalty: float = 1.0, early_stopping=False,
             no_repeat_ngram_size: int | None = None, bad_words_ids=None, forced_eos_token_id=None,
             logits_processor=None, stopping_criteria=None, output_scores: bool = False,
             output_logits: bool = False, return_dict_in_generate: bool = False,
             inputs_embeds: Tensor | None = None):
    """Prompt + generated tokens (B * num_return_sequences, S + n), n <= max_new_tokens.

    Rows are left-padded (attention_mask 0 on the left); a row that emits eos is padded with
    pad_token_id afterwards; the loop stops when every row has finished or at max_new_tokens.
    `decode`: how each step after the prefill runs: "eager", "compile" (torch.compile fullgraph with
    `compile_backend`), "cuda_graph" (captured once per shape, replayed), or "auto" (cuda_graph on CUDA,
    eager on the CPU). Sampling draws from a seed taken from `generator` (or torch's global RNG).
    `max_length` / `min_length` count the prompt, as in transformers (max_new_tokens / min_new_tokens
    win when both are given); one of max_new_tokens and max_length is required. `use_cache=False`
    (transformers' slow path): every step runs the whole sequence, no KV cache; the same tokens.

    transformers' other options run on the eager search loop (bloom/search.py), as transformers runs
    them: `num_beams` > 1 (with `length_penalty`, `early_stopping`, `num_return_sequences` <= num_beams),
    `no_repeat_ngram_size`, `bad_words_ids`, `forced_eos_token_id`, `logits_processor` and
    `stopping_criteria` (lists of callables (input_ids, scores)), `output_scores` / `output_logits`
    with `return_dict_in_generate=True` (a GenerateDecoderOnlyOutput, or GenerateBeamDecoderOnlyOutput
    with `sequences_scores` and `beam_indices`), and `inputs_embeds` prompts (input_ids None; the result
    holds the new tokens only, as transformers'). Without them nothing changes: the static step runs.
    """
    config = model.config
    if inputs_embeds is not None:
        input_ids = _embeds_prompt(model, input_ids, inputs_embeds, attention_mask)
    beams = num_beams != 1
    if beams:
        check_beam_options(num_beams, length_penalty, early_stopping, num_return_sequences, do_sample)
    max_new_tokens, min_new_tokens = new_token_limits(input_ids, max_new_tokens, min_new_tokens, max_length,
                                                       min_length)
    opts = GenerationOptions(
        config, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id,
        num_return_sequences=1 if beams else num_return_sequences,
    )
    for name, flag in (("output_scores", output_scores), ("output_logits", output_logits),
                       ("return_dict_in_generate", return_dict_in_generate)):
        if not isinstance(flag, bool):
            raise ValueError(f"{name} must be a bool; got {flag!r}")
    search = beams or inputs_embeds is not None or output_scores or output_logits or any(
        v not in (None, 0) for v in (no_repeat_ngram_size, bad_words_ids, forced_eos_token_id, logits_processor,
                                     stopping_criteria))
    device = model.device
    if search and (not use_cache or decode not in ("auto", "eager")):
        raise ValueError("beam search, no_repeat_ngram_size, bad_words_ids, forced_eos_token_id, logits_processor, "
                         "stopping_criteria, output_scores/output_logits and inputs_embeds run on the eager cached "
                         f"loop; decode={decode!r}, use_cache={use_cache!r} cannot")
    if not use_cache and decode not in ("auto", "eager"):
        raise ValueError(f"use_cache=False runs the uncached eager step; decode={decode!r} needs the cache")
    mode = resolve_mode(decode if use_cache else "uncached", device)
    if inputs_embeds is None:
        check_token_ids("input_ids", input_ids, config.vocab_size)
    input_ids = input_ids.to(device)
    if attention_mask is None and inputs_embeds is not None:
        attention_mask = torch.ones(inputs_embeds.shape[:2], dtype=torch.long, device=device)
    elif attention_mask is None:
        # As transformers: padding is inferred from pad tokens when pad differs from eos.
        if opts.pad_id not in opts.eos_ids and bool((input_ids == opts.pad_id).any()):
            attention_mask = (input_ids != opts.pad_id).long()
        else:
            attention_mask = torch.ones_like(input_ids)
    elif not isinstance(attention_mask, Tensor):
        raise TypeError(f"attention_mask must be a torch.Tensor (batch, sequence) of 0/1; got "
                        f"{type(attention_mask).__name__}")
    elif inputs_embeds is None and tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                         f"got {tuple(attention_mask.shape)}")
    attention_mask = attention_mask.to(device)
    if streamer is not None and not (callable(getattr(streamer, "put", None)) and callable(getattr(streamer, "end", None))):
        raise TypeError(f"streamer must have put(tensor) and end() methods (transformers' streamer protocol); "
                        f"got {type(streamer).__name__}")
    if streamer is not None and input_ids.shape[0] * opts.num_return_sequences != 1:
        raise ValueError("streamer supports a single sequence (batch 1, num_return_sequences=1)")

    if opts.num_return_sequences > 1:
        input_ids = input_ids.repeat_interleave(opts.num_return_sequences, 0)
        attention_mask = attention_mask.repeat_interleave(opts.num_return_sequences, 0)
        if inputs_embeds is not None:
            inputs_embeds = inputs_embeds.repeat_interleave(opts.num_return_sequences, 0)
    batch, prompt_len = input_ids.shape
    total = attention_mask.shape[1] + opts.max_new_tokens
    check_length_limits(config, total)
    # 2 x 32 bits, drawn on the CPU: the same seed gives the same tokens on every device
    seed = torch.randint(0, 2**32, (2,), generator=generator, dtype=torch.long,
                         device=generator.device if generator is not None else "cpu")

    if search:
        processors = SearchProcessors(opts, vocab_size=config.vocab_size, max_length=prompt_len + opts.max_new_tokens,
                                      no_repeat_ngram_size=no_repeat_ngram_size, bad_words_ids=bad_words_ids,
                                      forced_eos_token_id=forced_eos_token_id, logits_processor=logits_processor)
        stopping = StoppingCriteria(opts.eos_ids, stopping_criteria)
        outputs = dict(inputs_embeds=None if inputs_embeds is None else inputs_embeds.to(device, model.dtype),
                       output_scores=output_scores, output_logits=output_logits, return_dict=return_dict_in_generate)
        if beams:
            if streamer is not None:
                raise ValueError("streamer is not supported with beam search (as in transformers)")
            with _allocating(total, batch * num_beams):
                return beam_search(model, input_ids, attention_mask, opts, processors, stopping,
                                   num_beams=num_beams, length_penalty=float(length_penalty),
                                   early_stopping=early_stopping, num_return_sequences=num_return_sequences,
                                   **outputs)
        if streamer is not None:
            streamer.put(input_ids.cpu())
        with _allocating(total, batch):
            result = sample_search(model, input_ids, attention_mask, opts, processors, stopping, seed.to(device),
                                   streamer=streamer, **outputs)
        if streamer is not None:
            streamer.end()
        return result

    with _allocating(total, batch):
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
    sequences = decoder.tokens[:, : prompt_len + generated].clone()
    return GenerateDecoderOnlyOutput(sequences=sequences) if return_dict_in_generate else sequences


@contextlib.contextmanager
def _allocating(total: int, rows: int):
    """An allocator failure in generate (the KV cache for `total` positions above all) as one clear
    error naming max_new_tokens, not the allocator's raw message."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as err:
        if not isinstance(err, torch.OutOfMemoryError) and "allocate" not in str(err):
            raise
        raise CacheOverflowError(
            f"generate ran out of memory for {rows} rows x (prompt + max_new_tokens = {total}) positions (the KV "
            f"cache is allocated for all of them up front); lower max_new_tokens or the batch size") from None


def _embeds_prompt(model, input_ids, inputs_embeds, attention_mask) -> Tensor:
    """The (B, 0) ids of an inputs_embeds prompt (transformers' decoder-only rule: the result then
    holds the new tokens only), after checking the embeddings."""
    hidden = model.config.hidden_size
    if not isinstance(inputs_embeds, Tensor) or inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != hidden \
            or not inputs_embeds.is_floating_point() or inputs_embeds.shape[1] == 0:
        got = tuple(inputs_embeds.shape) if isinstance(inputs_embeds, Tensor) else type(inputs_embeds).__name__
        raise ValueError(f"inputs_embeds must be a float tensor (batch, seq >= 1, {hidden}); got {got}")
    if input_ids is not None:
        raise ValueError("pass input_ids or inputs_embeds to generate, not both")
    if attention_mask is not None and tuple(attention_mask.shape) != tuple(inputs_embeds.shape[:2]):
        raise ValueError(f"attention_mask must have the shape of inputs_embeds' first two dims "
                         f"{tuple(inputs_embeds.shape[:2])}; got {tuple(attention_mask.shape)}")
    return torch.zeros((inputs_embeds.shape[0], 0), dtype=torch.long, device=inputs_embeds.device)
