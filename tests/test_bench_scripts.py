"""The benchmark scripts import, parse their arguments, and fail clearly without a GPU.

Their numbers are measured on a GPU (bench/gpu_check.sh); here only what runs on any machine.
"""

import importlib.util
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
