"""Tuning that persists: the pre-tune plan and command (`python -m bloom_kernels.tune`, `bloom tune`),
the disk caches of both tuners (Triton's autotuner through `_tuning.autotune`, int8_linear's own), and
the one-line note. CPU only except the `gpu` tests at the end; Triton's real disk-cache code runs on
the CPU here against a made-up sm_90 card (its driver is replaced, nothing is launched)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import KERNEL_DEVICE, triton_importable

from bloom_kernels import _tune_cache

ROOT = Path(__file__).resolve().parent.parent

# bloom-560m and bloom-7b1 as in their config.json files: hidden, heads, head dim = hidden / heads
H560, HEADS560, D560 = 1024, 16, 64
H7B, HEADS7B, D7B = 4096, 32, 128
VOCAB = 250_880


def dims(*sizes):
    return "x".join(map(str, sizes))


def run_tune(argv, capsys):
    from bloom_kernels import tune

    code = tune.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


# --------------------------------------------------------------------------------------------------
# the plan (--dry-run): any machine
# --------------------------------------------------------------------------------------------------
def test_dry_run_plan_for_bloom_560m_lists_every_call(capsys):
    code, out, err = run_tune(["--model", "bloom-560m", "--dry-run", "--batch", "2", "--seq", "256",
                               "--max-new-tokens", "32"], capsys)
    assert code == 0 and err == ""
    h, heads, d, b = H560, HEADS560, D560, 2
    ln = f"weight={h} bias={h}"

    def attn(phase, q_len, k_len, mask):
        line = (f"{phase:8s} alibi_attention q={dims(b, heads, q_len, d)} k={dims(b, heads, k_len, d)} "
                f"v={dims(b, heads, k_len, d)} slopes={heads}")
        return line + (f" attention_mask={dims(b, k_len)}" if mask else "")

    expected = [f"prefill  layer_norm      x={dims(b, 256, h)} {ln} residual={dims(b, 256, h)}"]
    expected += [attn("prefill", s, s, mask) for s in (256, 255) for mask in (False, True)]  # 255: unaligned
    expected += [f"prefill  bias_gelu       x={dims(b, 256, 4 * h)} bias={4 * h}",
                 f"decode   layer_norm      x={dims(b, 1, h)} {ln} residual={dims(b, 1, h)}"]
    # every power-of-two K/V bucket below 256 + 32, then 288 itself
    expected += [attn("decode", 1, n, mask) for n in (1, 2, 4, 8, 16, 32, 64, 128, 256, 288)
                 for mask in (False, True)]
    expected += [f"decode   bias_gelu       x={dims(b, 1, 4 * h)} bias={4 * h}"]
    lines = out.splitlines()
    assert lines[0].startswith(f"plan for bloom-560m (hidden {h}, {heads} heads of {d}, ffn {4 * h}), bf16: "
                               f"{len(expected)} calls")
    assert lines[1:] == expected


def test_dry_run_plan_for_bloom_7b1_with_int8_and_backward(capsys):
    code, out, _ = run_tune(["--model", "bigscience/bloom-7b1", "--dry-run", "--int8", "--backward",
                             "--batch", "1", "--seq", "128", "--max-new-tokens", "128"], capsys)
    assert code == 0
    h, heads, d = H7B, HEADS7B, D7B
    lines = out.splitlines()[1:]
    calls = [line.split() for line in lines]
    # int8 projections: (N, K) = (3h, h) with bias, (h, h) with bias, (4h, h) without, (h, 4h) with bias
    for phase, rows in (("prefill", (1, 128)), ("decode", (1, 1)), ("backward", (1, 128))):
        for n, k, bias in ((3 * h, h, True), (h, h, True), (4 * h, h, False), (h, 4 * h, True)):
            words = [phase, "int8_linear", f"x={dims(*rows, k)}", f"weight_int8={dims(n, k)}", f"scale={n}"]
            assert words + ([f"bias={n}"] if bias else []) in calls
    assert ["decode", "int8_linear", f"x={dims(1, h)}", f"weight_int8={dims(VOCAB, h)}", f"scale={VOCAB}"] in calls
    qkv = f"q={dims(1, heads, 128, d)} k={dims(1, heads, 128, d)} v={dims(1, heads, 128, d)} slopes={heads}"
    assert f"backward alibi_attention {qkv}" in lines
    assert f"backward alibi_attention {qkv} attention_mask=1x128" in lines
    assert f"backward bias_gelu       x={dims(1, 128, 4 * h)} bias={4 * h}" in lines
    # decode K/V buckets up to 128 + 128 = 256, each without and with a mask
    decode_attention = [c for c in calls if c[:2] == ["decode", "alibi_attention"]]
    assert sorted({int(c[3].split("x")[2]) for c in decode_attention}) == [1, 2, 4, 8, 16, 32, 64, 128, 256]
    assert len(decode_attention) == 2 * 9
    assert len(lines) == len(set(lines))  # planned once each


def test_plan_defaults_cover_batches_1_and_8_and_prompts_128_and_2048():
    from bloom_kernels import tune
    from bloom_kernels.shapes import bloom_shape

    calls = tune.plan(bloom_shape("bloom-7b1"))
    prefill_ln = [c.tensors[0][1] for c in calls if c.phase == "prefill" and c.op == "layer_norm"]
    assert prefill_ln == [(1, 128, H7B), (1, 2048, H7B), (8, 128, H7B), (8, 2048, H7B)]
    longest = max(c.tensors[1][1][2] for c in calls if c.phase == "decode" and c.op == "alibi_attention")
    assert longest == 2048 + 128
    assert not any(c.op == "int8_linear" or c.phase == "backward" for c in calls)


def test_unknown_model_is_a_usage_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as info:
        run_tune(["--model", "bloom-9000", "--dry-run"], capsys)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "bloom-9000" in err and "bloom-560m" in err and "bloom-7b1" in err


def test_list_models(capsys):
    code, out, _ = run_tune(["--list-models"], capsys)
    assert code == 0
    assert f"bloom-7b1   hidden {H7B:6d}  heads {HEADS7B:4d}  head dim {D7B:4d}" in out


def test_without_cuda_it_exits_1_with_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, out, err = run_tune(["--model", "bloom-560m"], capsys)
    assert code == 1 and out == ""
    assert len(err.splitlines()) == 1
    assert err.startswith("bloom_kernels.tune: error: needs a CUDA GPU") and "--dry-run" in err


def test_tune_table_reports_what_each_call_tuned_and_failures(tuning, capsys, monkeypatch):
    """The run loop, without a GPU: the calls are faked (one tunes two keys, one fails)."""
    from bloom_kernels import tune
    from bloom_kernels.shapes import bloom_shape

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda *a: None)
    monkeypatch.setattr("bloom_kernels.triton._launch.triton_interpreting", lambda: False)
    monkeypatch.setattr(tuning, "gpu_identity", lambda device=None: "NVIDIA Fake sm_90")
    seen_env = []

    def fake_run_call(call, dtype, device):
        seen_env.append((os.environ.get("BLOOM_KERNELS_BACKEND"), dtype))
        if call.op == "bias_gelu":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory.\nTried to allocate 2 GiB")
        if call.op == "layer_norm":
            tuning.note_tuning("_ln_fwd_kernel", "(N=1024, M_BUCKET=64)", "NVIDIA Fake sm_90", "/c")
            tuning.note_tuning("_ln_fwd_kernel", "(N=1024, M_BUCKET=1)", "NVIDIA Fake sm_90", "/c")

    monkeypatch.setattr(tune, "run_call", fake_run_call)
    calls = tune.plan(bloom_shape("bloom-560m"), [1], [64], 0)
    assert tune.tune(calls, "fp16") == 1
    out, err = capsys.readouterr()
    assert err == ""  # the notes are the table's to give
    rows = out.splitlines()
    assert rows[0].startswith(f"tuning {len(calls)} calls on NVIDIA Fake sm_90, fp16")
    assert rows[2].split()[1:3] == ["2", "prefill"] and rows[2].endswith("(_ln_fwd_kernel, _ln_fwd_kernel)")
    gelu, = (r for r in rows if "bias_gelu" in r)
    assert gelu.endswith("FAILED OutOfMemoryError: CUDA out of memory. Tried to allocate 2 GiB")
    assert rows[-1].startswith(f"2 keys tuned by {len(calls)} calls in ")
    assert rows[-1].endswith(f"1 of {len(calls)} calls FAILED")
    assert seen_env == [("triton", torch.float16)] * len(calls)
    assert tuning.QUIET_ENV not in os.environ


def test_bloom_tune_subcommand_is_the_same_command(capsys):
    from bloom.cli import main

    argv = ["--model", "bloom-560m", "--dry-run", "--batch", "1", "--seq", "64", "--max-new-tokens", "8"]
    assert main(["tune", *argv]) == 0
    via_bloom = capsys.readouterr().out
    _, direct, _ = run_tune(argv, capsys)
    assert via_bloom == direct and "prefill  bias_gelu       x=1x64x4096 bias=4096" in via_bloom


def test_bloom_tune_without_cuda_exits_1(capsys, monkeypatch):
    from bloom.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["tune", "--model", "bloom-560m"]) == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and err.startswith("bloom: error: needs a CUDA GPU")


def test_module_runs_as_a_script():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    done = subprocess.run([sys.executable, "-m", "bloom_kernels.tune", "--model", "bloom-7b1", "--dry-run",
                           "--batch", "1", "--seq", "128", "--max-new-tokens", "0"],
                          capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert f"prefill  bias_gelu       x=1x128x{4 * H7B} bias={4 * H7B}" in done.stdout
    assert "decode" not in done.stdout  # --max-new-tokens 0: no decode phase


# --------------------------------------------------------------------------------------------------
# the shared pieces in _tuning: cache folder, keys, note, JSON files
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def tuning(monkeypatch, tmp_path):
    """bloom_kernels.triton._tuning with its caches in tmp_path and a fresh 'already noted' set."""
    if not triton_importable():
        pytest.skip("triton is not installed")
    from bloom_kernels.triton import _tuning

    monkeypatch.setenv(_tune_cache.CACHE_DIR_ENV, str(tmp_path / "bk"))
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "triton"))
    monkeypatch.delenv(_tune_cache.QUIET_ENV, raising=False)
    monkeypatch.setattr(_tune_cache, "_noted", set())
    monkeypatch.setattr(_tune_cache, "_warned", set())
    monkeypatch.setattr(_tune_cache, "tuning_events", [])
    return _tuning  # its shared pieces live in _tune_cache (re-exported), their state patched above


def test_cache_dir_env_and_default(tuning, monkeypatch, tmp_path):
    assert tuning.tune_cache_dir() == tmp_path / "bk"
    monkeypatch.delenv(tuning.CACHE_DIR_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tuning.tune_cache_dir() == tmp_path / "xdg" / "bloom_kernels"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert tuning.tune_cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "bloom_kernels"


def test_tuning_key_names_the_gpu_and_triton(tuning, monkeypatch):
    import triton

    monkeypatch.setattr(tuning, "gpu_identity", lambda device=None: "NVIDIA Fake 80GB sm_90")
    key = tuning.tuning_key(torch.device("cuda", 0), dtype="bfloat16", path="large", m_bucket=512)
    assert key == f"gpu=NVIDIA Fake 80GB sm_90|triton={triton.__version__}|dtype=bfloat16|path=large|m_bucket=512"


def test_gpu_identity_is_the_planned_gpu(tuning):
    from bloom_kernels.triton._launch import GpuSpec, planning_for
    with planning_for(GpuSpec("NVIDIA H200", 90, 132, 232_448)):
        assert tuning.gpu_identity(torch.device("cuda", 0)) == "NVIDIA H200 sm_90"
    assert tuning.gpu_identity(torch.device("cpu")) == "cpu"


def test_note_prints_one_line_once_per_key(tuning, capsys, monkeypatch):
    assert tuning.note_tuning("_k", "(N=4096)", "GPU sm_90", os.path.expanduser("~/.triton/cache"))
    assert not tuning.note_tuning("_k", "(N=4096)", "GPU sm_90", "/x")  # same key: silent
    assert tuning.note_tuning("_k", "(N=8192)", "GPU sm_90", "/x")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [
        "bloom_kernels: tuning _k for (N=4096) on GPU sm_90 (once; cached in ~/.triton/cache)",
        "bloom_kernels: tuning _k for (N=8192) on GPU sm_90 (once; cached in /x)",
    ]
    monkeypatch.setenv(tuning.QUIET_ENV, "1")
    assert tuning.note_tuning("_k", "(N=1024)", "GPU sm_90", "/x")
    assert capsys.readouterr().err == ""  # quiet, but still recorded
    assert [key for _, key in _tune_cache.tuning_events] == ["(N=4096)", "(N=8192)", "(N=1024)"]


def test_tuning_cache_round_trips_and_merges_other_processes(tuning, tmp_path):
    cache = tuning.TuningCache("t.json")
    assert cache.get("a") is None
    cache.put("a", {"block_m": 16})
    assert json.loads((tmp_path / "bk" / "t.json").read_text()) == {"a": {"block_m": 16}}
    assert tuning.TuningCache("t.json").get("a") == {"block_m": 16}  # a new process reads it
    # another process adds a key meanwhile: the next put keeps it
    tuning.save_json(tmp_path / "bk" / "t.json", {"a": {"block_m": 16}, "b": 2})
    cache.put("c", 3)
    assert json.loads((tmp_path / "bk" / "t.json").read_text()) == {"a": {"block_m": 16}, "b": 2, "c": 3}
    assert [p.name for p in (tmp_path / "bk").iterdir()] == ["t.json"]  # no temporary file left


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", ""])
def test_corrupt_cache_file_is_ignored_with_a_warning(tuning, tmp_path, text):
    path = tmp_path / "bk" / "t.json"
    path.parent.mkdir(parents=True)
    path.write_text(text)
    cache = tuning.TuningCache("t.json")
    with pytest.warns(RuntimeWarning, match="ignoring the tuning cache"):
        assert cache.get("a") is None
    cache.put("a", 1)  # and it is rewritten
    assert json.loads(path.read_text()) == {"a": 1}


def test_unwritable_cache_warns_and_goes_on(tuning, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(tuning.CACHE_DIR_ENV, str(blocker / "sub"))  # a folder under a file
    cache = tuning.TuningCache("t.json")
    with pytest.warns(RuntimeWarning, match="cannot write the tuning cache"):
        cache.put("a", 1)
    assert cache.get("a") == 1  # kept in memory


# --------------------------------------------------------------------------------------------------
# int8_linear's tuner: its whole path on a planned (made-up) GPU, timing faked, nothing launched
# --------------------------------------------------------------------------------------------------
@pytest.fixture
def int8_tuner(tuning, monkeypatch):
    import importlib

    import triton.testing

    il = importlib.import_module("bloom_kernels.triton.int8_linear")  # the package attribute is the public op
    monkeypatch.setattr(il, "_TUNED", {})
    monkeypatch.setenv(il.TUNE_ENV, "1")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    timed = []

    def fake_do_bench(fn, **kwargs):
        cand = fn.__defaults__[0]  # the candidate bound in _pick_config's lambda
        timed.append(cand)
        return 1.0 if cand.block_k == 64 and cand.num_stages == 3 else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", fake_do_bench)
    x2 = SimpleNamespace(shape=(512, 4096), device=torch.device("cuda", 0), dtype=torch.bfloat16)
    weight = torch.zeros(4096, 4096, dtype=torch.int8)
    scale, bias = torch.ones(4096), torch.zeros(4096)
    return SimpleNamespace(il=il, timed=timed, pick=lambda: il._pick_config("large", x2, weight, scale, bias))


def test_int8_picks_persist_across_processes_per_gpu(tuning, int8_tuner, capsys, monkeypatch, tmp_path):
    from bloom_kernels.triton._launch import GpuSpec, planning_for
    il = int8_tuner.il
    h100 = GpuSpec("NVIDIA H100 80GB HBM3", 90, 132, 232_448)
    with planning_for(h100):
        first = int8_tuner.pick()
        n_timed = len(int8_tuner.timed)
        assert n_timed > 1 and first.block_k == 64 and first.num_stages == 3
        err = capsys.readouterr().err
        cache_file = _tune_cache._short(tmp_path / "bk" / "int8_linear.json")
        assert err.splitlines() == [
            "bloom_kernels: tuning int8_linear (y, large path) for (M bucket 512, N 4096, K 4096, bfloat16, "
            f"bias) on NVIDIA H100 80GB HBM3 sm_90 (once; cached in {cache_file})"]
        stored = json.loads((tmp_path / "bk" / "int8_linear.json").read_text())
        (key, value), = stored.items()
        assert key.startswith("gpu=NVIDIA H100 80GB HBM3 sm_90|triton=")
        assert "|dtype=bfloat16|path=large|problem=y|m_bucket=512|n=4096|k=4096|bias=True|" in key
        assert value == dict(vars(first))

        # "another process": empty memory, a fresh file reader, a note set of its own
        monkeypatch.setattr(il, "_TUNED", {})
        monkeypatch.setattr("bloom_kernels._tune_cache._noted", set())
        tuning.tuning_cache.cache_clear()
        assert int8_tuner.pick() == first
        assert len(int8_tuner.timed) == n_timed and capsys.readouterr().err == ""

    monkeypatch.setattr(il, "_TUNED", {})
    with planning_for(GpuSpec("NVIDIA H200", 90, 132, 232_448)):  # same arch, other card
        int8_tuner.pick()
    assert len(int8_tuner.timed) == 2 * n_timed
    assert "on NVIDIA H200 sm_90" in capsys.readouterr().err
    assert len(json.loads((tmp_path / "bk" / "int8_linear.json").read_text())) == 2


# --------------------------------------------------------------------------------------------------
# _tuning.autotune: Triton's Autotuner with the disk cache keyed by GPU, and the note
# --------------------------------------------------------------------------------------------------
try:
    import triton.language as tl
except ImportError:  # the tests that need triton skip
    tl = None


def _copy_kernel(x_ptr, y_ptr, n, BLOCK: "tl.constexpr"):  # a kernel only hashed here, never compiled
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def test_autotune_is_a_drop_in_decorator_in_the_interpreter(tuning):
    import triton
    import triton.language as tl

    @tuning.autotune(configs=[triton.Config({"BLOCK": 16}, num_warps=4)], key=["n"], cache_results=True)
    @triton.jit
    def double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

    assert isinstance(double_kernel, tuning.CachingAutotuner)
    x = torch.arange(37, dtype=torch.float32, device=KERNEL_DEVICE)
    y = torch.zeros_like(x)
    double_kernel[lambda meta: (triton.cdiv(37, meta["BLOCK"]),)](x, y, 37)
    assert torch.equal(y.cpu(), 2 * x.cpu())


@pytest.fixture
def fake_sm90(tuning, monkeypatch):
    """Triton's real check_disk_cache (files in the tmp TRITON_CACHE_DIR) for a made-up sm_90 card:
    Triton's driver is replaced by one that only names the target; nothing is compiled or launched."""
    import triton.runtime.autotuner as autotuner
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend

    target = GPUTarget("cuda", 90, 32)
    try:
        make_backend(target).hash()
    except Exception as err:  # noqa: BLE001
        pytest.skip(f"no CUDA backend for Triton here ({err})")
    if not hasattr(autotuner, "driver"):
        pytest.skip("this Triton's autotuner does not name its driver `driver`")
    monkeypatch.setattr(autotuner, "driver", SimpleNamespace(active=SimpleNamespace(get_current_target=lambda: target)))
    monkeypatch.setattr(tuning, "gpu_identity", lambda device=None: "NVIDIA Fake 80GB sm_90")


def _tuner(tuning, timings):
    """A CachingAutotuner around a real JITFunction with two configs (one carrying extra attributes,
    as attention.py's do), its timing faked and its launch recorded."""
    import triton
    from triton.runtime.jit import JITFunction

    configs = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]
    configs[1].arch, configs[1].tiles = 90, (64, 128)
    tuner = tuning.autotune(configs, key=["n"])(JITFunction(_copy_kernel))
    tuner.cache_results = True  # Autotuner turns it off when TRITON_INTERPRET=1
    record = SimpleNamespace(benched=[], launched=[])

    def fake_bench(*args, config, **meta):
        if timings is None:
            raise AssertionError("timed a key that is on disk")
        record.benched.append(config.kwargs["BLOCK"])
        return [timings[config.kwargs["BLOCK"]]] * 3

    tuner._bench = fake_bench
    tuner.fn.run = lambda *args, **kwargs: record.launched.append(kwargs["BLOCK"])
    return tuner, record


def _launch_once(tuner, n=100):
    x = torch.zeros(4)
    tuner.run(x, torch.zeros(4), n, grid=(1,), warmup=False)


def test_autotune_caches_on_disk_keyed_by_gpu_and_notes_once(tuning, fake_sm90, capsys, monkeypatch, tmp_path):
    tuner, rec = _tuner(tuning, {16: 2.0, 32: 1.0})
    _launch_once(tuner)
    _launch_once(tuner)  # in memory now
    assert rec.benched == [16, 32] and rec.launched == [32, 32]
    assert capsys.readouterr().err.splitlines() == [
        "bloom_kernels: tuning _copy_kernel for (n=100, float32) on NVIDIA Fake 80GB sm_90 (once; cached in "
        f"{_tune_cache._short(tmp_path / 'triton')})"]
    files = list((tmp_path / "triton").rglob("_copy_kernel.autotune.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["key"] == [100, "torch.float32", "torch.float32", "NVIDIA Fake 80GB sm_90"]
    assert all("arch" not in config for config, _ in saved["configs_timings"])  # Config(**...) must read it

    # "another process": found on disk, nothing timed, no note; the pick is the same
    again, rec2 = _tuner(tuning, None)
    _launch_once(again)
    assert rec2.launched == [32] and capsys.readouterr().err == ""

    # another card of the same architecture: its own entry
    monkeypatch.setattr(tuning, "gpu_identity", lambda device=None: "NVIDIA Other sm_90")
    other, rec3 = _tuner(tuning, {16: 1.0, 32: 2.0})
    _launch_once(other)
    assert rec3.benched == [16, 32] and rec3.launched == [16]
    assert "on NVIDIA Other sm_90" in capsys.readouterr().err
    assert len(list((tmp_path / "triton").rglob("_copy_kernel.autotune.json"))) == 2


def test_autotune_with_a_corrupt_cache_file_warns_and_tunes(tuning, fake_sm90, tmp_path):
    tuner, _ = _tuner(tuning, {16: 2.0, 32: 1.0})
    _launch_once(tuner)
    path, = (tmp_path / "triton").rglob("_copy_kernel.autotune.json")
    path.write_text("{garbage")
    again, rec = _tuner(tuning, {16: 2.0, 32: 1.0})
    with pytest.warns(RuntimeWarning, match="autotune cache of _copy_kernel unusable"):
        _launch_once(again)
    assert rec.benched == [16, 32] and rec.launched == [32]


def test_autotune_does_not_time_a_single_pruned_config(tuning, fake_sm90, capsys, tmp_path):
    import triton
    from triton.runtime.jit import JITFunction

    configs = [triton.Config({"BLOCK": 16}), triton.Config({"BLOCK": 32})]
    tuner = tuning.autotune(configs, key=["n"], prune_configs_by={"early_config_prune": lambda c, a, **k: c[1:]})(
        JITFunction(_copy_kernel))
    tuner.cache_results = True
    tuner._bench = lambda *a, **k: pytest.fail("timed a single config")
    launched = []
    tuner.fn.run = lambda *args, **kwargs: launched.append(kwargs["BLOCK"])
    _launch_once(tuner)
    assert launched == [32] and capsys.readouterr().err == ""
    assert not list((tmp_path / "triton").rglob("*.autotune.json"))


def test_gpu_check_script_parses():
    done = subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# --------------------------------------------------------------------------------------------------
# on a GPU: across real processes
# --------------------------------------------------------------------------------------------------
def _subprocess(code_or_args, tmp_path, **env):
    full = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    full.update(PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), full.get("PYTHONPATH")])),
                TRITON_CACHE_DIR=str(tmp_path / "triton"), BLOOM_KERNELS_CACHE_DIR=str(tmp_path / "bk"), **env)
    full.pop("BLOOM_KERNELS_TUNE_QUIET", None)
    if isinstance(code_or_args, list):
        args = code_or_args
    else:  # a file, not -c: @triton.jit reads the kernel's source
        script = tmp_path / "script.py"
        script.write_text(code_or_args)
        args = [str(script)]
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


AUTOTUNED_KERNEL = """
import torch, triton, triton.language as tl
from bloom_kernels.triton._tuning import autotune
configs = [triton.Config({"BLOCK": b}, num_warps=4) for b in (64, 128, 256)]
for c in configs:
    c.arch, c.tiles = 90, (64, 128)  # extra attributes, as attention.py's configs carry

@autotune(configs=configs, key=["n"])
@triton.jit
def _triple_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, 3 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)

x = torch.randn(5000, device="cuda", dtype=torch.bfloat16)
y = torch.empty_like(x)
_triple_kernel[lambda meta: (triton.cdiv(5000, meta["BLOCK"]),)](x, y, 5000)
assert torch.equal(y, 3 * x)
print("ok")
"""


@pytest.mark.gpu
def test_gpu_autotune_results_persist_across_processes(tmp_path):
    first = _subprocess(AUTOTUNED_KERNEL, tmp_path)
    assert "bloom_kernels: tuning _triple_kernel for (n=5000, bfloat16)" in first.stderr
    assert torch.cuda.get_device_name() in first.stderr
    second = _subprocess(AUTOTUNED_KERNEL, tmp_path)
    assert second.stdout.strip() == "ok" and "bloom_kernels: tuning" not in second.stderr


INT8_CALL = """
import torch, bloom_kernels as bk
x = torch.randn(3, 40, 1536, device="cuda", dtype=torch.bfloat16)
q, s = bk.quantize_int8(torch.randn(2304, 1536, device="cuda"))
y = bk.int8_linear(x, q, s)
torch.testing.assert_close(y.float(), x.float() @ (q.float() * s[:, None]).t(), rtol=2e-2, atol=2e-1)
print("ok")
"""


@pytest.mark.gpu
def test_gpu_int8_tuning_persists_across_processes(tmp_path):
    first = _subprocess(INT8_CALL, tmp_path, BLOOM_KERNELS_BACKEND="triton")
    assert "bloom_kernels: tuning int8_linear (y, large path) for (M bucket 128, N 2304, K 1536" in first.stderr
    stored = json.loads((tmp_path / "bk" / "int8_linear.json").read_text())
    assert all(key.startswith(f"gpu={torch.cuda.get_device_name()} sm_") for key in stored)
    second = _subprocess(INT8_CALL, tmp_path, BLOOM_KERNELS_BACKEND="triton")
    assert "bloom_kernels: tuning" not in second.stderr


@pytest.mark.gpu
def test_gpu_tune_command_then_everything_is_cached(tmp_path):
    argv = ["-m", "bloom_kernels.tune", "--model", "bloom-560m", "--batch", "2", "--seq", "200",
            "--max-new-tokens", "8", "--int8", "--backward"]
    first = _subprocess(argv, tmp_path)
    assert "keys tuned by" in first.stdout and "FAILED" not in first.stdout
    second = _subprocess(argv, tmp_path)
    assert "\n0 keys tuned by" in second.stdout, second.stdout


# --------------------------------------------------------------------------------------------------
# --cpu: the CPU routes of a model's decode projections
# --------------------------------------------------------------------------------------------------
def test_cpu_tuning_measures_each_decode_projection_once(monkeypatch, tmp_path, capsys):
    """Every projection and the lm_head, per batch, linear and int8_linear: measured (timing faked
    here), stored on disk, and known (not timed) on a second run."""
    from bloom_kernels import cpu_routes, tune
    from bloom_kernels.shapes import BloomShape

    monkeypatch.setenv(_tune_cache.CACHE_DIR_ENV, str(tmp_path / "bk"))
    monkeypatch.setattr(cpu_routes, "_picks", {})
    monkeypatch.setattr(tune, "VOCAB_SIZE", 300)
    measured = []

    def fake_measure(op, args):
        measured.append((op, args[0].shape[0], args[1].shape))
        return ("gemv", {"gemv": 1.0, "dequant": 2.0}) if op == "int8_linear" else ("rowblock", {"rowblock": 1.0})

    monkeypatch.setattr(cpu_routes, "measure", fake_measure)
    shape = BloomShape("tiny", 64, 4, 2)
    assert tune.tune_cpu(shape, [1, 3], "fp32", int8=True) == 0
    table = capsys.readouterr().out
    # 4 projections + lm_head, 2 ops, 2 batches
    assert len(measured) == 20 and ("linear", 3, (300, 64)) in measured and ("int8_linear", 1, (64, 256)) in measured
    assert "int8_linear     3     300     64  gemv      gemv 1.000  dequant 2.000" in table
    stored = json.loads((tmp_path / "bk" / "cpu_routes.json").read_text())
    assert len(stored) == 20 and all("|threads=" in key for key in stored)

    monkeypatch.setattr(cpu_routes, "_picks", {})  # a new process: everything known from disk
    _tune_cache.tuning_cache("cpu_routes").reload()
    assert tune.tune_cpu(shape, [1, 3], "fp32", int8=True) == 0
    assert len(measured) == 20 and "linear          1     192     64  rowblock  -" in capsys.readouterr().out
    assert tune.tune_cpu(shape, [1], "fp32", int8=False, remeasure=True) == 0  # timed again
    assert len(measured) == 25


def test_cpu_flag_on_the_command_line(monkeypatch):
    from bloom_kernels import tune

    seen = {}
    monkeypatch.setattr(tune, "tune_cpu", lambda shape, batches, dtype, int8, out, remeasure: seen.update(
        shape=shape.name, batches=batches, dtype=dtype, int8=int8, remeasure=remeasure) or 0)
    assert tune.main(["--model", "bloom-560m", "--cpu", "--batch", "1", "8", "--remeasure"]) == 0
    assert seen == dict(shape="bloom-560m", batches=[1, 8], dtype="fp32", int8=False, remeasure=True)
    assert tune.main(["--model", "bloom-560m", "--dtype", "fp32"]) == 1  # the GPU kernels: bf16 / fp16
