"""generate(): greedy parity with transformers, batching, eos, sampling filters, cache discipline."""

import pytest
import torch

import bloom.generation as generation
from bloom import BloomCache, BloomConfig, BloomForCausalLM, CacheOverflowError
from bloom.decode_step import capacity_bucket
from bloom.logits import top_k_filter, top_p_filter
from helpers import left_padded_batch, peaked_causal_lm_pair

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=101, hidden_size=32, n_layer=2, n_head=4, pad_token_id=3, eos_token_id=2)
PAD, EOS = 3, 2


@pytest.fixture(scope="module")
def pair():
    return peaked_causal_lm_pair(CFG, noise=0.3)


def left_padded(lengths=(7, 4, 2), seed=1):
    return left_padded_batch(CFG["vocab_size"], lengths=lengths, seed=seed, pad_id=PAD)


def test_greedy_single_prompt_equals_transformers(pair):
    ours, theirs = pair
    ids = torch.tensor([[5, 17, 42, 7, 99]])
    a = ours.generate(ids, max_new_tokens=15)
    b = theirs.generate(ids, max_new_tokens=15, do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :5], ids) and a.shape[1] <= 20


def test_greedy_left_padded_batch_equals_transformers_and_each_row_alone(pair):
    ours, theirs = pair
    ids, mask = left_padded()
    a = ours.generate(ids, mask, max_new_tokens=12)
    b = theirs.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=PAD,
                        eos_token_id=EOS)
    assert torch.equal(a, b)
    for row in range(len(ids)):
        real = ids[row, mask[row].bool()][None]
        alone = ours.generate(real, max_new_tokens=12)
        new = a[row, ids.shape[1]:]
        assert torch.equal(alone[0, real.shape[1]:], new[: alone.shape[1] - real.shape[1]])


def test_repetition_penalty_matches_transformers(pair):
    ours, theirs = pair
    ids, mask = left_padded()
    a = ours.generate(ids, mask, max_new_tokens=10, repetition_penalty=1.7)
    b = theirs.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=PAD,
                        eos_token_id=EOS, repetition_penalty=1.7)
    assert torch.equal(a, b)


def test_each_row_stops_at_its_own_eos_then_pads(pair):
    ours, _ = pair
    ids, mask = left_padded()
    free = ours.generate(ids, mask, max_new_tokens=10, eos_token_id=[])
    new = free[:, ids.shape[1]:]
    stop_token = int(new[0, 2])  # row 0 emits this at step 2: make it the eos
    out = ours.generate(ids, mask, max_new_tokens=10, eos_token_id=stop_token)
    generated = out[:, ids.shape[1]:]
    for row in range(len(ids)):
        hits = (new[row] == stop_token).nonzero()
        if len(hits):
            first = int(hits[0])
            assert torch.equal(generated[row, : first + 1], new[row, : first + 1])
            assert (generated[row, first + 1:] == PAD).all()
        else:
            assert torch.equal(generated[row], new[row, : generated.shape[1]])
    # min_new_tokens forbids the eos before 4 new tokens
    held = ours.generate(ids, mask, max_new_tokens=10, eos_token_id=stop_token, min_new_tokens=4)
    assert not (held[:, ids.shape[1]: ids.shape[1] + 4] == stop_token).any()


def test_generation_stops_when_every_row_has_finished(pair):
    ours, _ = pair
    ids = torch.tensor([[5, 17, 42]])
    free = ours.generate(ids, max_new_tokens=8, eos_token_id=[])
    out = ours.generate(ids, max_new_tokens=8, eos_token_id=int(free[0, 4]))
    assert out.shape[1] <= 5 and torch.equal(out, free[:, : out.shape[1]])


def test_sampling_is_reproducible_with_a_seeded_generator(pair):
    ours, _ = pair
    ids, mask = left_padded()
    kw = dict(max_new_tokens=12, do_sample=True, temperature=1.5, eos_token_id=[])
    a = ours.generate(ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    b = ours.generate(ids, mask, generator=torch.Generator().manual_seed(7), **kw)
    c = ours.generate(ids, mask, generator=torch.Generator().manual_seed(8), **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)
    multi = ours.generate(ids, mask, num_return_sequences=3, generator=torch.Generator().manual_seed(1), **kw)
    assert multi.shape == (9, ids.shape[1] + 12)
    assert torch.equal(multi[::3, : ids.shape[1]], ids)


def allowed_top_k(logits, k):
    kth = logits.sort(descending=True).values[:, k - 1: k]
    return logits >= kth


def allowed_top_p(logits, p):
    probs = logits.double().softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    before = sorted_probs.cumsum(-1) - sorted_probs  # probability mass strictly above each token
    keep_sorted = before < p  # keep tokens until the mass before them reaches p
    return torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)


@pytest.mark.parametrize("top_k, top_p", [(5, None), (None, 0.6), (8, 0.3)])
def test_sampled_tokens_are_always_inside_the_filtered_set(pair, monkeypatch, top_k, top_p):
    ours, _ = pair
    seen = []
    real = ours.next_token_logits

    def recording(*args, **kwargs):
        logits = real(*args, **kwargs)
        seen.append(logits.clone())
        return logits

    monkeypatch.setattr(ours, "next_token_logits", recording)
    ids, mask = left_padded()
    out = ours.generate(ids, mask, max_new_tokens=25, do_sample=True, top_k=top_k, top_p=top_p,
                        temperature=0.9, eos_token_id=[], generator=torch.Generator().manual_seed(3))
    chosen = out[:, ids.shape[1]:]
    for step, logits in enumerate(seen):
        logits = logits / 0.9
        allowed = torch.ones_like(logits, dtype=torch.bool)
        if top_k:
            allowed &= allowed_top_k(logits, top_k)
            logits = logits.masked_fill(~allowed, float("-inf"))
        if top_p:
            allowed &= allowed_top_p(logits, top_p)
        assert allowed.gather(1, chosen[:, step: step + 1]).all(), step


def test_filters_equal_transformers_warpers():
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0)) * 3
    for k in (1, 7, 300):
        assert torch.equal(top_k_filter(logits, k), TopKLogitsWarper(k)(None, logits.clone()))
    for p in (0.05, 0.5, 0.95, 1.0):
        assert torch.equal(top_p_filter(logits, p), TopPLogitsWarper(p)(None, logits.clone()))
        assert torch.equal(~torch.isinf(top_p_filter(logits, p)), allowed_top_p(logits, p))


def test_cache_is_allocated_once_and_written_in_place(pair, monkeypatch):
    ours, _ = pair
    created = []
    real_new_cache = ours.transformer.new_cache

    def counting(*args, **kwargs):
        cache = real_new_cache(*args, **kwargs)
        created.append(cache)
        return cache

    monkeypatch.setattr(ours.transformer, "new_cache", counting)

    def no_growth(self, n):
        assert self.length + n <= self.capacity, "the cache had to grow"

    monkeypatch.setattr(BloomCache, "reserve", no_growth)

    def no_cat(*args, **kwargs):
        raise AssertionError("torch.cat inside the generation loop")

    monkeypatch.setattr(torch, "cat", no_cat)
    ids, mask = left_padded()
    first = ours.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    assert len(created) == 1
    assert created[0].capacity == capacity_bucket(ids.shape[1] + 6) and not created[0].growable
    address = created[0].keys[0].data_ptr()
    # a second request of the same shape bucket reuses every buffer: nothing allocated, same answer
    again = ours.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    shorter = ours.generate(ids[:, 2:], mask[:, 2:], max_new_tokens=9, eos_token_id=[])
    assert len(created) == 1 and created[0].keys[0].data_ptr() == address
    assert torch.equal(again, first)
    ours.__dict__.pop("_static_decoders")  # what a fresh decoder makes of the shorter request
    assert torch.equal(ours.generate(ids[:, 2:], mask[:, 2:], max_new_tokens=9, eos_token_id=[]), shorter)


def test_requests_beyond_the_model_limits_are_refused_up_front(pair, monkeypatch):
    _, theirs = pair
    config = BloomConfig(**CFG, seq_length=12)
    model = BloomForCausalLM(config).eval()
    calls = []
    monkeypatch.setattr(model, "next_token_logits", lambda *a: calls.append(1))
    with pytest.raises(CacheOverflowError, match="exceeds the model's seq_length = 12"):
        model.generate(torch.tensor([[5] * 8]), max_new_tokens=5)
    assert not calls


class RecordingStreamer:
    def __init__(self):
        self.chunks, self.ended = [], False

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.ended = True


def test_streamer_gets_the_prompt_then_each_token(pair):
    ours, _ = pair
    ids = torch.tensor([[5, 17, 42]])
    streamer = RecordingStreamer()
    out = ours.generate(ids, max_new_tokens=6, eos_token_id=[], streamer=streamer)
    assert torch.equal(streamer.chunks[0], ids)
    assert torch.equal(torch.stack([c.reshape(()) for c in streamer.chunks[1:]]), out[0, 3:])
    assert streamer.ended
    with pytest.raises(ValueError, match="streamer"):
        ours.generate(torch.tensor([[5], [6]]), max_new_tokens=2, streamer=RecordingStreamer())


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(max_new_tokens=3, min_new_tokens=5), "min_new_tokens"),
    (dict(max_new_tokens=3, do_sample=True, temperature=0.0), "temperature"),
    (dict(max_new_tokens=3, do_sample=True, top_p=1.5), "top_p"),
    (dict(max_new_tokens=3, do_sample=True, top_k=-1), "top_k"),
    (dict(max_new_tokens=3, repetition_penalty=0.0), "repetition_penalty"),
    (dict(max_new_tokens=3, eos_token_id=5000), "eos_token_id"),
    (dict(max_new_tokens=3, pad_token_id=-2), "pad_token_id"),
    (dict(max_new_tokens=3, num_return_sequences=2), "do_sample"),
    (dict(), "generate needs max_new_tokens or max_length"),
    (dict(max_length=2), r"max_length \(2\) counts the prompt and must exceed its length \(2\)"),
    (dict(max_length=5, min_length=2.5), "min_length must be an int"),
    # issue 14: never a sampling crash or a silently odd value
    (dict(max_new_tokens=3, do_sample=True, temperature=float("inf")), "temperature must be a finite number"),
    (dict(max_new_tokens=3, do_sample=True, temperature=float("nan")), "temperature must be a finite number"),
    (dict(max_new_tokens=3, do_sample=True, temperature="hot"), "temperature must be a finite number"),
    (dict(max_new_tokens=3, repetition_penalty=float("inf")), "repetition_penalty must be a finite number"),
    (dict(max_new_tokens=3, do_sample="yes"), "do_sample must be True or False"),
    (dict(max_new_tokens=10**12), "ran out of memory .* lower max_new_tokens"),
    (dict(max_new_tokens=10**12, num_beams=2), "ran out of memory .* lower max_new_tokens"),
])
def test_bad_generation_arguments(pair, kwargs, match):
    ours, _ = pair
    with pytest.raises(ValueError, match=match):
        ours.generate(torch.tensor([[5, 6]]), **kwargs)


def test_tiny_temperature_samples_the_argmax_and_tensor_ids_are_taken(pair):
    """temperature 1e-45 overflows logits / T to +inf for every positive logit: the step divides after
    subtracting the row max instead, so sampling gives the greedy tokens (the T -> 0 limit), eager and
    compiled alike; eos/pad ids given as tensors (as transformers' code passes them) work."""
    ours, _ = pair
    ids, mask = left_padded()
    greedy = ours.generate(ids, mask, max_new_tokens=6)
    for decode in ("eager", "compile"):
        assert torch.equal(ours.generate(ids, mask, max_new_tokens=6, do_sample=True, temperature=1e-45,
                                         decode=decode), greedy)
    tensors = ours.generate(ids, mask, max_new_tokens=6, eos_token_id=torch.tensor(EOS), pad_token_id=torch.tensor(PAD))
    assert torch.equal(tensors, greedy)


def test_bad_prompt_and_streamer_types(pair):
    ours, _ = pair
    with pytest.raises(TypeError, match="attention_mask must be a torch.Tensor"):
        ours.generate(torch.tensor([[5, 6]]), [[1, 1]], max_new_tokens=2)

    class NoPut:
        def end(self):
            pass

    with pytest.raises(TypeError, match="streamer must have put"):
        ours.generate(torch.tensor([[5, 6]]), max_new_tokens=2, streamer=NoPut())


def test_bad_prompts(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="input_ids holds token id 101"):
        ours.generate(torch.tensor([[5, 101]]), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask"):
        ours.generate(torch.tensor([[5, 6]]), torch.ones(1, 3), max_new_tokens=2)
    with pytest.raises(TypeError, match="num_beam_groups"):
        ours.generate(torch.tensor([[5, 6]]), max_new_tokens=2, num_beam_groups=2)  # not supported: named


def test_padding_is_inferred_from_pad_tokens_like_transformers(pair):
    ours, _ = pair
    ids, mask = left_padded()
    assert torch.equal(ours.generate(ids, max_new_tokens=5), ours.generate(ids, mask, max_new_tokens=5))
    assert generation.LENGTH_LIMIT_KEYS  # the limits checked


@pytest.mark.parametrize("limits", [dict(max_length=12), dict(max_length=12, min_length=10),
                                    dict(max_new_tokens=4, max_length=30), dict(max_new_tokens=6, min_length=9)],
                         ids=str)
def test_max_and_min_length_count_the_prompt_as_transformers(pair, limits):
    ours, theirs = pair
    ids, mask = left_padded()
    a = ours.generate(ids, mask, **limits)
    b = theirs.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=PAD, eos_token_id=EOS, **limits)
    assert torch.equal(a, b)


def test_generation_config_from_a_transformers_checkpoint_and_as_an_argument(pair, tmp_path):
    """generation_config.json written by transformers gives generate its defaults (same tokens as
    transformers' generate with no arguments); a GenerationConfig (transformers' or ours) passed in
    replaces them; keywords win; ours saves a file transformers reads."""
    from bloom import GenerationConfig

    _, theirs = pair
    theirs.generation_config.max_new_tokens = 7
    theirs.generation_config.repetition_penalty = 1.3
    theirs.save_pretrained(tmp_path / "ckpt")
    theirs.generation_config.max_new_tokens, theirs.generation_config.repetition_penalty = None, 1.0
    ours = BloomForCausalLM.from_pretrained(tmp_path / "ckpt")
    ids, mask = left_padded()
    want = theirs.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=7, repetition_penalty=1.3)
    assert torch.equal(ours.generate(ids, mask), want)
    assert ours.generate(ids, mask, max_new_tokens=3).shape[1] == ids.shape[1] + 3  # keyword wins
    config = transformers.GenerationConfig(max_new_tokens=4, eos_token_id=EOS, pad_token_id=PAD)
    assert torch.equal(ours.generate(ids, mask, generation_config=config),
                       theirs.generate(ids, attention_mask=mask, generation_config=config))
    ours.save_pretrained(tmp_path / "again")
    loaded = transformers.GenerationConfig.from_pretrained(tmp_path / "again")
    assert loaded.max_new_tokens == 7 and loaded.repetition_penalty == 1.3
    with pytest.raises(ValueError, match="does not implement: num_beam_groups=2"):
        ours.generate(ids, mask, generation_config=GenerationConfig(num_beam_groups=2, max_new_tokens=3))


def test_corrupt_generation_config_file_is_named(pair, tmp_path):
    ours, _ = pair
    ours.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text("{ not json")
    with pytest.raises(ValueError, match="generation_config.json is not valid JSON"):
        BloomForCausalLM.from_pretrained(tmp_path)


def test_use_cache_false_gives_the_same_tokens_as_transformers_and_the_cached_path(pair):
    ours, theirs = pair
    ids, mask = left_padded()
    slow = ours.generate(ids, mask, max_new_tokens=6, use_cache=False, repetition_penalty=1.2)
    assert torch.equal(slow, ours.generate(ids, mask, max_new_tokens=6, repetition_penalty=1.2))
    want = theirs.generate(ids, attention_mask=mask, max_new_tokens=6, use_cache=False, repetition_penalty=1.2,
                           do_sample=False, pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(slow, want)
    with pytest.raises(ValueError, match="use_cache=False runs the uncached eager step"):
        ours.generate(ids, mask, max_new_tokens=2, use_cache=False, decode="compile")


def test_repetition_penalty_skips_left_padding_as_transformers_5(pair, monkeypatch):
    """transformers 5 penalises the tokens of each row from its first real position on: the pad token
    of a left-padded row is not 'seen' unless it also appears after the padding."""
    import bloom.decode_step as decode_step

    ours, _ = pair
    ids, mask = left_padded()
    ids[0, -1] = PAD  # row 0 (no padding) holds the pad id as a real token
    seen_at_start = []
    real_process = decode_step.process_logits

    def recording(logits, seen, generated, opts):
        if not seen_at_start:
            seen_at_start.append(seen.clone())
        return real_process(logits, seen, generated, opts)

    monkeypatch.setattr(decode_step, "process_logits", recording)
    ours.generate(ids, mask, max_new_tokens=1, repetition_penalty=1.5)
    seen = seen_at_start[0]
    for row in range(ids.shape[0]):
        real = set(ids[row, mask[row].bool()].tolist())
        assert set(seen[row].nonzero().flatten().tolist()) == real
    assert seen[0, PAD] and not seen[1:, PAD].any()
