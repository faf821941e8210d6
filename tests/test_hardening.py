"""Bad input to the model's forward and heads gets an error naming the argument, what was expected and
what was given (issue 14), where torch's own message would name an internal argument or nothing."""

import pytest
import torch

from bloom import BloomConfig, BloomForCausalLM, BloomForSequenceClassification, BloomForTokenClassification

CFG = dict(vocab_size=50, hidden_size=16, n_layer=1, n_head=2, pad_token_id=0)
IDS = torch.tensor([[5, 6, 7]])


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    return (BloomForCausalLM(BloomConfig(**CFG)).eval(),
            BloomForSequenceClassification(BloomConfig(**CFG, num_labels=3)).eval(),
            BloomForTokenClassification(BloomConfig(**CFG, num_labels=3)).eval())


@pytest.mark.parametrize("dtype", [torch.int16, torch.int8, torch.uint8], ids=str)
def test_id_dtypes_other_than_int32_int64_are_named(models, dtype):
    with pytest.raises(TypeError, match=f"input_ids must hold int64 .* or int32 token ids; got dtype {dtype}"):
        models[0](IDS.to(dtype))


def test_int32_ids_give_the_int64_logits(models):
    torch.testing.assert_close(models[0](IDS.to(torch.int32)).logits, models[0](IDS).logits, rtol=0, atol=0)


def test_meta_ids_are_named(models):
    with pytest.raises(ValueError, match="input_ids is on the meta device"):
        models[0](torch.zeros(1, 3, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("value", [-1, 1.5, True, "2"], ids=str)
def test_logits_to_keep_must_be_a_non_negative_int(models, value):
    with pytest.raises(ValueError, match="logits_to_keep must be an int >= 0"):
        models[0](IDS, logits_to_keep=value)


def test_logits_to_keep_keeps_the_last_positions(models):
    full = models[0](IDS).logits
    torch.testing.assert_close(models[0](IDS, logits_to_keep=2).logits, full[:, -2:], rtol=0, atol=0)
    assert models[0](IDS, logits_to_keep=10).logits.shape == full.shape  # more than there are: all


@pytest.mark.parametrize("head, labels, error, match", [
    (1, torch.tensor([5]), ValueError, r"labels must be -100 or class indices in \[0, 3\); got 5"),
    (1, torch.tensor([-2]), ValueError, r"labels must be -100 or class indices in \[0, 3\); got -2"),
    (1, torch.tensor([[1, 2]]), ValueError, r"labels must have shape \(1,\); got \(1, 2\)"),
    (2, torch.tensor([[1, 7, 0]]), ValueError, r"labels must be -100 or class indices in \[0, 3\); got 7"),
    (2, torch.tensor([[1.0, 2.0, 0.0]]), TypeError, "labels must be an integer tensor of class indices"),
    (2, torch.tensor([1, 2, 0, 1]), ValueError, r"labels must have shape \(1, 3\)"),
], ids=str)
def test_head_labels_are_checked(models, head, labels, error, match):
    model = models[head]
    model.config.problem_type = None
    with pytest.raises(error, match=match):
        model(IDS, labels=labels)


def test_valid_head_labels_still_give_transformers_losses(models):
    """-100 ignored, (B,) or (B, 1) for sequence classification: the same cross entropy as by hand."""
    _, seq, tok = models
    seq.config.problem_type = None
    out = seq(IDS, labels=torch.tensor([[2]]))
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(out.logits, torch.tensor([2])))
    out = tok(IDS, labels=torch.tensor([[1, -100, 0]]))
    want = torch.nn.functional.cross_entropy(out.logits[0, [0, 2]], torch.tensor([1, 0]))
    torch.testing.assert_close(out.loss, want)


# --- tokenizer ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from bloom import BloomTokenizerFast
    from helpers import BLOOM_CONFIG, train_bloom_like_tokenizer, write_tokenizer_dir

    directory = write_tokenizer_dir(tmp_path_factory.mktemp("tok"), train_bloom_like_tokenizer(), BLOOM_CONFIG)
    return BloomTokenizerFast.from_pretrained(directory)


@pytest.mark.parametrize("call", ["decode", "batch_decode", "convert_ids_to_tokens", "convert_one"])
@pytest.mark.parametrize("bad", [10_000, -1], ids=str)
def test_ids_outside_the_vocabulary_are_refused_not_dropped(tokenizer, call, bad):
    name = "ids" if call.startswith("convert") else "token_ids"
    with pytest.raises(ValueError, match=f"{name} holds token id {bad}, outside the vocabulary"):
        if call == "decode":
            tokenizer.decode([5, bad])
        elif call == "batch_decode":
            tokenizer.batch_decode([[5], [6, bad]])
        elif call == "convert_ids_to_tokens":
            tokenizer.convert_ids_to_tokens([5, bad])
        else:
            tokenizer.convert_ids_to_tokens(bad)
    assert tokenizer.decode([5, 6]) and tokenizer.convert_ids_to_tokens(5) is not None  # valid ids still work


@pytest.mark.parametrize("texts", [("abc\ud800def",), (["fine", "x\udfffy"],), ("fine", "x\ud801")], ids=str)
def test_lone_surrogates_are_named(tokenizer, texts):
    with pytest.raises(ValueError, match="lone surrogate"):
        tokenizer(*texts)


# --- saving and loading ---------------------------------------------------------------------------
@pytest.mark.parametrize("size", [0, -5, "0MB", True, 1.5], ids=str)
def test_max_shard_size_must_be_positive(models, tmp_path, size):
    with pytest.raises(ValueError, match="max_shard_size must be"):
        models[0].save_pretrained(tmp_path, max_shard_size=size)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
@pytest.mark.parametrize("where", [dict(device="cuda"), dict(device_map="cuda:1"), dict(device_map=0)], ids=str)
def test_cuda_without_cuda_is_one_clear_line(models, tmp_path, where):
    models[0].save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="CUDA is not available here"):
        BloomForCausalLM.from_pretrained(tmp_path, **where)


# --- past_key_values that do not match the model --------------------------------------------------
@pytest.fixture(scope="module")
def two_layers():
    torch.manual_seed(1)
    return BloomForCausalLM(BloomConfig(**{**CFG, "n_layer": 2})).eval()


def _legacy(model):
    return model(IDS, use_cache=True).past_key_values.to_legacy_cache()


@pytest.mark.parametrize("make, error, match", [
    (lambda k, v: ((k[:, :4], v[..., :4]),) * 2, ValueError, "holds 2 heads of dim 4; the model has 2 heads of dim 8"),
    (lambda k, v: ((k, v[:, :2]),) * 2, ValueError, r"past_key_values\[0\]: key \(2, 8, 3\) and value \(2, 2, 8\)"),
    (lambda k, v: ((k, v), (k[..., :2], v[:, :2])), ValueError, r"past_key_values\[1\]: .* do not match layer 0"),
    (lambda k, v: ((k, v),), ValueError, "has 1 layers; the model has 2"),
    (lambda k, v: ["a", "b"], TypeError, r"past_key_values\[0\] must be a \(key, value\) pair"),
], ids=["head_dim", "key_value_lengths", "layers_differ", "layer_count", "not_pairs"])
def test_mismatched_legacy_caches_are_named(two_layers, make, error, match):
    k, v = _legacy(two_layers)[0]
    with pytest.raises(error, match=match):
        two_layers(torch.tensor([[8]]), past_key_values=make(k, v))


@pytest.mark.parametrize("shape, match", [((2, 1, 4, 8), "holds 4 heads of dim 8"), ((2, 1, 2, 4), "heads of dim 4"),
                                          ((3, 1, 2, 8), "has 3 layers"), ((2, 3, 2, 8), "holds a batch of 3")],
                         ids=str)
def test_mismatched_bloom_caches_are_named(two_layers, shape, match):
    from bloom import BloomCache

    layers, batch, heads, head_dim = shape
    cache = BloomCache(layers, batch, heads, head_dim, 10, dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match=match):
        two_layers(torch.tensor([[8]]), past_key_values=cache)


def test_a_matching_legacy_cache_still_continues_the_sequence(two_layers):
    full = two_layers(torch.tensor([[5, 6, 7, 8]])).logits[:, -1]
    step = two_layers(torch.tensor([[8]]), past_key_values=_legacy(two_layers)).logits[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-5, atol=1e-5)


def test_a_float64_model_says_its_accuracy_is_fp32_once(two_layers):
    import copy
    import warnings

    model = copy.deepcopy(two_layers).double()
    with pytest.warns(UserWarning, match="float64: .* fp32 accuracy"):
        out = model(IDS).logits
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), two_layers(IDS).logits, rtol=1e-4, atol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(IDS)  # said once per model


# --- files that are not what they claim -----------------------------------------------------------
def test_non_utf8_and_malformed_model_files_name_the_file(two_layers, tmp_path):
    from bloom.loading import CheckpointError

    two_layers.save_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_bytes(b'{"hidden_size": "\xff\xfe"}')
    with pytest.raises(ValueError, match="config.json is not UTF-8 text"):
        BloomForCausalLM.from_pretrained(tmp_path / "m")
    two_layers.save_pretrained(tmp_path / "s", max_shard_size="4KB")
    index = tmp_path / "s" / "model.safetensors.index.json"
    for content, match in ((b'{"weight_map": ', "not a valid checkpoint index"),
                           (b"\xff\xfe{}", "not a valid checkpoint index .*utf-8"),
                           (b'{"weight_map": [1, 2]}', "weight_map must map tensor names to file names")):
        index.write_bytes(content)
        with pytest.raises(CheckpointError, match=match):
            BloomForCausalLM.from_pretrained(tmp_path / "s")


def test_non_utf8_and_malformed_tokenizer_files_name_the_file(tmp_path):
    from bloom import BloomTokenizerFast
    from helpers import BLOOM_CONFIG, train_bloom_like_tokenizer, write_tokenizer_dir

    backend = train_bloom_like_tokenizer()
    cases = [("tokenizer.json", b'{"version": ', "tokenizer.json is not a valid `tokenizers` file"),
             ("tokenizer.json", b"\xff\xfe", "tokenizer.json is not a valid `tokenizers` file"),
             ("tokenizer_config.json", b'{"a": "\xff"}', "tokenizer_config.json is not UTF-8 text"),
             ("tokenizer_config.json", b'{"model_max_length": "big"}', "model_max_length must be a positive number")]
    for i, (name, content, match) in enumerate(cases):
        directory = write_tokenizer_dir(tmp_path / str(i), backend, BLOOM_CONFIG)
        (directory / name).write_bytes(content)
        with pytest.raises(ValueError, match=match):
            BloomTokenizerFast.from_pretrained(directory)
    directory = write_tokenizer_dir(tmp_path / "float", backend, {**BLOOM_CONFIG, "model_max_length": 2048.0})
    assert BloomTokenizerFast.from_pretrained(directory).model_max_length == 2048  # a float that is an int: taken
