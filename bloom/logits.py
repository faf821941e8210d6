"""Logit processing and token choice for generation, all of fixed shapes (so a decode step that runs
them can be compiled or captured in a CUDA graph).

Each processor takes and returns fp32 logits (B, V). The order and rules are transformers': repetition
penalty, min new tokens, then temperature, top-k, top-p; greedy output equals transformers' token for
token. Sampling is inverse-CDF sampling with one uniform number per row drawn from a counter-based hash
of (seed, step, row): no RNG state lives in the step, so replaying a captured step draws new numbers,
and the same seed gives the same tokens on any device, eager, compiled or captured.
"""

from __future__ import annotations

import torch
from torch import Tensor


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on every token already in the row (seen: bool (B, V)): divide positive logits,
    multiply negative ones."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def seen_tokens(tokens: Tensor, vocab_size: int, ignore_before: Tensor | None = None) -> Tensor:
    """bool (B, V): the tokens present in each row of `tokens` (B, L), not counting positions before
    `ignore_before` (B,) (a row's left padding: transformers 5 does not penalise it)."""
    present = torch.ones_like(tokens, dtype=torch.int32)
    if ignore_before is not None:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        present = (positions[None, :] >= ignore_before[:, None]).to(torch.int32)
    counts = torch.zeros((tokens.shape[0], vocab_size), dtype=torch.int32, device=tokens.device)
    return counts.scatter_add_(1, tokens, present) > 0


def padding_lengths(attention_mask: Tensor) -> Tensor:
    """Each row's left padding: the index of its first real position (transformers' rule)."""
    return (attention_mask != 0).int().argmax(dim=1)


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


def suppress_eos_before_min(logits: Tensor, generated: Tensor | int, opts) -> Tensor:
    """eos at -inf while fewer than opts.min_new_tokens tokens were made (transformers' min length)."""
    if opts.min_new_tokens > 0 and opts.eos_ids:
        eos = list(opts.eos_ids)
        if isinstance(generated, int):  # the eager search loop counts on the host
            if generated < opts.min_new_tokens:
                logits[:, eos] = float("-inf")
        else:  # a static step: a device counter, no host sync
            logits[:, eos] = logits[:, eos].masked_fill(generated < opts.min_new_tokens, float("-inf"))
    return logits


def apply_temperature(logits: Tensor, temperature: float) -> Tensor:
    """logits / temperature, as transformers; where that overflows to +inf (a temperature so small,
    e.g. 1e-45, that every positive logit becomes +inf and their order is lost) the row is divided
    after subtracting its max instead: the same softmax, and the argmax as the limit T -> 0."""
    scaled = logits / temperature
    if temperature < 1.0:  # only a division by less than 1 can overflow a finite logit
        shifted = (logits - logits.amax(-1, keepdim=True)) / temperature
        scaled = torch.where(torch.isposinf(scaled.amax(-1, keepdim=True)), shifted, scaled)
    return scaled


def apply_warpers(logits: Tensor, opts) -> Tensor:
    """Sampling's temperature, top-k, top-p (transformers' warpers, last in its order)."""
    if opts.do_sample:
        if opts.temperature != 1.0:
            logits = apply_temperature(logits, opts.temperature)
        if opts.top_k is not None and opts.top_k > 0:
            logits = top_k_filter(logits, opts.top_k)
        if opts.top_p is not None and opts.top_p < 1.0:
            logits = top_p_filter(logits, opts.top_p)
    return logits


def process_logits(logits: Tensor, seen: Tensor | None, generated: Tensor, opts) -> Tensor:
    """transformers' processors in transformers' order. `generated`: long () tokens made so far;
    `opts`: a GenerationOptions."""
    if opts.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, opts.repetition_penalty)
    return apply_warpers(suppress_eos_before_min(logits, generated, opts), opts)


_MASK32 = 0xFFFFFFFF


def _mul32(x: Tensor, constant: int) -> Tensor:
    """(x * constant) mod 2**32 for x in [0, 2**32) held in int64, without int64 overflow (which C++ code
    generated by torch.compile would be allowed to miscompile): multiply by 16-bit halves."""
    low = x * (constant & 0xFFFF)
    high = ((x * (constant >> 16)) & 0xFFFF) << 16
    return (low + high) & _MASK32


def hash32(x: Tensor) -> Tensor:
    """A 32-bit integer hash (Wellons' lowbias32) of int64 values in [0, 2**32)."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_per_row(seed: Tensor, step: Tensor, rows: int) -> Tensor:
    """fp64 (B,) uniform numbers in (0, 1), a pure function of (seed (2,) int64 in [0, 2**32), step,
    row)."""
    row = torch.arange(rows, device=seed.device, dtype=torch.int64)
    x = hash32(hash32(seed[0] ^ hash32(step + 0x9E3779B9)) ^ seed[1]) ^ row
    bits = hash32(hash32(x) + row * 0x632BE5AB)  # 32 bits per row
    return (bits.to(torch.float64) + 0.5) / 2.0**32


def sample(logits: Tensor, seed: Tensor, step: Tensor) -> Tensor:
    """One token per row from softmax(logits) (filtered tokens at -inf are never drawn). A row whose
    largest logit is +inf (the model's own logits overflowed; apply_temperature keeps a tiny
    temperature from doing it) draws among its +inf tokens, the limit of softmax, where softmax itself
    would give NaN."""
    peak = logits.amax(-1, keepdim=True)
    # exp(logits - peak): softmax before normalising (the cdf's last value normalises the draw)
    weights = torch.where(torch.isposinf(peak), (logits == peak).to(logits.dtype), (logits - peak).exp())
    cdf = weights.to(torch.float64).cumsum(-1)  # fp64: exact enough over 250k tokens
    target = uniform_per_row(seed, step, logits.shape[0]) * cdf[:, -1]
    # the first token whose cdf exceeds the target: a token of zero probability never does
    token = torch.searchsorted(cdf, target[:, None], right=True).squeeze(1)
    return token.clamp_(max=logits.shape[-1] - 1)


def choose_tokens(logits: Tensor, do_sample: bool, seed: Tensor, step: Tensor) -> Tensor:
    return sample(logits, seed, step) if do_sample else logits.argmax(-1)
