"""The eager decoding loops behind generate's options that a fixed-shape step cannot bake in: beam
search, no-repeat n-grams, bad words, forced eos, the caller's logits processors and stopping
criteria, per-step scores and logits, `inputs_embeds` prompts. transformers' algorithms (its 5.x
vectorised beam search included), so the same weights and options give the same tokens and scores.
Plain greedy and sampled generation never comes here: it runs on the static step (decode_step.py).
Sampling draws from the same counter-based sampler as the static step (bloom/logits.py), so a seed
gives the same tokens whichever loop runs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .logits import choose_tokens, padding_lengths
from .outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from .processors import SearchProcessors, StoppingCriteria

NEG = -1.0e9  # transformers' "impossible" beam score


class Prompt:
    """The model's prompt-side state for one generate call: the cache and mask, fed one token at a
    time after the prefill (ids or embeddings)."""

    def __init__(self, model, rows: int, capacity: int, attention_mask: Tensor):
        self.model = model
        self.cache = model.transformer.new_cache(rows, capacity, dtype=model.dtype, device=model.device)
        self.mask = attention_mask

    def prefill(self, input_ids: Tensor | None, inputs_embeds: Tensor | None) -> Tensor:
        embeds = self.model.transformer.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        return self._logits(embeds)

    def feed(self, tokens: Tensor) -> Tensor:
        """fp32 logits (N, V) after appending tokens (N,)."""
        self.mask = torch.cat([self.mask, self.mask.new_ones((self.mask.shape[0], 1))], dim=1)
        return self._logits(self.model.transformer.word_embeddings(tokens[:, None]))

    def reorder(self, rows: Tensor) -> None:
        """Keep rows `rows` (N,) of the cache and mask (beam search's survivors), in place."""
        for store in (self.cache.keys, self.cache.values):
            for buffer in store:
                buffer.copy_(buffer.index_select(0, rows))
        self.mask = self.mask.index_select(0, rows)

    def _logits(self, embeds: Tensor) -> Tensor:
        model = self.model
        hidden, _, _ = model.transformer.run(embeds, self.cache, self.mask)
        return model.lm_head(hidden[:, -1]).float()


def sample_search(model, input_ids: Tensor, attention_mask: Tensor, opts, processors: SearchProcessors,
                  stopping: StoppingCriteria, seed: Tensor, *, inputs_embeds: Tensor | None = None,
                  output_scores=False, output_logits=False, return_dict=False, streamer=None):
    """Greedy or sampled decoding, one eager step per token (transformers' `_sample`)."""
    rows = input_ids.shape[0]
    processors.ignore_before = padding_lengths(attention_mask) if input_ids.shape[1] else None
    prompt = Prompt(model, rows, attention_mask.shape[1] + opts.max_new_tokens, attention_mask)
    tokens = input_ids  # (N, L): the prompt (empty for an inputs_embeds prompt) and the new tokens
    unfinished = torch.ones(rows, dtype=torch.bool, device=tokens.device)
    scores, raw = ([] if output_scores else None), ([] if output_logits else None)
    logits = prompt.prefill(input_ids if inputs_embeds is None else None, inputs_embeds)
    step = torch.zeros((), dtype=torch.long, device=tokens.device)
    for generated in range(opts.max_new_tokens):
        processed = processors(tokens, logits.clone(), generated)
        if scores is not None:
            scores.append(processed)
        if raw is not None:
            raw.append(logits)
        step.fill_(generated)
        chosen = choose_tokens(processed, opts.do_sample, seed, step)
        chosen = torch.where(unfinished, chosen, opts.pad_id)
        tokens = torch.cat([tokens, chosen[:, None]], dim=1)
        if streamer is not None:
            streamer.put(chosen.cpu())
        unfinished &= ~stopping(tokens, tuple(scores) if scores is not None else None)
        if generated + 1 == opts.max_new_tokens or not bool(unfinished.any()):
            break
        logits = prompt.feed(chosen)
    if not return_dict:
        return tokens
    return GenerateDecoderOnlyOutput(sequences=tokens, scores=None if scores is None else tuple(scores),
                                     logits=None if raw is None else tuple(raw), cache=prompt.cache)


def check_beam_options(num_beams, length_penalty, early_stopping, num_return_sequences, do_sample) -> None:
    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1; got {num_beams!r}")
    if isinstance(length_penalty, bool) or not isinstance(length_penalty, (int, float)):
        raise ValueError(f"length_penalty must be a number; got {length_penalty!r}")
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never'; got {early_stopping!r}")
    if num_beams > 1 and do_sample:
        raise ValueError("do_sample=True with num_beams > 1 (beam sampling) is not implemented; "
                         "use num_beams=1 or do_sample=False")
    if num_return_sequences > num_beams:
        raise ValueError(f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams})")


def _gather(tensor: Tensor, index: Tensor) -> Tensor:
    """tensor (B, K, ...) at beams index (B, J) -> (B, J, ...)."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def beam_search(model, input_ids: Tensor, attention_mask: Tensor, opts, processors: SearchProcessors,
                stopping: StoppingCriteria, *, num_beams: int, length_penalty: float, early_stopping,
                num_return_sequences: int, inputs_embeds: Tensor | None = None, output_scores=False,
                output_logits=False, return_dict=False):
    """transformers 5's vectorised beam search (`_beam_search`): every beam of every row advances at
    once; of the top 2K continuations (K = num_beams, more with several eos ids) the best K that did
    not stop keep running, and those that stopped among the top K compete, length-penalised, for the K
    finished slots. Returns the best num_return_sequences finished sequences per row."""
    batch, prompt_len = input_ids.shape
    device = input_ids.device
    max_length = prompt_len + opts.max_new_tokens
    beams_to_keep = max(2, 1 + len(opts.eos_ids)) * num_beams
    top_num_beam_mask = torch.arange(beams_to_keep, device=device) < num_beams
    # transformers' fill value: `pad or eos[0]` (so a pad id of 0 gives eos[0]), -1 without either
    fill = opts.pad_id or (opts.eos_ids[0] if opts.eos_ids else -1)

    running_sequences = torch.full((batch, num_beams, max_length), fill, dtype=torch.long, device=device)
    running_sequences[:, :, :prompt_len] = input_ids[:, None]
    sequences = running_sequences.clone()
    running_scores = torch.zeros((batch, num_beams), device=device)
    running_scores[:, 1:] = NEG
    beam_scores = torch.full((batch, num_beams), NEG, device=device)
    finished = torch.zeros((batch, num_beams), dtype=torch.bool, device=device)
    improvable = torch.ones((batch, 1), dtype=torch.bool, device=device)
    running_indices = torch.full((batch, num_beams, opts.max_new_tokens), -1, dtype=torch.int32, device=device)
    beam_indices = running_indices.clone()
    all_scores, raw = ([] if output_scores else None), ([] if output_logits else None)

    flat_mask = attention_mask.repeat_interleave(num_beams, 0)
    processors.ignore_before = padding_lengths(flat_mask) if prompt_len else None
    prompt = Prompt(model, batch * num_beams, flat_mask.shape[1] + opts.max_new_tokens, flat_mask)
    logits = prompt.prefill(None if inputs_embeds is not None else input_ids.repeat_interleave(num_beams, 0),
                            None if inputs_embeds is None else inputs_embeds.repeat_interleave(num_beams, 0))
    cur_len = prompt_len
    batch_offset = torch.arange(batch, device=device)[:, None] * num_beams
    while True:
        flat_tokens = running_sequences[:, :, :cur_len].reshape(batch * num_beams, cur_len)
        log_probs = processors(flat_tokens, F.log_softmax(logits, dim=-1), cur_len - prompt_len, warp=False)
        if raw is not None:
            raw.append(logits.clone())
        if all_scores is not None:
            all_scores.append(log_probs.clone())
        vocab = log_probs.shape[-1]
        accumulated = (log_probs.view(batch, num_beams, vocab) + running_scores[:, :, None]).view(batch, -1)

        # the top continuations over every beam of a row
        topk_scores, topk_flat = torch.topk(accumulated, k=beams_to_keep)
        topk_beam = topk_flat // vocab
        topk_sequences = _gather(running_sequences, topk_beam)
        topk_sequences[:, :, cur_len] = topk_flat % vocab
        topk_indices = _gather(running_indices, topk_beam)
        topk_indices[:, :, cur_len - prompt_len] = (topk_beam + batch_offset).to(torch.int32)
        flat_candidates = topk_sequences[:, :, : cur_len + 1].reshape(batch * beams_to_keep, cur_len + 1)
        stops = stopping(flat_candidates, tuple(all_scores) if all_scores is not None else None)
        if cur_len + 1 >= max_length:
            stops = torch.ones_like(stops)
        stops = stops.view(batch, beams_to_keep)

        # the best num_beams that go on
        alive_scores = topk_scores + stops.float() * NEG
        keep = torch.topk(alive_scores, k=num_beams)[1]
        running_sequences = _gather(topk_sequences, keep)
        running_scores = _gather(alive_scores, keep)
        running_indices = _gather(topk_indices, keep)

        # the ones that stopped among the top num_beams compete for the finished slots
        just_finished = stops & top_num_beam_mask[None, :]
        penalised = topk_scores / ((cur_len + 1 - prompt_len) ** length_penalty)
        full = finished.all(dim=-1, keepdim=True) & (early_stopping is True)
        penalised = penalised + full.float() * NEG + (~improvable).float() * NEG + (~just_finished).float() * NEG
        merged_scores = torch.cat([beam_scores, penalised], dim=1)
        best = torch.topk(merged_scores, k=num_beams)[1]
        sequences = _gather(torch.cat([sequences, topk_sequences], dim=1), best)
        beam_scores = _gather(merged_scores, best)
        beam_indices = _gather(torch.cat([beam_indices, topk_indices], dim=1), best)
        finished = _gather(torch.cat([finished, just_finished], dim=1), best)

        survivors = running_indices[:, :, cur_len - prompt_len].reshape(-1).long()
        cur_len += 1
        # can a running beam still beat the worst finished one? (transformers' heuristic)
        if early_stopping == "never" and length_penalty > 0.0:
            best_length = max_length - prompt_len
        else:
            best_length = cur_len - prompt_len
        best_running = running_scores[:, :1] / (best_length ** length_penalty)
        worst_finished = torch.where(finished, beam_scores.min(dim=1, keepdim=True)[0], NEG)
        improvable = improvable & (best_running > worst_finished).any(dim=-1, keepdim=True)
        open_beams = not (bool(finished.all()) and early_stopping is True)
        if not (bool(improvable.any()) and open_beams and not bool(stops.all())):
            break
        prompt.reorder(survivors)
        logits = prompt.feed(running_sequences[:, :, cur_len - 1].reshape(-1))

    sequences = sequences[:, :num_return_sequences].reshape(batch * num_return_sequences, -1)
    beam_scores = beam_scores[:, :num_return_sequences].reshape(-1)
    beam_indices = beam_indices[:, :num_return_sequences].reshape(batch * num_return_sequences, -1)
    generated = int((beam_indices >= 0).sum(dim=1).max())
    sequences = sequences[:, : prompt_len + generated]
    if not return_dict:
        return sequences
    return GenerateBeamDecoderOnlyOutput(
        sequences=sequences, sequences_scores=beam_scores if output_scores else None,
        scores=None if all_scores is None else tuple(all_scores), logits=None if raw is None else tuple(raw),
        beam_indices=beam_indices[:, :generated], cache=prompt.cache)
