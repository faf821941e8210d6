"""`bloom parity` and bloom.parity.compare (issue 15) on tiny random models, on the CPU.

Reference against itself (errors 0), the Triton kernels through the interpreter (within fp32's
thresholds), a block broken on the fused path only (the report names it, the command exits 1), and the
command line (JSON, one-line errors).
"""

import json

import pytest
import torch

import bloom.parity as parity
from bloom import BloomConfig, BloomForCausalLM
from bloom.cli import main
from bloom.model import BloomAttention

# small enough for the Triton interpreter: hidden 64, 4 heads, 3 layers (a middle layer to break)
TINY = dict(hidden_size=64, n_layer=3, n_head=4, vocab_size=256)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)  # shapes.SHAPES' tiny (hidden 128) is more than the interpreter needs
    return BloomForCausalLM(BloomConfig(**TINY)).eval()


def left_padded(vocab: int, batch: int = 2, seq: int = 9):
    return parity.random_inputs(vocab, batch, seq, pad_id=3, seed=1, device="cpu")


def perturbed_attention(monkeypatch, layer: int, scale: float = 0.5):
    """Break the attention of one layer, on the fused path only (not under the reference backend): a
    test double standing for a fused op that is wrong in that layer."""
    from bloom_kernels._dispatch import requested_backend

    forward = BloomAttention.forward

    def broken(self, *args, **kwargs):
        out, probs = forward(self, *args, **kwargs)
        if self.layer_idx == layer and requested_backend() != "reference":
            out = out + scale * out.std() * torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
        return out, probs

    monkeypatch.setattr(BloomAttention, "forward", broken)


def test_reference_against_itself_is_exact(model, force_reference):
    ids, mask = left_padded(model.config.vocab_size)
    report = parity.compare(model, ids, mask, new_tokens=3, with_transformers=False)
    (vs_ref,) = report.comparisons
    assert [row.name for row in vs_ref.layers] == ["embeddings", "layer 0", "layer 1", "layer 2 + ln_f"]
    assert all(row.max_abs == 0 and row.rel == 0 for row in vs_ref.layers)
    assert vs_ref.logits_rel == 0 and vs_ref.top1 == 1.0
    assert vs_ref.positions == int(mask.sum())  # the padded positions are left out
    assert vs_ref.greedy_min == 3 and report.passed and report.failures == []
    assert report.fused.startswith("reference ops")


def test_transformers_row_agrees_in_fp32(model, force_reference):
    pytest.importorskip("transformers")
    ids, mask = left_padded(model.config.vocab_size)
    report = parity.compare(model, ids, mask, new_tokens=2)
    vs_theirs = report.comparisons[1]
    assert vs_theirs.baseline == "transformers"
    assert max(row.rel for row in vs_theirs.layers) < 1e-6 and vs_theirs.logits_rel < 1e-6
    assert vs_theirs.top1 == 1.0 and vs_theirs.greedy_min == 2 and report.passed


def test_triton_interpreter_within_fp32_thresholds(model, force_triton):
    ids, mask = left_padded(model.config.vocab_size)
    report = parity.compare(model, ids, mask, new_tokens=2, with_transformers=False)
    assert report.fused.startswith("Triton kernels")
    (vs_ref,) = report.comparisons
    limits = parity.THRESHOLDS["float32"]
    assert max(row.rel for row in vs_ref.layers) <= limits.hidden_rel
    assert 0 < vs_ref.logits_rel <= limits.logits_rel  # > 0: the kernels did run, not the reference
    assert report.passed, report.table()


def test_a_layer_broken_alone_is_named(model, monkeypatch):
    perturbed_attention(monkeypatch, layer=1)
    ids, mask = left_padded(model.config.vocab_size)
    report = parity.compare(model, ids, mask, new_tokens=2, with_transformers=False)
    assert not report.passed
    first = report.failures[0]
    assert (first.metric, first.layer, first.baseline) == ("hidden_rel", 1, "reference")
    assert str(first).startswith("layer 1: hidden-state relative error")
    rows = {row.name: row.rel for row in report.comparisons[0].layers}
    assert rows["layer 0"] < 1e-6  # before the broken layer: untouched
    assert "FAILED: layer 1:" in report.table()


def test_cli_exits_nonzero_on_a_broken_layer(monkeypatch, capsys):
    perturbed_attention(monkeypatch, layer=1)
    assert main(["parity", "--shape", "tiny", "--batch", "2", "--seq-len", "8", "--new-tokens", "2",
                 "--no-transformers"]) == 1
    assert "FAILED: layer 1 + ln_f: hidden-state relative error" in capsys.readouterr().out


def test_cli_writes_the_report_as_json(tmp_path, capsys):
    path = tmp_path / "parity.json"
    assert main(["parity", "--shape", "tiny", "--batch", "2", "--seq-len", "8", "--new-tokens", "3",
                 "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("bloom parity: shape tiny (random weights, seed 0) | float32 | device cpu")
    assert "PASSED" in out
    data = json.loads(path.read_text())
    assert data["passed"] is True and data["failures"] == [] and data["table"] == out.rstrip("\n")
    assert data["thresholds"] == {"hidden_rel": 1e-4, "logits_rel": 1e-4, "top1_min": 0.99}
    layers = data["comparisons"][0]["layers"]
    assert [row["name"] for row in layers] == ["embeddings", "layer 0", "layer 1 + ln_f"]
    assert data["comparisons"][0]["greedy_min"] == 3 and data["batch"] == 2 and data["seq_len"] == 8


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch must be >= 1; got 0"),
    (["--seq-len", "-1"], "--seq-len must be >= 1; got -1"),
    (["--new-tokens", "0"], "--new-tokens must be >= 1; got 0"),
    (["--prompt", "hi"], "--prompt needs MODEL"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_arguments_are_one_line(argv, message, capsys):
    assert main(["parity", "--shape", "tiny", *argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"bloom: error: {message}") and err.count("\n") == 1


def test_thresholds_by_dtype():
    assert parity.thresholds_for(torch.float32, int8=False) == parity.THRESHOLDS["float32"]
    assert parity.thresholds_for(torch.bfloat16, int8=True) == parity.Thresholds(1e-1, 1e-1, 0.80)
    with pytest.raises(ValueError, match="float64"):
        parity.thresholds_for(torch.float64, int8=False)


def test_int8_model_needs_its_reference(model):
    from bloom import quantize_int8

    quantized = quantize_int8(parity.cast_copy(model, torch.float32))
    ids, mask = left_padded(model.config.vocab_size, batch=1, seq=5)
    with pytest.raises(ValueError, match="pass reference="):
        parity.compare(quantized, ids, mask)
    report = parity.compare(quantized, ids, mask, new_tokens=2, reference=model, with_transformers=False)
    assert report.int8 and report.thresholds == parity.THRESHOLDS["int8"]
    assert 0 < report.comparisons[0].logits_rel < 0.1


def test_errors_leave_padding_out_and_greedy_counts_the_agreeing_prefix():
    baseline = torch.ones(2, 3, 4)
    fused = baseline.clone()
    fused[1, 0] = float("nan")  # a padded position: whatever a path computes there is not compared
    fused[0, 2] += 0.5
    real = torch.tensor([[1, 1, 1], [0, 1, 1]], dtype=torch.bool)
    max_abs, rel = parity.errors(fused, baseline, real)
    assert max_abs == 0.5 and rel == pytest.approx((4 * 0.25) ** 0.5 / 20 ** 0.5)
    tokens = torch.tensor([[5, 6, 7], [5, 6, 7]])
    assert parity.greedy_agreement(tokens, torch.tensor([[5, 6, 7], [5, 9, 7]])) == [3, 1]


def test_without_transformers_the_report_says_so(model, monkeypatch, force_reference):
    monkeypatch.setattr(parity, "transformers_twin", lambda reference: None)  # as if not importable
    ids, mask = left_padded(model.config.vocab_size, batch=1, seq=4)
    report = parity.compare(model, ids, mask, new_tokens=1)
    assert [c.baseline for c in report.comparisons] == ["reference"] and report.passed
    assert "note: transformers is not importable" in report.table()


def test_cli_loads_a_model_directory(model, tmp_path, capsys):
    model.save_pretrained(tmp_path)
    assert main(["parity", str(tmp_path), "--batch", "1", "--seq-len", "4", "--new-tokens", "1",
                 "--no-transformers"]) == 0
    assert capsys.readouterr().out.startswith(f"bloom parity: {tmp_path} | float32 | device cpu | batch 1 x seq 4")
