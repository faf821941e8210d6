"""from_pretrained / save_pretrained: round trips with transformers, and every error case (CPU, offline)."""

import dataclasses
import inspect
import json
import os
import pickle

import pytest
import torch
from safetensors.torch import save_file

from bloom import BloomConfig, BloomForCausalLM, BloomModel
from bloom.hub import HubOptions, ModelNotFoundError
from bloom.loading import CheckpointError, parse_size

transformers = pytest.importorskip("transformers")

CFG = dict(vocab_size=101, hidden_size=32, n_layer=2, n_head=4)


def random_hf(cls_name="BloomForCausalLM", seed=0, **extra):
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(transformers.BloomConfig(**CFG, **extra)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))  # LN weights/biases and biases off their init values
    return model


# Our logits against transformers' on the same weights: fp32 to rounding (fp32 sums in other orders);
# bf16 to bf16's resolution (our math keeps fp32 inside where transformers rounds to bf16).
ACROSS_IMPLEMENTATIONS = {torch.float32: dict(atol=1e-6, rtol=1e-5), torch.bfloat16: dict(atol=0.1, rtol=0.02)}
IDS = torch.tensor([[5, 17, 42, 7, 99, 3], [8, 8, 1, 64, 30, 2]])


def logits(model, ids=IDS):
    with torch.no_grad():
        out = model(ids)
    return (out.logits if hasattr(out, "logits") else out.last_hidden_state).float()


@pytest.mark.parametrize("shard", [None, "20KB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_we_load_what_transformers_saves(tmp_path, shard, dtype):
    theirs = random_hf().to(dtype)
    kwargs = {"max_shard_size": shard} if shard else {}
    theirs.save_pretrained(tmp_path, **kwargs)
    assert (tmp_path / ("model.safetensors.index.json" if shard else "model.safetensors")).exists()
    ours = BloomForCausalLM.from_pretrained(tmp_path, torch_dtype="auto")
    assert ours.dtype == dtype
    assert ours.lm_head.weight is ours.transformer.word_embeddings.weight
    assert not any(p.is_meta for p in ours.parameters())
    # The transfer is exact in any dtype: identical to our model given transformers' state dict directly.
    direct = BloomForCausalLM(BloomConfig(**CFG)).to(dtype).eval()
    direct.load_state_dict(theirs.state_dict())
    assert torch.equal(logits(ours), logits(direct))
    # Across implementations: fp32 to rounding (both attentions are fused SDPA-style but sum in other
    # orders); bf16 the same weights but our math keeps fp32 inside (residual sums, ALiBi bias) where
    # transformers rounds to bf16 -> a bf16-sized tolerance.
    torch.testing.assert_close(logits(ours), logits(theirs), **ACROSS_IMPLEMENTATIONS[dtype])


@pytest.mark.parametrize("shard", [None, "20KB"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transformers_loads_what_we_save(tmp_path, shard, dtype):
    source = random_hf()
    ours = BloomForCausalLM(BloomConfig(**CFG)).eval()
    ours.load_state_dict(source.state_dict())
    ours = ours.to(dtype)
    ours.save_pretrained(tmp_path, **({"max_shard_size": shard} if shard else {}))
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["BloomForCausalLM"] and config["dtype"] == str(dtype)[6:]
    theirs = transformers.BloomForCausalLM.from_pretrained(tmp_path, dtype=dtype).eval()
    # The transfer is exact: transformers' model from our files equals it given our state dict directly.
    direct = transformers.BloomForCausalLM(transformers.BloomConfig(**CFG)).to(dtype).eval()
    direct.load_state_dict(ours.state_dict())
    assert torch.equal(logits(theirs), logits(direct))
    torch.testing.assert_close(logits(theirs), logits(ours), **ACROSS_IMPLEMENTATIONS[dtype])
    # and our own round trip is exact in any dtype
    again = BloomForCausalLM.from_pretrained(tmp_path, torch_dtype="auto")
    assert torch.equal(logits(again), logits(ours))


def test_base_model_checkpoints_load_into_both_classes(tmp_path):
    """The official bigscience checkpoints are saved from the base model (no 'transformer.' prefix)."""
    theirs = random_hf("BloomModel")
    theirs.save_pretrained(tmp_path)
    causal = BloomForCausalLM.from_pretrained(tmp_path)
    base = BloomModel.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(base), logits(theirs), **ACROSS_IMPLEMENTATIONS[torch.float32])
    hidden = causal.transformer(IDS).last_hidden_state
    torch.testing.assert_close(causal(IDS).logits, hidden @ causal.transformer.word_embeddings.weight.T)
    # and a causal-LM checkpoint loads into the base model (the head is dropped)
    causal.save_pretrained(tmp_path / "causal")
    torch.testing.assert_close(logits(BloomModel.from_pretrained(tmp_path / "causal")), logits(base))


def test_loading_does_not_initialise_weights_randomly(tmp_path, monkeypatch):
    random_hf().save_pretrained(tmp_path)

    # Every random init ends in Tensor.normal_ / uniform_; on meta tensors they compute nothing.
    for method in ("normal_", "uniform_"):
        real = getattr(torch.Tensor, method)

        def guarded(tensor, *args, _real=real, **kwargs):
            if not tensor.is_meta:
                raise AssertionError("random init of a real tensor during from_pretrained")
            return _real(tensor, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, guarded)
    model = BloomForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float16, device="cpu")
    assert model.dtype == torch.float16 and model.device.type == "cpu"


def test_config_overrides_and_dtype_names(tmp_path):
    random_hf().save_pretrained(tmp_path)
    model = BloomForCausalLM.from_pretrained(tmp_path, torch_dtype="bf16", hidden_dropout=0.25)
    assert model.dtype == torch.bfloat16 and model.config.hidden_dropout == 0.25
    with pytest.raises(ValueError, match="torch_dtype"):
        BloomForCausalLM.from_pretrained(tmp_path, torch_dtype="float8")


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pytorch_bin_is_loaded_with_weights_only(tmp_path, zip_format):
    """torch's zip format (memory-mapped) and the legacy pre-1.6 format (read whole), both safely."""
    theirs = random_hf()
    torch.save(theirs.state_dict(), tmp_path / "pytorch_model.bin", _use_new_zipfile_serialization=zip_format)
    theirs.config.save_pretrained(tmp_path)
    ours = BloomForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(logits(ours), logits(theirs), **ACROSS_IMPLEMENTATIONS[torch.float32])


@pytest.mark.parametrize("content", [[torch.zeros(2)], {"word_embeddings.weight": 3}, torch.zeros(3)], ids=str)
def test_a_bin_that_is_not_a_state_dict_is_refused_by_name(tmp_path, content):
    BloomConfig(**CFG).save_pretrained(tmp_path)
    torch.save(content, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin is not a state dict"):
        BloomForCausalLM.from_pretrained(tmp_path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def test_a_malicious_pickle_is_refused(tmp_path):
    BloomConfig(**CFG).save_pretrained(tmp_path)
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"word_embeddings.weight": _Exploit()}, f)
    with pytest.raises(CheckpointError, match="pytorch_model.bin cannot be read safely"):
        BloomForCausalLM.from_pretrained(tmp_path)


# --- errors --------------------------------------------------------------------------------------
def saved_state(tmp_path):
    theirs = random_hf()
    theirs.save_pretrained(tmp_path)
    return {k: v.contiguous() for k, v in theirs.state_dict().items() if k != "lm_head.weight"}


def test_missing_keys_are_listed(tmp_path):
    state = saved_state(tmp_path)
    del state["transformer.h.1.mlp.dense_4h_to_h.bias"]
    del state["transformer.ln_f.weight"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing keys") as info:
        BloomForCausalLM.from_pretrained(tmp_path)
    assert "transformer.h.1.mlp.dense_4h_to_h.bias" in str(info.value)
    assert "transformer.ln_f.weight" in str(info.value)


def test_unexpected_keys_are_listed(tmp_path):
    state = saved_state(tmp_path)
    state["transformer.h.7.mlp.dense_4h_to_h.bias"] = torch.zeros(3)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="unexpected keys: transformer.h.7.mlp.dense_4h_to_h.bias"):
        BloomForCausalLM.from_pretrained(tmp_path)


def test_shape_mismatch_names_tensor_expected_and_found(tmp_path):
    state = saved_state(tmp_path)
    state["transformer.h.0.self_attention.dense.weight"] = torch.zeros(32, 31)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        BloomForCausalLM.from_pretrained(tmp_path)
    message = str(info.value)
    assert "transformer.h.0.self_attention.dense.weight" in message
    assert "(32, 31)" in message and "(32, 32)" in message


def test_config_that_does_not_match_the_weights(tmp_path):
    random_hf().save_pretrained(tmp_path)
    with pytest.raises(CheckpointError, match="does the config match the weights"):
        BloomForCausalLM.from_pretrained(tmp_path, hidden_size=64)
    with pytest.raises(CheckpointError, match="unexpected keys"):
        BloomForCausalLM.from_pretrained(tmp_path, n_layer=1)


def test_truncated_and_corrupt_files_are_named(tmp_path):
    random_hf().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        BloomForCausalLM.from_pretrained(tmp_path)
    path.write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="model.safetensors is truncated or corrupt"):
        BloomForCausalLM.from_pretrained(tmp_path)


def test_missing_shard_is_named(tmp_path):
    random_hf().save_pretrained(tmp_path, max_shard_size="20KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    shards[-1].unlink()
    with pytest.raises(FileNotFoundError, match=shards[-1].name):
        BloomForCausalLM.from_pretrained(tmp_path)


def test_no_weights_in_directory(tmp_path):
    BloomConfig(**CFG).save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="no weights found"):
        BloomForCausalLM.from_pretrained(tmp_path)


def test_unknown_hub_id_while_offline(tmp_path):
    with pytest.raises(ModelNotFoundError, match="not in the local cache"):
        BloomForCausalLM.from_pretrained("no-such-org/no-such-bloom", local_files_only=True,
                                         cache_dir=tmp_path)


def test_save_replaces_a_previous_sharding(tmp_path):
    model = BloomForCausalLM(BloomConfig(**CFG))
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200MiB") == 200 * 2**20
    with pytest.raises(ValueError, match="max_shard_size"):
        parse_size("lots")


# --------------------------------------------------------------------------------------------------
# HubOptions: the hub arguments travel as one object down to hf_hub_download
# --------------------------------------------------------------------------------------------------
HUB_KWARGS = dict(revision="v1.0", cache_dir="/some/cache", local_files_only=True, token="hf_secret",
                  subfolder="sub")


def test_hub_options_from_kwargs_and_to_kwargs():
    import huggingface_hub

    kwargs = {"revision": "main", "token": False, "torch_dtype": "auto"}
    hub = HubOptions.from_kwargs(kwargs)
    assert hub == HubOptions(revision="main", token=False)
    assert kwargs == {"torch_dtype": "auto"}  # the hub keys are popped, the rest stays
    assert HubOptions.from_kwargs({}) == HubOptions()
    assert HubOptions(**HUB_KWARGS).to_kwargs() == HUB_KWARGS
    assert set(HUB_KWARGS) <= set(inspect.signature(huggingface_hub.hf_hub_download).parameters)
    with pytest.raises(dataclasses.FrozenInstanceError):
        hub.revision = "other"


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """hf_hub_download answering from a local directory (config, weights, tokenizer); records calls."""
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError

    from helpers import train_bloom_like_tokenizer, write_tokenizer_dir

    repo = tmp_path / "repo"
    random_hf().save_pretrained(repo)
    write_tokenizer_dir(repo, train_bloom_like_tokenizer())
    calls = []

    def hf_hub_download(*, repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        if not (repo / filename).is_file():
            raise EntryNotFoundError(filename)
        return str(repo / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    return calls


def test_every_from_pretrained_passes_the_hub_arguments_to_each_download(fake_hub):
    from bloom import BloomTokenizerFast

    config = BloomConfig.from_pretrained("org/bloom", **HUB_KWARGS)
    model = BloomForCausalLM.from_pretrained("org/bloom", **HUB_KWARGS)
    tokenizer = BloomTokenizerFast.from_pretrained("org/bloom", **HUB_KWARGS)
    assert config.vocab_size == model.config.vocab_size == CFG["vocab_size"] and tokenizer.vocab_size > 0
    files = [filename for _, filename, _ in fake_hub]
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= set(files)
    assert all(repo == "org/bloom" and kwargs == HUB_KWARGS for repo, _, kwargs in fake_hub)
    # Defaults when nothing is given: those of hf_hub_download's arguments.
    fake_hub.clear()
    BloomConfig.from_pretrained("org/bloom")
    assert fake_hub == [("org/bloom", "config.json", HubOptions().to_kwargs())]


def test_unknown_revision_is_named(monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import RevisionNotFoundError

    class NoRevision(RevisionNotFoundError):
        def __init__(self):
            Exception.__init__(self, "404")

    def hf_hub_download(**kwargs):
        raise NoRevision()

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(ModelNotFoundError, match=r"revision 'nope' not found in the hub repository org/bloom"):
        BloomForCausalLM.from_pretrained("org/bloom", revision="nope")
