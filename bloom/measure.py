"""End-to-end timing of BLOOM engines, shared by `bloom bench` (bloom/benchmark.py) and the developer
benchmark bench/bench_generate.py: the engines (this package's model, int8, transformers' model on the same
weights), the interleaved timing loop, peak memory, the machine's bandwidth and the ceiling arithmetic.
What each number means is in bloom/benchmark.py's docstring.
"""

from __future__ import annotations

import math
import platform
import statistics
import sys
import time

import torch

PREFILL_METHOD = "generate with max_new_tokens=1"
DECODE_FORMULA = "batch * (new_tokens - 1) / (T_generate - T_prefill)"
# (faster?, than) pairs reported as speed-ups; bench/bench_generate.py adds its CTranslate2 pairs
RATIOS = [("bloom", "transformers"), ("bloom int8", "bloom"), ("bloom int8", "transformers")]
MODEL_SEED, PROMPT_SEED = 0, 1
MIB = 2**20


# ---------------------------------------------------------------------------------------------- engines

class Engine:
    """One way to generate: run(ids, n) -> the n new tokens (B, n) on the CPU; `weights`: bytes read per
    decode step for the weights; `kind`: "fp" or "int8" (which ceiling); `kv_size`: KV element bytes;
    for an engine that runs in another process, `last_seconds`: () -> the wall time of its last call
    there, taken around the call in that process (the pipe's and the scheduler's latency, ms-sized
    outliers on a busy 2-core machine, are not the engine's), and `last_memory`: () -> (peak, rise) bytes
    of that call there (this process's peak would say nothing of it)."""

    def __init__(self, name: str, run, weights: int, kind: str, kv_size: int, last_seconds=None, last_memory=None):
        self.name, self.run, self.weights, self.kind, self.kv_size = name, run, weights, kind, kv_size
        self.last_seconds, self.last_memory = last_seconds, last_memory

    def seconds(self, ids, n: int, device) -> float:
        """Wall time of run(ids, n): taken here, or where the engine ran."""
        here = wall_s(lambda: self.run(ids, n), device)
        return here if self.last_seconds is None else self.last_seconds()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes a decode step reads for the weights: every parameter and buffer once (tied ones once), but
    an input embedding table only when it is also the lm_head (a lookup reads B rows, not the table)."""
    seen, total = set(), 0
    for t in (*model.parameters(), *model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    embedding = model.get_input_embeddings().weight
    if getattr(model.get_output_embeddings(), "weight", None) is not embedding:
        total -= embedding.numel() * embedding.element_size()
    return total


def model_dtype(model: torch.nn.Module) -> torch.dtype:
    # the activations' (and so the KV cache's) dtype: an int8 model keeps fp biases, embeddings, norms
    return next(p.dtype for p in (*model.parameters(), *model.buffers()) if p.is_floating_point())


def bloom_engine(name: str, model, decode: str, kind: str = "fp") -> Engine:
    """Our model's greedy generate, end-of-sequence disabled so every row makes exactly n tokens."""
    def run(ids, n):
        out = model.generate(ids, torch.ones_like(ids), max_new_tokens=n, eos_token_id=[], decode=decode)
        return out[:, ids.shape[1]:].cpu()
    return Engine(name, run, weight_bytes(model), kind, model_dtype(model).itemsize)


def transformers_engine(model) -> Engine:
    """transformers' greedy generate, min_new_tokens = max_new_tokens: it never stops early either."""
    def run(ids, n):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             min_new_tokens=n, pad_token_id=0)
        return out[:, ids.shape[1]:].cpu()
    return Engine("transformers", run, weight_bytes(model), "fp", model_dtype(model).itemsize)


def transformers_twin(ours):
    """transformers.BloomForCausalLM on our model's own tensors (bloom.interop: no copy, so the weights are
    in memory once); ImportError without transformers, ValueError for an int8 model (named there)."""
    return ours.to_transformers().eval()


# ---------------------------------------------------------------------------------------------- timing

def wall_s(fn, device) -> float:
    """Wall seconds of one call of fn, synchronised on CUDA (queued work before it finished first)."""
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


def best_wall_s(fn, device, repeats: int) -> float:
    """The best wall time of `repeats` calls of fn (synchronised), after a warm-up call."""
    wall_s(fn, device)
    return min(wall_s(fn, device) for _ in range(repeats))


def guarded(label: str, fn, notes: list | None = None) -> float:
    """fn(); NaN and a line in `notes` (None: on stderr) if it raises: one failing engine must not end the run."""
    try:
        return fn()
    except Exception as error:  # noqa: BLE001 - out of memory, a compile error, a shape an engine lacks
        first = (str(error).splitlines() or [""])[0]
        line = f"{label} failed: {type(error).__name__}: {first[:160]}"
        if notes is None:
            print(f"  {line}", file=sys.stderr)
        else:
            notes.append(line)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return float("nan")


class Memory:
    """Peak memory of one call: (peak bytes, rise over the bytes held before) or (None, None)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.rss_resettable = False
        if not self.cuda:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
                self.rss_resettable = self._status("VmHWM") is not None
            except OSError:  # not Linux, or not allowed: memory is reported as n/a
                pass

    @staticmethod
    def _status(key: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(key + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def method(self) -> str:
        if self.cuda:
            return "torch.cuda.max_memory_allocated"
        return "process peak RSS (VmHWM)" if self.rss_resettable else "not measurable here"

    def measure(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            return peak, peak - before
        if not self.rss_resettable:
            fn()
            return None, None
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        before = self._status("VmRSS")
        fn()
        # the kernel folds per-thread RSS counters into VmHWM lazily, so it can read a little below the
        # VmRSS taken before the call; the peak is at least what was held then
        peak = max(self._status("VmHWM"), before)
        return peak, peak - before


def _cuda_copy_gbs(device, nbytes: int = 1 << 29, repeats: int = 10) -> float:
    """Median GB/s (bytes read + written) of a device copy of `nbytes`, timed with CUDA events (a
    512 MiB copy is far larger than L2, so every call streams from memory)."""
    x = torch.empty(nbytes, dtype=torch.uint8, device=device)
    out = torch.empty_like(x)
    out.copy_(x)
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return 2 * nbytes / statistics.median(times) / 1e9


def bandwidth_gbs(device) -> tuple[float, str]:
    """The memory bandwidth a decode step can stream weights at, measured now, and how."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_copy_gbs(device), "device copy of 512 MiB, bytes read + written"
    nbytes = 1 << 28
    x = torch.ones(nbytes // 4)
    out = torch.empty_like(x)
    copy_gbs = 2 * nbytes / best_wall_s(lambda: out.copy_(x), device, 3) / 1e9
    sum_gbs = nbytes / best_wall_s(x.sum, device, 3) / 1e9
    return max(copy_gbs, sum_gbs), (f"max of a 256 MiB copy ({copy_gbs:.1f} GB/s, read + written) and a 256 MiB "
                                    f"sum ({sum_gbs:.1f} GB/s, read)")


# ---------------------------------------------------------------------------------------------- arithmetic

def spread(times: list[float]) -> dict:
    """best, median, spread = (slowest - fastest) / median, and every time."""
    median = statistics.median(times)
    return {"best": min(times), "median": median, "spread": (max(times) - min(times)) / median if median else 0.0,
            "all": list(times)}


def decode_rate(batch: int, new_tokens: int, t_generate: float, t_prefill: float) -> float:
    """tok/s of the tokens after the first over the time they added; NaN when they added none."""
    if not t_generate > t_prefill:
        return float("nan")
    return batch * (new_tokens - 1) / (t_generate - t_prefill)


def kv_bytes(layers: int, hidden: int, batch: int, prompt_len: int, new_tokens: int, element_size: int) -> int:
    """KV cache bytes a decode step reads at the mean length (keys and values of every layer)."""
    return int(2 * layers * batch * (prompt_len + new_tokens / 2) * hidden * element_size)


def ceiling_tok_s(batch: int, bandwidth: float, bytes_per_step: float) -> float:
    """The bandwidth bound: every step streams bytes_per_step at `bandwidth` GB/s and makes `batch` tokens."""
    return batch * bandwidth * 1e9 / bytes_per_step


def engine_numbers(e: Engine, prefill: list[float], generate: list[float], *, batch: int, prompt_len: int,
                   new_tokens: int, layers: int, hidden: int, bandwidth: float, peak=(None, None)) -> dict:
    """One engine's JSON numbers from its per-repeat times (seconds)."""
    pre, gen = spread(prefill), spread(generate)
    decode = {"best": decode_rate(batch, new_tokens, gen["best"], pre["best"]),
              "median": decode_rate(batch, new_tokens, gen["median"], pre["median"]),
              "per_repeat": [decode_rate(batch, new_tokens, g, p) for g, p in zip(gen["all"], pre["all"])]}
    kv = kv_bytes(layers, hidden, batch, prompt_len, new_tokens, e.kv_size)
    ceiling = ceiling_tok_s(batch, bandwidth, e.weights + kv)
    return {"prefill_s": pre, "generate_s": gen, "decode_tok_s": decode,
            "bytes_per_step": e.weights + kv, "weight_bytes": e.weights, "kv_bytes": kv,
            "ceiling_tok_s": ceiling, "fraction_of_ceiling": decode["best"] / ceiling,
            "peak_memory_bytes": peak[0], "memory_rise_bytes": peak[1]}


def ratios(engines: dict, pairs=RATIOS) -> dict:
    """Speed-ups (> 1: the first is faster) of the pairs measured, e.g. "bloom/transformers": decode as
    the ratio of the best tok/s, prefill as the inverse ratio of the best times."""
    pairs = [(a, b) for a, b in pairs if a in engines and b in engines]
    return {"decode": {f"{a}/{b}": engines[a]["decode_tok_s"]["best"] / engines[b]["decode_tok_s"]["best"]
                       for a, b in pairs},
            "prefill": {f"{a}/{b}": engines[b]["prefill_s"]["best"] / engines[a]["prefill_s"]["best"]
                        for a, b in pairs}}


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows of the common prefix of two (B, n) token tensors, as a fraction of n."""
    same = (tokens == reference).int().cumprod(dim=1)
    return same.sum().item() / reference.numel()


# ---------------------------------------------------------------------------------------------- measuring

def prompt_ids(vocab: int, batch: int, prompt_len: int, device, seed: int = PROMPT_SEED) -> torch.Tensor:
    """Random ids above the special tokens (0-3), the same for every engine."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (batch, prompt_len), generator=generator).to(device)


def _warm_up(engines, ids, new_tokens: int, notes, tick):
    """Untimed: every engine's outputs, and its warm-up (compile, capture, tuning) at both lengths."""
    outputs, live = {}, []
    for e in engines:
        def first(e=e):
            outputs[e.name] = e.run(ids, new_tokens)
            e.run(ids, 1)
            return 0.0
        if not math.isnan(guarded(f"{e.name} batch {ids.shape[0]}", first, notes)):
            live.append(e)
        tick(f"batch {ids.shape[0]}: {e.name} warm-up")
    return outputs, live


def _time_repeats(live, ids, new_tokens: int, repeats: int, device, memory: Memory, notes, tick):
    """Per engine, its prefill and generate times, interleaved over the repeats; and the memory peaks of
    the first timed generate (reset and read outside its timing)."""
    batch = ids.shape[0]
    times = {e.name: {"prefill": [], "generate": []} for e in live}
    peaks = {}
    for r in range(repeats):
        for e in list(live):
            def generate(e=e):
                if r > 0:
                    return e.seconds(ids, new_tokens, device)
                timed = []
                peaks[e.name] = memory.measure(lambda: timed.append(e.seconds(ids, new_tokens, device)))
                if e.last_memory is not None:
                    peaks[e.name] = e.last_memory()
                return timed[0]
            t_prefill = guarded(f"{e.name} batch {batch} prefill", lambda: e.seconds(ids, 1, device), notes)
            t_generate = guarded(f"{e.name} batch {batch} generate", generate, notes)
            tick(f"batch {batch}: {e.name} repeat {r + 1}/{repeats}")
            if math.isnan(t_prefill) or math.isnan(t_generate):
                live.remove(e)
                times.pop(e.name)
                continue
            times[e.name]["prefill"].append(t_prefill)
            times[e.name]["generate"].append(t_generate)
    return times, peaks


def measure_batch(engines, *, device, vocab: int, layers: int, hidden: int, batch: int, prompt_len: int,
                  new_tokens: int, repeats: int, memory: Memory, bandwidth: float, pairs=RATIOS,
                  notes: list | None = None, tick=None) -> dict:
    """One batch size: outputs compared, then every engine timed (interleaved) -> the JSON row.
    `tick(label)` is called after every engine call (a progress bar)."""
    tick = tick or (lambda label: None)
    ids = prompt_ids(vocab, batch, prompt_len, device)
    outputs, live = _warm_up(engines, ids, new_tokens, notes, tick)
    row = {"batch": batch, "engines": {}}
    if "transformers" in outputs and "bloom" in outputs:
        row["outputs_identical"] = bool(torch.equal(outputs["bloom"], outputs["transformers"]))
    times, peaks = _time_repeats(live, ids, new_tokens, repeats, device, memory, notes, tick)
    reference = outputs.get("transformers", outputs.get("bloom"))
    for e in live:
        row["engines"][e.name] = numbers = engine_numbers(
            e, times[e.name]["prefill"], times[e.name]["generate"], batch=batch, prompt_len=prompt_len,
            new_tokens=new_tokens, layers=layers, hidden=hidden, bandwidth=bandwidth,
            peak=peaks.get(e.name, (None, None)))
        if reference is not None and e.name not in ("bloom", "transformers") and e.name in outputs:
            numbers["agreement"] = agreement(outputs[e.name], reference)
    row["ratios"] = ratios(row["engines"], pairs)
    return row


def jsonable(value):
    """NaN -> None (JSON has no NaN), recursively."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def versions(names=("transformers",)) -> dict:
    found = {"torch": torch.__version__}
    for name in names:
        try:
            found[name] = __import__(name).__version__
        except ImportError:
            found[name] = None
    return found


def device_name(device) -> str:
    """The card's name, or the CPU's model name (Linux), or "CPU"."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "CPU"


