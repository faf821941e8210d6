"""Every kernel variant the launchers can pick, compiled ahead of time for sm_80 and sm_90 (no GPU needed).

The CPU interpreter never compiles a kernel; this does, with Triton's own compiler and ptxas, for the
configs the launchers and autotuners can choose at BLOOM's shapes (bloom_kernels/compile_targets.py).
By default a representative subset (bf16; bloom-560m, -3b, -7b1 and -176B; even and odd lengths);
`pytest --compile-full` compiles the full sweep (every model, bf16 and fp16, more lengths).
The table of every variant (registers, spills, shared memory, CTAs per SM) is written to
compile_targets.txt in the test's temp dir and its summary printed (`pytest -s` shows it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from helpers import triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")

# what must be in the plan: every kernel of every op, on both targets
EXPECTED_KERNELS = {
    "_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_bwd_preprocess_kernel",
    "_decode_kernel", "_combine_kernel", "_ln_fwd_kernel", "_ln_bwd_kernel", "_ln_bwd_row_dots_kernel",
    "_bias_gelu_fwd_kernel", "_bias_gelu_bwd_kernel", "_int8_matmul_kernel", "_splitk_reduce_kernel",
}


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return os.path.exists(get_ptxas(90).path)
    except Exception:  # noqa: BLE001 - no NVIDIA backend in this triton build
        return False


@pytest.fixture(scope="module")
def compiled(request, tmp_path_factory):
    """Run the compile check once in a subprocess (without TRITON_INTERPRET, which replaces @triton.jit)."""
    if not _ptxas_available():
        pytest.skip("triton's NVIDIA backend (ptxas) is not available")
    out = tmp_path_factory.mktemp("compile_targets")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    cmd = [sys.executable, "-m", "bloom_kernels.compile_targets", "--out", str(out), "--jobs", str(os.cpu_count() or 1)]
    if request.config.getoption("--compile-full"):
        cmd.append("--full")
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    results = json.loads((out / "compile_targets.json").read_text())
    summary = run.stdout.split("\n\n")[-2:] if run.stdout else [run.stderr[-3000:]]
    print("\n" + "\n\n".join(summary))
    assert results, f"the compile check produced no variants:\n{run.stderr[-3000:]}"
    return results


def _problems(results, check):
    from bloom_kernels._ptxas import Result, problems
    bad = []
    for r in results:
        found = [p for p in problems(Result(**r)) if check(p)]
        if found:
            bad.append(f"{r['kernel']} {r['target']} {r['config']} [{r['spec']}] ({r['case']}): {'; '.join(found)}")
    return bad


def test_plan_covers_every_kernel_on_both_targets(compiled):
    for target in ("sm_80", "sm_90"):
        kernels = {r["kernel"] for r in compiled if r["target"] == target}
        assert kernels == EXPECTED_KERNELS, f"{target}: missing {EXPECTED_KERNELS - kernels}"
    # both int8 paths: the 16-row decode tiles and the large-M tiles
    int8_rows = {int(r["config"].split("BLOCK_M=")[1].split()[0]) for r in compiled
                 if r["kernel"] == "_int8_matmul_kernel"}
    assert 16 in int8_rows and max(int8_rows) >= 64
    # attention: masked and unmasked, even and odd lengths, every BLOOM head-dim tile
    specs = " ".join(r["spec"] for r in compiled if r["kernel"] == "_attn_fwd_kernel")
    for needle in ("HAS_MASK=0", "HAS_MASK=1", "EVEN_M=0", "EVEN_M=1", "HEAD_DIM=64", "HEAD_DIM=80", "HEAD_DIM=128"):
        assert needle in specs


def test_everything_compiles(compiled):
    bad = _problems(compiled, lambda p: p.startswith("does not compile"))
    assert not bad, "\n".join(bad)


def test_no_register_spills(compiled):
    bad = _problems(compiled, lambda p: p.startswith("spills"))
    assert not bad, f"{len(bad)} variants spill:\n" + "\n".join(bad)


def test_shared_memory_within_the_targets_limit(compiled):
    bad = _problems(compiled, lambda p: "shared memory" in p)
    assert not bad, "\n".join(bad)


def test_no_ptxas_performance_warning_in_attention_on_sm90(compiled):
    bad = _problems(compiled, lambda p: p.startswith("ptxas"))
    assert not bad, "serialised wgmma (C7515) or another ptxas warning:\n" + "\n".join(bad)


def test_attention_and_large_int8_tiles_use_wgmma_on_sm90(compiled):
    bad = _problems(compiled, lambda p: p.startswith("no wgmma"))
    assert not bad, "\n".join(bad)
    assert any(r["wgmma"] for r in compiled if r["kernel"] == "_attn_fwd_kernel" and r["target"] == "sm_90")
    assert not any(r["wgmma"] for r in compiled if r["target"] == "sm_80")  # Hopper-only instruction


# --- the checks themselves, on made-up ptxas output (fast, no compiler) -------------------------------
PTXAS_LOG = """\
ptxas info    : (C7515) Potential Performance Loss: wgmma.mma_async instructions are serialized due to non wgmma instructions defining accumulator registers of a wgmma between start and end of the pipeline stage in the function '_attn_fwd_kernel'
ptxas info    : 11 bytes gmem
ptxas info    : Compiling entry function '_attn_fwd_kernel' for 'sm_90a'
ptxas info    : Function properties for _attn_fwd_kernel
    0 bytes stack frame, 68 bytes spill stores, 128 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers
"""


def _result(**overrides):
    from bloom_kernels._ptxas import Result
    fields = dict(kernel="_attn_fwd_kernel", target="sm_90", config="BLOCK_M=128 BLOCK_N=64 w8 s3", spec="bf16",
                  case="test", registers=200, shared=100_000, smem_limit=232_448, wgmma=True)
    return Result(**{**fields, **overrides})


def test_ptxas_log_is_read():
    from bloom_kernels import _ptxas
    r = _result()
    _ptxas._parse_ptxas_log(r, PTXAS_LOG)
    assert (r.registers, r.spill_stores, r.spill_loads) == (255, 68, 128)
    assert len(r.warnings) == 1 and "C7515" in r.warnings[0]


def test_problems_flag_each_failure():
    from bloom_kernels._ptxas import problems
    assert problems(_result()) == []
    assert problems(_result(error="CompilationError: boom")) == ["does not compile: CompilationError: boom"]
    assert problems(_result(spill_stores=4))[0].startswith("spills 4 B")
    assert "shared memory" in problems(_result(shared=240_000))[0]
    assert problems(_result(warnings=["(C7515) Potential Performance Loss"]))[0].startswith("ptxas")
    # the ptxas-warning and wgmma rules are Hopper rules for the attention kernels only
    assert problems(_result(target="sm_80", warnings=["(C7515) x"], wgmma=False)) == []
    assert problems(_result(kernel="_ln_fwd_kernel", warnings=["(C7515) x"], wgmma=False)) == []
    assert problems(_result(wgmma=False)) == ["no wgmma on sm_90"]
    assert problems(_result(kernel="_int8_matmul_kernel", config="BLOCK_M=128 BLOCK_N=128", wgmma=False))
    assert problems(_result(kernel="_int8_matmul_kernel", config="BLOCK_M=16 BLOCK_N=64", wgmma=False)) == []


def test_occupancy_bound():
    from bloom_kernels._ptxas import occupancy as _occupancy
    # 255 registers x 256 threads take the whole 64K register file: one CTA per SM
    assert _occupancy(255, 1024, 8, 90) == 1
    # 128 registers x 128 threads: 4 CTAs by registers; 100 KB of shared memory: 2 on sm_90
    assert _occupancy(128, 100 * 1024, 4, 90) == 2
    assert _occupancy(32, 0, 4, 80) == 16  # 64 warps per SM / 4
