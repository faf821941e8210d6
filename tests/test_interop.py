"""bloom.from_transformers / model.to_transformers(): one set of weights seen through both libraries."""

import sys

import pytest
import torch
from torch import nn

import bloom
from bloom.config import BLOOM_DEFAULTS
from bloom.interop import CLASS_NAMES
from helpers import left_padded_batch, randomize_

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=300, hidden_size=64, n_layer=2, n_head=4, pad_token_id=3)
ATOL = 1e-5  # fp32 on the CPU: the two attention implementations sum in other orders


def hf_model(name, **extra):
    model = getattr(transformers, name)(transformers.BloomConfig(**CFG, **extra))
    randomize_(model)
    return model.eval()


def our_model(name, **extra):
    model = getattr(bloom, name)(bloom.BloomConfig(**CFG, **extra))
    randomize_(model)
    return model.eval()


def all_tensors(model):
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def assert_shared(a, b):
    """Every tensor of a is b's tensor of the same name: the very object, hence the same storage."""
    ta, tb = all_tensors(a), all_tensors(b)
    assert ta.keys() == tb.keys()
    for name in ta:
        assert ta[name].data_ptr() == tb[name].data_ptr(), name
        assert ta[name] is tb[name], name


def outputs(model, ids, mask):
    """The output(s) of each class at the real (non-padding) positions."""
    out = model(ids, attention_mask=mask)
    real = mask.bool()
    if hasattr(out, "start_logits"):
        return out.start_logits[real], out.end_logits[real]
    if hasattr(out, "last_hidden_state"):
        return (out.last_hidden_state[real],)
    if out.logits.dim() == 2:  # sequence classification: one row per sequence
        return (out.logits,)
    return (out.logits[real],)


def assert_same_outputs(ours, theirs, vocab=CFG["vocab_size"]):
    ids, mask = left_padded_batch(vocab, pad_id=CFG["pad_token_id"])
    with torch.no_grad():
        for a, b in zip(outputs(ours, ids, mask), outputs(theirs, ids, mask), strict=True):
            torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------------------------------
# Both ways, every class
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", CLASS_NAMES)
def test_from_transformers_shares_every_tensor_and_computes_the_same(name):
    theirs = hf_model(name)
    ours = bloom.from_transformers(theirs)
    assert type(ours) is getattr(bloom, name)
    assert_shared(ours, theirs)
    assert not any(t.is_meta for t in all_tensors(ours).values())
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_to_transformers_shares_every_tensor_and_computes_the_same(name):
    ours = our_model(name)
    theirs = ours.to_transformers()
    assert type(theirs) is getattr(transformers, name)
    assert_shared(ours, theirs)
    assert_same_outputs(ours, theirs)


@pytest.mark.parametrize("name", CLASS_NAMES)
def test_the_round_trip_shares_the_storage_too(name):
    ours = our_model(name)
    again = bloom.from_transformers(ours.to_transformers())
    assert type(again) is type(ours) and again is not ours
    assert_shared(again, ours)
    # every BLOOM field comes back (transformers adds its bookkeeping keys, as in its config.json files)
    fields = [*BLOOM_DEFAULTS, "id2label", "label2id", "dtype"]
    assert {k: getattr(again.config, k) for k in fields} == {k: getattr(ours.config, k) for k in fields}


def test_the_config_is_converted():
    theirs = hf_model("BloomForSequenceClassification", num_labels=3, apply_residual_connection_post_layernorm=True)
    ours = bloom.from_transformers(theirs)
    assert isinstance(ours.config, bloom.BloomConfig)
    assert ours.config.num_labels == 3 and ours.config.id2label == theirs.config.id2label
    assert ours.config.apply_residual_connection_post_layernorm
    assert_same_outputs(ours, theirs)
    back = ours.to_transformers()
    assert isinstance(back.config, transformers.BloomConfig) and back.config.num_labels == 3
    # copies: the configs are not shared (only the tensors are)
    ours.config.pad_token_id = 5
    assert theirs.config.pad_token_id == back.config.pad_token_id == CFG["pad_token_id"]


# --------------------------------------------------------------------------------------------------
# Ties, modes, dtype, requires_grad, devices
# --------------------------------------------------------------------------------------------------
def test_tied_embeddings_stay_tied_both_ways():
    ours = bloom.from_transformers(hf_model("BloomForCausalLM"))
    assert ours.lm_head.weight is ours.transformer.word_embeddings.weight
    theirs = ours.to_transformers()
    assert theirs.lm_head.weight is theirs.transformer.word_embeddings.weight


def test_untied_embeddings_stay_untied():
    theirs = hf_model("BloomForCausalLM", tie_word_embeddings=False)
    assert theirs.lm_head.weight is not theirs.transformer.word_embeddings.weight
    ours = bloom.from_transformers(theirs)
    assert ours.lm_head.weight is theirs.lm_head.weight
    assert ours.lm_head.weight is not ours.transformer.word_embeddings.weight
    assert_same_outputs(ours, theirs)


def test_mode_dtype_and_requires_grad_follow_the_source():
    theirs = hf_model("BloomForTokenClassification").to(torch.bfloat16).train()
    theirs.transformer.h[0].requires_grad_(False)
    theirs.dropout.eval()  # one module in another mode than the model's
    ours = bloom.from_transformers(theirs)
    assert ours.training and not ours.dropout.training and ours.transformer.h[1].training
    assert ours.dtype == torch.bfloat16
    assert {n: p.requires_grad for n, p in ours.named_parameters()} == \
        {n: p.requires_grad for n, p in theirs.named_parameters()}
    assert not ours.transformer.h[0].self_attention.dense.weight.requires_grad

    back = ours.eval().to_transformers()
    assert not back.training and not any(m.training for m in back.modules())


def test_a_dtype_change_through_one_is_the_others():
    ours = our_model("BloomModel")
    theirs = ours.to_transformers()
    ours.double()  # Module._apply sets each shared Parameter's .data in place
    assert theirs.word_embeddings.weight.dtype == torch.float64
    assert_shared(ours, theirs)


@pytest.mark.gpu
def test_a_model_on_the_gpu_stays_there():
    theirs = hf_model("BloomForCausalLM").to("cuda", torch.float16)
    ours = bloom.from_transformers(theirs)
    assert ours.device.type == "cuda" and ours.dtype == torch.float16
    assert_shared(ours, theirs)
    ids, mask = left_padded_batch(CFG["vocab_size"], pad_id=CFG["pad_token_id"])
    ids, mask, real = ids.cuda(), mask.cuda(), mask.bool().cuda()
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask=mask).logits[real].float(),
                                   theirs(ids, attention_mask=mask).logits[real].float(), atol=2e-2, rtol=0)


# --------------------------------------------------------------------------------------------------
# Training through one trains the other
# --------------------------------------------------------------------------------------------------
def sgd_step(model, ids, mask):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    optimizer.zero_grad()
    model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
    optimizer.step()


@pytest.mark.parametrize("step_through", ["ours", "theirs"])
def test_a_gradient_step_through_one_changes_the_other(step_through):
    theirs = hf_model("BloomForCausalLM")
    ours = bloom.from_transformers(theirs)
    ids, mask = left_padded_batch(CFG["vocab_size"], pad_id=CFG["pad_token_id"])
    before = {n: p.detach().clone() for n, p in theirs.named_parameters()}
    sgd_step((ours if step_through == "ours" else theirs).train(), ids, mask)
    for model in (ours, theirs):
        model.eval()
        changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
        assert "transformer.word_embeddings.weight" in changed and len(changed) == len(before)
    assert_same_outputs(ours, theirs)


def test_ours_generates_with_the_transformers_generation_config():
    theirs = hf_model("BloomForCausalLM")
    theirs.generation_config.max_new_tokens = 4
    ours = bloom.from_transformers(theirs)
    assert ours.generation_config.max_new_tokens == 4
    assert ours.generate(torch.tensor([[5, 6, 7]])).shape == (1, 7)
    assert ours.to_transformers().generation_config.max_new_tokens == 4


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------
def test_from_transformers_refuses_what_is_not_a_transformers_bloom_model():
    with pytest.raises(TypeError, match=r"hf_model.*transformers BLOOM model.*got torch\.nn\.modules\.linear\.Linear"):
        bloom.from_transformers(nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"got bloom\.model\.BloomForCausalLM \(already a bloom model"):
        bloom.from_transformers(our_model("BloomForCausalLM"))
    gpt2 = transformers.GPT2Model(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=50))
    with pytest.raises(TypeError, match="GPT2Model .a transformers model, but not one of these BLOOM classes"):
        bloom.from_transformers(gpt2)


def test_from_transformers_refuses_a_model_quantised_by_transformers():
    theirs = hf_model("BloomForCausalLM")
    theirs.config.quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    with pytest.raises(ValueError, match=r"hf_model.*quantised by transformers \(quant_method=bitsandbytes\)"):
        bloom.from_transformers(theirs)


def test_to_transformers_refuses_an_int8_model():
    model = bloom.quantize_int8(our_model("BloomForCausalLM"))
    with pytest.raises(ValueError, match=r"to_transformers\(model\): this BloomForCausalLM is int8-quantised"):
        model.to_transformers()


def test_to_transformers_without_transformers_says_so(monkeypatch):
    model = our_model("BloomModel")
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` raises ImportError
    with pytest.raises(ImportError, match=r"to_transformers\(\) needs the transformers package.*pip install"):
        model.to_transformers()
    with pytest.raises(TypeError, match="expected a transformers BLOOM model"):
        bloom.from_transformers(model)


def test_to_transformers_refuses_what_is_not_a_bloom_model():
    with pytest.raises(TypeError, match=r"to_transformers\(model\): expected a bloom model.*got torch"):
        bloom.interop.to_transformers(nn.Linear(2, 2))
