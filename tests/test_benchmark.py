"""`bloom bench` (bloom/benchmark.py): runs in seconds on the CPU at the tiny shape, writes a JSON whose
numbers follow from the raw times it stored, and those times match an independent timing of the same call.

One benchmark run (module fixture) serves the JSON, table and timing tests; torch runs one thread in it,
so a busy shared machine stalls the timings less (both the benchmark's and the test's own)."""

import contextlib
import io
import json
import math
import re
import time

import pytest
import torch

from bloom import benchmark, measure
from bloom.cli import main

BATCH, PROMPT, NEW, REPEATS = 1, 8, 4, 2
ARGV = ["bench", "--shape", "tiny", "--batch", str(BATCH), "--prompt-len", str(PROMPT), "--new-tokens", str(NEW),
        "--repeats", str(REPEATS), "--no-progress"]


@pytest.fixture(scope="module")
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, single_thread):
    """`bloom bench --shape tiny ... --json p --plot q`: (exit status, stdout, JSON, plot path, seconds)."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("bench")
    json_path, plot_path = folder / "bench.json", folder / "bench.png"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # capsys is per test; this run is per module
        start = time.perf_counter()
        status = main(ARGV + ["--json", str(json_path), "--plot", str(plot_path)])
        seconds = time.perf_counter() - start
    print(out.getvalue())  # shown with -s, or when a test fails
    result = json.loads(json_path.read_text()) if json_path.exists() else None
    return status, out.getvalue(), result, plot_path, seconds


def test_bench_tiny_runs_in_seconds_and_writes_its_json(bench_run):
    status, out, result, _, seconds = bench_run
    assert status == 0, out
    assert seconds < 60, seconds  # seconds on an idle CPU; loose for a shared one
    assert result["shape"] == "tiny" and result["model"] is None and result["device"] == "cpu"
    assert result["dtype"] == "fp32" and result["engines"] == ["bloom", "transformers"]
    assert result["config"] == dict(hidden=128, layers=2, heads=4, vocab=1000)
    assert (result["prompt_len"], result["new_tokens"], result["repeats"]) == (PROMPT, NEW, REPEATS)
    assert result["versions"]["torch"] == torch.__version__ and result["versions"]["transformers"]
    assert result["bandwidth_gbs"] > 0 and "GB/s" in result["bandwidth_method"]
    # the header says what it ran on, how the bandwidth was measured, and the units
    for text in ("tiny", "fp32", "torch", "transformers", "GB/s", result["bandwidth_method"], "tok/s", "ms", "MiB"):
        assert text in out, text


def rate(t_generate, t_prefill):
    """decode tok/s as the JSON must hold it: None (JSON's NaN) where the tokens after the first added no
    time, which a noisy machine can make happen at 4 new tokens of a tiny model."""
    if t_generate <= t_prefill:
        return None
    return pytest.approx(BATCH * (NEW - 1) / (t_generate - t_prefill))


def test_bench_json_numbers_follow_from_its_raw_times(bench_run):
    result = bench_run[2]
    (row,) = result["batches"]
    assert row["batch"] == BATCH and row["outputs_identical"] is True
    assert list(row["engines"]) == ["bloom", "transformers"]
    for name, e in row["engines"].items():
        pre, gen = e["prefill_s"]["all"], e["generate_s"]["all"]
        assert len(pre) == len(gen) == REPEATS and all(t > 0 for t in pre + gen), name
        assert e["prefill_s"]["best"] == min(pre) and e["generate_s"]["best"] == min(gen)
        assert e["prefill_s"]["spread"] == pytest.approx((max(pre) - min(pre)) / e["prefill_s"]["median"])
        assert e["decode_tok_s"]["best"] == rate(min(gen), min(pre))
        assert e["decode_tok_s"]["per_repeat"] == [rate(g, p) for g, p in zip(gen, pre)]
        kv = 2 * 2 * BATCH * (PROMPT + NEW / 2) * 128 * 4  # layers, hidden, fp32
        assert e["kv_bytes"] == kv and e["bytes_per_step"] == e["weight_bytes"] + kv
        ceiling = BATCH * result["bandwidth_gbs"] * 1e9 / e["bytes_per_step"]
        assert e["ceiling_tok_s"] == pytest.approx(ceiling)
        if e["decode_tok_s"]["best"] is not None:
            assert e["fraction_of_ceiling"] == pytest.approx(e["decode_tok_s"]["best"] / ceiling)
        assert e["peak_memory_bytes"] is None or e["peak_memory_bytes"] > 0
    ours, theirs = row["engines"]["bloom"], row["engines"]["transformers"]
    assert ours["weight_bytes"] == theirs["weight_bytes"]  # the same weights
    if ours["decode_tok_s"]["best"] and theirs["decode_tok_s"]["best"]:
        assert row["ratios"]["decode"]["bloom/transformers"] == pytest.approx(
            ours["decode_tok_s"]["best"] / theirs["decode_tok_s"]["best"])
    assert row["ratios"]["prefill"]["bloom/transformers"] == pytest.approx(
        theirs["prefill_s"]["best"] / ours["prefill_s"]["best"])


def test_bench_prints_the_numbers_of_its_json(bench_run):
    out, result = bench_run[1], bench_run[2]
    (row,) = result["batches"]
    for name, e in row["engines"].items():
        line = next(line for line in out.splitlines() if re.match(rf"{name} +\|", line))
        assert f"{1e3 * e['prefill_s']['best']:.2f}" in line and shown(e["decode_tok_s"]["best"], ".1f") in line
        assert f"{e['ceiling_tok_s']:.1f}" in line
    assert shown(row["ratios"]["decode"]["bloom/transformers"], ".2f") + "x" in out


def shown(value, fmt):
    return "n/a" if value is None else format(value, fmt)


def test_bench_times_match_an_independent_timing_of_the_same_call(bench_run):
    """Rebuild the same tiny model (same seed), time generate ourselves: the JSON's best times are of
    that call, within a loose factor (the machine is shared and noisy)."""
    from bloom.shapes import random_model

    result = bench_run[2]
    e = result["batches"][0]["engines"]["bloom"]
    model = random_model("tiny", seed=result["seed"])
    ids = torch.randint(4, 1000, (BATCH, PROMPT), generator=torch.Generator().manual_seed(result["prompt_seed"]))

    def best_s(n: int) -> float:
        times = []
        with torch.inference_mode():
            for _ in range(6):  # the first is a warm-up
                start = time.perf_counter()
                model.generate(ids, torch.ones_like(ids), max_new_tokens=n, eos_token_id=[])
                times.append(time.perf_counter() - start)
        return min(times[1:])

    for key, n in (("prefill_s", 1), ("generate_s", NEW)):
        ratio = e[key]["best"] / best_s(n)
        assert 0.2 < ratio < 5, (key, ratio)


def test_bench_plot_is_a_png(bench_run):
    pytest.importorskip("matplotlib")
    plot_path = bench_run[3]
    assert plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"plot: {plot_path}" in bench_run[1]


def test_bench_plot_without_matplotlib_is_a_note(monkeypatch, tmp_path, bench_run):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    note = benchmark.plot(bench_run[2], str(tmp_path / "x.png"))
    assert note.startswith("note: matplotlib is not installed") and not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("extra, option", [
    (["--batch", "0"], "--batch"),
    (["--new-tokens", "1"], "--new-tokens"),
    (["--prompt-len", "0"], "--prompt-len"),
    (["--repeats", "0"], "--repeats"),
    (["--decode", "cuda_graph", "--device", "cpu"], "--decode"),
    (["--json", "/no/such/dir/x.json"], "--json"),
    (["MODEL_DIR"], "MODEL or --shape"),
])
def test_bench_bad_arguments_are_one_line(extra, option, capsys):
    # later options win in argparse: the bad value replaces ARGV's
    assert main(ARGV + extra) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bloom: error:") and option in lines[0], captured.err


def test_arithmetic_helpers():
    assert measure.spread([3.0, 1.0, 2.0]) == {"best": 1.0, "median": 2.0, "spread": 1.0, "all": [3.0, 1.0, 2.0]}
    assert measure.decode_rate(8, 33, 2.0, 1.0) == 256.0
    assert math.isnan(measure.decode_rate(1, 4, 1.0, 1.0))  # no time added: no rate
    assert measure.kv_bytes(layers=24, hidden=1024, batch=2, prompt_len=32, new_tokens=32, element_size=2) == \
        2 * 24 * 2 * 48 * 1024 * 2
    assert measure.ceiling_tok_s(4, 100.0, 1e9) == 400.0
    assert measure.jsonable({"a": [float("nan"), 1.0]}) == {"a": [None, 1.0]}


def test_weight_bytes_counts_a_tied_embedding_once():
    from bloom.shapes import random_model

    model = random_model("tiny")
    params = sum(p.numel() * p.element_size() for p in model.parameters())  # tied: listed once
    assert measure.weight_bytes(model) == params
