"""Task heads against transformers' on the same random weights (fp32, CPU)."""

import pytest
import torch

import bloom
from helpers import left_padded_batch, randomize_

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=97, hidden_size=24, n_layer=2, n_head=3, pad_token_id=3)
ATOL = 1e-4


def pair(name, **extra):
    theirs = getattr(transformers, name)(transformers.BloomConfig(**CFG, **extra)).eval()
    randomize_(theirs)
    ours = getattr(bloom, name)(bloom.BloomConfig(**CFG, **extra)).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


@pytest.mark.parametrize("num_labels, labels", [
    (3, torch.tensor([0, 2, 1])),                       # single-label classification
    (1, torch.tensor([0.5, -1.0, 2.0])),                # regression
    (4, torch.tensor([[1., 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]])),  # multi-label
])
def test_sequence_classification_matches_transformers(num_labels, labels):
    ours, theirs = pair("BloomForSequenceClassification", num_labels=num_labels)
    ids, mask = left_padded_batch(CFG["vocab_size"])
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=labels)
        b = theirs(ids, attention_mask=mask, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)
    assert a.logits.shape == (3, num_labels)


def test_sequence_classification_needs_a_pad_token_for_batches():
    model = bloom.BloomForSequenceClassification(bloom.BloomConfig(**{**CFG, "pad_token_id": None}))
    with pytest.raises(ValueError, match="pad_token_id"):
        model(torch.tensor([[5, 6], [7, 8]]))


def test_token_classification_matches_transformers():
    ours, theirs = pair("BloomForTokenClassification", num_labels=5)
    ids, mask = left_padded_batch(CFG["vocab_size"])
    labels = torch.randint(0, 5, ids.shape).masked_fill(mask == 0, -100)
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, labels=labels)
        b = theirs(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(a.logits[real], b.logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)


def test_question_answering_matches_transformers():
    ours, theirs = pair("BloomForQuestionAnswering")
    ids, _ = left_padded_batch(CFG["vocab_size"], lengths=(9, 9, 9))
    start, end = torch.tensor([1, 4, 20]), torch.tensor([3, 8, 2])  # 20 is outside: ignored
    with torch.no_grad():
        a = ours(ids, start_positions=start, end_positions=end)
        b = theirs(ids, start_positions=start, end_positions=end)
    torch.testing.assert_close(a.start_logits, b.start_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.end_logits, b.end_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)


def test_a_head_loads_from_a_base_checkpoint_with_a_fresh_head(tmp_path):
    theirs = transformers.BloomModel(transformers.BloomConfig(**CFG)).eval()
    randomize_(theirs)
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="score.weight"):
        model = bloom.BloomForSequenceClassification.from_pretrained(tmp_path, num_labels=4)
    assert model.score.weight.shape == (4, CFG["hidden_size"]) and not model.score.weight.is_meta
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        # the same fp32 weights: fp32 rounding only (our CPU attention and theirs sum in other orders)
        torch.testing.assert_close(model.transformer(ids).last_hidden_state, theirs(ids).last_hidden_state,
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name, targets, length", [
    ("BloomForSequenceClassification", {"labels": torch.tensor([0, 1, 1])}, 3),  # loss, logits, past
    ("BloomForTokenClassification", {"labels": torch.zeros(3, 9, dtype=torch.long)}, 2),
    ("BloomForQuestionAnswering", {"start_positions": torch.tensor([1, 2, 3]),
                                   "end_positions": torch.tensor([4, 5, 6])}, 3),
])
def test_return_dict_false_gives_the_output_fields_that_are_not_none_in_order(name, targets, length):
    ours, theirs = pair(name)
    ids, mask = left_padded_batch(CFG["vocab_size"], lengths=(9, 9, 9))
    with torch.no_grad():
        for extra in ({}, targets, {**targets, "output_hidden_states": True}):
            d = ours(ids, attention_mask=mask, **extra)
            t = ours(ids, attention_mask=mask, return_dict=False, **extra)
            ref = theirs(ids, attention_mask=mask, return_dict=False, **extra)
            assert len(t) == len(d.to_tuple()) == len(ref)
            for ours_value, dict_value in zip(t, d.to_tuple()):
                if isinstance(ours_value, torch.Tensor):
                    assert torch.equal(ours_value, dict_value)
    assert len(ours(ids, attention_mask=mask, return_dict=False, **targets)) == length
