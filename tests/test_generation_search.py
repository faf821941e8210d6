"""generate's options beyond plain greedy/sampling (bloom/search.py, bloom/processors.py): beam search,
no-repeat n-grams, bad words, forced eos, the caller's processors and stopping criteria, scores and
logits in a returned dict, inputs_embeds prompts. Each compared with transformers' generate on the
same weights (tokens, sequence scores, per-step scores), plus the refusals."""

import pytest
import torch

from bloom.outputs import GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput
from helpers import left_padded_batch, peaked_causal_lm_pair

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=61, hidden_size=32, n_layer=2, n_head=4, pad_token_id=3, eos_token_id=2)
PAD, EOS = 3, 2


@pytest.fixture(scope="module")
def pair():
    return peaked_causal_lm_pair(CFG, noise=0.25)


def padded(lengths=(7, 4, 2), seed=1):
    return left_padded_batch(CFG["vocab_size"], lengths=lengths, seed=seed, pad_id=PAD)


def both(pair, ids, mask, **kwargs):
    ours, theirs = pair
    a = ours.generate(ids, mask, **kwargs)
    b = theirs.generate(ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=kwargs.pop("eos_token_id", EOS),
                        **kwargs)
    return a, b


# --- beam search --------------------------------------------------------------------------------
@pytest.mark.parametrize("num_beams, new, lengths, extra", [
    (2, 6, (5,), {}),
    (3, 9, (7, 4, 2), {}),
    (4, 12, (6, 6), dict(num_return_sequences=3, length_penalty=0.6)),
    (3, 10, (8, 3), dict(early_stopping=True)),
    (2, 10, (5, 2), dict(early_stopping="never", length_penalty=2.0)),
    (3, 8, (7, 4, 2), dict(no_repeat_ngram_size=2, min_new_tokens=3)),
], ids=str)
def test_beam_search_equals_transformers(pair, num_beams, new, lengths, extra):
    ids, mask = padded(lengths, seed=num_beams + new)
    a, b = both(pair, ids, mask, num_beams=num_beams, max_new_tokens=new, do_sample=False, output_scores=True,
                output_logits=True, return_dict_in_generate=True, **extra)
    assert isinstance(a, GenerateBeamDecoderOnlyOutput)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, rtol=1e-5, atol=1e-5)
    assert torch.equal(a.beam_indices, b.beam_indices.to(a.beam_indices.dtype))
    assert len(a.scores) == len(b.scores) and len(a.logits) == len(b.logits)
    for mine, theirs in zip(a.scores, b.scores):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    # the plain call returns the sequences alone
    plain = pair[0].generate(ids, mask, num_beams=num_beams, max_new_tokens=new, **extra)
    assert torch.equal(plain, a.sequences)


def test_beam_search_where_eos_ends_beams(pair):
    """eos made likely: finished hypotheses compete with running ones; rows padded after their end."""
    ours, theirs = pair
    ids, mask = padded((6, 3), seed=4)
    bias = torch.zeros(CFG["vocab_size"])
    bias[EOS] = 4.0

    def eos_bias(input_ids, scores):
        return scores + bias

    a, b = both(pair, ids, mask, num_beams=3, max_new_tokens=10, logits_processor=[eos_bias],
                output_scores=True, return_dict_in_generate=True)
    assert torch.equal(a.sequences, b.sequences)
    assert (a.sequences[:, ids.shape[1]:] == EOS).any()
    torch.testing.assert_close(a.sequences_scores, b.sequences_scores, rtol=1e-5, atol=1e-5)


# --- processors and criteria (greedy and sampling) ---------------------------------------------
@pytest.mark.parametrize("options", [
    dict(no_repeat_ngram_size=2),
    dict(no_repeat_ngram_size=1),
    dict(bad_words_ids=[[7], [11, 12], [EOS]]),
    dict(forced_eos_token_id=EOS),
    dict(no_repeat_ngram_size=3, repetition_penalty=1.4, min_new_tokens=4),
], ids=str)
def test_processors_equal_transformers(pair, options):
    ids, mask = padded()
    a, b = both(pair, ids, mask, max_new_tokens=12, do_sample=False, **options)
    assert torch.equal(a, b)


def test_processors_change_what_they_should(pair):
    """The options are not no-ops on these weights: greedy alone repeats an n-gram and makes token 7."""
    ours, _ = pair
    ids, mask = padded()
    plain = ours.generate(ids, mask, max_new_tokens=20)
    out = ours.generate(ids, mask, max_new_tokens=20, no_repeat_ngram_size=2, bad_words_ids=[[7]])
    assert not torch.equal(plain, out)
    for row in out[:, ids.shape[1]:].tolist():
        assert 7 not in row
        pairs = list(zip(row, row[1:]))
        assert len(pairs) == len(set(pairs))
    forced = ours.generate(ids, mask, max_new_tokens=5, forced_eos_token_id=EOS, eos_token_id=[])
    assert (forced[:, -1] == EOS).all()


def test_scores_and_logits_equal_transformers(pair):
    ids, mask = padded()
    a, b = both(pair, ids, mask, max_new_tokens=6, do_sample=False, repetition_penalty=1.3, output_scores=True,
                output_logits=True, return_dict_in_generate=True)
    assert isinstance(a, GenerateDecoderOnlyOutput) and torch.equal(a.sequences, b.sequences)
    assert len(a.scores) == len(b.scores) == len(a.logits) == len(b.logits)
    for name in ("scores", "logits"):
        for mine, theirs in zip(getattr(a, name), getattr(b, name)):
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    assert a.cache is not None and a.cache.get_seq_length() == a.sequences.shape[1] - 1


def test_return_dict_alone_keeps_the_static_step(pair, monkeypatch):
    """return_dict_in_generate without scores needs nothing the static step lacks: it stays there."""
    import bloom.generation as generation

    ours, _ = pair
    ids, mask = padded()
    monkeypatch.setattr(generation, "sample_search", None)  # would fail if called
    out = ours.generate(ids, mask, max_new_tokens=4, return_dict_in_generate=True)
    assert isinstance(out, GenerateDecoderOnlyOutput) and out.scores is None
    assert torch.equal(out.sequences, ours.generate(ids, mask, max_new_tokens=4))


def test_search_loop_greedy_and_sampling_equal_the_static_step(pair):
    """A no-op processor sends generate to the eager search loop: the same tokens as the static step,
    greedy and sampled with the same seed."""
    ours, _ = pair
    ids, mask = padded()

    def identity(input_ids, scores):
        return scores

    for sampling in (dict(), dict(do_sample=True, top_k=20, temperature=0.8)):
        static = ours.generate(ids, mask, max_new_tokens=9, generator=torch.Generator().manual_seed(5), **sampling)
        search = ours.generate(ids, mask, max_new_tokens=9, generator=torch.Generator().manual_seed(5),
                               logits_processor=[identity], **sampling)
        assert torch.equal(static, search)


def test_custom_logits_processor_and_stopping_criteria_equal_transformers(pair):
    ids, mask = padded()
    ban = torch.zeros(CFG["vocab_size"], dtype=torch.bool)
    ban[::3] = True

    def no_multiples_of_three(input_ids, scores):
        return scores.masked_fill(ban, float("-inf"))

    def stop_after_token_9(input_ids, scores, **kwargs):
        return input_ids[:, -1] == 9

    a, b = both(pair, ids, mask, max_new_tokens=15, do_sample=False, logits_processor=[no_multiples_of_three],
                stopping_criteria=transformers.StoppingCriteriaList([stop_after_token_9]))
    assert torch.equal(a, b)
    assert not (a[:, ids.shape[1]:] % 3 == 0).logical_and(a[:, ids.shape[1]:] != PAD).any()

    def always(input_ids, scores, **kwargs):
        return True

    short = pair[0].generate(ids, mask, max_new_tokens=15, stopping_criteria=[always])
    assert short.shape[1] == ids.shape[1] + 1


def test_inputs_embeds_prompt_equals_transformers(pair):
    ours, theirs = pair
    ids, mask = padded()
    embeds = theirs.get_input_embeddings()(ids)
    a = ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=7)
    b = theirs.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=7, do_sample=False,
                        pad_token_id=PAD, eos_token_id=EOS)
    assert torch.equal(a, b)
    assert torch.equal(a, ours.generate(ids, mask, max_new_tokens=7)[:, ids.shape[1]:])
    beams = ours.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5, num_beams=2)
    assert torch.equal(beams, theirs.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=5,
                                              num_beams=2, pad_token_id=PAD, eos_token_id=EOS))


def test_generation_config_carries_the_search_options(pair):
    from bloom import GenerationConfig

    ids, mask = padded()
    ours, theirs = pair
    config = GenerationConfig(num_beams=3, max_new_tokens=6, length_penalty=0.5, no_repeat_ngram_size=2)
    want = theirs.generate(ids, attention_mask=mask, pad_token_id=PAD, eos_token_id=EOS, num_beams=3,
                           max_new_tokens=6, length_penalty=0.5, no_repeat_ngram_size=2)
    assert torch.equal(ours.generate(ids, mask, generation_config=config), want)


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(num_beams=0), ValueError, "num_beams must be an int >= 1"),
    (dict(num_beams=2, do_sample=True), ValueError, "beam sampling"),
    (dict(num_beams=2, num_return_sequences=3), ValueError, "num_return_sequences .3. must be <= num_beams"),
    (dict(num_beams=2, early_stopping="sometimes"), ValueError, "early_stopping must be"),
    (dict(num_beams=2, length_penalty="long"), ValueError, "length_penalty must be a number"),
    (dict(no_repeat_ngram_size=-1), ValueError, "no_repeat_ngram_size must be"),
    (dict(bad_words_ids=[7]), ValueError, "bad_words_ids must be"),
    (dict(bad_words_ids=[[99]]), ValueError, "bad_words_ids must be"),
    (dict(forced_eos_token_id=99), ValueError, "forced_eos_token_id must be"),
    (dict(logits_processor=[5]), TypeError, "logits_processor must be a list of callables"),
    (dict(stopping_criteria="stop"), TypeError, "stopping_criteria must be a list of callables"),
    (dict(output_scores="yes"), ValueError, "output_scores must be a bool"),
    (dict(num_beams=2, decode="compile"), ValueError, "eager cached loop"),
    (dict(no_repeat_ngram_size=2, use_cache=False), ValueError, "eager cached loop"),
], ids=str)
def test_bad_search_options_are_named(pair, kwargs, error, match):
    ours, _ = pair
    with pytest.raises(error, match=match):
        ours.generate(torch.tensor([[5, 6]]), max_new_tokens=3, **kwargs)


def test_bad_inputs_embeds(pair):
    ours, _ = pair
    with pytest.raises(ValueError, match="inputs_embeds must be a float tensor"):
        ours.generate(inputs_embeds=torch.zeros(1, 3, 7), max_new_tokens=2)
    with pytest.raises(ValueError, match="not both"):
        ours.generate(torch.tensor([[5]]), inputs_embeds=torch.zeros(1, 3, 32), max_new_tokens=2)
    with pytest.raises(ValueError, match="attention_mask must have the shape"):
        ours.generate(inputs_embeds=torch.zeros(1, 3, 32), attention_mask=torch.ones(1, 2), max_new_tokens=2)
