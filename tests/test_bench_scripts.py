"""The benchmark scripts import, parse their arguments, and fail clearly without a GPU.

Their numbers are measured on a GPU (bench/gpu_check.sh); here only what runs on any machine.
"""

import importlib.util
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


def test_generate_bench_runs_end_to_end_on_cpu(capsys):
    load("bench_generate").main(["--preset", "tiny", "--batch", "1", "2", "--prompt-len", "5",
                                 "--new-tokens", "3", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "tok/s" in out and "ratio" in out and "outputs differ" not in out
    assert len([line for line in out.splitlines() if line.strip().startswith(("1 |", "2 |"))]) == 2


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
