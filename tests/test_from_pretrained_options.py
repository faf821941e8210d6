"""from_pretrained with transformers' keyword arguments, side by side with transformers where it has
the same option: loading info, mismatched sizes, subfolder, device_map, state_dict, and refusals."""

import warnings

import pytest
import torch

import bloom
from bloom import BloomConfig

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=64, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0)


@pytest.fixture(scope="module")
def causal_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("causal")
    transformers.BloomForCausalLM(transformers.BloomConfig(**CFG)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def two_label_dir(tmp_path_factory, causal_dir):
    path = tmp_path_factory.mktemp("cls2")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformers.BloomForSequenceClassification.from_pretrained(causal_dir, num_labels=2).save_pretrained(path)
    return path


def load_both(name, path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = getattr(transformers, name).from_pretrained(path, output_loading_info=True, **kwargs)
        ours = getattr(bloom, name).from_pretrained(path, output_loading_info=True, **kwargs)
    return ours, theirs


def test_loading_info_of_a_head_from_a_causal_checkpoint(causal_dir):
    (ours, info), (_, want) = load_both("BloomForSequenceClassification", causal_dir)
    assert info == want
    assert info["missing_keys"] == {"score.weight"}


def test_complete_checkpoint_reports_nothing(causal_dir):
    (_, info), (_, want) = load_both("BloomForCausalLM", causal_dir)
    assert info == want == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                            "error_msgs": []}


def test_num_labels_override_wins_and_mismatch_is_reinitialised_and_reported(two_label_dir):
    (ours, info), (theirs, want) = load_both("BloomForSequenceClassification", two_label_dir, num_labels=5,
                                             ignore_mismatched_sizes=True)
    assert info == want and ours.config.num_labels == theirs.config.num_labels == 5
    assert ours.score.weight.shape == (5, 32) and torch.isfinite(ours.score.weight).all()
    torch.testing.assert_close(ours.transformer.h[0].mlp.dense_h_to_4h.weight,
                               theirs.transformer.h[0].mlp.dense_h_to_4h.weight)
    with pytest.raises(ValueError, match=r"score.weight has shape \(2, 32\).*expects \(5, 32\).*ignore_mismatched"):
        bloom.BloomForSequenceClassification.from_pretrained(two_label_dir, num_labels=5)


def test_subfolder(causal_dir, tmp_path):
    import shutil

    shutil.copytree(causal_dir, tmp_path / "weights" / "main")
    model = bloom.BloomForCausalLM.from_pretrained(tmp_path / "weights", subfolder="main")
    reference = bloom.BloomForCausalLM.from_pretrained(causal_dir)
    assert torch.equal(model.lm_head.weight, reference.lm_head.weight)
    assert BloomConfig.from_pretrained(tmp_path / "weights", subfolder="main") == reference.config


@pytest.mark.parametrize("device_map, expected", [("cpu", "cpu"), (torch.device("cpu"), "cpu"),
                                                  ("auto", "cuda" if torch.cuda.is_available() else "cpu")],
                         ids=str)
def test_device_map_on_one_device(causal_dir, device_map, expected):
    model = bloom.BloomForCausalLM.from_pretrained(causal_dir, device_map=device_map, low_cpu_mem_usage=True,
                                                   attn_implementation="sdpa")
    assert model.device.type == expected


def test_device_map_meta_builds_the_model_without_weights(causal_dir):
    """device_map="meta": every tensor on the meta device (shapes and dtypes only), the tie kept."""
    model = bloom.BloomForCausalLM.from_pretrained(causal_dir, device_map="meta")
    assert model.device.type == "meta"
    assert all(t.is_meta for t in (*model.parameters(), *model.buffers()))
    assert model.lm_head.weight is model.transformer.word_embeddings.weight
    reference = bloom.BloomForCausalLM.from_pretrained(causal_dir)
    assert {n: p.shape for n, p in model.named_parameters()} == {n: p.shape for n, p in reference.named_parameters()}


def test_refusals_name_the_argument(causal_dir):
    with pytest.raises(NotImplementedError, match="device_map as a per-module dict"):
        bloom.BloomForCausalLM.from_pretrained(causal_dir, device_map={"": "cpu"})
    with pytest.raises(ValueError, match="device_map must be 'auto', a device"):
        bloom.BloomForCausalLM.from_pretrained(causal_dir, device_map="gpu-please")
    with pytest.raises(ValueError, match="pass device or device_map, not both"):
        bloom.BloomForCausalLM.from_pretrained(causal_dir, device="cpu", device_map="cpu")
    with pytest.raises(ValueError, match="attn_implementation must be one of"):
        bloom.BloomForCausalLM.from_pretrained(causal_dir, attn_implementation="paged")
    with pytest.raises(TypeError, match="takes no positional model arguments"):
        bloom.BloomForCausalLM.from_pretrained(causal_dir, BloomConfig(**CFG))
    with pytest.raises(ValueError, match=r"from_pretrained\(None, ...\) needs both config= and state_dict="):
        bloom.BloomForCausalLM.from_pretrained(None, config=BloomConfig(**CFG))


def test_from_config_and_state_dict(causal_dir):
    reference = bloom.BloomForCausalLM.from_pretrained(causal_dir)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    model = bloom.BloomForCausalLM.from_pretrained(None, config=BloomConfig(**CFG), state_dict=state,
                                                   dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.lm_head.weight is model.transformer.word_embeddings.weight
    torch.testing.assert_close(model.transformer.ln_f.weight.float(), reference.transformer.ln_f.weight)
    # a state dict with the config of the checkpoint dir, as transformers allows
    again = bloom.BloomForCausalLM.from_pretrained(causal_dir, state_dict=state)
    assert torch.equal(again.lm_head.weight, reference.lm_head.weight)
