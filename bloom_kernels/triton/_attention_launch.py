"""Launch pieces of the attention kernels: the autotune configs of the prefill kernels (forward, dK/dV,
dQ) with their per-architecture tables, pruner and key, and the key-position argument every attention
kernel takes. One place, so the three prefill kernels choose their tiles the same way.

Per architecture (80: Ampere and Ada, mma.sync; 90: Hopper, wgmma), rows of
    (BLOCK_M, BLOCK_N, warps, stages, BLOCK_D tiles it runs unmasked, BLOCK_D tiles it runs masked)
where "masked" means a padding mask or lengths that do not divide the blocks (more live registers),
and a BLOCK_D tile is 64 (head dims <= 64) or 128 (BLOOM's 80, 96 and 128). A tile left out of a row
is one where that config spills registers: read off the ahead-of-time compile for sm_80 / sm_90
(python -m bloom_kernels.compile_targets; Triton 3.6, bf16, BLOOM's shapes), which the test
tests/test_compile_targets.py re-checks. Shared memory is pruned per device (`_pruner`). The CPU
interpreter gets exactly one config (it cannot time configs).
"""

from __future__ import annotations

import triton
from torch import Tensor

from ._launch import config_arch, length_bucket, next_power_of_2, smem_per_block, triton_interpreting
from ._tuning import autotune, mark_spills, spill_free

ANY, D64, NONE = (64, 128), (64,), ()
FWD = {
    90: [(128, 64, 8, 3, ANY, ANY), (128, 64, 8, 4, ANY, ANY), (128, 128, 8, 3, ANY, D64),
         (64, 64, 4, 3, ANY, ANY), (64, 32, 4, 4, ANY, ANY), (128, 64, 4, 3, D64, D64),
         (128, 32, 4, 3, D64, D64)],
    80: [(128, 64, 8, 3, ANY, D64), (128, 64, 8, 4, ANY, D64), (64, 64, 8, 3, ANY, ANY),
         (64, 64, 4, 3, ANY, ANY), (64, 32, 4, 4, ANY, ANY), (128, 32, 8, 3, ANY, (128,)),
         (128, 32, 4, 3, D64, D64)],
}
DKDV = {
    90: [(32, 128, 8, 3, ANY, ANY), (64, 64, 8, 3, ANY, D64), (64, 128, 8, 3, D64, D64),
         (32, 64, 4, 3, ANY, D64), (16, 128, 4, 3, D64, D64), (64, 128, 8, 2, D64, D64),
         (32, 64, 8, 3, ANY, ANY), (16, 128, 8, 3, ANY, ANY)],
    80: [(16, 128, 8, 3, ANY, ANY), (16, 64, 4, 3, ANY, ANY), (32, 64, 8, 3, ANY, (128,)),
         (64, 64, 8, 3, (128,), (128,)), (32, 64, 4, 3, ANY, NONE), (32, 128, 8, 3, D64, NONE),
         (32, 128, 8, 2, D64, D64), (16, 128, 4, 3, D64, D64)],
}
DQ = {
    90: [(128, 32, 8, 3, ANY, ANY), (128, 64, 8, 2, ANY, ANY), (64, 64, 8, 3, ANY, ANY),
         (64, 32, 4, 3, ANY, ANY), (128, 128, 8, 2, D64, D64), (128, 32, 4, 3, D64, D64)],
    80: [(128, 32, 8, 3, ANY, ANY), (64, 32, 4, 3, ANY, ANY), (64, 32, 8, 3, ANY, ANY),
         (128, 32, 4, 3, D64, NONE), (128, 64, 8, 2, ANY, NONE), (64, 64, 8, 3, ANY, (128,))],
}

# autotune key: lengths bucketed (plus ALIGNED, see key_lengths), the head dim and the mask flag
KEY = ["Q_BUCKET", "K_BUCKET", "ALIGNED", "HEAD_DIM", "HAS_MASK"]
# the unmasked variants of the kernels: lengths that are multiples of the blocks
EVEN = {
    "EVEN_M": lambda a: a["Q_LEN"] % a["BLOCK_M"] == 0,
    "EVEN_N": lambda a: a["K_LEN"] % a["BLOCK_N"] == 0,
}


def key_lengths(q_len: int, k_len: int) -> tuple[int, int, int]:
    """(Q_BUCKET, K_BUCKET, ALIGNED) of the autotune key. ALIGNED: both lengths are multiples of 128,
    hence of every block size, so no config needs a boundary mask; the pruner keeps only the configs
    that run masked without spilling otherwise, for every length of the bucket alike."""
    return length_bucket(q_len, 16384), length_bucket(k_len, 16384), int(q_len % 128 == 0 and k_len % 128 == 0)


def configs(table, interpreter_blocks) -> list[triton.Config]:
    """The table's rows as triton.Configs (each knowing its architecture and where it spills), or the
    interpreter's single (BLOCK_M, BLOCK_N)."""
    if triton_interpreting():
        bm, bn = interpreter_blocks
        return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=4, num_stages=1)]
    out = []
    for arch, rows in table.items():
        for bm, bn, warps, stages, tiles, masked_tiles in rows:
            spills = {(tile, False) for tile in (64, 128) if tile not in tiles}
            spills |= {(tile, True) for tile in (64, 128) if tile not in masked_tiles}
            out.append(mark_spills(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps,
                                                num_stages=stages), arch=arch, spills=spills))
    return out


def pruner(staged_elements):
    """Early config prune for one kernel: keep the configs of this device's architecture that run
    this (BLOCK_D tile, masked) case without spilling, are not much larger than the problem, and whose
    shared memory (staged_elements(BM, BN, BD, stages) * element size, the tiles the pipeline keeps)
    fits the device, e.g. not fp32 with large tiles.
    """
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        q, block_d = args["q_ptr"], args["BLOCK_D"]
        masked = bool(args["HAS_MASK"]) or not args["ALIGNED"]  # the same for every length in this key
        mine = spill_free(configs, config_arch(q.device), (64 if block_d <= 64 else 128, masked))
        if len(mine) <= 1:
            return mine
        limit = smem_per_block(q.device)
        q_cap, k_cap = max(64, next_power_of_2(args["Q_LEN"])), max(64, next_power_of_2(args["K_LEN"]))

        def fits(c):
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            return (bm <= q_cap and bn <= k_cap
                    and staged_elements(bm, bn, block_d, c.num_stages) * q.element_size() <= limit - 2048)

        return [c for c in mine if fits(c)] or [
            min(mine, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.num_stages)]
    return prune


def autotuned(table, interpreter_blocks, prune):
    """The decorators of a prefill attention kernel: autotuned over `table`'s configs (pruned by
    `prune`) on KEY, with the EVEN_M / EVEN_N heuristics. Put it above @triton.jit."""
    def decorate(kernel):
        return autotune(configs=configs(table, interpreter_blocks), key=KEY,
                        prune_configs_by={"early_config_prune": prune})(triton.heuristics(EVEN)(kernel))
    return decorate


# q tile + pipelined K and V tiles; K and V tile + pipelined Q and dO tiles; Q and dO + K and V
prune_fwd = pruner(lambda bm, bn, bd, stages: bm * bd + stages * 2 * bn * bd)
prune_dkdv = pruner(lambda bm, bn, bd, stages: 2 * bn * bd + stages * 2 * bm * bd)
prune_dq = pruner(lambda bm, bn, bd, stages: 2 * bm * bd + stages * 2 * bn * bd)


def positions_arg(positions: Tensor | None, slopes: Tensor) -> tuple[Tensor, tuple[int, int], bool]:
    """(tensor, its strides, HAS_MASK) of the key positions (B, Sk) fp32; without a mask the kernels
    never read the pointer (the slopes stand in)."""
    if positions is None:
        return slopes, (0, 0), False
    return positions, positions.stride(), True
