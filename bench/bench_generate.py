"""End-to-end greedy generation: bloom vs transformers' BloomForCausalLM (and CTranslate2, the CPU
reference engine), on the same random weights, in one process.

    python bench/bench_generate.py                                  # bloom-560m shape, CPU fp32, batch 1 and 8
    python bench/bench_generate.py --preset tiny small --int8       # + our int8 model and CTranslate2 int8
    python bench/bench_generate.py --device cuda --dtype bf16 --preset bloom-560m bloom-7b1

Engines (each one that cannot run is skipped with a printed note):
  bloom          bloom.BloomForCausalLM.generate(decode=--decode), eos disabled (eos_token_id=[]); with
                 several modes (--decode eager compile) the first is "bloom", each other one "bloom <mode>"
                 (and "bloom int8 <mode>"): the modes compared in one run, interleaved
  bloom int8     (--int8) the same weights through bloom.quantize_int8: weight-only int8, per output
                 channel, lm_head included; the row "bloom" (fp32 or --dtype) stays for the int8/fp ratio
  transformers   transformers.BloomForCausalLM on the same weight tensors (no copy), greedy, min_new_tokens =
                 max_new_tokens (--no-transformers)
  ct2, ct2 int8  CTranslate2's Generator on the CPU (--no-ctranslate2; skipped on CUDA and when
                 `ctranslate2` is not importable): transformers' model converted once (float32), loaded
                 with compute_type = --dtype (and "int8" with --int8), intra_threads = torch's threads,
                 end_token=[] and min_length = max_length, so it never stops early; served by a child
                 process (bench/_ct2_server.py: in this one it slowed the other engines 3-5x), called
                 interleaved with the others like any engine; its time and memory are taken there
Every engine gets the same prompt (random ids, all rows --prompt-len long, no padding) and makes the
same --new-tokens tokens per row.

Measured per batch size, the engines interleaved within each repeat (bloom, transformers, ct2, bloom,
transformers, ct2, ...: on a noisy CPU each sees the same disturbances), after one untimed call each:
  prefill      wall time of generating ONE token (generate with max_new_tokens=1: the prompt's forward
               and the first token's pick), best and median over --repeats
  decode       tok/s = batch * (new_tokens - 1) / (T_generate - T_prefill): the tokens after the first
               over the time they added; "best" from the best times, "median" from the median times
  memory       peak memory of one (timed) generate: on CUDA torch.cuda.max_memory_allocated after
               reset_peak_memory_stats, on the CPU the process peak RSS (VmHWM of /proc/self/status,
               reset by writing "5" to /proc/self/clear_refs; "n/a" where that is not allowed). The
               peak is of the whole process (every engine's weights are resident); "+" is its rise
               over the memory held just before the call (the run's own activations, cache, workspace)
  ceiling      the weight-bandwidth bound of a decode step: bytes read per step = the weights (every
               parameter and buffer once; an embedding table only when it is also the lm_head: a lookup
               reads B rows) + the KV cache at the mean length (2 * layers * batch * (prompt + new/2) *
               hidden * element size), over the bandwidth measured in this process (CUDA: a device copy,
               bytes read + written; CPU: the faster of a 256 MiB copy, bytes read + written, and a 256
               MiB sum, bytes read), as max tok/s for that batch = batch * bandwidth / bytes. The fp
               engines share the fp weights' ceiling and the int8 engines the int8 model's.
Before timing, the greedy outputs are compared: bloom vs transformers must be identical ("(outputs
differ!)" otherwise); CTranslate2 (and bloom int8) report agreement, the mean over rows of the common
prefix of their new tokens with the fp reference's (transformers', else bloom's), as a fraction.

The engines, the timing loop, the memory and bandwidth measures and the arithmetic are bloom/measure.py's
(the same as `bloom bench`, the installed command); this script adds CTranslate2, the goals and the tables.

Results: per preset <out>/generate-<preset>-<device>-<dtype>[-int8].json (every number above),
.._decode.csv / _prefill.csv tables and their png plots (bench/_common.py), and results.html.

Goals (CPU, bloom-560m; printed for any preset): bloom decode >= 1.3x transformers at batch 1 and at
batch 8; with --int8, bloom int8 at batch 1 >= 1.8x bloom fp32 and >= CTranslate2 int8. (GPU, bf16):
bloom-560m batch-1 decode >= 20x transformers and batch-16 >= 5x; bloom-7b1 batch-1 decode >= 80% of
the weight-bandwidth ceiling; prefill at batch 8, prompt 512 <= 0.65x transformers' time: that extra
timing (ours and transformers, generate with max_new_tokens=1) runs by default on CUDA
(--prefill-check / --no-prefill-check).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import math
import os
import subprocess
import sys
import tempfile

import torch

from bloom import measure as benchmark  # the timing core `bloom bench` uses too
from bloom.measure import Engine, Memory, bandwidth_gbs, jsonable, spread, wall_s
from bloom.shapes import SHAPES, random_model

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/_common.py
import _common as common  # noqa: E402

PRESETS = SHAPES  # name -> (hidden, layers, heads, vocab)
SKIPS = {"transformers": ("transformers", "transformers' BloomForCausalLM"),
         "ct2": ("ctranslate2", "CTranslate2 (the CPU reference engine)")}
PREFILL_CHECK = (8, 512)  # batch, prompt length of the GPU prefill goal
CT2_COMPUTE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def parse_args(argv=None):
    parser = common.parser(__doc__, dtype=None, skips=SKIPS)
    parser.add_argument("--preset", nargs="+", choices=list(PRESETS), default=["bloom-560m"])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 8 on the CPU, 1 16 on CUDA)")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens made per row (>= 2)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--int8", action="store_true", help="also our weight-only int8 model (and CTranslate2 int8)")
    parser.add_argument("--decode", choices=["auto", "eager", "compile", "cuda_graph"], nargs="+", default=["auto"],
                        help="bloom's generate(decode=...); several: one engine each, the first named bloom")
    parser.add_argument("--prefill-check", action=argparse.BooleanOptionalAction, default=None,
                        help=f"time the prefill at batch {PREFILL_CHECK[0]}, prompt {PREFILL_CHECK[1]} "
                             "(bloom vs transformers; default: on CUDA only)")
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bf16" if cuda else "fp32")
    args.batch = args.batch or ([1, 16] if cuda else [1, 8])
    args.decode = list(dict.fromkeys(args.decode))  # a mode named twice is one engine
    args.prefill_check = cuda if args.prefill_check is None else args.prefill_check
    if args.new_tokens < 2:
        parser.error("--new-tokens must be >= 2 (decode time = generate(new) - generate(1))")
    if min(args.batch) < 1 or args.prompt_len < 1 or args.repeats < 1:
        parser.error("--batch, --prompt-len and --repeats must be >= 1")
    return args


# ---------------------------------------------------------------------------------------------- engines

def torch_engines(args, device, dtype, notes: list[str]):
    """[bloom, bloom int8?, transformers?] on the same random weights (bloom.measure's engines), and
    transformers' model (for CTranslate2's conversion, even with --no-transformers) or None."""
    from bloom import quantize_int8

    ours = random_model(args.preset_name, dtype=dtype, device=device)
    try:
        theirs = benchmark.transformers_twin(ours)
    except ImportError:
        theirs = None
        notes.append("transformers is not importable: no transformers row, no CTranslate2 (it converts "
                     "transformers' model)")
    quantized = quantize_int8(copy.deepcopy(ours)) if args.int8 else None
    engines = []
    for mode in args.decode:
        engines.append(benchmark.bloom_engine(engine_name("bloom", mode, args), ours, mode))
        if quantized is not None:
            engines.append(benchmark.bloom_engine(engine_name("bloom int8", mode, args), quantized, mode, "int8"))
    if theirs is not None and not args.no_transformers:
        engines.append(benchmark.transformers_engine(theirs))
    return engines, theirs


def engine_name(base: str, mode: str, args) -> str:
    """"bloom" / "bloom int8" for the first --decode mode, "bloom compile" / "bloom int8 compile" for others."""
    return base if mode == args.decode[0] else f"{base} {mode}"


def ratio_pairs(args) -> list[tuple[str, str]]:
    """RATIOS, and for each further --decode mode the same pairs of its engines plus each against the first."""
    pairs = list(RATIOS)
    for mode in args.decode[1:]:
        fp, int8 = engine_name("bloom", mode, args), engine_name("bloom int8", mode, args)
        pairs += [(fp, "bloom"), (fp, "transformers"), (fp, "ct2"), (int8, fp), (int8, "ct2 int8"), (int8, "bloom int8"),
                  (int8, "bloom")]
    return pairs


def ct2_engines(args, theirs, engines, workdir: str, notes: list[str], stack: contextlib.ExitStack) -> list[Engine]:
    """CTranslate2 Generators of transformers' model (float32 conversion, loaded at --dtype and, with
    --int8, at "int8"), served by a child process (bench/_ct2_server.py says why; `stack` stops it);
    [] with a note where CTranslate2 cannot run."""
    if args.no_ctranslate2:
        return []
    if args.device != "cpu":
        notes.append("CTranslate2 is the CPU reference engine: skipped on CUDA")
        return []
    if theirs is None:
        return []
    try:
        import ctranslate2
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        notes.append("ctranslate2 is not importable: no CTranslate2 rows (pip install ctranslate2)")
        return []
    vocab = theirs.config.vocab_size

    class Vocabulary:  # what the converter reads of a tokenizer: token i is "<i>"
        bos_token, eos_token, unk_token = "<1>", "<2>", "<0>"

        @staticmethod
        def get_vocab():
            return {f"<{i}>": i for i in range(vocab)}

    class Converter(TransformersConverter):  # the model in memory: no checkpoint written, no tokenizer
        def load_model(self, model_class, model_name_or_path, **kwargs):
            # a copy: the converter may quantise the tensors it is given in place
            return copy.deepcopy(theirs).float()

        def load_tokenizer(self, tokenizer_class, model_name_or_path, **kwargs):
            return Vocabulary()

    theirs.config.save_pretrained(workdir)  # AutoConfig reads the architecture from here
    model_dir = Converter(workdir).convert(os.path.join(workdir, "ct2"), quantization="float32")
    supported = ctranslate2.get_supported_compute_types("cpu")
    fp = {e.kind: e for e in engines if e.name.startswith("bloom")}
    wanted = [("ct2", CT2_COMPUTE[args.dtype], "fp")] + ([("ct2 int8", "int8", "int8")] if args.int8 else [])
    for name, compute_type, kind in list(wanted):
        if compute_type not in supported:
            notes.append(f"CTranslate2 on this CPU lacks compute_type {compute_type} (has {sorted(supported)}): "
                         f"no {name} row")
            wanted.remove((name, compute_type, kind))
    if not wanted:
        return []
    server = stack.enter_context(Ct2Server(model_dir, torch.get_num_threads(), [ct for _, ct, _ in wanted], workdir))
    notes.append("CTranslate2 runs in a child process (bench/_ct2_server.py: in this one it slowed the other "
                 "engines' OpenMP code 3-5x); its peak memory is that process's")
    # bytes as our model of the same kind (CTranslate2 int8 also keeps fp32 scales, as ours)
    return [Engine(name, functools.partial(server.generate, compute_type), fp[kind].weights, kind,
                   4 if compute_type == "int8" else fp[kind].kv_size, last_seconds=server.last_seconds,
                   last_memory=server.last_memory)
            for name, compute_type, kind in wanted]


class Ct2Server:
    """bench/_ct2_server.py as a child process: generate(compute_type, ids, n) -> (B, n) tokens."""

    def __init__(self, model_dir: str, threads: int, compute_types: list[str], workdir: str):
        self._stderr = open(os.path.join(workdir, "ct2_server.stderr"), "w+", encoding="utf-8")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_ct2_server.py")
        self._process = subprocess.Popen([sys.executable, script, model_dir, str(threads), *compute_types],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                         text=True, bufsize=1)
        self._seconds, self._memory = float("nan"), (None, None)
        self._read()  # {"ready": ...}: the generators are loaded

    def _read(self) -> dict:
        line = self._process.stdout.readline()
        if not line:  # it exited: its last stderr line is the exception that ended it
            try:
                code = self._process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                code = self._process.wait()
            self._stderr.seek(0)
            lines = self._stderr.read().strip().splitlines()
            raise RuntimeError(f"the CTranslate2 process exited ({code}): {lines[-1] if lines else 'no output'}")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"CTranslate2: {answer['error']}")
        return answer

    def generate(self, compute_type: str, ids: torch.Tensor, n: int) -> torch.Tensor:
        self._process.stdin.write(json.dumps({"compute_type": compute_type, "ids": ids.tolist(), "n": n}) + "\n")
        answer = self._read()
        self._seconds, self._memory = answer["seconds"], (answer["peak"], answer["rise"])
        return torch.tensor(answer["tokens"])

    def last_seconds(self) -> float:
        return self._seconds

    def last_memory(self):
        return self._memory

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._process.stdin.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stderr.close()


# ---------------------------------------------------------------------------------------------- measures

def measure_batch(engines, args, device, vocab: int, batch: int, prompt_len: int, new_tokens: int, memory: Memory,
                  bandwidth: float):
    """One batch size through bloom.measure.measure_batch (outputs compared, engines timed interleaved)."""
    hidden, layers = PRESETS[args.preset_name][:2]
    return benchmark.measure_batch(engines, device=device, vocab=vocab, layers=layers, hidden=hidden, batch=batch,
                                   prompt_len=prompt_len, new_tokens=new_tokens, repeats=args.repeats,
                                   memory=memory, bandwidth=bandwidth, pairs=ratio_pairs(args))


# bloom.measure's pairs and CTranslate2's, in the order the JSON has always listed them
RATIOS = [("bloom", "transformers"), ("bloom", "ct2"), ("bloom int8", "bloom"), ("bloom int8", "ct2 int8"),
          ("bloom int8", "transformers")]


def prefill_check(engines, args, device, vocab: int) -> dict | None:
    """bloom's and transformers' prefill (generate with max_new_tokens=1) at PREFILL_CHECK, interleaved."""
    by_name = {e.name: e for e in engines if e.name in ("bloom", "transformers")}
    if len(by_name) < 2:
        return None
    batch, prompt_len = PREFILL_CHECK
    ids = benchmark.prompt_ids(vocab, batch, prompt_len, device, seed=2)
    times = {name: [] for name in by_name}
    for e in by_name.values():
        e.run(ids, 1)
    for _ in range(args.repeats):
        for name, e in by_name.items():
            times[name].append(wall_s(lambda: e.run(ids, 1), device))
    result = {name: spread(t) for name, t in times.items()}
    result.update(batch=batch, prompt_len=prompt_len,
                  ratio=result["bloom"]["best"] / result["transformers"]["best"])
    return result


# ---------------------------------------------------------------------------------------------- report

def show(value, fmt: str) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def print_batch(row: dict) -> None:
    notes = []
    if "outputs_identical" in row:
        notes.append("outputs identical to transformers" if row["outputs_identical"] else "(outputs differ!)")
    notes += [f"{name}: {100 * e['agreement']:.0f}% of tokens agree" for name, e in row["engines"].items()
              if "agreement" in e]
    print(f"\nbatch {row['batch']}" + (f"  ({'; '.join(notes)})" if notes else ""))
    width = max(12, *(len(name) for name in row["engines"]))
    head = (f"{'engine':>{width}} | {'prefill ms best/med':>19} | {'decode tok/s best/med':>21} | {'ceiling tok/s':>13} | "
            f"{'% ceil':>6} | {'peak MiB (+run)':>17}")
    print(head)
    print("-" * len(head))
    mib = 2**20
    for name, e in row["engines"].items():
        pre, dec = e["prefill_s"], e["decode_tok_s"]
        peak, rise = e["peak_memory_bytes"], e["memory_rise_bytes"]
        memory = "n/a" if peak is None else f"{peak / mib:.0f} ({rise / mib:+.1f})"
        print(f"{name:>{width}} | {1e3 * pre['best']:>9.2f}/{1e3 * pre['median']:<9.2f} | "
              f"{show(dec['best'], '10.1f')}/{show(dec['median'], '<10.1f')} | {e['ceiling_tok_s']:>13.1f} | "
              f"{show(100 * e['fraction_of_ceiling'], '5.1f')}% | {memory:>17}")
    for metric, found in row["ratios"].items():
        if found:
            print(f"{metric} speed-up: " + ", ".join(f"{k} {show(v, '.2f')}x" for k, v in found.items()))


def goals(result: dict, args) -> tuple[list[str], list[str]]:
    """(goals checked, misses): CPU or GPU goals of the docstring, on the batches measured."""
    rows = {row["batch"]: row for row in result["batches"]}
    checked, misses = [], []

    def check(text: str, value, goal: float, at_most=False):
        if value is None or math.isnan(value):
            checked.append(f"{text}: not measured")
            return
        ok = value <= goal if at_most else value >= goal
        checked.append(f"{text}: {value:.2f} (goal {'<=' if at_most else '>='} {goal:g}) {'met' if ok else 'MISSED'}")
        if not ok:
            misses.append(f"{result['preset']} {text}: {value:.2f} (goal {'<=' if at_most else '>='} {goal:g})")

    def ratio(batch, key):
        return rows[batch]["ratios"]["decode"].get(key) if batch in rows else None

    if args.device == "cpu":
        for mode in args.decode:  # each decode mode against its peers, int8 against fp in the same mode
            fp, int8 = engine_name("bloom", mode, args), engine_name("bloom int8", mode, args)
            for batch in (1, 8):
                if batch in rows:
                    check(f"batch {batch} decode {fp}/transformers", ratio(batch, f"{fp}/transformers"), 1.3)
            if args.int8 and 1 in rows:
                check(f"batch 1 decode {int8}/{fp}", ratio(1, f"{int8}/{fp}"), 1.8)
                check(f"batch 1 decode {int8}/ct2 int8", ratio(1, f"{int8}/ct2 int8"), 1.0)
    else:
        if result["preset"] == "bloom-560m":
            for batch, goal in ((1, 20.0), (16, 5.0)):
                if batch in rows:
                    check(f"batch {batch} decode bloom/transformers", ratio(batch, "bloom/transformers"), goal)
        if result["preset"] == "bloom-7b1" and 1 in rows and "bloom" in rows[1]["engines"]:
            check("batch 1 decode, fraction of the bandwidth ceiling",
                  rows[1]["engines"]["bloom"]["fraction_of_ceiling"], 0.8)
        if result["prefill_check"]:
            check(f"prefill B{PREFILL_CHECK[0]} S{PREFILL_CHECK[1]} time bloom/transformers",
                  result["prefill_check"]["ratio"], 0.65, at_most=True)
    return checked, misses


def write_results(result: dict, out: str, name: str) -> None:
    """<out>/<name>.json, and the decode tok/s and prefill ms tables (csv, png) of bench/_common.py."""
    with open(os.path.join(out, f"{name}.json"), "w", encoding="utf-8") as f:
        json.dump(jsonable(result), f, indent=2)
    names = list(dict.fromkeys(n for row in result["batches"] for n in row["engines"]))
    for metric, unit, pick in (("decode", "tok/s", lambda e: e["decode_tok_s"]["best"]),
                               ("prefill", "ms", lambda e: 1e3 * e["prefill_s"]["best"])):
        table = common.Table(f"{name}_{metric}", "batch", names, unit)
        for row in result["batches"]:
            table.add(row["batch"], [pick(row["engines"][n]) if n in row["engines"] else float("nan") for n in names])
        table.write_csv(os.path.join(out, f"{table.name}.csv"))
        common.plot(table, out, "batch", x_log=True)
    common.write_html(out)


# ---------------------------------------------------------------------------------------------- main

def run_preset(args, device, dtype, bandwidth: float, how: str, memory: Memory) -> dict:
    notes: list[str] = []
    hidden, layers, heads, vocab = PRESETS[args.preset_name]
    with tempfile.TemporaryDirectory() as workdir, contextlib.ExitStack() as stack:
        engines, theirs = torch_engines(args, device, dtype, notes)
        engines += ct2_engines(args, theirs, engines, workdir, notes, stack)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
        print(f"\n== {args.preset_name} (hidden {hidden}, layers {layers}, heads {heads}, vocab {vocab}), {args.dtype} "
              f"on {name}, {torch.get_num_threads()} threads; prompt {args.prompt_len}, {args.new_tokens} new "
              f"tokens, best of {args.repeats}; decode = {', '.join(args.decode)} ==")
        print(f"bandwidth {bandwidth:.1f} GB/s ({how}); prefill = generate with max_new_tokens=1; decode tok/s = "
              "batch * (new - 1) / (T_generate - T_prefill)")
        for note in notes:
            print(f"note: {note}")
        result = {
            "preset": args.preset_name, "config": dict(hidden=hidden, layers=layers, heads=heads, vocab=vocab),
            "device": args.device, "device_name": name, "dtype": args.dtype, "threads": torch.get_num_threads(),
            "prompt_len": args.prompt_len, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "decode": args.decode, "int8": args.int8, "versions": benchmark.versions(("transformers", "ctranslate2")),
            "bandwidth_gbs": bandwidth,
            "bandwidth_method": how, "prefill_method": "generate with max_new_tokens=1",
            "engines": [e.name for e in engines], "notes": notes, "batches": [], "prefill_check": None,
        }
        with torch.inference_mode():
            for batch in args.batch:
                row = measure_batch(engines, args, device, vocab, batch, args.prompt_len, args.new_tokens, memory,
                                    bandwidth)
                print_batch(row)
                result["batches"].append(row)
            if args.prefill_check:
                check = common.guarded("prefill check", lambda: prefill_check(engines, args, device, vocab))
                result["prefill_check"] = check = None if isinstance(check, float) else check
                if check:
                    print(f"\nprefill B{check['batch']} S{check['prompt_len']}: bloom {1e3 * check['bloom']['best']:.1f} "
                          f"ms, transformers {1e3 * check['transformers']['best']:.1f} ms: {check['ratio']:.2f}x "
                          "transformers' time")
    checked, misses = goals(result, args)
    result["goals"], result["misses"] = checked, misses
    print("\ngoals checked:\n  " + ("\n  ".join(checked) if checked else "none for these batches"))
    common.report_goals(f"{args.preset_name}, {args.device}, {args.dtype}", misses)
    return result


def main(argv=None) -> int:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), common.DTYPES[args.dtype]
    if device.type == "cuda" and not common.start(args, "bench_generate.py --device cuda", "the GPU model"):
        return 1
    os.makedirs(args.out, exist_ok=True)
    bandwidth, how = bandwidth_gbs(device)
    memory = Memory(device)
    for preset in args.preset:
        args.preset_name = preset
        result = run_preset(args, device, dtype, bandwidth, how, memory)
        name = f"generate-{preset}-{args.device}-{args.dtype}" + ("-int8" if args.int8 else "")
        write_results(result, args.out, name)
        print(f"results: {os.path.join(args.out, name)}.json (+ _decode/_prefill csv and png)")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
