#!/usr/bin/env bash
# Everything GPU-side in one command, every result under one folder:
#
#   PYTHONPATH=. OUT=/some/dir bash bench/gpu_check.sh          (default OUT: bench/out/<date>-<gpu>)
#
#  1. install what the benchmarks need (pyproject's `bench` extra: matplotlib for the plots) when
#     missing; without a network that fails, says so, and the run goes on (no matplotlib: tables
#     without plots, see bench/_common.py)
#  2. the GPU tests (pytest -m gpu: bf16/fp16 at BLOOM sizes, torch.compile, CUDA graphs)
#  3. pre-tune bloom-560m (python -m bloom_kernels.tune), then once more: the second run must find
#     every key in the disk caches (its table says "0 keys tuned")
#  4. every benchmark (each kernel against its peers, then end-to-end generation: bloom-560m and
#     bloom-7b1, bf16, against transformers, with the prefill check at batch 8, prompt 512)
# (The ahead-of-time sm_80/sm_90 compile check needs no GPU: CI runs it, device time is not spent on it.)
#
# $OUT holds env.txt (GPU, versions), one log per step, gpu_tests.xml (junit), bench_<op>/ (csv
# tables, png plots, results.html; bench_generate/ also a json per preset) and summary.txt: each step,
# its exit status, its seconds and its log. The script exits 1 if any step failed (the later steps still run).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:-.}
PYTHON=${PYTHON:-python}

gpu_name=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
gpu_name=$(printf '%s' "${gpu_name:-nogpu}" | tr -cs 'A-Za-z0-9._-' '-' | sed 's/-*$//')
OUT=${OUT:-bench/out/$(date +%Y%m%d-%H%M%S)-$gpu_name}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
printf '%-26s %-6s %8s  %s\n' step exit seconds log > "$SUMMARY"
status=0

# step NAME LOG CMD...: run CMD, its output shown and kept in $OUT/LOG; one line of summary.txt
step() {
    local name=$1 log=$2 began=$SECONDS rc
    shift 2
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$log"
    rc=${PIPESTATUS[0]}
    printf '%-26s %-6s %8d  %s\n' "$name" "$rc" $((SECONDS - began)) "$log" >> "$SUMMARY"
    [ "$rc" -eq 0 ] || status=1
}

{
    nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>&1
    "$PYTHON" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, \
'triton', triton.__version__, 'cuda', torch.version.cuda)" 2>&1
} > "$OUT/env.txt"

# 1. the `bench` extra of pyproject.toml (read from it; matplotlib if it cannot be read)
bench_packages=$("$PYTHON" - <<'EOF' 2>/dev/null || echo "matplotlib"
import tomllib
with open("pyproject.toml", "rb") as f:
    print(" ".join(tomllib.load(f)["project"]["optional-dependencies"]["bench"]))
EOF
)
install_bench_extra() {
    if "$PYTHON" -c "import matplotlib" 2>/dev/null; then
        echo "already installed: $bench_packages"
        return 0
    fi
    # shellcheck disable=SC2086  # one word per package
    "$PYTHON" -m pip install --disable-pip-version-check --retries 0 --timeout 20 $bench_packages && return 0
    echo "WARNING: could not install $bench_packages (no network?). Without matplotlib the benchmarks" \
         "write their csv tables without png plots."
    return 1
}
step install-bench-extra install.txt install_bench_extra
"$PYTHON" - >> "$OUT/env.txt" 2>&1 <<'EOF'
import importlib
for name in ("matplotlib",):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError:
        print(name, "not installed")
EOF

# 2. correctness first
step gpu-tests gpu_tests.txt \
    "$PYTHON" -m pytest -q -m gpu tests -p no:cacheprovider --junitxml "$OUT/gpu_tests.xml"

# 3. pre-tune (the benchmarks then time kernels, not tuning), and check the disk cache
step tune-bloom-560m tune_bloom-560m.txt "$PYTHON" -m bloom_kernels.tune --model bloom-560m
step tune-bloom-560m-again tune_bloom-560m_again.txt "$PYTHON" -m bloom_kernels.tune --model bloom-560m

# 4. every benchmark, each into its own folder (each writes its own results.html)
for op in bias_gelu layer_norm attention int8_linear; do
    mkdir -p "$OUT/bench_$op"
    step "bench-$op" "bench_$op.txt" "$PYTHON" "bench/bench_$op.py" --out "$OUT/bench_$op"
done
mkdir -p "$OUT/bench_generate"
step bench-generate bench_generate.txt \
    "$PYTHON" bench/bench_generate.py --device cuda --dtype bf16 --preset bloom-560m bloom-7b1 \
    --out "$OUT/bench_generate"

echo
cat "$SUMMARY"
echo "all results in $OUT"
exit $status
