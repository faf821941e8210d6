"""The static decode step: fixed shapes, compiled without graph breaks or recompilation, captured on
CUDA, the same tokens on every path; prefill logits at the last position; the sampler."""

import pytest
import torch
from torch._dynamo.utils import counters

import bloom_kernels
from bloom import BloomConfig, BloomForCausalLM, decode_step
from bloom.logits import sample, uniform_per_row
from helpers import HAS_CUDA, left_padded_batch, randomize_

CFG = dict(vocab_size=97, hidden_size=32, n_layer=2, n_head=4, pad_token_id=3, eos_token_id=2)
GREEDY = dict(max_new_tokens=9, eos_token_id=[])


@pytest.fixture(scope="module")
def model():
    model = BloomForCausalLM(BloomConfig(**CFG)).eval()
    randomize_(model)  # peaked distributions: greedy is not a coin toss between near-equal logits
    return model


def prompts():
    return left_padded_batch(CFG["vocab_size"], lengths=(6, 3), pad_id=3)


def compiled_generate(model, ids, mask, **kwargs):
    """generate with the step compiled (aot_eager: no C++ compiler needed), counting what dynamo did."""
    counters.clear()
    builds = decode_step.build_counts["compile"]
    out = model.generate(ids, mask, decode="compile", compile_backend="aot_eager", **kwargs)
    return out, dict(counters["stats"]), dict(counters["graph_break"]), decode_step.build_counts["compile"] - builds


@pytest.mark.parametrize("backend, cpu_route", [("reference", "default"), ("auto", "default"),
                                                ("auto", "gemv")])
def test_compiled_step_has_one_graph_no_break_no_recompile(model, backend, cpu_route, monkeypatch):
    """auto with gemv: every projection through the compiled multiply-and-sum route (eager: inductor
    per shape; in the step: traced into the step's graph)."""
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", backend)
    monkeypatch.setenv("BLOOM_KERNELS_CPU_ROUTE", cpu_route)
    model.__dict__.pop("_static_decoders", None)
    ids, mask = prompts()
    eager = model.generate(ids, mask, decode="eager", **GREEDY)
    out, stats, breaks, builds = compiled_generate(model, ids, mask, **GREEDY)
    # 8 steps after the prefill ran through one graph, traced once (fullgraph=True would raise on a break)
    assert stats.get("unique_graphs") == 1 and not breaks and builds == 1, (stats, breaks)
    assert torch.equal(out, eager)
    # a second request of the same shape bucket: nothing compiled or traced again
    again, stats, breaks, builds = compiled_generate(model, ids, mask, **GREEDY)
    assert torch.equal(again, eager) and builds == 0 and stats.get("unique_graphs", 0) == 0, stats


def test_compiled_step_through_the_kernels_fake_implementations(model, force_triton):
    """BLOOM_KERNELS_BACKEND=triton: dynamo traces the kernels' custom ops through their fake (meta)
    implementations; the graph then runs the kernels (the interpreter on CPU)."""
    model.__dict__.pop("_static_decoders", None)
    ids, mask = prompts()
    kw = dict(max_new_tokens=4, eos_token_id=[])
    eager = model.generate(ids, mask, decode="eager", **kw)
    out, stats, breaks, builds = compiled_generate(model, ids, mask, **kw)
    assert stats.get("unique_graphs") == 1 and not breaks and builds == 1, (stats, breaks)
    assert torch.equal(out, eager)


def test_static_step_equals_the_reference_path(model, monkeypatch):
    """Greedy tokens of the static step (auto: CPU routes) equal those of the eager reference ops, and
    those of a plain forward over the growing sequence (no cache at all)."""
    ids, mask = prompts()
    fast = model.generate(ids, mask, **GREEDY)
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "reference")
    model.__dict__.pop("_static_decoders", None)
    assert torch.equal(model.generate(ids, mask, **GREEDY), fast)
    seq, seq_mask = ids, mask
    with torch.no_grad():
        for _ in range(GREEDY["max_new_tokens"]):
            logits = model(seq, attention_mask=seq_mask, use_cache=False).logits[:, -1]
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], 1)
            seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], 1)
    assert torch.equal(seq, fast)


def test_prefill_logits_are_the_last_position_of_the_full_logits(model):
    ids, mask = prompts()
    with torch.no_grad():
        full = model(ids, attention_mask=mask).logits  # (B, S, V)
        cache = model.transformer.new_cache(ids.shape[0], ids.shape[1], dtype=model.dtype, device="cpu")
        last = model.next_token_logits(ids, cache, mask)  # (B, V): the lm_head ran on B rows only
    assert last.shape == (ids.shape[0], CFG["vocab_size"])
    torch.testing.assert_close(last, full[:, -1].float(), atol=1e-5, rtol=1e-5)
    assert torch.equal(last.argmax(-1), full[:, -1].argmax(-1))


def test_static_step_has_fixed_shapes_and_addresses(model):
    """Every decode step sees the same tensors: the cache buffers and the mask never move or grow."""
    model.__dict__.pop("_static_decoders", None)
    ids, mask = prompts()
    seen = []
    real = model.next_token_logits

    def recording(input_ids, cache, attention_mask, write_position=None):
        if write_position is not None:
            seen.append((input_ids.shape, attention_mask.data_ptr(), attention_mask.shape,
                         cache.keys[0].data_ptr(), write_position.data_ptr()))
        return real(input_ids, cache, attention_mask, write_position)

    model.next_token_logits = recording
    try:
        model.generate(ids, mask, **GREEDY)
    finally:
        del model.next_token_logits
    assert len(seen) == GREEDY["max_new_tokens"] - 1 and len(set(seen)) == 1


def test_decoders_are_bounded_and_keyed_by_the_weights(model):
    model.__dict__.pop("_static_decoders", None)
    ids, mask = prompts()
    for new in (9, 70, 200):  # three capacity buckets
        model.generate(ids, mask, max_new_tokens=new, eos_token_id=[])
    assert len(model._static_decoders) == decode_step.MAX_CACHED


def test_bad_decode_mode_is_refused(model):
    ids, mask = prompts()
    with pytest.raises(ValueError, match="decode must be one of"):
        model.generate(ids, mask, max_new_tokens=2, decode="fast")
    if not HAS_CUDA:
        with pytest.raises(ValueError, match="needs a CUDA model"):
            model.generate(ids, mask, max_new_tokens=2, decode="cuda_graph")


# --------------------------------------------------------------------------------------------------
# the sampler
# --------------------------------------------------------------------------------------------------
def test_sampler_draws_the_softmax_distribution():
    """10k rows of the same logits: token frequencies within 5 sigma of the probabilities; a -inf
    (filtered) token is never drawn."""
    rows = 10_000
    logits = torch.tensor([2.0, 1.0, 0.0, float("-inf"), -1.0]).repeat(rows, 1)
    tokens = sample(logits, torch.tensor([12345, 678]), torch.tensor(0))
    probs = logits[0].softmax(-1)
    freq = torch.bincount(tokens, minlength=5).double() / rows
    sigma = (probs.double() * (1 - probs.double()) / rows).sqrt()
    assert freq[3] == 0
    assert ((freq - probs.double()).abs() <= 5 * sigma + 1e-12).all(), (freq, probs)


def test_uniforms_depend_on_seed_step_and_row_only():
    seed = torch.tensor([1, 2])
    a = uniform_per_row(seed, torch.tensor(3), 1000)
    assert torch.equal(a, uniform_per_row(seed.clone(), torch.tensor(3), 1000))
    assert not torch.equal(a, uniform_per_row(seed, torch.tensor(4), 1000))
    assert not torch.equal(a, uniform_per_row(torch.tensor([1, 3]), torch.tensor(3), 1000))
    assert ((a > 0) & (a < 1)).all() and abs(a.mean().item() - 0.5) < 0.05
    assert a.unique().numel() == 1000


def test_seeded_sampling_is_the_same_on_every_path(model):
    ids, mask = prompts()
    kw = dict(max_new_tokens=8, do_sample=True, top_k=20, repetition_penalty=1.3, eos_token_id=[])
    eager = model.generate(ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    compiled = model.generate(ids, mask, generator=torch.Generator().manual_seed(5), decode="compile",
                              compile_backend="aot_eager", **kw)
    assert torch.equal(eager, compiled)


# --------------------------------------------------------------------------------------------------
# CUDA: the captured step
# --------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cuda_graph_step_equals_eager_and_is_captured_once(dtype):
    model = BloomForCausalLM(BloomConfig(**CFG)).eval()
    randomize_(model)
    model = model.to("cuda", dtype)
    ids, mask = (t.cuda() for t in prompts())
    eager = model.generate(ids, mask, decode="eager", **GREEDY)
    builds = decode_step.build_counts["cuda_graph"]
    graphed = model.generate(ids, mask, decode="cuda_graph", **GREEDY)
    assert decode_step.build_counts["cuda_graph"] == builds + 1
    assert torch.equal(graphed, eager)
    again = model.generate(ids, mask, decode="cuda_graph", **GREEDY)
    assert decode_step.build_counts["cuda_graph"] == builds + 1 and torch.equal(again, eager)
    kw = dict(max_new_tokens=8, do_sample=True, top_p=0.9, eos_token_id=[])
    a = model.generate(ids, mask, generator=torch.Generator("cuda").manual_seed(1), decode="eager", **kw)
    b = model.generate(ids, mask, generator=torch.Generator("cuda").manual_seed(1), decode="cuda_graph", **kw)
    assert torch.equal(a, b)
    assert bloom_kernels._dispatch.kernel_failures() == {}


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU")
def test_decode_peak_memory_is_weights_cache_and_a_bounded_workspace():
    """bloom-560m's width with 2 layers, bf16, batch 4, 64 + 192 tokens: the peak over a captured
    generation is the weights + the KV cache + at most 64 MiB (logits (B, V) fp32 are 4 MB of it)."""
    cfg = dict(CFG, vocab_size=250880, hidden_size=1024, n_head=16)
    model = BloomForCausalLM(BloomConfig(**cfg)).eval().to("cuda", torch.bfloat16)
    ids = torch.randint(4, 250880, (4, 64), device="cuda")
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    model.generate(ids, max_new_tokens=192, eos_token_id=[], decode="cuda_graph")
    decoder = next(iter(model._static_decoders.values()))
    cache = sum(t.numel() * t.element_size() for t in decoder.cache.keys + decoder.cache.values)
    workspace = torch.cuda.max_memory_allocated() - base - cache
    assert base >= weights and workspace <= 64 * 2**20, (weights, cache, workspace)
