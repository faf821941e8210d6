"""BloomConfig: transformers' fields and defaults, JSON round trips, real bigscience config files."""

import json

import pytest
import torch

from bloom import BloomConfig
from bloom.config import BLOOM_DEFAULTS
from bloom.hub import ModelNotFoundError

transformers = pytest.importorskip("transformers")

# config.json of bigscience/bloom-560m and of bigscience/bloom (176B) as published on the hub: the
# 176B file uses the old spellings n_embed / num_attention_heads and carries Megatron-only keys.
BLOOM_560M = {
    "apply_residual_connection_post_layernorm": False, "architectures": ["BloomForCausalLM"],
    "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0, "hidden_size": 1024,
    "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True,
    "model_type": "bloom", "n_head": 16, "n_inner": None, "n_layer": 24, "offset_alibi": 100,
    "pad_token_id": 3, "pretraining_tp": 1, "skip_bias_add": True, "skip_bias_add_qkv": False,
    "slow_but_exact": False, "transformers_version": "4.27.0.dev0", "unk_token_id": 0,
    "use_cache": True, "vocab_size": 250880,
}
BLOOM_176B = {
    "apply_residual_connection_post_layernorm": False, "architectures": ["BloomForCausalLM"],
    "attention_dropout": 0.0, "attention_softmax_in_fp32": True, "bias_dropout_fusion": True,
    "bos_token_id": 1, "eos_token_id": 2, "hidden_dropout": 0.0, "initializer_range": 0.02,
    "layer_norm_epsilon": 1e-05, "masked_softmax_fusion": True, "model_type": "bloom",
    "n_embed": 14336, "n_layer": 70, "num_attention_heads": 112, "pretraining_tp": 4,
    "slow_but_exact": False, "transformers_version": "4.21.0", "use_cache": True,
    "vocab_size": 250880,
}


def test_defaults_equal_transformers():
    ours, theirs = BloomConfig(), transformers.BloomConfig()
    for name in BLOOM_DEFAULTS:
        assert getattr(ours, name) == getattr(theirs, name), name
    assert (ours.num_hidden_layers, ours.num_attention_heads, ours.n_embed) == (2, 8, 64)
    assert ours.num_labels == theirs.num_labels == 2
    assert ours.output_hidden_states is False and ours.return_dict is True


def test_accepts_every_key_of_a_transformers_config_dict():
    theirs = transformers.BloomConfig(hidden_size=96, n_head=6, n_layer=3, pad_token_id=3,
                                      apply_residual_connection_post_layernorm=True)
    ours = BloomConfig(**theirs.to_dict())
    for key, value in theirs.to_dict().items():
        if key in ("id2label", "label2id"):
            continue
        assert getattr(ours, key) == value, key
    # and transformers reads ours
    back = transformers.BloomConfig(**ours.to_dict())
    assert (back.hidden_size, back.n_head, back.n_layer, back.pad_token_id) == (96, 6, 3, 3)


@pytest.mark.parametrize("raw, expected", [
    (BLOOM_560M, dict(hidden_size=1024, n_head=16, n_layer=24, pretraining_tp=1, head_dim=64)),
    (BLOOM_176B, dict(hidden_size=14336, n_head=112, n_layer=70, pretraining_tp=4, head_dim=128)),
])
def test_reads_real_bigscience_config_files(tmp_path, raw, expected):
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = BloomConfig.from_pretrained(tmp_path)
    for name, value in expected.items():
        assert getattr(config, name) == value, name
    # keys BloomConfig does not know (Megatron's) are kept as attributes and written back
    assert config.attention_softmax_in_fp32 is True and config.masked_softmax_fusion is True
    assert config.to_dict()["bias_dropout_fusion"] is True
    theirs = transformers.BloomConfig.from_json_file(str(tmp_path / "config.json"))
    assert (theirs.hidden_size, theirs.n_head, theirs.n_layer) == (config.hidden_size, config.n_head,
                                                                   config.n_layer)


def test_json_round_trip(tmp_path):
    config = BloomConfig(hidden_size=48, n_head=12, n_layer=3, id2label={0: "neg", 1: "neu", 2: "pos"},
                         custom_field=[1, 2], eos_token_id=[2, 5])
    config.save_pretrained(tmp_path)
    loaded = BloomConfig.from_pretrained(tmp_path)
    assert loaded == config
    assert loaded.id2label == {0: "neg", 1: "neu", 2: "pos"} and loaded.num_labels == 3
    assert loaded.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert loaded.custom_field == [1, 2]
    assert BloomConfig.from_dict(json.loads(config.to_json_string())) == config


def test_num_labels_follows_id2label():
    assert BloomConfig(num_labels=5).id2label == {i: f"LABEL_{i}" for i in range(5)}
    config = BloomConfig(id2label={"0": "a", "1": "b", "2": "c"})
    assert config.num_labels == 3 and config.id2label[2] == "c"
    config.num_labels = 4
    assert len(config.id2label) == 4 and config.label2id["LABEL_3"] == 3


def test_aliases_and_overrides():
    config = BloomConfig(num_hidden_layers=5, num_attention_heads=4, n_embed=32)
    assert (config.n_layer, config.n_head, config.hidden_size) == (5, 4, 32)
    config.num_hidden_layers = 7
    assert config.n_layer == 7 and config.to_dict()["n_layer"] == 7
    assert BloomConfig.from_dict(BLOOM_560M, n_layer=2).n_layer == 2


@pytest.mark.parametrize("kwargs, field", [
    (dict(hidden_size=100, n_head=8), "hidden_size"),
    (dict(n_layer=0), "n_layer"),
    (dict(n_head=-2), "n_head"),
    (dict(vocab_size=0), "vocab_size"),
    (dict(hidden_dropout=1.5), "hidden_dropout"),
    (dict(attention_dropout=-0.1), "attention_dropout"),
    (dict(layer_norm_epsilon=0), "layer_norm_epsilon"),
    (dict(pretraining_tp=0), "pretraining_tp"),
    (dict(n_layer=2.5), "n_layer"),
    (dict(vocab_size=10, eos_token_id=12), "eos_token_id"),
    (dict(n_layer=2, num_hidden_layers=3), "num_hidden_layers"),
    # parsed, not coerced (issue 14): "False" is a truthy string, it must not switch a path on
    (dict(slow_but_exact="False"), "slow_but_exact"),
    (dict(apply_residual_connection_post_layernorm="no"), "apply_residual_connection_post_layernorm"),
    (dict(use_cache="yes"), "use_cache"),
    (dict(tie_word_embeddings=0), "tie_word_embeddings"),
    (dict(hidden_size="64"), "hidden_size"),
    (dict(hidden_size=float("inf")), "hidden_size"),
    (dict(layer_norm_epsilon=float("nan")), "layer_norm_epsilon"),
    (dict(layer_norm_epsilon="1e-5"), "layer_norm_epsilon"),
    (dict(initializer_range=-0.1), "initializer_range"),
    (dict(initializer_range=float("inf")), "initializer_range"),
    (dict(num_labels=-2), "num_labels"),
    (dict(num_labels=2.0), "num_labels"),
    (dict(id2label={"a": "x"}), "id2label"),
    (dict(id2label={"-1": "x"}), "id2label"),
    (dict(id2label=["x"]), "id2label"),
])
def test_invalid_values_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        BloomConfig(**kwargs)


def test_bad_files_are_reported(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        BloomConfig.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        BloomConfig.from_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        BloomConfig.from_pretrained(empty)
    with pytest.raises(ModelNotFoundError, match="not a directory"):
        BloomConfig.from_pretrained(tmp_path / "missing_dir")


@pytest.mark.parametrize("given", [dict(dtype="bfloat16"), dict(torch_dtype="float16"), dict(dtype=torch.float32),
                                   dict(torch_dtype=torch.bfloat16), {}], ids=str)
def test_dtype_is_a_torch_dtype_saved_by_name_as_transformers_does(given, tmp_path):
    transformers = pytest.importorskip("transformers")
    ours, theirs = BloomConfig(**given), transformers.BloomConfig(**given)
    assert ours.dtype == theirs.dtype and ours.torch_dtype == ours.dtype
    assert ours.to_dict()["dtype"] == theirs.to_dict().get("dtype")
    ours.save_pretrained(tmp_path)
    assert BloomConfig.from_pretrained(tmp_path).dtype == ours.dtype
    assert "torch_dtype" not in ours.to_dict()


def test_bad_or_conflicting_dtype_is_refused_by_name():
    with pytest.raises(ValueError, match="BloomConfig.dtype must be None, 'auto', a torch.dtype"):
        BloomConfig(dtype="float8")
    with pytest.raises(ValueError, match="torch_dtype='float16' conflicts with dtype='bfloat16'"):
        BloomConfig(dtype="bfloat16", torch_dtype="float16")
    config = BloomConfig(dtype="torch.float16")  # str(torch.float16), as some configs hold it
    assert config.dtype is torch.float16
    config.torch_dtype = "bf16"
    assert config.dtype is torch.bfloat16
