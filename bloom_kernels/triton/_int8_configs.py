"""Launch configs of the int8 weight-only matmul (int8_linear.py): the config record, the built-in
default of each path, and the candidate tiles the tuner times, per architecture, each checked
against the ahead-of-time compile (no spills; python -m bloom_kernels.compile_targets).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from ._launch import config_arch, gpu_spec, sm_count, smem_per_block

@dataclass(frozen=True)
class Int8MatmulConfig:
    """One launch of `_int8_matmul_kernel`: output tile (block_m, block_n), K step block_k, K split
    into split_k parts (fp32 partials summed by `_splitk_reduce_kernel`), GROUP_M row tiles per group,
    and whether the weight is streamed with an evict-first hint (read once: the small path)."""
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    stream_weight: bool = False




def _sm_count(device: torch.device) -> int:
    return sm_count(device, interpreter_sms=4)  # a few "SMs": small shapes still exercise split-K


def _split_for(m: int, n: int, k: int, bm: int, bn: int, bk: int, sms: int, waves: float) -> int:
    """K splits so that (tiles x splits) fills about `waves` waves of SMs, keeping >= 4 K steps per
    split (shorter splits make the fp32 partials cost more than the extra parallelism gains)."""
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    want = triton.cdiv(int(waves * sms), tiles)
    return max(1, min(want, triton.cdiv(k, bk) // 4, 64))


def _cfg(m, n, k, bm, bn, bk, warps, stages, sms, waves=0.0, stream=False) -> Int8MatmulConfig:
    split = _split_for(m, n, k, bm, bn, bk, sms, waves) if waves else 1
    return Int8MatmulConfig(bm, bn, bk, split, 8, warps, stages, stream)


def default_config(path: str, m: int, n: int, k: int, device: torch.device,
                    dtype: torch.dtype = torch.bfloat16) -> Int8MatmulConfig:
    """The config used without timing (interpreter, fp32, CUDA-graph capture, tuning off)."""
    sms = _sm_count(device)
    if gpu_spec(device) is None:  # interpreter: small tiles, it is slow
        if path == "small":
            return _cfg(m, n, k, 16, 16, 32, 4, 1, sms, waves=2, stream=True)
        return Int8MatmulConfig(16, 32, 32, group_m=2)
    if dtype == torch.float32:  # IEEE fp32 dot on CUDA cores: the largest tiles that do not spill
        if path == "small":
            return _cfg(m, n, k, 16, 64, 32, 4, 2, sms, waves=4, stream=True)
        return _cfg(m, n, k, 32, 64, 32, 4, 2, sms)
    if path == "small":
        return _cfg(m, n, k, 16, 64, 128, 4, 4, sms, waves=4, stream=True)
    if m <= 256:
        return _cfg(m, n, k, 64, 64, 128, 4, 4, sms, waves=2)
    # sm_8x: 128x128x64 w4 s4 spills on sm_80 (20 B fwd with a masked M tail, 636-7,736 B dx; ptxas,
    # Triton 3.6); 8 warps halve the accumulator per thread: 152-236 registers, no spill (_LARGE_TILES)
    warps = 4 if config_arch(device) == 90 else 8
    return _cfg(m, n, k, 128, 128, 64, warps, 4, sms)


def smem_bytes(bm: int, bn: int, bk: int, stages: int) -> int:
    # pipelined x (2 B) and int8 weight tiles, plus one staged copy of the dequantised tile
    return stages * (bm * bk * 2 + bn * bk) + bn * bk * 2


# Candidate tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages), chosen from the sm_90 SASS of this kernel
# (Triton 3.6): no spills; small M: 0.03 issue-cycles per weight byte and 48-144 KB of weight in flight
# per SM; large M: 4-warp 128-row tiles fit two CTAs per SM, so one dequantises while the other's wgmma
# runs (each CTA's loop waits for its own wgmma), 8-warp 256-row tiles amortise the dequant instead.
_SMALL_TILES = ((16, 64, 128, 4, 4), (16, 128, 128, 4, 4), (16, 64, 256, 4, 3), (16, 32, 256, 4, 4),
                (64, 64, 128, 4, 4))
# Large tiles per architecture: 90 for Hopper and newer (wgmma; the tiles chosen above from the sm_90
# SASS), 80 for Ampere and Ada (mma.sync: the operand fragments live in registers too). ptxas spills
# most of the sm_90 tiles on sm_80 (Triton 3.6, compile_targets --full: every BLOOM shape, bf16 and
# fp16), worst in dx (SCALE_ON_K: the weight tile is dequantised in fp32; the tuner's candidates serve
# fwd and dx alike), so each is swapped for the closest tile that does not spill there, row by row
# (before -> after: registers and spill-store bytes per thread on sm_80):
_LARGE_TILES = {
    90: ((128, 128, 64, 4, 4), (128, 128, 64, 4, 3), (128, 128, 32, 4, 4), (64, 256, 64, 4, 3),
         (64, 128, 128, 4, 3), (64, 128, 64, 4, 4), (256, 128, 64, 8, 3), (128, 256, 64, 8, 3),
         (128, 128, 128, 8, 3)),
    80: ((128, 128, 64, 8, 4),  # w4: 255 regs, 20 B fwd (masked M), 636-7,736 B dx -> w8: 152-236, none
         (128, 128, 64, 8, 3),  # w4: 255 regs, 20 B fwd (masked M), 380-6,892 B dx -> w8: 152-220, none
         (128, 128, 32, 4, 3),  # s4: 255 regs, 44-56 B dx -> s3: 220-254, none (w8 s3 spills fp16 fwd)
         (64, 256, 64, 8, 3),  # w4: 255 regs, 32 B fwd, 668-720 B dx -> w8: 152-251, none
         (64, 128, 128, 8, 3),  # w4: 255 regs, 36-48 B fwd (masked M), 888-7,620 B dx -> w8: 127-234
         (64, 128, 64, 8, 4),  # w4: 255 regs, 8-36 B dx -> w8: 99-174, none (w4 s3 is at 254)
         (256, 128, 32, 8, 3),  # BLOCK_K=64: 255 regs, 4-164 B fwd, 276-6,100 B dx -> 32: 218-242
         (128, 256, 32, 8, 3),  # BLOCK_K=64: 255 regs, 400-412 B dx -> 32: 214-255, none
         (128, 128, 128, 8, 3)),  # never kept on sm_8x: more shared memory (smem_bytes) than it has
}
# 16 < M <= 256. 32x128x128 at 4 warps spilled in dx on both targets (255 registers; sm_80 924-956 B,
# sm_90 932-940 B: 32 rows are below wgmma's 64, so mma.sync there too); at 8 warps 92-246 registers
# on sm_80 and 80-238 on sm_90, none.
_MID_TILES = ((32, 64, 128, 4, 4), (64, 64, 128, 4, 4), (32, 128, 128, 8, 4))


def candidates(path: str, m: int, n: int, k: int, device: torch.device) -> list[Int8MatmulConfig]:
    """What the tuner times on a GPU: whole launches, so a split pays for its reduce."""
    sms = _sm_count(device)
    arch = config_arch(device)  # the rows of _LARGE_TILES
    out = []
    if path == "small":  # one row tile (x padded with masked rows), K split over ~2-4 waves
        for bm, bn, bk, warps, stages in _SMALL_TILES:
            if bm >= m:
                out += [_cfg(m, n, k, bm, bn, bk, warps, stages, sms, w, True) for w in (2, 4)]
    else:
        tiles = _LARGE_TILES[arch] + (_MID_TILES if m <= 256 else ())
        for bm, bn, bk, warps, stages in tiles:
            if bm > max(16, triton.next_power_of_2(m)):
                continue
            out.append(_cfg(m, n, k, bm, bn, bk, warps, stages, sms))
            if m <= 256:  # few row tiles: also try splitting K
                out.append(_cfg(m, n, k, bm, bn, bk, warps, stages, sms, waves=2))
    kept = []
    for c in out:
        if c not in kept and smem_bytes(c.block_m, c.block_n, c.block_k, c.num_stages) <= smem_per_block(device):
            kept.append(c)
    return kept or [default_config(path, m, n, k, device)]
