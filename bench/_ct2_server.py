"""CTranslate2 in a process of its own, serving greedy generations to bench_generate.py over a pipe.

Why not in the benchmark's process: once CTranslate2 has generated there (its own copy of libgomp, its
own thread pool), the other engines' OpenMP code ran 3-5x slower for the rest of the process, measured
on the 2-core VM: inductor's fused decode kernels 67 -> 383 µs, ATen's SDPA 21 -> 50 µs; our compiled
int8 decode step 1150 -> 300 tok/s. Its own threads were idle meanwhile (no CPU time), so this is not
contention we could time around. In a child process every engine keeps its speed, and the calls stay
interleaved with the others.

    python bench/_ct2_server.py MODEL_DIR THREADS COMPUTE_TYPE [COMPUTE_TYPE ...]

Protocol, one JSON object per line: the parent writes {"compute_type", "ids" (B x S ints), "n"}; the
server answers {"tokens" (B x n ints), "seconds" (the generate_batch call's wall time, taken here: the
pipe's latency is not CTranslate2's), "peak", "rise"} (its own peak RSS during the call and its rise over
the RSS before, bytes; null where Linux does not let it reset the peak), or {"error": text}.
"""

from __future__ import annotations

import json
import sys
import time


def _memory() -> dict[str, int]:
    """This process's VmRSS and VmHWM in bytes ({} where /proc cannot be read)."""
    try:
        with open("/proc/self/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
    except OSError:
        return {}
    return {key: int(fields[key].split()[0]) * 1024 for key in ("VmRSS", "VmHWM") if key in fields}


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def main(argv: list[str]) -> int:
    import ctranslate2

    model_dir, threads, compute_types = argv[0], int(argv[1]), argv[2:]
    generators = {ct: ctranslate2.Generator(model_dir, device="cpu", compute_type=ct, inter_threads=1,
                                            intra_threads=threads) for ct in compute_types}
    print(json.dumps({"ready": compute_types}), flush=True)
    for line in sys.stdin:
        try:
            request = json.loads(line)
            tokens = [[f"<{i}>" for i in row] for row in request["ids"]]
            resettable = _reset_peak()
            before = _memory().get("VmRSS")
            start = time.perf_counter()
            results = generators[request["compute_type"]].generate_batch(
                tokens, max_length=request["n"], min_length=request["n"], sampling_topk=1, end_token=[],
                include_prompt_in_result=False)
            seconds = time.perf_counter() - start
            after = _memory()
            peak = max(after["VmHWM"], before) if resettable and before is not None and "VmHWM" in after else None
            answer = {"tokens": [r.sequences_ids[0] for r in results], "seconds": seconds, "peak": peak,
                      "rise": None if peak is None else peak - before}
        except Exception as exc:  # noqa: BLE001 - reported to the parent, which skips the engine
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
