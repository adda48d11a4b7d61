#!/usr/bin/env bash
# Everything only a GPU can show, in one call: GPU tests, the dense-branch kernel microbenchmark, whole-model
# training/inference throughput and loader throughput. Results go to ${OUT:-runs/gpu_check}; the last lines
# printed are the tables for BENCHMARKS.md. Run from the repository root with the packages importable.
set -uo pipefail
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -5
python kernels/bench.py --out "$out/bench_dense_branch.json" > "$out/bench_dense_branch.txt" 2>&1
python launch/bench_model.py --out "$out/bench_model.json" > "$out/bench_model.txt" 2>&1
DCRIS_NO_TRITON=1 python launch/bench_model.py --out "$out/bench_model_eager.json" > "$out/bench_model_eager.txt" 2>&1
python shards/bench_loaders.py --json "$out/bench_loaders.json" > "$out/bench_loaders.txt" 2>&1
tail -n 30 "$out"/bench_*.txt
