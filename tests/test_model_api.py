"""The model API transformers' PreTrainedModel gives every class, run side by side with transformers'
BLOOM on the same random weights: parameter counts, base_model, embeddings getters/setters,
can_generate, input-require-grads, gradient checkpointing (same gradients, less memory kept)."""

import pytest
import torch

import bloom
from helpers import randomize_

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=64, hidden_size=32, n_layer=3, n_head=4, pad_token_id=0)
CLASSES = ["BloomModel", "BloomForCausalLM", "BloomForSequenceClassification", "BloomForTokenClassification",
           "BloomForQuestionAnswering"]


def pair(name):
    torch.manual_seed(0)
    theirs = getattr(transformers, name)(transformers.BloomConfig(**CFG))
    ours = getattr(bloom, name)(bloom.BloomConfig(**CFG))
    ours.load_state_dict(theirs.state_dict(), strict=False)
    return ours, theirs


@pytest.mark.parametrize("name", CLASSES)
def test_counts_embeddings_and_base_model_match_transformers(name):
    ours, theirs = pair(name)
    for kwargs in ({}, dict(exclude_embeddings=True), dict(only_trainable=True)):
        assert ours.num_parameters(**kwargs) == theirs.num_parameters(**kwargs), kwargs
    ours.get_input_embeddings().weight.requires_grad_(False)
    theirs.get_input_embeddings().weight.requires_grad_(False)
    assert ours.num_parameters(only_trainable=True) == theirs.num_parameters(only_trainable=True)
    assert type(ours.base_model).__name__ == type(theirs.base_model).__name__ == "BloomModel"
    assert ours.can_generate() == theirs.can_generate() == (name == "BloomForCausalLM")
    assert ours.get_input_embeddings().weight.shape == theirs.get_input_embeddings().weight.shape
    assert (ours.get_output_embeddings() is None) == (theirs.get_output_embeddings() is None)


def test_set_embeddings_and_tie():
    ours, _ = pair("BloomForCausalLM")
    new = torch.nn.Embedding(64, 32)
    ours.set_input_embeddings(new)
    assert ours.transformer.word_embeddings is new
    ours.tie_weights()
    assert ours.lm_head.weight is new.weight
    head = torch.nn.Linear(32, 64, bias=False)
    ours.set_output_embeddings(head)
    assert ours.get_output_embeddings() is head
    with pytest.raises(AttributeError, match="BloomForSequenceClassification has no output embeddings"):
        pair("BloomForSequenceClassification")[0].set_output_embeddings(head)


def test_enable_input_require_grads_with_frozen_embeddings():
    ours, _ = pair("BloomForCausalLM")
    for p in ours.parameters():
        p.requires_grad_(False)
    ids = torch.randint(1, 64, (2, 5))
    assert not ours(ids).logits.requires_grad
    ours.enable_input_require_grads()
    assert ours(ids).logits.requires_grad
    ours.disable_input_require_grads()
    assert not ours(ids).logits.requires_grad


@pytest.mark.parametrize("kwargs", [None, {"use_reentrant": True}], ids=["non-reentrant", "reentrant"])
def test_gradient_checkpointing_gives_the_same_gradients(kwargs):
    """Training forward + backward with and without checkpointing: the same loss and gradients (the
    recomputation repeats the same ops), and the flag is reported like transformers'."""
    ours, _ = pair("BloomForCausalLM")
    randomize_(ours)
    ours.train()
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))

    def grads():
        ours.zero_grad()
        loss = ours(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in ours.named_parameters()}

    plain_loss, plain = grads()
    ours.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    assert ours.is_gradient_checkpointing
    ckpt_loss, ckpt = grads()
    torch.testing.assert_close(ckpt_loss, plain_loss, atol=0, rtol=0)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)
    ours.gradient_checkpointing_disable()
    assert not ours.is_gradient_checkpointing


def test_gradient_checkpointing_keeps_fewer_activations():
    """Saved-for-backward tensors of one forward: checkpointing keeps only each block's inputs."""
    ours, _ = pair("BloomForCausalLM")
    ours.train()
    ids = torch.randint(1, 64, (2, 16))

    def saved_bytes():
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            ours(ids, labels=ids).loss
        return total

    plain = saved_bytes()
    ours.gradient_checkpointing_enable()
    assert saved_bytes() < plain / 2


@pytest.mark.parametrize("name", ["BloomForCausalLM", "BloomForSequenceClassification"])
@pytest.mark.parametrize("new_size, multiple", [(70, None), (50, None), (70, 16)], ids=str)
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_resize_token_embeddings_matches_transformers(name, new_size, multiple, tied):
    """Same sizes, same kept rows, new rows at the old mean (transformers samples them from a
    normal of that mean with 1e-9 x the covariance), tie kept, config.vocab_size updated; the model
    then runs on the new ids and gives transformers' logits."""
    torch.manual_seed(0)
    cfg = dict(CFG, tie_word_embeddings=tied)
    theirs = getattr(transformers, name)(transformers.BloomConfig(**cfg)).eval()
    ours = getattr(bloom, name)(bloom.BloomConfig(**cfg)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=False)
    got = ours.resize_token_embeddings(new_size, pad_to_multiple_of=multiple)
    want = theirs.resize_token_embeddings(new_size, pad_to_multiple_of=multiple)
    assert got.weight.shape == want.weight.shape and ours.config.vocab_size == theirs.config.vocab_size
    torch.testing.assert_close(got.weight, want.weight, atol=1e-3, rtol=0)
    if name == "BloomForCausalLM":
        assert (ours.lm_head.weight is got.weight) == tied
        assert ours.lm_head.weight.shape == theirs.lm_head.weight.shape
        if not tied:  # transformers' resized untied head: same kept rows (new rows: both at the mean)
            torch.testing.assert_close(ours.lm_head.weight, theirs.lm_head.weight, atol=1e-3, rtol=0)
        ids = torch.tensor([[1, got.num_embeddings - 1, 5]])
        with torch.no_grad():
            torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=1e-3, rtol=1e-3)


def test_resize_refuses_bad_sizes():
    ours, _ = pair("BloomForCausalLM")
    with pytest.raises(ValueError, match="new_num_tokens must be a positive int, got 0"):
        ours.resize_token_embeddings(0)
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int"):
        ours.resize_token_embeddings(70, pad_to_multiple_of=0)
    assert ours.resize_token_embeddings() is ours.get_input_embeddings()


def test_trainer_loss_arguments_match_transformers():
    """num_items_in_batch (sum / n: gradient accumulation), shift_labels, and the arguments BLOOM
    ignores (position_ids, cache_position): the same losses and gradients as transformers'."""
    ours, theirs = pair("BloomForCausalLM")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 64, (2, 6), generator=g)
    labels = ids.clone()
    labels[0, :2] = -100
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[:, 1:].contiguous()
    cases = [dict(labels=labels), dict(labels=labels, num_items_in_batch=torch.tensor(7)),
             dict(labels=labels, num_items_in_batch=3), dict(labels=labels, shift_labels=shifted),
             dict(labels=labels, position_ids=torch.arange(6).expand(2, 6), cache_position=torch.arange(6))]
    for kwargs in cases:
        losses = []
        for model in (theirs, ours):
            model.zero_grad()
            loss = model(ids, **kwargs).loss
            loss.backward()
            losses.append((loss.detach(), model.transformer.h[0].mlp.dense_4h_to_h.weight.grad.clone()))
        torch.testing.assert_close(losses[1][0], losses[0][0], atol=1e-5, rtol=1e-5, msg=str(kwargs))
        torch.testing.assert_close(losses[1][1], losses[0][1], atol=1e-5, rtol=1e-4, msg=str(kwargs))


@pytest.mark.parametrize("name", CLASSES)
def test_unknown_forward_argument_is_a_type_error_naming_it(name):
    ours, _ = pair(name)
    ids = torch.randint(1, 64, (1, 4))
    ours(ids, num_items_in_batch=4, position_ids=torch.arange(4)[None])  # what Trainer passes: accepted
    with pytest.raises(TypeError, match="unexpected keyword arguments: temperature"):
        ours(ids, temperature=0.5)


def test_transformers_caches_are_accepted_and_ours_reads_like_one():
    """A DynamicCache filled by transformers' BLOOM, an empty one, and legacy tuples continue the
    sequence with transformers' logits; our returned cache answers get_seq_length() and
    layers[i].keys / .values like transformers'."""
    from transformers import DynamicCache

    ours, theirs = pair("BloomForCausalLM")
    ours.eval(), theirs.eval()
    g = torch.Generator().manual_seed(3)
    prompt, nxt = torch.randint(1, 64, (2, 5), generator=g), torch.randint(1, 64, (2, 1), generator=g)
    with torch.no_grad():
        their_first = theirs(prompt, use_cache=True)
        their_cache = their_first.past_key_values
        our_first = ours(prompt, use_cache=True)
        cache = our_first.past_key_values
        assert cache.get_seq_length() == their_cache.get_seq_length() == 5 and len(cache.layers) == CFG["n_layer"]
        for mine, theirs_layer in zip(cache.layers, their_cache.layers):
            torch.testing.assert_close(mine.keys, theirs_layer.keys, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(mine.values, theirs_layer.values, atol=1e-5, rtol=1e-5)
        mask = torch.ones(2, 6, dtype=torch.long)
        legacy = tuple((layer.keys.clone(), layer.values.clone()) for layer in their_cache.layers)
        want = theirs(nxt, cache=their_cache, attention_mask=mask).logits  # appends to their_cache
        refill = DynamicCache()
        for i, (k, v) in enumerate(legacy):
            refill.update(k, v, i)
        for past in (refill, legacy):
            got = ours(nxt, past_key_values=past, attention_mask=mask).logits
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        empty = ours(prompt, past_key_values=DynamicCache(), use_cache=True)
        torch.testing.assert_close(empty.logits, our_first.logits)
        assert empty.past_key_values.get_seq_length() == 5
