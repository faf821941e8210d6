"""int8 weight-only BLOOM: Int8Linear, the model swap, quantise-while-loading, int8 checkpoints."""

import json

import pytest
import torch
from torch import nn

import bloom_kernels
from bloom import BloomConfig, BloomForCausalLM, Int8Linear, quantize_int8
from bloom.cli import main as cli_main
from bloom.quantization import QUANTIZATION_KEY
from helpers import BLOOM_CONFIG, train_bloom_like_tokenizer, write_tokenizer_dir

CFG = dict(vocab_size=211, hidden_size=64, n_layer=2, n_head=4)


def random_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    model = BloomForCausalLM(BloomConfig(**CFG)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.to(dtype)


IDS = torch.tensor([[5, 17, 42, 7, 99, 3, 150, 64], [8, 8, 1, 64, 30, 2, 210, 0]])


def test_int8_linear_module_matches_its_definition_and_error_bound():
    torch.manual_seed(1)
    linear = nn.Linear(70, 33)
    q = Int8Linear.from_linear(linear)
    assert q.weight.dtype == torch.int8 and q.weight.shape == (33, 70)
    assert q.scale.dtype == torch.float32 and q.scale.shape == (33,)
    x = torch.randn(3, 5, 70)
    y = q(x)
    expected = x.double() @ (q.weight.double() * q.scale.double()[:, None]).T + linear.bias.double()
    torch.testing.assert_close(y.double(), expected, atol=1e-5, rtol=1e-5)
    # Rounding moves each weight by at most scale/2, so |y_q - y| <= sum_k |x_k| * scale_n / 2.
    bound = x.abs().sum(-1, keepdim=True) * q.scale / 2
    assert ((y - linear(x)).abs() <= bound + 1e-5).all()
    assert not torch.equal(y, linear(x))


def test_scale_stays_fp32_through_dtype_casts():
    q = Int8Linear.from_linear(nn.Linear(16, 8))
    scale = q.scale.clone()
    q.to(torch.bfloat16)
    assert q.scale.dtype == torch.float32 and torch.equal(q.scale, scale)
    assert q.weight.dtype == torch.int8 and q.bias.dtype == torch.bfloat16
    q.half()
    assert q.scale.dtype == torch.float32 and q.bias.dtype == torch.float16


def test_quantize_int8_swaps_every_linear_in_place():
    model = random_model()
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert quantize_int8(model) is model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == n_linear == 4 * CFG["n_layer"] + 1
    assert getattr(model.config, QUANTIZATION_KEY)["include_lm_head"] is True
    # the embedding lookup stays in floating point; lm_head holds its own int8 copy of it
    assert model.transformer.word_embeddings.weight.dtype == torch.float32
    with pytest.raises(ValueError, match="already quantised"):
        quantize_int8(model)


def test_quantize_without_lm_head_keeps_it_tied():
    model = quantize_int8(random_model(), include_lm_head=False)
    assert isinstance(model.lm_head, nn.Linear)
    assert model.lm_head.weight is model.transformer.word_embeddings.weight


def test_int8_logits_stay_close_to_the_float_model():
    """Bound: each weight moves by <= 1/254 of its row's absmax, i.e. a relative weight error of
    ~0.2% rms for Gaussian rows; through 2 blocks and the head that gives logits errors of ~1% of
    their spread. We allow 5% of the logits' standard deviation and require the same argmax on
    almost every position."""
    model = random_model()
    with torch.no_grad():
        ref = model(IDS).logits
        got = quantize_int8(model)(IDS).logits
    err = (got - ref).abs().max() / ref.std()
    assert 0 < err < 0.05, err
    agree = (got.argmax(-1) == ref.argmax(-1)).float().mean()
    assert agree >= 0.9, agree


def test_model_uses_bloom_kernels_int8_linear(monkeypatch):
    calls = []
    real = bloom_kernels.int8_linear
    monkeypatch.setattr(bloom_kernels.unchecked, "int8_linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = quantize_int8(random_model())
    with torch.no_grad():
        model(IDS)
    assert len(calls) == 4 * CFG["n_layer"] + 1


def test_int8_slow_but_exact_tp_sums_slices_of_the_same_int8_weights():
    """pretraining_tp=2 with slow_but_exact: each row-parallel int8 projection is the sum of its two
    input slices (same per-channel scale), then the bias: it equals the tp=1 int8 model."""
    torch.manual_seed(0)
    exact = BloomForCausalLM(BloomConfig(**CFG, pretraining_tp=2, slow_but_exact=True)).eval()
    with torch.no_grad():
        for p in exact.parameters():
            p.add_(0.05 * torch.randn_like(p))
    plain = BloomForCausalLM(BloomConfig(**CFG)).eval()
    plain.load_state_dict(exact.state_dict())
    quantize_int8(exact), quantize_int8(plain)
    assert exact.transformer.h[0].mlp.dense_4h_to_h.bias.abs().sum() > 0
    with torch.no_grad():
        torch.testing.assert_close(exact(IDS).logits, plain(IDS).logits, atol=1e-5, rtol=1e-5)


def test_quantize_while_loading_equals_quantizing_the_loaded_model(tmp_path):
    random_model().save_pretrained(tmp_path)
    loaded = BloomForCausalLM.from_pretrained(tmp_path, quantization="int8")
    swapped = quantize_int8(BloomForCausalLM.from_pretrained(tmp_path))
    for name, module in loaded.named_modules():
        if isinstance(module, Int8Linear):  # never a float weight kept in a quantised module
            assert module.weight.dtype == torch.int8
            assert torch.equal(module.weight, swapped.get_submodule(name).weight)
    assert sum(isinstance(m, Int8Linear) for m in loaded.modules()) == 4 * CFG["n_layer"] + 1
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, swapped(IDS).logits)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantized_model_save_load_round_trip_is_exact(tmp_path, dtype):
    model = quantize_int8(random_model(dtype=dtype))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config[QUANTIZATION_KEY] == {"method": "int8_weight_only", "include_lm_head": True}
    again = BloomForCausalLM.from_pretrained(tmp_path, torch_dtype="auto")
    assert isinstance(again.lm_head, Int8Linear) and again.lm_head.scale.dtype == torch.float32
    assert again.transformer.h[0].self_attention.dense.bias.dtype == dtype
    with torch.no_grad():
        assert torch.equal(again(IDS).logits, model(IDS).logits)


def test_quantization_argument_is_checked(tmp_path):
    random_model().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="quantization"):
        BloomForCausalLM.from_pretrained(tmp_path, quantization="int4")


def test_int8_generation_and_cli(tmp_path, capsys):
    backend = train_bloom_like_tokenizer()
    write_tokenizer_dir(tmp_path, backend, BLOOM_CONFIG)
    torch.manual_seed(0)
    model = BloomForCausalLM(BloomConfig(**{**CFG, "vocab_size": backend.get_vocab_size()}))
    model.save_pretrained(tmp_path)
    assert cli_main(["generate", str(tmp_path), "Hello world", "--max-new-tokens", "5", "--int8"]) == 0
    out = capsys.readouterr().out
    q = BloomForCausalLM.from_pretrained(tmp_path, quantization="int8")
    from bloom import BloomTokenizerFast

    tok = BloomTokenizerFast.from_pretrained(tmp_path)
    ids = tok("Hello world", return_tensors="pt")["input_ids"]
    assert out == tok.decode(q.generate(ids, max_new_tokens=5)[0], skip_special_tokens=True) + "\n"
