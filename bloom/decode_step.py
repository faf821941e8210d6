"""The static decode step: every buffer a generation writes, allocated once per (batch, capacity), and
one step function whose shapes and addresses never change — so it can run eagerly, be compiled
(torch.compile, fullgraph) or be captured in a CUDA graph and replayed.

State (all on the model's device, written in place):
    tokens (B, C)   prompt + generated ids; mask (B, C) 1 at every slot written so far, 0 after
    position ()     the slot of the last written token (the one the next step feeds)
    generated ()    tokens generated so far; finished (B,) rows that emitted eos
    seen (B, V)     tokens present in each row (repetition penalty only); seed (2,) sampling seed
    cache           BloomCache of capacity C: a step writes its keys/values at `position` and attends
                    over all C slots, the unwritten ones hidden by the mask

A step: feed tokens[:, position], write the next token at position + 1. The prefill (the prompt, of any
length) runs outside the step through the same `advance` so the first token is chosen the same way.

Decoders are cached on the model per (batch, capacity bucket, dtype, device, processing options), at
most MAX_CACHED per model, so a second similar `generate` reuses the buffers and the captured graph
or compiled step: nothing is allocated, compiled or captured again.
"""

from __future__ import annotations

from collections import Counter, OrderedDict

import torch
from torch import Tensor

import bloom_kernels as bk

from .logits import choose_tokens, padding_lengths, process_logits, seen_tokens

MODES = ("auto", "eager", "compile", "cuda_graph", "uncached")  # uncached: generate(use_cache=False)
GUARDED_CALLS = 3  # compiled-step calls that check dynamo's guards before they are skipped
MAX_CACHED = 2  # decoders kept per model (each holds a KV cache: B x C x layers x 2 x E)

# How many times a step was compiled (torch.compile wrapper made) or captured; tests count them.
build_counts: Counter = Counter()


def capacity_bucket(total: int) -> int:
    """Capacity for prompt + max_new_tokens = total: rounded up (64 up to 512, then 256) so that nearby
    requests share one decoder; attention over the unused slots is masked and cheap."""
    step = 64 if total <= 512 else 256
    return -(-total // step) * step


class StaticDecoder:
    def __init__(self, model, batch: int, capacity: int, opts, device, dtype, mode: str,
                 compile_backend="inductor"):
        self.model, self.opts, self.mode = model, opts, mode
        self.batch, self.capacity = batch, capacity
        vocab = model.config.vocab_size
        self.cache = model.transformer.new_cache(batch, capacity, dtype=dtype, device=device)
        self.tokens = torch.full((batch, capacity), opts.pad_id, dtype=torch.long, device=device)
        self.mask = torch.zeros((batch, capacity), dtype=torch.long, device=device)
        self.position = torch.zeros((1,), dtype=torch.long, device=device)
        self.generated = torch.zeros((), dtype=torch.long, device=device)
        self.finished = torch.zeros(batch, dtype=torch.bool, device=device)
        self.next_tokens = torch.zeros(batch, dtype=torch.long, device=device)
        self.seen = (torch.zeros((batch, vocab), dtype=torch.bool, device=device)
                     if opts.repetition_penalty != 1.0 else None)
        self.seed = torch.zeros(2, dtype=torch.long, device=device)
        self.eos = torch.tensor(opts.eos_ids, dtype=torch.long, device=device)
        self._compile_backend = compile_backend
        self._runner = None

    # --- per request ------------------------------------------------------------------------------
    def start(self, input_ids: Tensor, attention_mask: Tensor, seed: Tensor) -> None:
        """Reset every buffer in place for a new prompt (B, P), then run the prefill (first token)."""
        prompt_len = input_ids.shape[1]
        self.tokens.fill_(self.opts.pad_id)
        self.tokens[:, :prompt_len] = input_ids
        self.mask.zero_()
        self.mask[:, :prompt_len] = attention_mask
        self.finished.zero_()
        self.generated.zero_()
        self.position.fill_(prompt_len - 1)
        self.seed.copy_(seed)
        if self.seen is not None:
            self.seen.copy_(seen_tokens(input_ids, self.seen.shape[1], padding_lengths(attention_mask)))
        self.cache.crop(0)
        logits = self.model.next_token_logits(input_ids, self.cache, self.mask[:, :prompt_len])
        self.advance(logits)

    def advance(self, logits: Tensor) -> None:
        """Choose the next token of every row from fp32 logits (B, V) and write it at position + 1."""
        opts = self.opts
        logits = process_logits(logits, self.seen, self.generated, opts)
        chosen = choose_tokens(logits, opts.do_sample, self.seed, self.generated)
        chosen = torch.where(self.finished, opts.pad_id, chosen)
        self.position.add_(1)
        self.tokens.index_copy_(1, self.position, chosen[:, None])
        self.mask.index_fill_(1, self.position, 1)
        self.generated.add_(1)
        if self.eos.numel():
            self.finished |= torch.isin(chosen, self.eos)
        if self.seen is not None:
            self.seen.scatter_(1, chosen[:, None], True)
        self.next_tokens.copy_(chosen)

    # --- the step ---------------------------------------------------------------------------------
    def step_eager(self) -> None:
        """One decode step: feed the token at `position`, choose the next one. Fixed shapes throughout."""
        ids = self.tokens.index_select(1, self.position)  # (B, 1)
        logits = self.model.next_token_logits(ids, self.cache, self.mask, write_position=self.position)
        self.advance(logits)

    def step_uncached(self) -> None:
        """transformers' use_cache=False: the whole sequence so far through the model, every step (slow;
        the same tokens as the cached step)."""
        length = int(self.position) + 1
        logits = self.model.next_token_logits(self.tokens[:, :length], None, self.mask[:, :length])
        self.advance(logits)

    def step(self) -> None:
        if self._runner is None and self.mode == "compile":
            # The first step runs eagerly: every op meets its decode shapes outside tracing, so the CPU
            # routes are timed (bloom_kernels.cpu_routes) and the graph traces their picks.
            self.step_eager()
            self._runner = self._build()
            return
        if self._runner is None:
            self._runner = self._build()
        self._runner()

    def _build(self):
        if self.mode == "eager":
            return self.step_eager
        if self.mode == "uncached":
            return self.step_uncached
        if self.mode == "compile":
            build_counts["compile"] += 1
            bk.prepare_to_compile()
            compiled = torch.compile(self.step_eager, fullgraph=True, dynamic=False, backend=self._compile_backend)
            return _skip_guards_after(GUARDED_CALLS, compiled)
        if self.mode == "cuda_graph":
            return self._capture()
        raise ValueError(f"unknown decode mode {self.mode!r}; expected one of {', '.join(MODES)}")

    def _capture(self):
        """Warm up (Triton autotuning and compilation, cuBLAS workspaces) on a side stream, then capture
        one step. The warm-up steps write garbage into the buffers: `start` resets all of them."""
        self.position.fill_(0)
        self.mask.fill_(1)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step_eager()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.step_eager()
        build_counts["cuda_graph"] += 1
        return graph.replay


def _skip_guards_after(guarded_calls: int, compiled):
    """`compiled`, whose calls after the first `guarded_calls` skip dynamo's guard checks: the step's
    inputs are the decoder's own buffers, the same tensors every call, so after the first calls have
    shown the graph does not recompile (tests count it), checking ~a thousand guards per step (0.4 ms
    of a 2.5 ms step on the small shape) buys nothing."""
    calls = 0

    def run():
        nonlocal calls
        if calls < guarded_calls:
            calls += 1
            return compiled()
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
            return compiled()

    return run


def resolve_mode(mode: str, device: torch.device) -> str:
    if mode not in MODES:
        raise ValueError(f"decode must be one of {', '.join(MODES)}; got {mode!r}")
    if mode == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"decode='cuda_graph' needs a CUDA model; this one is on {device}")
    if mode == "auto":
        return "cuda_graph" if device.type == "cuda" else "eager"
    return mode


def decoder_for(model, batch: int, total: int, opts, mode: str, compile_backend="inductor") -> StaticDecoder:
    """The model's cached decoder for this request's shape and options, or a new one (evicting the
    least recently used beyond MAX_CACHED)."""
    device, dtype = model.device, model.dtype
    capacity = capacity_bucket(total)
    # the weights' addresses: a captured graph reads them by address, so moved or swapped (quantised)
    # weights must never meet an old decoder
    weights = tuple(t.data_ptr() for t in (*model.parameters(), *model.buffers()))
    key = (batch, capacity, dtype, device, mode, str(compile_backend), opts.static_key(), hash(weights))
    decoders = model.__dict__.setdefault("_static_decoders", OrderedDict())
    decoder = decoders.get(key)
    if decoder is None:
        decoder = StaticDecoder(model, batch, capacity, opts, device, dtype, mode, compile_backend)
        decoders[key] = decoder
        while len(decoders) > MAX_CACHED:
            decoders.popitem(last=False)
    decoders.move_to_end(key)
    return decoder
