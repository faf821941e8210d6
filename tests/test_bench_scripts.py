"""The benchmark scripts import, parse their arguments, and fail clearly without a GPU.

Their numbers are measured on a GPU (bench/gpu_check.sh); here only what runs on any machine.
"""

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
KERNEL_BENCHES = ["bench_bias_gelu", "bench_layer_norm", "bench_attention", "bench_int8_linear"]


def load(name):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("name", KERNEL_BENCHES)
def test_kernel_bench_says_it_needs_a_gpu(name, capsys):
    assert load(name).main([]) == 1
    assert "CUDA" in capsys.readouterr().err


@pytest.mark.parametrize("name", KERNEL_BENCHES)
def test_kernel_bench_help_names_its_options(name, capsys):
    with pytest.raises(SystemExit) as info:
        load(name).main(["--help"])
    assert info.value.code == 0
    assert "--out" in capsys.readouterr().out


def test_generate_bench_help_names_its_options(capsys):
    with pytest.raises(SystemExit) as info:
        load("bench_generate").main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--out", "--preset", "--int8", "--decode", "--no-transformers", "--no-ctranslate2"):
        assert option in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_generate_bench_on_cuda_says_it_needs_a_gpu(tmp_path, capsys):
    assert load("bench_generate").main(["--device", "cuda", "--preset", "tiny", "--out", str(tmp_path)]) == 1
    assert "CUDA" in capsys.readouterr().err


def _finite_positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.mark.parametrize("int8", [False, True], ids=["fp32", "int8"])
def test_generate_bench_runs_end_to_end_on_cpu(int8, tmp_path, capsys):
    """The tiny preset, batch 1 and 2: the JSON holds every engine's numbers, bloom's outputs equal
    transformers', and CTranslate2's rows (fp32, and int8 with --int8) are there when it is installed."""
    pytest.importorskip("transformers")
    has_ct2 = importlib.util.find_spec("ctranslate2") is not None
    argv = ["--preset", "tiny", "--batch", "1", "2", "--prompt-len", "8", "--new-tokens", "16", "--repeats", "3",
            "--out", str(tmp_path)] + (["--int8"] if int8 else [])
    assert load("bench_generate").main(argv) == 0
    out = capsys.readouterr().out
    assert "tok/s" in out and "speed-up" in out and "goals" in out and "outputs differ" not in out

    name = "generate-tiny-cpu-fp32" + ("-int8" if int8 else "")
    result = json.loads((tmp_path / f"{name}.json").read_text())
    engines = ["bloom"] + (["bloom int8"] if int8 else []) + ["transformers"]
    engines += (["ct2"] + (["ct2 int8"] if int8 else [])) if has_ct2 else []
    assert result["preset"] == "tiny" and result["engines"] == engines
    assert _finite_positive(result["bandwidth_gbs"])
    assert [row["batch"] for row in result["batches"]] == [1, 2]
    for row in result["batches"]:
        assert row["outputs_identical"] is True
        assert list(row["engines"]) == engines
        for engine, e in row["engines"].items():
            for key in ("prefill_s", "generate_s", "decode_tok_s"):
                assert _finite_positive(e[key]["best"]), (engine, key)
                # CTranslate2 makes tiny's 16 tokens in < 1 ms in a process of its own that shares the 2
                # cores with this one: a call held up a few ms by the scheduler can make the median
                # generate shorter than the median prefill, whose difference is then None (no rate)
                assert _finite_positive(e[key]["median"]) or (engine.startswith("ct2") and key == "decode_tok_s"
                                                              and e[key]["median"] is None), (engine, key)
            for key in ("bytes_per_step", "weight_bytes", "kv_bytes", "ceiling_tok_s", "fraction_of_ceiling"):
                assert _finite_positive(e[key]), (engine, key)
            assert e["peak_memory_bytes"] is None or _finite_positive(e["peak_memory_bytes"])
            if engine not in ("bloom", "transformers"):
                assert 0 <= e["agreement"] <= 1
        if has_ct2:
            assert row["engines"]["ct2"]["agreement"] >= 0.5  # fp32 against fp32: the same greedy tokens, but
            # for a near-tie decided the other way by a different summation order
        decode = row["ratios"]["decode"]
        expected = {"bloom/transformers"} | ({"bloom int8/bloom", "bloom int8/transformers"} if int8 else set())
        expected |= ({"bloom/ct2"} | ({"bloom int8/ct2 int8"} if int8 else set())) if has_ct2 else set()
        assert set(decode) == set(row["ratios"]["prefill"]) == expected
        assert all(_finite_positive(v) for v in decode.values())
    assert isinstance(result["goals"], list) and result["goals"]
    assert (tmp_path / f"{name}_decode.csv").read_text().startswith("batch,bloom (tok/s)")
    assert (tmp_path / f"{name}_prefill.csv").exists()


# bench/_common.py: what every benchmark shares (its pure parts; timing itself needs a GPU)

def test_common_rates_are_amount_per_second_in_units():
    common = load("_common")
    assert common.gbs(2e9, 1.0) == pytest.approx(2000.0)  # 2 GB in 1 ms
    assert common.per_second(3e12, 500.0, 1e12) == pytest.approx(6.0)  # 3 TFLOP in 0.5 s
    assert common.per_second(1e9, 1.0, 1e12) == pytest.approx(1.0)  # TB/s = GB/s / 1000


def test_common_dims_and_peer_skips():
    common = load("_common")
    assert common.dims("4x16x2048x64") == (4, 16, 2048, 64)
    assert common.dims("1024X250880") == (1024, 250880)
    skips = {**common.COMPILE_SKIP, "transformers": ("hf", "the transformers peer")}
    args = common.parser("doc", skips=skips).parse_args(["--no-hf", "--out", "x"])
    assert (args.no_compile, args.no_hf, args.out, args.dtype) == (False, True, "x", "bf16")
    assert common.peers(["bloom_kernels", "compiled", "transformers", "copy"], args, skips) == \
        ["bloom_kernels", "compiled", "copy"]


def test_common_guarded_turns_a_failing_peer_into_nan(capsys):
    common = load("_common")
    assert common.guarded("ok", lambda: 1.5) == 1.5

    def boom():
        raise RuntimeError("out of memory\nmore")
    assert math.isnan(common.guarded("flex fwd", boom))
    assert "flex fwd failed: RuntimeError: out of memory" in capsys.readouterr().err


def test_common_run_table_prints_unit_and_ceiling_and_writes_the_csv(tmp_path, capsys):
    common = load("_common")
    values = {(1024, "ours"): 2500.0, (1024, "copy"): 3000.0, (2048, "ours"): float("nan"), (2048, "copy"): 3100.25}
    table = common.run_table(str(tmp_path), "op-fwd-bf16", "N", [1024, 2048], ["ours", "copy"],
                             lambda n, p: values[(n, p)], "GB/s", "the copy column", labels={"copy": "copy ceiling"})
    out = capsys.readouterr().out
    assert "GB/s" in out and "ceiling: the copy column" in out and "higher is better" in out
    assert (tmp_path / "op-fwd-bf16.csv").read_text().splitlines() == [
        "N,ours (GB/s),copy ceiling (GB/s)",
        "1024.000000,2500.000000,3000.000000",
        "2048.000000,,3100.250000",  # a failed peer (NaN) is an empty cell
    ]
    assert (tmp_path / "results.html").exists()
    assert table.value(1024, "copy") == 3000.0 and table.column("copy") == "copy ceiling (GB/s)"
    assert common.cell("4x16x2048x64") == "4x16x2048x64" and common.cell(None) == ""


def test_bench_byte_counts():
    """What each row-wise bench counts as moved: a regression guard on its bandwidth numbers."""
    bias_gelu, layer_norm = load("bench_bias_gelu"), load("bench_layer_norm")
    assert bias_gelu.BYTES["fwd"](8192, 4096, 2) == (2 * 8192 * 4096 + 4096) * 2
    assert bias_gelu.BYTES["bwd"](8192, 4096, 2) == (3 * 8192 * 4096 + 2 * 4096) * 2
    assert layer_norm.nbytes("fwd", True, 8192, 4096, 2) == (4 * 8192 + 2) * 4096 * 2
    assert layer_norm.nbytes("bwd", False, 8192, 4096, 2) == (3 * 8192 + 3) * 4096 * 2


def test_generate_bench_compares_decode_modes_in_one_run(tmp_path, capsys):
    """--decode eager compile: "bloom" is the first mode, "bloom compile" / "bloom int8 compile" the
    second, timed in the same run; each mode's int8 is checked against its own fp engine."""
    pytest.importorskip("transformers")
    argv = ["--preset", "tiny", "--batch", "1", "--prompt-len", "8", "--new-tokens", "8", "--repeats", "2",
            "--int8", "--no-ctranslate2", "--decode", "eager", "compile", "eager", "--out", str(tmp_path)]
    assert load("bench_generate").main(argv) == 0
    out = capsys.readouterr().out
    assert "decode = eager, compile ==" in out and "outputs differ" not in out
    result = json.loads((tmp_path / "generate-tiny-cpu-fp32-int8.json").read_text())
    assert result["engines"] == ["bloom", "bloom int8", "bloom compile", "bloom int8 compile", "transformers"]
    (row,) = result["batches"]
    assert row["outputs_identical"] is True
    assert row["engines"]["bloom compile"]["agreement"] == 1.0  # the same greedy tokens as transformers'
    decode = row["ratios"]["decode"]
    for pair in ("bloom compile/bloom", "bloom compile/transformers", "bloom int8 compile/bloom compile",
                 "bloom int8 compile/bloom int8", "bloom int8 compile/bloom"):
        assert _finite_positive(decode[pair]), pair
    assert any(g.startswith("batch 1 decode bloom int8 compile/bloom compile:") for g in result["goals"])


def test_ct2_server_that_cannot_start_says_why(tmp_path):
    """bench_generate's CTranslate2 child process: a model folder it cannot load ends it, and the
    parent raises with the child's own error instead of waiting on the pipe."""
    pytest.importorskip("ctranslate2")
    server_class = load("bench_generate").Ct2Server
    with pytest.raises(RuntimeError, match=r"the CTranslate2 process exited \(1\): RuntimeError: .*no-such-model"):
        server_class(str(tmp_path / "no-such-model"), 1, ["float32"], str(tmp_path))
