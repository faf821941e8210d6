#!/usr/bin/env bash
# Everything GPU-side in one call: correctness first (the `gpu` tests: bf16/fp16 at BLOOM sizes,
# torch.compile, CUDA graphs), then every benchmark with its peers in the same process.
# Results (logs, csv tables, png plots) go to $OUT (default bench/out).
#
#   PYTHONPATH=. OUT=/some/dir bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/out}
mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:-.}
status=0

nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1 || true
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/gpu.txt"

python -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tee "$OUT/gpu_tests.txt" || status=1

for op in bias_gelu layer_norm attention int8_linear; do
    python "bench/bench_$op.py" --out "$OUT" 2>&1 | tee "$OUT/bench_$op.txt" || status=1
done
python bench/bench_generate.py --device cuda --dtype bf16 --preset bloom-560m 2>&1 \
    | tee "$OUT/bench_generate.txt" || status=1
exit $status
