"""Prefill latency, decode tokens/s and peak memory of this package's BLOOM and of transformers' BLOOM on the
same weights in the same process, against the machine's memory-bandwidth ceiling (offline by default:
random weights of a named shape).

    bloom bench                                   # bloom-560m shape, random weights; batch 1 and 8 on the CPU
    bloom bench --shape tiny --batch 1 --json bench.json
    bloom bench bigscience/bloom-560m --device cuda --batch 1 16 64 --plot bench.png

Engines: "bloom" (BloomForCausalLM.generate(decode=--decode)), "bloom int8" (--int8: the same weights
through quantize_int8, weight-only int8), "transformers" (transformers.BloomForCausalLM on the same weight
tensors, bloom.interop; --no-transformers). Every engine gets the same prompt (random ids, --prompt-len long, no
padding) and makes exactly --new-tokens greedy tokens per row (end-of-sequence disabled).

Measured per batch size, after one untimed call per engine (compilation, tuning, graph capture), the
engines interleaved within each repeat so that each sees the same disturbances of a busy machine:
  prefill   wall time of generate(max_new_tokens=1) (the prompt's forward and the first token's pick);
            best, median and spread = (slowest - fastest) / median over --repeats
  decode    tok/s = batch * (new_tokens - 1) / (T_generate - T_prefill): the tokens after the first over
            the time they added; "best" from the best times, "median" from the median times
  memory    peak of the first timed generate: CUDA max_memory_allocated; on the CPU the process peak RSS
            (VmHWM, reset through /proc/self/clear_refs), so every engine's weights are in it; "+" is the
            rise over what was held before the call (the run's activations, cache, workspace)
  ceiling   batch * bandwidth / bytes read per decode step (weights once + the KV cache at the mean
            length), the bandwidth measured in this process (CUDA: a device copy; CPU: a copy and a sum)
The JSON (--json) holds every printed number and the raw per-repeat times; --plot draws decode tok/s and
prefill ms against the batch size (needs matplotlib).
"""

from __future__ import annotations

import math
import os
import sys

import torch

from .cli import DTYPE_NAMES, add_device_argument, resolve_device
from .measure import (DECODE_FORMULA, MIB, MODEL_SEED, PREFILL_METHOD, PROMPT_SEED, Engine, Memory,
                      bandwidth_gbs, bloom_engine, device_name, jsonable, measure_batch, model_dtype,
                      prompt_ids, transformers_engine, transformers_twin, versions, wall_s)
from .shapes import SHAPES, random_model



# ---------------------------------------------------------------------------------------------- command

def add_arguments(parser) -> None:
    parser.add_argument("model", nargs="?", metavar="MODEL",
                        help="a local directory or hub id to load (default: random weights of --shape, offline)")
    parser.add_argument("--shape", choices=list(SHAPES), default=None,
                        help="random-weight model shape when no MODEL is given (default: bloom-560m)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="weights/activations dtype (default: bf16 on CUDA, fp32 on the CPU)")
    add_device_argument(parser)
    parser.add_argument("--batch", type=int, nargs="+", metavar="B",
                        help="batch sizes (default: 1 8 on the CPU, 1 16 on CUDA)")
    parser.add_argument("--prompt-len", type=int, default=32, metavar="S", help="prompt tokens per row (default: 32)")
    parser.add_argument("--new-tokens", type=int, default=32, metavar="N",
                        help="tokens generated per row, >= 2 (default: 32)")
    parser.add_argument("--repeats", type=int, default=3, metavar="R", help="timed repeats (default: 3)")
    parser.add_argument("--int8", action="store_true",
                        help="also time the same weights int8-quantised (weight-only, per output channel)")
    parser.add_argument("--decode", choices=["auto", "eager", "compile", "cuda_graph"], default="auto",
                        help="bloom's generate(decode=...) (default: auto = cuda_graph on CUDA, eager on the CPU)")
    parser.add_argument("--no-transformers", action="store_true", help="skip transformers' BloomForCausalLM")
    parser.add_argument("--json", metavar="FILE", help="write every number and the raw per-repeat times here")
    parser.add_argument("--plot", metavar="FILE", help="write a PNG of decode tok/s and prefill ms by batch size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (it is off when not a tty)")
    parser.add_argument("--tensor-parallel", action="store_true",
                        help="under torchrun --nproc-per-node N: the model split over the N ranks; reports the "
                             "per-token decode latency and the all-reduce share of it (rank 0 prints)")


def check_args(args, device) -> None:
    """A bad option is one ValueError naming it, before anything is built."""
    if args.model is not None and args.shape is not None:
        raise ValueError("give MODEL or --shape, not both (--shape picks random weights)")
    for option, value, least in (("--batch", min(args.batch), 1), ("--prompt-len", args.prompt_len, 1),
                                 ("--new-tokens", args.new_tokens, 2), ("--repeats", args.repeats, 1)):
        if value < least:
            why = " (decode time = generate(new) - generate(1))" if option == "--new-tokens" else ""
            raise ValueError(f"{option} must be >= {least}{why}; got {value}")
    if args.decode == "cuda_graph" and device.type != "cuda":
        raise ValueError(f"--decode cuda_graph needs a CUDA device; --device is {device}")
    for option in ("json", "plot"):
        path = getattr(args, option)
        if path is not None and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"--{option} {path}: its directory does not exist")


def load_model(args, device, dtype: torch.dtype):
    """Our model: MODEL loaded, or random weights of --shape (seeded)."""
    from .model import BloomForCausalLM

    if args.model is not None:
        return BloomForCausalLM.from_pretrained(args.model, torch_dtype=dtype, device=device)
    return random_model(args.shape, dtype=dtype, device=device, seed=MODEL_SEED)


def build_engines(ours, args, notes: list[str]) -> list[Engine]:
    """[bloom, bloom int8?, transformers?] on the same weights; what cannot run is a note."""
    import copy

    from .quantization import quantize_int8

    engines = [bloom_engine("bloom", ours, args.decode)]
    if args.int8:
        engines.append(bloom_engine("bloom int8", quantize_int8(copy.deepcopy(ours)), args.decode, "int8"))
    if not args.no_transformers:
        try:
            engines.append(transformers_engine(transformers_twin(ours)))
        except (ImportError, ValueError) as error:
            notes.append(f"no transformers row: {error}")
    return engines


class _Progress:
    """A tqdm bar on stderr, or nothing (not a tty, --no-progress, tqdm missing)."""

    def __init__(self, total: int, enabled: bool):
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                return
            self.bar = tqdm(total=total, file=sys.stderr, unit="run", desc="bloom bench", leave=False)

    def tick(self, label: str) -> None:
        if self.bar is not None:
            self.bar.set_postfix_str(label, refresh=False)
            self.bar.update()

    def write(self, text: str) -> None:
        """Print to stdout without breaking the bar."""
        if self.bar is None:
            print(text, flush=True)
        else:
            self.bar.write(text, file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def header(result: dict) -> list[str]:
    c, v = result["config"], result["versions"]
    source = result["model"] or f"shape {result['shape']} (random weights, seed {result['seed']})"
    return [
        f"bloom bench: {source}; hidden {c['hidden']}, layers {c['layers']}, heads {c['heads']}, vocab {c['vocab']}",
        f"{result['dtype']} on {result['device']} ({result['device_name']}, {result['threads']} threads); "
        f"torch {v['torch']}, transformers {v['transformers'] or 'not installed'}",
        f"prompt {result['prompt_len']} tokens, {result['new_tokens']} new tokens per row, {result['repeats']} "
        f"repeats (engines interleaved), decode = {result['decode']}",
        f"bandwidth {result['bandwidth_gbs']:.1f} GB/s ({result['bandwidth_method']})",
        f"prefill = {PREFILL_METHOD}; decode tok/s = {DECODE_FORMULA}; ceiling tok/s = batch * bandwidth / "
        "(weight + KV cache bytes per step); spread = (slowest - fastest) / median",
        f"peak memory: {result['memory_method']}" + (" (the whole process: every engine's weights)"
                                                     if result["device"] == "cpu" else ""),
    ]


def _show(value, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def _cells(name: str, e: dict, row_ratios: dict) -> list[str]:
    pre, dec = e["prefill_s"], e["decode_tok_s"]
    peak, rise = e["peak_memory_bytes"], e["memory_rise_bytes"]
    versus = ""
    if f"{name}/transformers" in row_ratios["decode"]:
        key = f"{name}/transformers"
        versus = (f"{_show(row_ratios['decode'][key], '.2f')}x / {_show(row_ratios['prefill'][key], '.2f')}x")
    return [name, f"{1e3 * pre['best']:.2f} / {1e3 * pre['median']:.2f} ({100 * pre['spread']:.0f}%)",
            f"{_show(dec['best'], '.1f')} / {_show(dec['median'], '.1f')}", f"{e['ceiling_tok_s']:.1f}",
            f"{_show(100 * e['fraction_of_ceiling'], '.1f')}%",
            "n/a" if peak is None else f"{peak / MIB:.0f} ({rise / MIB:+.1f})", versus]


def table(row: dict) -> list[str]:
    """One batch's lines: a title (outputs compared), a table with its units, other speed-ups."""
    notes = []
    if "outputs_identical" in row:
        same = row["outputs_identical"]
        notes.append("outputs identical to transformers" if same else "OUTPUTS DIFFER from transformers")
    notes += [f"{name}: {100 * e['agreement']:.0f}% of tokens agree" for name, e in row["engines"].items()
              if "agreement" in e]
    lines = [f"batch {row['batch']}" + (f"  ({'; '.join(notes)})" if notes else "")]
    head = ["engine", "prefill ms best/median (spread)", "decode tok/s best/median", "ceiling tok/s",
            "% of ceiling", "peak MiB (+run)", "vs transformers decode/prefill"]
    body = [_cells(name, e, row["ratios"]) for name, e in row["engines"].items()]
    if not any(cells[-1] for cells in body):  # no transformers row to compare with
        head, body = head[:-1], [cells[:-1] for cells in body]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(len(head))]
    for i, cells in enumerate([head, *body]):  # names left-aligned, numbers right-aligned
        aligned = [c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(cells, widths))]
        lines.append(" | ".join(aligned).rstrip())
        if i == 0:
            lines.append("-" * len(lines[-1]))
    for key in row["ratios"]["decode"]:
        if not key.endswith("/transformers"):
            lines.append(f"{key}: decode {_show(row['ratios']['decode'][key], '.2f')}x, prefill "
                         f"{_show(row['ratios']['prefill'][key], '.2f')}x (> 1: the first is faster)")
    return lines


def plot(result: dict, path: str) -> str:
    """A PNG of decode tok/s (and each engine's ceiling) and prefill ms against the batch size; the line
    to print about it."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # no display needed: the figure only goes to a file
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return f"note: matplotlib is not installed: no plot written to {path}"
    rows = result["batches"]
    names = list(dict.fromkeys(n for row in rows for n in row["engines"]))
    fig, (decode_ax, prefill_ax) = plt.subplots(1, 2, figsize=(11, 4.5))
    ceilings: dict = {}  # (batches, tok/s) -> engines: bloom and transformers share one ceiling, drawn once
    for name in names:
        found = [row for row in rows if name in row["engines"]]
        batches = [row["batch"] for row in found]
        numbers = [row["engines"][name] for row in found]
        decode_ax.plot(batches, [_nan(e["decode_tok_s"]["best"]) for e in numbers], marker="o", label=name)
        prefill_ax.plot(batches, [1e3 * e["prefill_s"]["best"] for e in numbers], marker="o", label=name)
        ceilings.setdefault((tuple(batches), tuple(e["ceiling_tok_s"] for e in numbers)), []).append(name)
    for (batches, values), owners in ceilings.items():
        decode_ax.plot(batches, values, linestyle="--", color="gray", label=f"ceiling ({', '.join(owners)})")
    every_batch = sorted({row["batch"] for row in rows})
    for ax, unit in ((decode_ax, "decode tok/s (best)"), (prefill_ax, "prefill ms (best)")):
        ax.set_xlabel("batch size")
        ax.set_ylabel(unit)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(every_batch, labels=[str(b) for b in every_batch])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        # plain numbers (6, not 6 x 10^0); minor ticks labelled only where the axis spans few decades
        ax.yaxis.set_major_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        ax.legend(fontsize="small")
    source = result["model"] or result["shape"]
    fig.suptitle(f"{source}, {result['dtype']} on {result['device_name']}; prompt {result['prompt_len']}, "
                 f"{result['new_tokens']} new tokens", fontsize="medium")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot: {path}"


def _nan(value):
    return float("nan") if value is None else value


def measure(args, device, dtype: torch.dtype) -> dict:
    """Build the engines, measure every batch size (printing the header, then each batch's table); the
    result (what --json writes, NaN as NaN)."""
    notes: list[str] = []
    ours = load_model(args, device, dtype)
    cfg = ours.config
    engines = build_engines(ours, args, notes)
    bandwidth, how = bandwidth_gbs(device)
    memory = Memory(device)
    result = {
        "command": "bloom bench", "model": args.model, "shape": args.shape, "seed": MODEL_SEED,
        "prompt_seed": PROMPT_SEED,
        "config": dict(hidden=cfg.hidden_size, layers=cfg.n_layer, heads=cfg.n_head, vocab=cfg.vocab_size),
        "device": str(device), "device_name": device_name(device), "dtype": args.dtype,
        "threads": torch.get_num_threads(), "batch": list(args.batch), "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "repeats": args.repeats, "decode": args.decode, "int8": args.int8,
        "versions": versions(), "bandwidth_gbs": bandwidth, "bandwidth_method": how,
        "memory_method": memory.method(), "prefill_method": PREFILL_METHOD, "decode_formula": DECODE_FORMULA,
        "engines": [e.name for e in engines], "notes": notes, "batches": [],
    }
    print("\n".join(header(result)), flush=True)
    progress = _Progress(len(args.batch) * len(engines) * (1 + args.repeats),
                         enabled=not args.no_progress and sys.stderr.isatty())
    try:
        with torch.inference_mode():
            for batch in args.batch:
                row = measure_batch(
                    engines, device=device, vocab=cfg.vocab_size, layers=cfg.n_layer, hidden=cfg.hidden_size,
                    batch=batch, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
                    memory=memory, bandwidth=bandwidth, notes=notes, tick=progress.tick)
                result["batches"].append(row)
                if row["engines"]:  # each batch's table as soon as it is measured: a long run shows progress
                    progress.write("\n" + "\n".join(table(row)))
    finally:
        progress.close()
    return result


def measure_tensor_parallel(args, device, dtype: torch.dtype) -> dict | None:
    """`bloom bench --tensor-parallel` on every rank: per batch, the decode latency per token (generate n
    minus generate 1, over n - 1 tokens; the best of --repeats, ranks in step) and the time the step's
    collectives take on their own with the step's shapes (per token: 2 all-reduces per layer + the
    embedding's, and the logits' all-gather; eager, timed back to back): their share of the token's
    time. The result on rank 0 (None on the others)."""
    import torch.distributed as dist

    from .model import BloomForCausalLM
    from .parallel import init_distributed, local_bytes, tensor_parallel

    device = init_distributed(device if args.device else None)
    if args.model is not None:
        model = BloomForCausalLM.from_pretrained(args.model, torch_dtype=dtype, device=device, tensor_parallel=True)
    else:  # the same seeded random weights on every rank, then split
        model = tensor_parallel(random_model(args.shape, dtype=dtype, device=device, seed=MODEL_SEED))
    if args.int8:
        from .quantization import quantize_int8

        quantize_int8(model)
    tp, cfg = model.tp, model.config
    act = model_dtype(model)
    result = {"command": "bloom bench --tensor-parallel", "model": args.model, "shape": args.shape,
              "world": tp.world, "backend": dist.get_backend(), "device": str(device),
              "device_name": device_name(device), "dtype": args.dtype, "int8": args.int8, "decode": args.decode,
              "config": dict(hidden=cfg.hidden_size, layers=cfg.n_layer, heads=cfg.n_head, vocab=cfg.vocab_size),
              "weight_bytes_per_rank": local_bytes(model), "prompt_len": args.prompt_len,
              "new_tokens": args.new_tokens, "repeats": args.repeats, "batches": []}
    with torch.inference_mode():
        for batch in args.batch:
            ids = prompt_ids(cfg.vocab_size, batch, args.prompt_len, device)

            def generate(n):
                model.generate(ids, torch.ones_like(ids), max_new_tokens=n, eos_token_id=[], decode=args.decode)

            def timed(fn) -> float:
                tp.barrier()
                return wall_s(fn, device)

            generate(args.new_tokens)  # warm-up: compile, capture, tuning
            prefill = min(timed(lambda: generate(1)) for _ in range(args.repeats))
            total = min(timed(lambda: generate(args.new_tokens)) for _ in range(args.repeats))
            # NaN, not 0, when noise made the longer run no slower (tiny models, one repeat)
            per_token = (total - prefill) / (args.new_tokens - 1) if total > prefill else float("nan")

            hidden = torch.randn(batch, 1, cfg.hidden_size, device=device).to(act)
            logits = torch.randn(batch, tp.vocab_hi - tp.vocab_lo, device=device).to(act)

            def collectives():
                for _ in range(2 * cfg.n_layer + 1):
                    tp.all_reduce(hidden)
                tp.gather_vocab(logits)

            collectives()
            reps = 10
            comm = min(timed(lambda: [collectives() for _ in range(reps)]) for _ in range(args.repeats)) / reps
            result["batches"].append({"batch": batch, "token_ms": 1e3 * per_token, "prefill_ms": 1e3 * prefill,
                                      "collectives_ms_per_token": 1e3 * comm,
                                      "all_reduce_share": comm / per_token if per_token > 0 else float("nan")})
    if tp.rank != 0:
        return None
    print(f"bloom bench --tensor-parallel: {tp.world} ranks ({result['backend']}, {device.type}), "
          f"{result['config']}, {args.dtype}{' int8' if args.int8 else ''}, decode={args.decode}, "
          f"{result['weight_bytes_per_rank'] / 2**20:.1f} MiB of weights per rank")
    print(f"{'batch':>5} {'prefill ms':>11} {'ms/token':>9} {'collectives ms/token':>21} {'all-reduce share':>17}")
    for row in result["batches"]:
        print(f"{row['batch']:>5} {row['prefill_ms']:>11.2f} {row['token_ms']:>9.3f} "
              f"{row['collectives_ms_per_token']:>21.3f} {100 * row['all_reduce_share']:>16.1f}%")
    return result


def run(args) -> int:
    import json

    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch = args.batch or ([1, 16] if cuda else [1, 8])
    check_args(args, device)
    if args.model is None:
        args.shape = args.shape or "bloom-560m"
    dtype = getattr(torch, DTYPE_NAMES[args.dtype])
    if getattr(args, "tensor_parallel", False):
        import torch.distributed as dist

        from .parallel import shutdown

        started = not dist.is_initialized()
        try:
            result = measure_tensor_parallel(args, device, dtype)
        finally:
            if started:
                shutdown()
        if result is not None and args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(jsonable(result), f, indent=2)
            print(f"json: {args.json}")
        return 0
    result = measure(args, device, dtype)
    if not any(row["engines"] for row in result["batches"]):
        raise RuntimeError("no engine ran: " + "; ".join(result["notes"]))
    for note in result["notes"]:
        print(f"note: {note}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(jsonable(result), f, indent=2)
        print(f"json: {args.json}")
    if args.plot:
        print(plot(result, args.plot))
    return 0
