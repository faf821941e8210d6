"""Compile every kernel variant the launchers can pick for real NVIDIA GPUs, ahead of time, on any machine.

    python -m bloom_kernels.compile_targets                    # representative subset, sm_80 + sm_90
    python -m bloom_kernels.compile_targets --full             # every BLOOM model, dtype and config
    python -m bloom_kernels.compile_targets --kernels _attn_fwd_kernel --targets 90 --json out.json

The CPU interpreter never compiles a kernel, so a bf16 `tl.dot`, a config that spills registers or
overflows shared memory, or a Hopper pipeline that ptxas serialises only shows on a real target.
Triton compiles for one without a GPU or driver (`triton.compile` on an ASTSource with a GPUTarget;
ptxas ships inside triton). How the variants are found, without writing any launch twice:

1. plan: the real launchers (attention._forward/_backward, decode, layer_norm, bias_gelu, int8_linear)
   run on `meta` tensors of BLOOM's shapes and layouts (q/k/v as views of the fused QKV projection, k/v
   as slices of a KV cache), under `planning_for(GpuSpec)` so SM counts and shared memory are the
   target's; every kernel launch is recorded instead of run (`_recording_launches`). Meta tensors
   have data pointers 0 + offset, so alignment specialisation is the real one.
2. expand: an autotuned launch becomes one variant per config its pruner keeps for that target, with
   the `triton.heuristics` values (EVEN_M, ONE_TILE, ...) applied as at run time; variants that
   specialise identically are compiled once.
3. compile: Triton's own binder computes the signature and specialisation, `triton.compile` builds the
   PTX for GPUTarget("cuda", 80 | 90), and ptxas -v on that PTX gives registers, spill bytes and its
   warnings; Triton's metadata gives the shared memory.

Checks (the test `tests/test_compile_targets.py` asserts them; `problems()` lists what fails): it
compiles; no spill stores or loads; shared memory within the target's per-block limit; on sm_90 no
ptxas performance warning (C7515: serialised wgmma) in the attention kernels, and wgmma in the
attention and int8 large-M kernels. Must run without TRITON_INTERPRET (the interpreter replaces
@triton.jit): the test starts it in a subprocess.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import importlib
import itertools
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler.compiler import make_backend
from triton.runtime.autotuner import Autotuner, Heuristics
from triton.runtime.jit import JITFunction, create_function_from_signature

from .triton._launch import GpuSpec, planning_for
from ._ptxas import Result, occupancy, problems, read_ptxas, summary, table
from .shapes import BLOOM_SHAPES, bloom_shape

# Compute capability -> the card the launchers plan for (SMs, opt-in shared memory per block).
TARGETS = {
    80: GpuSpec("A100 (sm_80)", 80, 108, 166_912),
    90: GpuSpec("H100 (sm_90)", 90, 132, 232_448),
}

DEFAULT_MODELS = ("bloom-560m", "bloom-3b", "bloom-7b1", "bloom")  # head dims 64, 80, 128; N 14,336
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DECODE_TOKENS = 64  # token counts up to this are decode steps: no backward is planned for them


# --------------------------------------------------------------------------------------------------
# 1. plan: run the launchers on meta tensors and record their launches
# --------------------------------------------------------------------------------------------------
@dataclass
class Launch:
    kernel: object  # Autotuner, Heuristics or JITFunction, as the launcher called it
    args: tuple
    kwargs: dict
    case: str  # what the launcher was doing: "bloom-7b1 bf16 prefill S=1000 mask"


@contextlib.contextmanager
def _recording_launches(log: list, case: list):
    """Within: `kernel[grid](...)` records a Launch and runs nothing (Autotuner first, so an autotuned
    kernel is recorded once with its config still open)."""
    def record_tuned(self, *args, grid=None, warmup=False, **kwargs):
        log.append(Launch(self, args, kwargs, case[0]))

    def record_jit(self, *args, grid, warmup, **kwargs):
        log.append(Launch(self, args, kwargs, case[0]))

    saved = Autotuner.run, JITFunction.run
    Autotuner.run, JITFunction.run = record_tuned, record_jit
    try:
        yield
    finally:
        Autotuner.run, JITFunction.run = saved


def _module(name: str):
    return importlib.import_module(f"{__package__}.triton.{name}")


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(shape, dtype=dtype, device="meta")


def _attention_cases(model, dtype, seqs, batch=2):
    """Prefill forward + backward on views of the fused QKV projection, as BloomAttention passes them;
    `seqs` holds (length, with a padding mask) pairs."""
    attention = _module("attention")
    heads, head_dim = model.heads, model.head_dim
    slopes = _meta(heads, dtype=torch.float32)
    for seq, masked in seqs:
        qkv = _meta(batch, seq, heads, 3, head_dim, dtype=dtype)
        q, k, v = (qkv[:, :, :, i].transpose(1, 2) for i in range(3))  # (B, H, S, D) strided views
        out = _meta(batch, seq, heads, head_dim, dtype=dtype).transpose(1, 2)  # as _forward returns it
        positions = _meta(batch, seq, dtype=torch.float32) if masked else None
        yield f"prefill S={seq} {'mask' if masked else 'no mask'}", lambda: (
            attention._forward(q, k, v, slopes, positions, head_dim ** -0.5),
            attention._backward(out, q, k, v, out, _meta(batch, heads, seq, dtype=torch.float32), slopes,
                                positions, head_dim ** -0.5))


def _decode_cases(model, dtype, steps, max_len=8192):
    """One new token against a slice of a (B, H, max_len, D) KV cache; `steps` holds (rows, key length,
    with a padding mask) triples. Few rows split the keys over programs, many do not."""
    attention = _module("attention")
    heads, head_dim = model.heads, model.head_dim
    slopes = _meta(heads, dtype=torch.float32)
    for batch, key_len, masked in steps:
        q = _meta(batch, 1, heads, 3, head_dim, dtype=dtype)[:, :, :, 0].transpose(1, 2)
        k = v = _meta(batch, heads, max_len, head_dim, dtype=dtype)[:, :, :key_len]
        positions = _meta(batch, key_len, dtype=torch.float32) if masked else None
        yield f"decode B={batch} Sk={key_len} {'mask' if masked else 'no mask'}", lambda: attention._forward(
            q, k, v, slopes, positions, head_dim ** -0.5)


def _row_op_cases(model, dtype, token_counts, training_counts):
    """LayerNorm with the residual add (hidden) and bias-GeLU (4 x hidden), forward and backward."""
    bias_gelu, layer_norm = _module("bias_gelu"), _module("layer_norm")
    h, ffn = model.hidden, model.ffn
    w, b = _meta(h, dtype=dtype), _meta(h, dtype=dtype)
    for m in token_counts:
        x, r = _meta(m, h, dtype=dtype), _meta(m, h, dtype=dtype)
        stats = _meta(m, dtype=torch.float32)
        training = m in training_counts  # backward only where training runs: prefill-sized batches
        yield f"layer_norm M={m}", lambda: (
            layer_norm._forward(x, w, b, 1e-5, r),
            training and layer_norm._backward(x, x, x, r, w, stats, stats, dtype),
            training and layer_norm._backward(x, None, x, None, w, stats, stats, dtype))
        xf = _meta(m, ffn, dtype=dtype)
        yield f"bias_gelu M={m}", lambda: (bias_gelu._forward(xf, _meta(ffn, dtype=dtype)),
                                           training and bias_gelu._backward(xf, xf, _meta(ffn, dtype=dtype)))


def _int8_cases(model, dtype, token_counts, training_counts):
    """Every candidate config of the int8 tuner for BLOOM's four projections, forward and dx."""
    q8 = _module("int8_linear")
    device = torch.device("cuda", 0)  # the tuner's candidates are those of a CUDA device
    for n, k, has_bias in model.projections:
        weight, scale = _meta(n, k, dtype=torch.int8), _meta(n, dtype=dtype)
        bias = _meta(n, dtype=dtype) if has_bias else None
        for m in token_counts:
            path = q8._choose_path(m)
            x, dy = _meta(m, k, dtype=dtype), _meta(m, n, dtype=dtype)

            def run(x=x, dy=dy, weight=weight, scale=scale, bias=bias, path=path, m=m, n=n, k=k):
                for cfg in q8.candidates(path, m, n, k, device):
                    q8._launch(x, weight, scale, bias, cfg)
                if m in training_counts:  # dx: training
                    for cfg in q8.candidates(path, m, k, n, device):
                        q8._launch(dy, weight.t(), scale, None, cfg, scale_on_k=True)
            yield f"int8 {path} M={m} N={n} K={k}", run


def plan(targets=(80, 90), models=DEFAULT_MODELS, dtypes=("bf16",), full=False) -> list[Variant]:
    """Every distinct variant the launchers can pick for these targets, models and dtypes.

    Lengths: a multiple of every block (EVEN_M / EVEN_N) and one that divides none (masked tails),
    each with and without a padding mask in the full sweep; the subset pairs the even length without
    a mask and the odd one with it (the most registers). Decode: 1 row (the keys split over programs)
    and 64 (no split); the subset pairs the split with the even unmasked length and no split with the
    odd masked one. Token counts: 1 and 8 (decode), 1000 and 4096 (prefill); the backward (training)
    at every prefill count in the full sweep, at 1000 (rows that divide no block) in the subset.
    """
    if full:
        pairs = lambda lengths: [(n, masked) for n in lengths for masked in (False, True)]  # noqa: E731
        seqs = pairs((4096, 2048, 1000, 129))
        steps = [(b, n, masked) for b in (1, 8, 64) for n, masked in pairs((8192, 4097, 1000, 129, 17))]
        tokens = (1, 3, 8, 16, 17, 64, 256, 1000, 4096, 8192)
        training = tuple(m for m in tokens if m > DECODE_TOKENS)
    else:
        seqs, steps = ((2048, False), (1000, True)), ((1, 4096, False), (64, 4097, True))
        tokens, training = (1, 8, 1000, 4096), (1000,)
    variants: dict[tuple, Variant] = {}
    for capability in targets:
        spec = TARGETS[capability]
        for name in models:
            model = bloom_shape(name)
            for dtype_name in dtypes:
                dtype = DTYPES[dtype_name]
                # each case runs before its generator moves on (the lambdas read the loop variables)
                cases = itertools.chain(_attention_cases(model, dtype, seqs), _decode_cases(model, dtype, steps),
                                        _row_op_cases(model, dtype, tokens, training),
                                        _int8_cases(model, dtype, tokens, training))
                log, case = [], [""]
                with planning_for(spec):  # the pruners too must see the target, not this machine
                    with _recording_launches(log, case):
                        for label, run in cases:
                            case[0] = f"{name} {dtype_name} {label}"
                            run()
                    for launch in log:
                        for variant in _expand(launch, capability):
                            variants.setdefault(variant.key, variant)
    return list(variants.values())


# --------------------------------------------------------------------------------------------------
# 2. expand: one variant per (config the pruner keeps, specialisation)
# --------------------------------------------------------------------------------------------------
@dataclass
class Variant:
    kernel_name: str
    capability: int
    config: str  # "BLOCK_M=128 BLOCK_N=64 w8 s3"
    spec: str  # dtypes and the specialising constexprs: "bf16 HEAD_DIM=128 HAS_MASK=1 EVEN_M=0"
    case: str  # first launcher case that produced it
    key: tuple = field(repr=False)
    jit: JITFunction = field(repr=False)
    args: tuple = field(repr=False)
    kwargs: dict = field(repr=False)


_CONFIG_NAMES = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK", "SPLIT_K", "GROUP_M")


def _expand(launch: Launch, capability: int) -> list[Variant]:
    kernel, args, kwargs = launch.kernel, launch.args, dict(launch.kwargs)
    configs = [({}, None, None)]
    if isinstance(kernel, Autotuner):
        named = dict(zip(kernel.arg_names, args))
        kept = kernel.configs
        if kernel.early_config_prune:
            kept = kernel.early_config_prune(kernel.configs, named, **kwargs)
        configs = [(c.kwargs, c.num_warps, c.num_stages) for c in kept]
        kernel = kernel.fn
    out = []
    for config, warps, stages in configs:
        kw = {**kwargs, **config}
        if warps is not None:
            kw.update(num_warps=warps, num_stages=stages)
        inner = kernel
        if isinstance(inner, Heuristics):
            for name, rule in inner.values.items():
                kw[name] = rule({**dict(zip(inner.arg_names, args)), **kw})
            inner = inner.fn
        out.append(_variant(inner, args, kw, capability, launch.case))
    return out


def _variant(jit: JITFunction, args, kw, capability, case) -> Variant:
    backend = make_backend(GPUTarget("cuda", capability, 32))
    bound, specialization, _ = _binder(jit, backend)(*args, **kw)
    constexprs = {n: v for n, (kind, v) in zip(bound, specialization) if kind == "constexpr"}
    tensor_dtypes = sorted({str(a.dtype).replace("torch.", "") for a in args if isinstance(a, torch.Tensor)})
    warps, stages = kw.get("num_warps", 4), kw.get("num_stages", 3)
    config = " ".join(f"{n}={constexprs[n]}" for n in _CONFIG_NAMES if n in constexprs) + f" w{warps} s{stages}"
    # the constexprs that are not the config, and the integers that are not multiples of 16 (Triton
    # specialises on that); unit strides, constexprs too, are the same in every variant
    odd = [n for n, (kind, attr) in _flat_args(bound, specialization) if kind[0] in "iu" and attr != "D"
           and n not in constexprs]
    spec = " ".join([",".join(tensor_dtypes)] + [f"{n}={_short(v)}" for n, v in constexprs.items()
                                                 if n not in _CONFIG_NAMES and not n.startswith("stride")]
                    + ([f"~16:{','.join(odd)}"] if odd else []))
    key = (jit.fn.__name__, capability, str(specialization), warps, stages)
    return Variant(jit.fn.__name__, capability, config, spec, case, key, jit, args, kw)


def _flat_args(bound: dict, specialization: list):
    """(name, (kind, attr)) of every scalar argument; a tuple argument (a tensor's strides) gives
    name[0], name[1], ..."""
    for name, (kind, attr) in zip(bound, specialization):
        if isinstance(kind, tuple):
            yield from ((f"{name}[{i}]", (k, a)) for i, (k, a) in enumerate(zip(kind, attr)))
        else:
            yield name, (kind, attr)


def _short(value) -> str:
    return str(int(value)) if isinstance(value, bool) else str(value).replace("triton.language.", "")


_binders: dict = {}


def _binder(jit: JITFunction, backend):
    key = (id(jit), backend.target.arch)
    if key not in _binders:
        _binders[key] = create_function_from_signature(jit.signature, jit.params, backend)
    return _binders[key]


# --------------------------------------------------------------------------------------------------
# 3. compile, then read ptxas (_ptxas.py)
# --------------------------------------------------------------------------------------------------
def compile_variant(v: Variant) -> Result:
    spec = TARGETS[v.capability]
    result = Result(v.kernel_name, f"sm_{v.capability}", v.config, v.spec, v.case, smem_limit=spec.smem_per_block)
    start = time.perf_counter()
    try:
        target = GPUTarget("cuda", v.capability, 32)
        backend = make_backend(target)
        bound, specialization, options = _binder(v.jit, backend)(*v.args, **v.kwargs)
        options, signature, constexprs, attrs = v.jit._pack_args(backend, dict(v.kwargs), bound,
                                                                 specialization, options)
        src = triton.compiler.ASTSource(v.jit, signature, constexprs, attrs)
        compiled = triton.compile(src, target=target, options=options.__dict__)
        ptx = compiled.asm["ptx"]
        result.shared = int(compiled.metadata.shared)
        result.wgmma = "wgmma.mma_async" in ptx
        read_ptxas(result, ptx, v.capability)
        warps = v.kwargs.get("num_warps", 4)
        result.occupancy = occupancy(result.registers, result.shared, warps, v.capability)
    except Exception as exc:  # noqa: BLE001 - a failed compile is a result to report, not a crash
        result.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    result.seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------------
# running it
# --------------------------------------------------------------------------------------------------
_PLANNED: list[Variant] = []


def _compile_share(share: tuple[int, int]) -> list[dict]:
    index, jobs = share
    return [asdict(compile_variant(v)) for v in _PLANNED[index::jobs]]


def run(variants: list[Variant], jobs: int = 1) -> list[Result]:
    """Compile every variant, `jobs` processes at a time (forked: they inherit the plan)."""
    global _PLANNED
    _PLANNED = variants
    if jobs <= 1:
        return [compile_variant(v) for v in variants]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        shares = list(pool.map(_compile_share, [(i, jobs) for i in range(jobs)]))
    ordered = [None] * len(variants)
    for index, share in enumerate(shares):
        ordered[index::jobs] = [Result(**r) for r in share]
    return ordered


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloom_kernels.compile_targets",
                                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--full", action="store_true", help="every BLOOM model, more lengths and token counts")
    parser.add_argument("--targets", type=int, nargs="+", choices=sorted(TARGETS), default=sorted(TARGETS))
    parser.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_MODELS)} "
                        f"(--full: all of {' '.join(BLOOM_SHAPES)})")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default: bf16 (--full: bf16 fp16)")
    parser.add_argument("--kernels", nargs="+", default=None, help="only these kernels (e.g. _attn_fwd_kernel)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--json", default=None, help="write every result to this JSON file")
    parser.add_argument("--out", default=None, help="write compile_targets.txt and .json into this folder")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        parser.error("run without TRITON_INTERPRET: the interpreter never compiles a kernel")

    models = args.models or (tuple(BLOOM_SHAPES) if args.full else DEFAULT_MODELS)
    start = time.perf_counter()
    dtypes = args.dtypes or (("bf16", "fp16") if args.full else ("bf16",))
    variants = plan(tuple(args.targets), tuple(models), tuple(dtypes), args.full)
    if args.kernels:
        variants = [v for v in variants if v.kernel_name in args.kernels]
    results = run(variants, args.jobs)
    text = f"{table(results)}\n\n{summary(results)}\n\n{len(results)} variants compiled in " \
           f"{time.perf_counter() - start:.0f} s (triton {triton.__version__}, ptxas from triton)"
    print(text)
    payload = [asdict(r) for r in results]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "compile_targets.txt"), "w") as f:
            f.write(text + "\n")
        args.json = args.json or os.path.join(args.out, "compile_targets.json")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(payload, f, indent=1)
    return 1 if any(problems(r) for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
