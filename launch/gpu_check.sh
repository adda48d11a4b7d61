#!/usr/bin/env bash
# Everything only a GPU can show: the GPU tests, the dense-branch kernel table, training and inference throughput
# of dcris-b at 448x448, batch 32 (eager, fused, compiled, all switches; with the loader and model-only), the
# loaders' throughput on COCO-sized JPEGs, and a profiler table of one training step.
#
#   launch/gpu_check.sh [STAGE ...]
#   launch/gpu_check.sh quick      # everything below in at most 8 minutes: one call on a lent machine
#
# Stages (default: all, in this order): tests kernels shards model_only rows loaders profile compiled. A row whose
# loader fails is measured again with the PyTorch loader (its row names the loader).
#
# `quick` first installs what was carried (the wheels of .whl/, made by ../shared/device/wheels.sh, and DALI's when
# earlier calls assembled them in /tmp/dw), then runs, each under its own limit: the GPU tests; model-only training
# and inference rows of every speed variant of launch/bench.py --variants (today's path, each switch alone, all
# together, ZeRO 0 and 1) in one process, so their ratios are side by side; the shards (${IMAGES:-1000} COCO-sized
# images); the training row with the loader (DALI when installed); evaluation over the train split (about 3,000
# sentences at 1,000 images) beside the model alone; the loaders; a profiler table of one training step.
#
# Results go to ${OUT:-runs/gpu_check}; the stages can run in separate calls sharing ${SHARDS:-$OUT/shards}.
# Each stage has a time limit, so one slow stage cannot take the others' time; the last lines printed are the
# BENCHMARKS.md rows. ${STEPS:-20} timed training steps a row; PRESET and BATCH change the model (a CPU smoke test:
# PRESET=tiny-dcris BATCH=4 STEPS=2 IMAGES=16). Run from the repository root with the package installed.
set -uo pipefail
out=${OUT:-runs/gpu_check}
shards=${SHARDS:-$out/shards}
steps=${STEPS:-20}
preset=${PRESET:-dcris-b}
batch=${BATCH:-32}
workers=${WORKERS:-8}  # decoding threads of the one rank
mkdir -p "$out"
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests kernels shards model_only rows loaders profile compiled)

limited() {  # SECONDS LOG CMD...: runs CMD with a time limit, output to LOG; says so when the limit ends it
  local seconds=$1 log=$2; shift 2
  timeout "$seconds" "$@" > "$log" 2>&1
  local rc=$?
  [ $rc -eq 124 ] && echo "(stopped after ${seconds} s: $*)" >> "$log"
  return $rc
}

bench() {  # NAME SECONDS ARGS...: one launch/bench.py record and its BENCHMARKS.md row
  local name=$1 seconds=$2; shift 2
  local run=(python launch/bench.py --preset "$preset" --batch "$batch" --shards "$shards" --steps "$steps"
             --warmup 3 --out "$out/bench_$name.json" "$@" "data.workers=$workers")
  limited "$seconds" "$out/bench_$name.txt" "${run[@]}"
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [[ " $* " != *" --model-only "* ]]; then  # say why, then the torch loader
    grep -E "Error|error" "$out/bench_$name.txt" | tail -n 3
    limited "$seconds" "$out/bench_${name}_torch_loader.txt" "${run[@]}" data.loader=torch
    name=${name}_torch_loader
  fi
  { grep "^| " "$out/bench_$name.txt" || echo "| $name: no record (see bench_$name.txt) |"; } | tee -a "$out/rows.md"
}

install_carried() {  # the carried wheels into /tmp/site (none needed where the packages are installed)
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  fi
  if compgen -G "/tmp/dw/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/dw/*.whl
  fi
  export PYTHONPATH=$PWD:/tmp/site${PYTHONPATH:+:$PYTHONPATH}
}

quick() {  # the stages of `quick` (header), about 470 s of limits in all
  install_carried
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  echo "-- gpu tests ($(date +%T))"
  limited 60 "$out/gpu_tests.log" python -m pytest -q -m gpu tests; tail -n 3 "$out/gpu_tests.log"
  echo "-- variants, model only ($(date +%T))"
  limited 200 "$out/bench_variants.txt" python launch/bench.py --preset "$preset" --batch "$batch" --model-only \
    --steps "${QUICK_STEPS:-8}" --warmup 3 --out "$out/bench_variants.json" \
    --variants eager,fp32_frozen,fused_qkv,channels_last,single_key_gate,residual16,zero0,zero1,fused,cuda_graphs,compile,all
  { grep "^| " "$out/bench_variants.txt" | awk '!seen[$0]++' | grep . || echo "| variants: no record |"; } |
    tee -a "$out/rows.md"  # each row is printed as measured and again at the end: once here
  echo "-- shards ($(date +%T))"
  IMAGES=${IMAGES:-1000} limited 60 "$out/shards.log" "$0" shards
  echo "-- training with the loader ($(date +%T))"
  bench train_loader 50 --mode train --steps "${QUICK_STEPS:-8}"
  echo "-- evaluation of the train split ($(date +%T))"
  bench evaluation 60 --mode infer data.eval_splits=train
  echo "-- loaders ($(date +%T))"
  limited 30 "$out/bench_loaders.txt" python shards/bench_loaders.py --shards "$shards" --repeats 1 \
    --batch-size "$batch" --json "$out/bench_loaders.json"
  tail -n 6 "$out/bench_loaders.txt"
  echo "-- profile ($(date +%T))"
  limited 40 "$out/profile.txt" python launch/bench.py --preset "$preset" --batch "$batch" --shards "$shards" \
    --mode train --steps 2 --warmup 2 --profile --out "$out/bench_profile.json" "data.workers=$workers"
  head -n 30 "$out/profile.txt"
}

for stage in "${stages[@]}"; do
  echo "== $stage ($(date +%T))"
  case $stage in
    tests)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
      limited 240 "$out/gpu_tests.log" python -m pytest -q -m gpu tests; tail -n 5 "$out/gpu_tests.log" ;;
    kernels)
      limited 240 "$out/bench_dense_branch.txt" python kernels/bench.py --out "$out/bench_dense_branch.json"
      tail -n 40 "$out/bench_dense_branch.txt" ;;
    shards)  # a synthetic release of COCO-sized JPEGs, packed once for the rows, the loaders and the profile
      [ -f "$shards/manifest.json" ] || {
        work=$(mktemp -d) && mkdir -p "$(dirname "$shards")" &&
        python shards/synth.py --out "$work/release" --images "${IMAGES:-800}" --sizes 427,640 &&
        python shards/pack.py --refer "$work/release" --dataset synthetic --split-by unc \
          --images "$work/release/images" --out "$work/packed" --workers "$(nproc)" | tail -n 1 &&
        mv "$work/packed/synthetic" "$shards"; rm -rf "$work"; } ;;
    model_only)
      bench eager_model_only 150 --model-only
      bench fused_model_only 150 --model-only --fused ;;
    rows)
      bench eager 180
      bench fused 180 --fused ;;
    compiled)  # model-only: what compiling gains is the model's, and the loader can hide it
      bench compile_model_only 300 --model-only --compile
      bench all_model_only 300 --model-only --fused --compile model.vision.fused_qkv=true \
        model.head.channels_last=true model.head.single_key_gate=true ;;
    loaders)
      limited 180 "$out/bench_loaders.txt" python shards/bench_loaders.py --shards "$shards" --repeats 2 \
        --batch-size "$batch" --json "$out/bench_loaders.json"
      tail -n 8 "$out/bench_loaders.txt" ;;
    profile)
      limited 180 "$out/profile.txt" python launch/bench.py --preset "$preset" --batch "$batch" --shards "$shards" \
        --mode train --steps 3 --warmup 2 --profile --out "$out/bench_profile.json" "data.workers=$workers"
      head -n 35 "$out/profile.txt" ;;
    quick) quick ;;
    *) echo "unknown stage '$stage' (quick, or: tests kernels shards model_only rows loaders profile compiled)"; exit 2 ;;
  esac
done
[ -f "$out/rows.md" ] && cat "$out/rows.md"
exit 0
