"""The logit processors that depend on the tokens so far in ways a fixed-shape step cannot bake in:
no_repeat_ngram_size, bad_words_ids, forced_eos_token_id and the caller's own `logits_processor` /
`stopping_criteria` callables. They run in the eager search loop (bloom/search.py), in transformers'
order (see `SearchProcessors.__call__`), with transformers' rules, so the same options give the same
tokens as transformers' generate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .logits import apply_repetition_penalty, apply_warpers, seen_tokens, suppress_eos_before_min


def _callables(name: str, value) -> list[Callable]:
    """A list (or transformers' LogitsProcessorList / StoppingCriteriaList, both lists) of callables."""
    if value is None:
        return []
    if callable(value) and not isinstance(value, (list, tuple)):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(callable(f) for f in value):
        raise TypeError(f"{name} must be a list of callables (input_ids, scores) -> ...; got {value!r}")
    return list(value)


def check_bad_words(bad_words_ids, vocab_size: int) -> list[list[int]]:
    if bad_words_ids is None:
        return []
    ok = isinstance(bad_words_ids, (list, tuple)) and len(bad_words_ids) > 0 and all(
        isinstance(seq, (list, tuple)) and len(seq) > 0
        and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in seq)
        for seq in bad_words_ids)
    if not ok:
        raise ValueError(f"bad_words_ids must be a non-empty list of non-empty lists of token ids in "
                         f"[0, {vocab_size}); got {bad_words_ids!r}")
    return [list(seq) for seq in bad_words_ids]


def banned_ngram_tokens(tokens: Tensor, n: int) -> list[list[int]]:
    """Per row, the tokens that would repeat an n-gram already in the row (tokens: (B, L), prompt
    included, as transformers counts them)."""
    rows = tokens.tolist()
    length = tokens.shape[1]
    banned = []
    for row in rows:
        if length + 1 < n:
            banned.append([])
            continue
        prefix = tuple(row[length - n + 1:]) if n > 1 else ()
        banned.append([row[i + n - 1] for i in range(length - n + 1) if tuple(row[i:i + n - 1]) == prefix])
    return banned


class SearchProcessors:
    """Every logit processor of one generate call, applied in transformers' order: repetition penalty,
    no-repeat n-grams, bad words, min new tokens, forced eos, the caller's logits_processor, then (when
    sampling) temperature, top-k, top-p."""

    def __init__(self, opts, *, vocab_size: int, max_length: int, no_repeat_ngram_size=None,
                 bad_words_ids=None, forced_eos_token_id=None, logits_processor=None) -> None:
        self.opts, self.max_length = opts, max_length
        if no_repeat_ngram_size is not None and (isinstance(no_repeat_ngram_size, bool)
                                                 or not isinstance(no_repeat_ngram_size, int)
                                                 or no_repeat_ngram_size < 0):
            raise ValueError(f"no_repeat_ngram_size must be an int >= 0; got {no_repeat_ngram_size!r}")
        self.ngram = no_repeat_ngram_size or 0
        # transformers drops a bad word that is exactly an eos token (eos stays reachable)
        self.bad_words = [seq for seq in check_bad_words(bad_words_ids, vocab_size)
                          if not (len(seq) == 1 and seq[0] in opts.eos_ids)]
        forced = forced_eos_token_id
        if forced is not None:
            forced = [forced] if isinstance(forced, int) and not isinstance(forced, bool) else forced
            if not (isinstance(forced, (list, tuple)) and forced
                    and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in forced)):
                raise ValueError(f"forced_eos_token_id must be a token id or a list of them in [0, {vocab_size}); "
                                 f"got {forced_eos_token_id!r}")
        self.forced_eos = list(forced) if forced is not None else None
        self.custom = _callables("logits_processor", logits_processor)
        self.ignore_before: Tensor | None = None  # per row, the left padding the repetition penalty skips

    def __call__(self, tokens: Tensor, scores: Tensor, generated: int, warp: bool = True) -> Tensor:
        """Processed fp32 scores (N, V) for rows whose tokens so far are `tokens` (N, L); `generated`:
        new tokens made so far. `warp=False`: no sampling warpers (beam search)."""
        opts = self.opts
        if opts.repetition_penalty != 1.0:
            seen = seen_tokens(tokens, scores.shape[1], self.ignore_before)
            scores = apply_repetition_penalty(scores, seen, opts.repetition_penalty)
        if self.ngram:
            for row, banned in enumerate(banned_ngram_tokens(tokens, self.ngram)):
                if banned:
                    scores[row, banned] = float("-inf")
        if self.bad_words:
            scores = self._ban_bad_words(tokens, scores)
        scores = suppress_eos_before_min(scores, generated, opts)
        if self.forced_eos is not None and tokens.shape[1] == self.max_length - 1:
            forced = torch.full_like(scores, float("-inf"))
            forced[:, self.forced_eos] = 0.0
            scores = forced
        for processor in self.custom:
            scores = processor(tokens, scores)
        return apply_warpers(scores, opts) if warp else scores

    def _ban_bad_words(self, tokens: Tensor, scores: Tensor) -> Tensor:
        bias = torch.zeros_like(scores)
        rows = tokens.tolist()
        for seq in self.bad_words:
            *prefix, last = seq
            if len(prefix) > tokens.shape[1]:
                continue
            for row, ids in enumerate(rows):
                if not prefix or ids[len(ids) - len(prefix):] == prefix:
                    bias[row, last] = float("-inf")
        return scores + bias


class StoppingCriteria:
    """eos (a row that made an eos token stops), the length limit, and the caller's `stopping_criteria`
    (each called as transformers calls them: (input_ids, scores) -> bool or bool (N,))."""

    def __init__(self, eos_ids: Sequence[int], stopping_criteria=None) -> None:
        self.eos_ids = list(eos_ids)
        self.custom = _callables("stopping_criteria", stopping_criteria)

    def __call__(self, tokens: Tensor, scores) -> Tensor:
        done = torch.zeros(tokens.shape[0], dtype=torch.bool, device=tokens.device)
        if self.eos_ids:
            done |= torch.isin(tokens[:, -1], torch.tensor(self.eos_ids, device=tokens.device))
        for criterion in self.custom:
            verdict = criterion(tokens, scores)
            done |= torch.as_tensor(verdict, dtype=torch.bool, device=tokens.device).expand(tokens.shape[0])
        return done
