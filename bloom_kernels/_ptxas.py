"""What the ahead-of-time compile check (compile_targets.py) reads off one compiled kernel variant, what
it counts as a problem, and its reports: registers, spill bytes and performance warnings from
`ptxas -v`, shared memory from Triton's metadata, wgmma in the PTX, and the occupancy those allow.
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

# Per-SM limits of the targets (for the occupancy bound): shared memory by compute capability.
SMEM_PER_SM = {80: 167_936, 90: 233_472}
REGISTERS_PER_SM = 65_536
MAX_WARPS_PER_SM = 64

# Kernels whose sm_90 build must use wgmma and carry no ptxas performance warning.
ATTENTION_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel", "_decode_kernel")
WGMMA_KERNELS = ("_attn_fwd_kernel", "_attn_bwd_dq_kernel", "_attn_bwd_dkdv_kernel")
# _int8_matmul_kernel's large-M tiles (BLOCK_M >= 64) must use wgmma too; the 16-row decode tiles
# are below wgmma's 64-row minimum and run mma.sync by design.
WGMMA_MIN_BLOCK_M = 64


@dataclass
class Result:
    kernel: str
    target: str
    config: str
    spec: str
    case: str
    registers: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    shared: int = 0
    smem_limit: int = 0
    occupancy: int = 0  # CTAs per SM allowed by registers, shared memory and warps
    wgmma: bool = False
    warnings: list = field(default_factory=list)
    error: str = ""
    seconds: float = 0.0


def read_ptxas(result: Result, ptx: str, capability: int) -> None:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        run = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                              path, "-o", os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"ptxas failed: {run.stderr.strip()[:500]}")
    _parse_ptxas_log(result, run.stderr)


def _parse_ptxas_log(result: Result, log: str) -> None:
    """Registers, spill bytes and performance warnings from `ptxas -v` output."""
    if m := re.search(r"Used (\d+) registers", log):
        result.registers = int(m.group(1))
    if m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log):
        result.spill_stores, result.spill_loads = int(m.group(1)), int(m.group(2))
    result.warnings = [line.split("info    : ", 1)[-1].strip() for line in log.splitlines()
                       if "Performance" in line or "warning" in line.lower()]


def occupancy(registers: int, shared: int, warps: int, capability: int) -> int:
    regs_per_warp = math.ceil(max(registers, 1) * 32 / 256) * 256  # allocated per warp in 256s
    by_regs = REGISTERS_PER_SM // (regs_per_warp * warps)
    by_smem = SMEM_PER_SM[capability] // shared if shared else 32
    return max(0, min(by_regs, by_smem, MAX_WARPS_PER_SM // warps, 32))


def problems(r: Result) -> list[str]:
    """What is wrong with one compiled variant (empty: all checks pass)."""
    found = []
    if r.error:
        return [f"does not compile: {r.error}"]
    if r.spill_stores or r.spill_loads:
        found.append(f"spills {r.spill_stores} B stores / {r.spill_loads} B loads per thread")
    if r.shared > r.smem_limit:
        found.append(f"needs {r.shared} B shared memory, the target allows {r.smem_limit}")
    if r.target == "sm_90" and r.kernel in ATTENTION_KERNELS and r.warnings:
        found.append("ptxas: " + "; ".join(w[:120] for w in r.warnings))
    if r.target == "sm_90" and not r.wgmma and (
            r.kernel in WGMMA_KERNELS
            or (r.kernel == "_int8_matmul_kernel" and _config_value(r.config, "BLOCK_M") >= WGMMA_MIN_BLOCK_M)):
        found.append("no wgmma on sm_90")
    return found


def _config_value(config: str, name: str) -> int:
    m = re.search(rf"\b{name}=(\d+)", config)
    return int(m.group(1)) if m else 0


# --------------------------------------------------------------------------------------------------
# reports
# --------------------------------------------------------------------------------------------------
def table(results: list[Result]) -> str:
    """One line per variant: what a kernel author compares before and after a change."""
    head = f"{'kernel':<24} {'target':<6} {'config':<44} {'spec':<60} {'regs':>4} {'spill':>9} " \
           f"{'smem KB':>7} {'CTA/SM':>6}  notes"
    lines = [head, "-" * len(head)]
    for r in sorted(results, key=lambda r: (r.kernel, r.target, r.spec, r.config)):
        notes = "; ".join(problems(r)) or ("wgmma" if r.wgmma else "")
        lines.append(f"{r.kernel:<24} {r.target:<6} {r.config:<44} {r.spec[:60]:<60} {r.registers:>4} "
                     f"{r.spill_stores:>4}/{r.spill_loads:<4} {r.shared / 1024:>7.1f} {r.occupancy:>6}  {notes}")
    return "\n".join(lines)


def summary(results: list[Result]) -> str:
    lines = []
    for kernel in sorted({r.kernel for r in results}):
        for target in sorted({r.target for r in results}):
            rs = [r for r in results if r.kernel == kernel and r.target == target]
            if not rs:
                continue
            bad = sum(bool(problems(r)) for r in rs)
            regs = [r.registers for r in rs if not r.error]
            lines.append(f"{kernel:<24} {target}: {len(rs):>4} variants, {bad:>3} with problems, registers "
                         f"{min(regs, default=0)}-{max(regs, default=0)} (mean {sum(regs) / max(len(regs), 1):.0f}), "
                         f"max smem {max((r.shared for r in rs), default=0) / 1024:.0f} KB")
    return "\n".join(lines)
