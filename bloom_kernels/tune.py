"""Pre-tune the Triton kernels for a BLOOM model's shapes, so no request pays for tuning later.

    python -m bloom_kernels.tune --model bloom-7b1                  # bf16, batch 1 and 8, prompts 128 and 2048
    python -m bloom_kernels.tune --model bloom-560m --int8 --backward --batch 1 --seq 512
    python -m bloom_kernels.tune --model bloom-7b1 --dry-run        # the plan only; any machine
    bloom tune --model bloom-7b1                                    # the same, from the `bloom` command
    python -m bloom_kernels.tune --model bloom-560m --cpu --int8    # the CPU routes of decode (no GPU)

Each autotuned kernel times its configs the first time it meets a key (power-of-two buckets of the
sizes, the dtypes, the GPU) and keeps the pick on disk (Triton's cache for the autotuned kernels,
~/.cache/bloom_kernels/int8_linear.json for int8_linear; see _tuning.py). This command makes those first
meetings happen now: it calls the PUBLIC ops (BLOOM_KERNELS_BACKEND=triton) on CUDA tensors of the
model's shapes (bloom_kernels/shapes.py: hidden h, heads H, head dim D = h / H, MLP 4h) and prints what
each call tuned and how long it took. A second run finds everything on disk and takes seconds.

The plan, for each batch B and prompt length S (tokens B*S):
  prefill   layer_norm with residual (B, S, h); bias_gelu (B, S, 4h); alibi_attention q/k/v (B, H, S, D)
            without and with a (B, S) mask, also at S-1 when S is a multiple of 128 (real prompts rarely
            are, and that is another attention key); with --int8, int8_linear on the QKV, dense and MLP
            projections, (N, K) = (3h, h) with bias, (h, h) with bias, (4h, h) without (its bias is in
            the GeLU), (h, 4h) with bias
  decode    (with --max-new-tokens > 0) one new token per row: layer_norm and bias_gelu on (B, 1, .);
            alibi_attention q (B, H, 1, D) against K/V lengths L of every power-of-two bucket up to
            S + max_new_tokens (each bucket is a key of the split-KV decode kernel), without and with a
            mask; with --int8, the four projections on (B, 1, .) and the int8 lm_head on (B, h)
  backward  (with --backward) forward and backward of layer_norm, bias_gelu, alibi_attention (no mask,
            mask) at (B, S), and with --int8 the projections' dx
Duplicate calls are planned once.

With --cpu nothing runs on a GPU: for each batch B it times the CPU routes (cpu_routes.py) of the
decode projections, (B, h) against the four projections and the lm_head (fp32 unless --dtype says
otherwise; with --int8 also int8_linear), keeps the picks in ~/.cache/bloom_kernels/cpu_routes.json and
prints each route's time. Prefill (more than cpu_routes.MEASURED_MAX_ROWS rows) always takes F.linear.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
from dataclasses import dataclass

from .shapes import BLOOM_SHAPES, VOCAB_SIZE, BloomShape, bloom_shape

DTYPES = ("bf16", "fp16", "fp32")
DEFAULT_BATCHES = (1, 8)
DEFAULT_SEQS = (128, 2048)
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class Call:
    """One call of a public op: its tensor arguments by name and shape, in call order."""
    phase: str  # "prefill", "decode" or "backward" (forward + backward)
    op: str  # the name of a public op of bloom_kernels
    tensors: tuple[tuple[str, tuple[int, ...]], ...]

    def describe(self) -> str:
        args = " ".join(f"{name}={'x'.join(map(str, shape))}" for name, shape in self.tensors)
        return f"{self.phase:8s} {self.op:15s} {args}"


def _layer_norm(phase, rows, h):
    return Call(phase, "layer_norm", (("x", (*rows, h)), ("weight", (h,)), ("bias", (h,)),
                                      ("residual", (*rows, h))))


def _bias_gelu(phase, rows, h):
    return Call(phase, "bias_gelu", (("x", (*rows, 4 * h)), ("bias", (4 * h,))))


def _attention(phase, batch, heads, head_dim, q_len, k_len, mask):
    q, kv = (batch, heads, q_len, head_dim), (batch, heads, k_len, head_dim)
    tensors = (("q", q), ("k", kv), ("v", kv), ("slopes", (heads,)))
    return Call(phase, "alibi_attention", tensors + ((("attention_mask", (batch, k_len)),) if mask else ()))


def _int8(phase, rows, n, k, bias):
    tensors = (("x", (*rows, k)), ("weight_int8", (n, k)), ("scale", (n,)))
    return Call(phase, "int8_linear", tensors + ((("bias", (n,)),) if bias else ()))


def _projections(phase, rows, shape: BloomShape):
    """The block's four linears as int8 (BloomShape.projections)."""
    return [_int8(phase, rows, n, k, bias) for n, k, bias in shape.projections]


def decode_lengths(longest: int) -> list[int]:
    """K/V lengths that hit every power-of-two bucket up to `longest`: 1, 2, 4, ... below it, then it."""
    lengths, length = [], 1
    while length < longest:
        lengths.append(length)
        length *= 2
    return lengths + [longest]


def plan(shape: BloomShape, batches=DEFAULT_BATCHES, seqs=DEFAULT_SEQS,
         max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, backward: bool = False, int8: bool = False) -> list[Call]:
    """The op calls that tune every kernel key a model of this shape meets (see the module docstring)."""
    h, heads, d = shape.hidden, shape.heads, shape.head_dim
    calls: list[Call] = []
    for b in batches:
        for s in seqs:
            rows = (b, s)
            calls.append(_layer_norm("prefill", rows, h))
            for length in [s] + ([s - 1] if s % 128 == 0 and s > 1 else []):
                calls += [_attention("prefill", b, heads, d, length, length, mask) for mask in (False, True)]
            calls.append(_bias_gelu("prefill", rows, h))
            if int8:
                calls += _projections("prefill", rows, shape)
    if max_new_tokens > 0:
        longest = max(seqs) + max_new_tokens
        lengths = sorted(set(decode_lengths(longest)) | {s + max_new_tokens for s in seqs})
        for b in batches:
            calls.append(_layer_norm("decode", (b, 1), h))
            for length in lengths:
                calls += [_attention("decode", b, heads, d, 1, length, mask) for mask in (False, True)]
            calls.append(_bias_gelu("decode", (b, 1), h))
            if int8:
                calls += _projections("decode", (b, 1), shape)
                calls.append(_int8("decode", (b,), VOCAB_SIZE, h, False))  # the lm_head, last position
    if backward:
        for b in batches:
            for s in seqs:
                calls.append(_layer_norm("backward", (b, s), h))
                calls += [_attention("backward", b, heads, d, s, s, mask) for mask in (False, True)]
                calls.append(_bias_gelu("backward", (b, s), h))
                if int8:
                    calls += _projections("backward", (b, s), shape)
    unique = {}
    for call in calls:
        unique.setdefault((call.phase == "backward", call.op, call.tensors), call)
    return list(unique.values())


# --------------------------------------------------------------------------------------------------
# running the plan
# --------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _env(**values):
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _tensor(name: str, shape, dtype, device):
    import torch

    import bloom_kernels as bk

    if name == "weight_int8":
        return torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
    if name == "scale":
        return torch.rand(shape, device=device) * 0.01 + 1e-3
    if name == "slopes":
        return bk.alibi_slopes(shape[0], device)
    if name == "attention_mask":
        return torch.ones(shape, dtype=torch.long, device=device)
    return torch.randn(shape, dtype=dtype, device=device)


def run_call(call: Call, dtype, device) -> None:
    """Make the call's tensors on `device` and run the op (and its backward for a backward call)."""
    import torch

    import bloom_kernels as bk

    backward = call.phase == "backward"
    no_grad = ("weight_int8", "scale", "slopes", "attention_mask")
    args = {}
    for name, shape in call.tensors:
        t = _tensor(name, shape, dtype, device)
        args[name] = t.requires_grad_() if backward and name not in no_grad else t
    with torch.set_grad_enabled(backward):
        out = getattr(bk, call.op)(**args)
        if backward:
            outs = out if isinstance(out, tuple) else (out,)
            torch.autograd.backward(outs, [torch.ones_like(o) for o in outs])


def tune(calls: list[Call], dtype_name: str, out=None) -> int:
    """Run `calls` on the current CUDA device, printing one row per call (what it tuned, how long it
    took); returns 0, or 1 if a call failed (the others still run)."""
    import torch

    from . import _tune_cache
    from .triton import _tuning
    from .triton._launch import triton_interpreting

    out = out or sys.stdout
    if not torch.cuda.is_available():
        raise RuntimeError("needs a CUDA GPU to time the kernels, and torch sees none "
                           "(torch.cuda.is_available() is False); --dry-run prints the plan without one")
    if triton_interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: the interpreter runs one config and times nothing; "
                           "unset it to tune")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    device = torch.device("cuda")
    from triton import knobs

    print(f"tuning {len(calls)} calls on {_tuning.gpu_identity(device)}, {dtype_name}; results cached in "
          f"{_tune_cache._short(knobs.cache.dir)} and {_tune_cache._short(_tune_cache.tuning_cache('int8_linear').path)}",
          file=out, flush=True)
    print(f"{'seconds':>8s}  {'tuned':5s}  call", file=out)
    failed, total, start = 0, 0, time.perf_counter()
    with _env(BLOOM_KERNELS_BACKEND="triton", **{_tune_cache.QUIET_ENV: "1"}):  # the table says what was tuned
        for call in calls:
            seen = len(_tune_cache.tuning_events)
            torch.cuda.synchronize()
            began = time.perf_counter()
            try:
                run_call(call, dtype, device)
                torch.cuda.synchronize()
                error = None
            except Exception as err:  # noqa: BLE001 - one failing shape (out of memory) must not stop the rest
                error = f"{type(err).__name__}: {' '.join(str(err).split())[:200]}"
                failed += 1
                torch.cuda.empty_cache()
            tuned = [what for what, _ in _tune_cache.tuning_events[seen:]]
            total += len(tuned)
            note = f"  FAILED {error}" if error else (f"  ({', '.join(tuned)})" if tuned else "")
            print(f"{time.perf_counter() - began:8.2f}  {len(tuned):5d}  {call.describe()}{note}", file=out,
                  flush=True)
    print(f"{total} keys tuned by {len(calls)} calls in {time.perf_counter() - start:.1f} s"
          + (f"; {failed} of {len(calls)} calls FAILED" if failed else ""), file=out)
    return 1 if failed else 0


def tune_cpu(shape: BloomShape, batches, dtype_name: str, int8: bool, out=None, remeasure: bool = False) -> int:
    """Time the CPU routes of a model's decode projections (see the module docstring); returns 0."""
    import torch

    from . import _tune_cache, cpu_routes, reference

    out = out or sys.stdout
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    print(f"CPU routes of {shape.name} decode on {cpu_routes.machine()}, {torch.get_num_threads()} threads, "
          f"{dtype_name}; picks cached in {_tune_cache._short(_tune_cache.tuning_cache('cpu_routes').path)}",
          file=out, flush=True)
    print(f"{'op':12s} {'rows':>4s} {'N':>7s} {'K':>6s}  {'pick':9s} times (ms; '-' = known, not timed)", file=out)
    linears = [*shape.projections, (VOCAB_SIZE, shape.hidden, False)]
    ops = ("linear", "int8_linear") if int8 else ("linear",)
    g = torch.Generator().manual_seed(0)
    with _env(BLOOM_KERNELS_CPU_ROUTE="measure", **{_tune_cache.QUIET_ENV: "1"}), torch.inference_mode():
        for n, k, has_bias in linears:
            weight = torch.randn(n, k, generator=g).to(dtype)
            bias = torch.randn(n, generator=g).to(dtype) if has_bias else None
            for op in ops:
                args_w = reference.quantize_int8(weight) if op == "int8_linear" else (weight,)
                for b in batches:
                    x = torch.randn(b, k, generator=g).to(dtype)
                    args = (x, *args_w, bias)
                    key = (op, b, n, k, dtype, has_bias)
                    known = None if remeasure else cpu_routes._known_pick(*key)
                    if remeasure:
                        pick = cpu_routes.measure_and_keep(key, args)
                    else:
                        pick = cpu_routes.route(op, x, args_w[0], bias, args)
                    stored = _tune_cache.tuning_cache("cpu_routes").get(cpu_routes._disk_key(key)) or {}
                    timed = stored.get("ms", {}).items()
                    times = "-" if known else "  ".join(f"{r} {ms:.3f}" for r, ms in timed)
                    print(f"{op:12s} {b:4d} {n:7d} {k:6d}  {pick:9s} {times}", file=out, flush=True)
    return 0


# --------------------------------------------------------------------------------------------------
# command line (also `bloom tune`, through add_arguments and run)
# --------------------------------------------------------------------------------------------------
def _model(name: str) -> BloomShape:
    try:
        return bloom_shape(name)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", type=_model, metavar="NAME",
                       help=f"a BLOOM model: {', '.join(BLOOM_SHAPES)} (also bigscience/<name>, bloom-176b)")
    which.add_argument("--list-models", action="store_true", help="list the known models and their shapes")
    parser.add_argument("--dtype", choices=DTYPES, default=None,
                        help="activation dtype (default: bf16 on the GPU, fp32 with --cpu)")
    parser.add_argument("--batch", type=_positive, nargs="+", default=list(DEFAULT_BATCHES), metavar="B",
                        help=f"batch sizes (default: {' '.join(map(str, DEFAULT_BATCHES))})")
    parser.add_argument("--seq", type=_positive, nargs="+", default=list(DEFAULT_SEQS), metavar="S",
                        help=f"prompt lengths (default: {' '.join(map(str, DEFAULT_SEQS))})")
    parser.add_argument("--max-new-tokens", type=_count, default=DEFAULT_MAX_NEW_TOKENS, metavar="N",
                        help="tokens generated after a prompt: decode K/V lengths go up to S + N; 0 = no "
                             f"decode (default: {DEFAULT_MAX_NEW_TOKENS})")
    parser.add_argument("--backward", action="store_true", help="also tune the training backward kernels")
    parser.add_argument("--int8", action="store_true", help="also tune int8_linear (int8 weight-only models)")
    parser.add_argument("--cpu", action="store_true",
                        help="time the CPU routes of the decode projections instead (no GPU needed)")
    parser.add_argument("--remeasure", action="store_true",
                        help="with --cpu: time every route again, even where a pick is on disk")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (the op calls and their shapes) without running anything")


def run(args: argparse.Namespace, out=None) -> int:
    """What `python -m bloom_kernels.tune` and `bloom tune` do with parsed arguments; errors raise."""
    out = out or sys.stdout
    if args.list_models:
        for s in BLOOM_SHAPES.values():
            print(f"{s.name:11s} hidden {s.hidden:6d}  heads {s.heads:4d}  head dim {s.head_dim:4d}  "
                  f"ffn {s.ffn:6d}  layers {s.layers}", file=out)
        return 0
    shape = args.model
    if args.cpu:
        return tune_cpu(shape, args.batch, args.dtype or "fp32", args.int8, out, args.remeasure)
    dtype_name = args.dtype or "bf16"
    if dtype_name == "fp32":
        raise ValueError("--dtype fp32 is for --cpu: the GPU kernels are tuned in bf16 or fp16")
    calls = plan(shape, args.batch, args.seq, args.max_new_tokens, args.backward, args.int8)
    if args.dry_run:
        print(f"plan for {shape.name} (hidden {shape.hidden}, {shape.heads} heads of {shape.head_dim}, ffn "
              f"{shape.ffn}), {dtype_name}: {len(calls)} calls", file=out)
        for call in calls:
            print(call.describe(), file=out)
        return 0
    return tune(calls, dtype_name, out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bloom_kernels.tune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        print("\nbloom_kernels.tune: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line, not a traceback
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"bloom_kernels.tune: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
