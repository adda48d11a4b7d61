#!/usr/bin/env bash
# Everything only a GPU can show, in one call: the GPU tests, the dense-branch kernel table, training and inference
# throughput of dcris-b at 448x448, batch 32 (eager, fused, compiled, all switches; with the loader and model-only),
# the loaders' throughput, and a profiler table of one training step. Results go to ${OUT:-runs/gpu_check}; the
# last lines printed are the BENCHMARKS.md rows. Run from the repository root with the package installed.
set -uo pipefail
out=${OUT:-runs/gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python -m pytest -q -m gpu tests 2>&1 | tee "$out/gpu_tests.log" | tail -5
python kernels/bench.py --out "$out/bench_dense_branch.json" > "$out/bench_dense_branch.txt" 2>&1
all="model.vision.fused_qkv=true model.head.channels_last=true model.head.single_key_gate=true"
bench() {  # NAME ARGS...: one launch/bench.py record
  local name=$1; shift
  python launch/bench.py --preset dcris-b --batch 32 --out "$out/bench_$name.json" "$@" > "$out/bench_$name.txt" 2>&1
  tail -n 1 "$out/bench_$name.txt"
}
{
  bench eager_model_only --model-only
  bench eager
  bench fused --fused
  bench compile --compile
  bench all --fused --compile $all
} | tee "$out/rows.md"
python shards/bench_loaders.py --json "$out/bench_loaders.json" > "$out/bench_loaders.txt" 2>&1
python launch/bench.py --preset dcris-b --batch 32 --mode train --steps 5 --profile --out "$out/bench_profile.json" \
  > "$out/profile.txt" 2>&1
tail -n 25 "$out/bench_dense_branch.txt" "$out/bench_loaders.txt"; head -n 35 "$out/profile.txt"
cat "$out/rows.md"
