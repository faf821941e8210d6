"""Tuning that persists, shared by the two tuners of this package: Triton's autotuner
(`autotune`, a drop-in for `triton.autotune` used by the kernel decorators) and int8_linear's own tuner
(which times whole launches and stores its picks in a `TuningCache`). Both cache their results on disk
across processes, keyed by the GPU (name and compute capability), the Triton version, the dtypes and the
key values, and both print ONE line to stderr the first time this process times a key that is not on
disk, e.g.

    bloom_kernels: tuning _attn_fwd_kernel for (Q_BUCKET=2048, ..., bfloat16/float32) on NVIDIA H100
    80GB HBM3 sm_90 (once; cached in ~/.triton/cache)

    BLOOM_KERNELS_TUNE_QUIET=1        no note
    BLOOM_KERNELS_CACHE_DIR=DIR       where int8_linear's picks live (default ~/.cache/bloom_kernels, or
                                      $XDG_CACHE_HOME/bloom_kernels); Triton's autotuner results live in
                                      Triton's cache (TRITON_CACHE_DIR, default ~/.triton/cache)

The note is a plain `print` to stderr, not `logging` or `warnings`: INFO records are dropped unless the
application configures logging (the user would never see it), and a warning says something is wrong,
which tuning is not (under `-W error` or pytest's warnings-as-errors it would even abort the call).
stderr keeps it out of stdout, where `bloom generate` streams the text. Pre-tune with
`python -m bloom_kernels.tune --model bloom-7b1` (or `bloom tune ...`) to pay the cost ahead of time.
"""

from __future__ import annotations

import inspect

import torch
import triton
from triton import knobs
from triton.runtime.autotuner import Autotuner, Config

# the disk cache and the note, shared with the CPU routes; their state (what was noted) lives there
from .._tune_cache import (
    CACHE_DIR_ENV, QUIET_ENV, TuningCache, _warn_once, load_json, note_tuning, save_json, short_hash,
    tune_cache_dir, tuning_cache,
)

__all__ = ["CACHE_DIR_ENV", "QUIET_ENV", "TuningCache", "autotune", "gpu_identity", "load_json",
           "mark_spills", "note_tuning", "save_json", "short_hash", "spill_free", "tune_cache_dir",
           "tuning_cache", "tuning_key"]
from ._launch import gpu_spec

# --------------------------------------------------------------------------------------------------
# Tuning that persists: the cache folder, the GPU identity, the one-line note, JSON files, and
# Triton's autotuner with all of them (see the module docstring)
# --------------------------------------------------------------------------------------------------
def gpu_identity(device: torch.device | None = None) -> str:
    """The GPU tuning results belong to, as '<device name> sm_<capability>' (e.g. 'NVIDIA H100 80GB HBM3
    sm_90'): the given CUDA device, else the current one; 'cpu' where there is none."""
    if device is None:
        if not torch.cuda.is_available():
            return "cpu"
        device = torch.device("cuda")
    spec = gpu_spec(device)
    return "cpu" if spec is None else f"{spec.name} sm_{spec.capability}"


def tuning_key(device: torch.device | None = None, **fields) -> str:
    """A disk-cache key: the GPU (gpu_identity), the Triton version, then `fields` in the given order,
    as one readable string 'gpu=...|triton=...|name=value|...'."""
    parts = {"gpu": gpu_identity(device), "triton": triton.__version__, **fields}
    return "|".join(f"{name}={value}" for name, value in parts.items())


# Where a config spills: one annotation for every kernel ------------------------------------------------
def mark_spills(config: Config, *, arch: int | None = None, spills=()) -> Config:
    """Annotate an autotune config with the architecture table it belongs to (80 or 90, see
    _launch.config_arch; None: every architecture) and the launch cases where ptxas spills its
    registers (read off the ahead-of-time compile, python -m bloom_kernels.compile_targets, which
    tests/test_compile_targets.py re-checks). A case is whatever the kernel's pruner computes from a
    launch, e.g. (BLOCK_D tile, masked) for attention. Returns the config."""
    config.arch, config.spills = arch, frozenset(spills)
    return config


def spill_free(configs: list[Config], arch: int, case) -> list[Config]:
    """The configs for `arch` that do not spill in `case`; configs never annotated (the interpreter's
    single one) all pass. Never empty: the first config stands in if every one spills."""
    kept = [c for c in configs
            if getattr(c, "arch", None) in (None, arch) and case not in getattr(c, "spills", ())]
    return kept or configs[:1]


# Triton's autotuner ----------------------------------------------------------------------------------
_CONFIG_FIELDS = frozenset(inspect.signature(Config.__init__).parameters) - {"self"}


def _plain_config(config: Config) -> Config:
    """The same config without the attributes `mark_spills` hangs on it for the pruners: Triton 3.6
    writes config.__dict__ to its cache file and reads it back with Config(**fields), which fails on
    any such extra attribute."""
    return Config(**{k: v for k, v in vars(config).items() if k in _CONFIG_FIELDS})


class CachingAutotuner(Autotuner):
    """triton.runtime.autotuner.Autotuner with its disk cache always on, keyed also by the GPU's name,
    and the one-line note when a key is timed. Only `check_disk_cache` (called by Autotuner.run on an
    in-memory miss when caching is on; it times the configs only when the key is not on disk) is
    overridden; what is timed, kept and launched is Triton's.

    Triton 3.6's own disk key (Autotuner.check_disk_cache) is sha256 of: triton_key() (the Triton
    version and hashes of its compiler sources and libtriton), the backend hash (ptxas version and the
    target arch, e.g. 90: the capability but not the card), the kernel's source hash (fn.cache_key),
    the cache-invalidating env vars, the tuning key (the values of `key`'s arguments, then str(dtype)
    of EVERY tensor argument), and str() of each pruned config. This class adds gpu_identity() (the
    device name) to the tuning key before it is hashed, so two cards of one architecture (H100 PCIe,
    H100 SXM, H200) keep their own results. Files: <Triton cache dir>/<hash>/<kernel>.autotune.json.
    """

    def __init__(self, *args, **kwargs):
        kwargs["cache_results"] = True  # Autotuner still turns it off when TRITON_INTERPRET=1
        super().__init__(*args, **kwargs)

    def _describe(self, tuning_key: tuple) -> str:
        names = list(self.keys)[:len(tuning_key)]
        parts = [f"{name}={value}" for name, value in zip(names, tuning_key)]
        dtypes = sorted({str(v).removeprefix("torch.") for v in tuning_key[len(names):]})
        return "(" + ", ".join(parts + (["/".join(dtypes)] if dtypes else [])) + ")"

    def check_disk_cache(self, tuning_key, configs, bench_fn):
        if len(configs) == 1:  # nothing to choose: no timing, no file, no note
            self.cache[tuning_key] = configs[0]
            return True
        gpu = gpu_identity()
        disk_key = (*tuning_key, gpu)
        benched = False

        def bench_and_note():
            nonlocal benched
            benched = True
            note_tuning(self.base_fn.__name__, self._describe(tuning_key), gpu, knobs.cache.dir)
            bench_fn()  # Autotuner.run's closure: times, sets self.cache[tuning_key], self.configs_timings
            self.configs_timings = {_plain_config(c): t for c, t in self.configs_timings.items()}

        try:
            found = super().check_disk_cache(disk_key, configs, bench_and_note)
        except Exception as err:  # noqa: BLE001 - a cache file Triton cannot read or write
            if benched and tuning_key not in self.cache:
                raise  # the timing itself failed: not a cache problem
            _warn_once(f"bloom_kernels: autotune cache of {self.base_fn.__name__} unusable "
                       f"({type(err).__name__}: {err}); tuning in memory")
            if tuning_key not in self.cache:
                bench_and_note()
            return False
        if found:  # Triton stored the cached pick under the key it was given
            self.cache[tuning_key] = self.cache.pop(disk_key)
        return found


def autotune(configs, key, prune_configs_by=None, reset_to_zero=None, restore_value=None, pre_hook=None,
             post_hook=None, warmup=None, rep=None, use_cuda_graph=False, do_bench=None, cache_results=True):
    """Drop-in for `triton.autotune` (same arguments): a `CachingAutotuner`, so results are always
    cached on disk across processes (`cache_results` is accepted and ignored), keyed also by the GPU's
    name, with a one-line note on stderr the first time a key is timed. In the interpreter
    (TRITON_INTERPRET=1) nothing is cached; with one config nothing is timed."""
    del cache_results

    def decorator(fn):
        return CachingAutotuner(fn, fn.arg_names, configs, key, reset_to_zero, restore_value, pre_hook=pre_hook,
                                post_hook=post_hook, prune_configs_by=prune_configs_by, warmup=warmup, rep=rep,
                                use_cuda_graph=use_cuda_graph, do_bench=do_bench)

    return decorator
