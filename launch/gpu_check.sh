#!/usr/bin/env bash
# Everything only a GPU can show: the GPU tests, the dense-branch kernel table, training and inference throughput
# of dcris-b at 448x448, batch 32 (each speed switch, all together, compiled, CUDA graphs, ZeRO stages; with the
# loader and model-only), evaluation beside the model alone, the loaders on COCO-sized JPEGs, and a profiler table.
#
#   launch/gpu_check.sh [STAGE ...]   stages: tests kernels shards model_only rows loaders profile compiled (default)
#   launch/gpu_check.sh receive       on the GPU machine: keep the carried piece of this call (see below)
#   launch/gpu_check.sh install       on the GPU machine: the carry (once all its pieces came) and the project
#   launch/gpu_check.sh quick         on the GPU machine: install, then the stages below, 8 minutes a call
#   launch/gpu_check.sh rehearse      on a CPU machine: `quick` in an environment of the GPU image's packages alone
#
# The GPU machine's image lacks much of what the project needs (launch/gpu_image.txt lists what it has). Here,
# `python launch/gpu_carry.py` writes the rest as wheels for its Python 3.12 in pieces of at most 55 MB
# (.carry/piece0 .. pieceN), since one transfer carries at most 64 MiB with the tree. One piece travels a call,
# calls within 30 s of each other so the machine stays warm: `receive` for every piece but the last, `quick` with
# the last. `quick` assembles the pieces in /tmp/dcris-carry, checks the SHA-256, installs the wheels and then the
# project itself (built from this checkout offline, no build isolation) into ${SITE:-/tmp/dcris-site}, so
# `dcris.kernels` imports as it does for users.
#
# `quick` spends at most ${QUICK_SECONDS:-480} s a call: no stage starts with less than 20 s of it left, and each
# stage's limit is cut to what is left. Stages that finished (or failed) are recorded in /tmp/dcris-quick, so a
# second call on the still-warm machine goes on with those that did not (FRESH=1 starts over). The rows that
# decide the defaults come first, each in its own process under its own limit (s): install 60 | eager 45 | all
# switches 90 | compile 75 | CUDA graphs 75 | ZeRO 0 30 | ZeRO 1 30 (ZeRO 2 is eager's) | shards 40 | training on
# DALI's GPU decoding 35: 480 s in all. Then, in a second call: the GPU tests 120 | evaluation of the train split
# (about 3,000 sentences) in one pass beside the model alone 60 | the loaders 60 | each other switch alone, 35 each
# | training on the PyTorch loader 40 | a profiler table of one step 40.
# Sized from the rehearsal (BENCHMARKS.md): on 2 busy CPU cores at tiny width each row's process took 55-85 s,
# the steps a few seconds of it and the imports alone about 20 s; the rest is the model and DeepSpeed's engine.
# The limits assume that the GPU machine's 16 idle cores start such a process in about 15 s (not yet measured
# there) and add what is known of dcris-b on an H200: 11 training steps at 163 ms (BENCHMARKS.md's model-only row)
# and its inference; the compiled rows leave 30-45 s more for inductor, the ZeRO rows time training only. The
# rehearsal's install took 61 s for the 308 MB of wheels.
#
# `rehearse` builds (once, cached in ~/.cache/dcris/rehearsal) a virtual environment holding only the image's
# packages at the image's versions, carries the wheels for this machine's Python the same way (its own pieces,
# received and installed as `quick` does), and runs `quick` at PRESET=tiny-dcris BATCH=4 STEPS=2 IMAGES=24 with
# the limits scaled by LIMIT_SCALE=8 (a CPU compiles slowly) and no budget per call.
#
# Results go to ${OUT:-runs/gpu_check} (`quick`: rows and stage times also in /tmp/dcris-quick, printed last);
# ${STEPS:-20} timed training steps a row (`quick`: ${QUICK_STEPS:-8}); PRESET and BATCH change the model.
set -uo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
py=${PYTHON:-python3}
out=${OUT:-runs/gpu_check}
shards=${SHARDS:-$out/shards}
steps=${STEPS:-20}
preset=${PRESET:-dcris-b}
batch=${BATCH:-32}
workers=${WORKERS:-8}  # decoding threads of the one rank
carry=${CARRY:-.carry}  # the pieces travelling with the tree
store=${CARRY_STORE:-/tmp/dcris-carry}  # the pieces received, by the SHA-256 of their tar
site=${SITE:-/tmp/dcris-site}  # the carried wheels and the project, installed
state=${QUICK_STATE:-/tmp/dcris-quick}
scale=${LIMIT_SCALE:-1}
export PYTHONUNBUFFERED=1
rows=$out/rows.md
mkdir -p "$out"

limited() {  # SECONDS LOG CMD...: CMD under a time limit, its output to LOG, its table rows printed as they come
  local seconds=$1 log=$2; shift 2  # (once each: launch/bench.py --variants repeats its rows at the end)
  timeout -k 10 "$seconds" "$@" 2>&1 | tee "$log" | awk '/^\| / && !seen[$0]++ { print; fflush() }' | tee -a "$rows"
  local rc=${PIPESTATUS[0]}
  { [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; } && echo "(stopped after ${seconds} s: $*)" | tee -a "$log"
  return "$rc"
}

bench() {  # NAME SECONDS ARGS...: one launch/bench.py record, its BENCHMARKS.md row printed when measured
  local name=$1 seconds=$2; shift 2
  local run=("$py" launch/bench.py --preset "$preset" --batch "$batch" --shards "$shards" --steps "$steps"
             --warmup 3 --out "$out/bench_$name.json" "$@" "data.workers=$workers")
  limited "$seconds" "$out/bench_$name.txt" "${run[@]}"
  local rc=$?
  if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $rc -ne 137 ] && [[ " $* " != *" --model-only "* ]]; then  # say why, then the torch loader
    grep -E "Error|error" "$out/bench_$name.txt" | tail -n 3
    limited "$seconds" "$out/bench_${name}_torch_loader.txt" "${run[@]}" data.loader=torch
    rc=$?
  fi
  grep -q "^| " "$out/bench_$name.txt" "$out/bench_${name}_torch_loader.txt" 2>/dev/null ||
    echo "| $name: no record (see $out/bench_$name.txt) |" | tee -a "$rows"
  return $rc
}

receive() {  # keeps the pieces carried in this call under $store/SHA; succeeds once every piece of it is there
  local piece manifest=
  for piece in "$carry"/piece*/; do
    [ -f "$piece/manifest.json" ] || continue
    manifest=$piece/manifest.json
    sha=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["tar_sha256"])' "$manifest")
    mkdir -p "$store/$sha" && cp "$piece"/carry.tar.* "$manifest" "$store/$sha/" || return 1
    echo "$sha" > "$store/latest"
  done
  sha=$(cat "$store/latest" 2>/dev/null)
  [ -n "$sha" ] && [ -f "$store/$sha/manifest.json" ] ||
    { echo "carry: no pieces here or earlier ($carry/pieceK from launch/gpu_carry.py)"; return 1; }
  local n k missing=()
  n=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["pieces"])' "$store/$sha/manifest.json")
  for ((k = 0; k < n; k++)); do [ -f "$store/$sha/carry.tar.$k" ] || missing+=("$k"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "carry: piece(s) ${missing[*]} of 0..$((n - 1)) still to come, one a call (carry $carry/pieceK)"
    return 1
  fi
  echo "carry: all $n piece(s) here"
}

install_carry() {  # the carried wheels into $site, once per carry
  receive || return 1
  [ -f "$site/.installed-$sha" ] && return 0
  local dir=$store/$sha k
  rm -rf "$dir/wheels" "$site" && mkdir -p "$dir/wheels" || return 1
  for ((k = 0; ; k++)); do [ -f "$dir/carry.tar.$k" ] || break; cat "$dir/carry.tar.$k"; done > "$dir/carry.tar"
  if [ "$(sha256sum "$dir/carry.tar" | cut -d' ' -f1)" != "$sha" ]; then
    echo "carry: the pieces do not add up to the tar of their manifest; send them again"
    rm -rf "${dir:?}"; return 1
  fi
  tar -xf "$dir/carry.tar" -C "$dir/wheels" && rm "$dir/carry.tar" &&
    "$py" -m pip install -q --no-index --no-deps --no-compile --disable-pip-version-check --target "$site" \
      "$dir/wheels"/*.whl && rm -rf "$dir/wheels" && touch "$site/.installed-$sha"
}

install_project() {  # this checkout as a package into $site, built offline (every call: the tree may have changed)
  PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} "$py" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --disable-pip-version-check \
    --upgrade --target "$site" "$here" || return 1
  (cd /tmp && PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} "$py" -c "import dcris.adapters, dcris.kernels as k, deepspeed, transformers
print('dcris.kernels from', k.__path__[0], '| transformers', transformers.__version__, '| deepspeed',
      deepspeed.__version__)")
}

timeout_install() {  # install_carry and install_project within $LIMIT seconds (a stage of its own process)
  CARRY=$carry CARRY_STORE=$store SITE=$site PYTHON=$py timeout -k 10 "$LIMIT" "$here/launch/gpu_check.sh" install
}

make_shards() {  # a synthetic release of COCO-sized JPEGs, packed once for the rows, the loaders and the profile
  [ -f "$shards/manifest.json" ] && return 0
  local work
  work=$(mktemp -d) && mkdir -p "$(dirname "$shards")" &&
    "$py" shards/synth.py --out "$work/release" --images "${IMAGES:-800}" --sizes 427,640 &&
    "$py" shards/pack.py --refer "$work/release" --dataset synthetic --split-by unc \
      --images "$work/release/images" --out "$work/packed" --workers "$(nproc)" | tail -n 1 &&
    mv "$work/packed/synthetic" "$shards"
  local rc=$?
  rm -rf "$work"
  return $rc
}

gpu_info() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
  else
    echo "no nvidia-smi: $(nproc) CPU cores" | tee "$out/gpu.txt"
  fi
}

quick_stage() {  # NAME SECONDS FUNCTION: FUNCTION once per machine, within what is left of this call's budget
  local name=$1 seconds=$(($2 * scale)) fn=$3
  if [ -f "$state/done/$name" ]; then echo "-- $name: done in an earlier call"; return 0; fi
  local left=$((budget - (SECONDS - began)))
  if [ $left -lt 20 ]; then echo "-- $name: not started, under 20 s left of this call's ${budget} s"; return 0; fi
  [ $seconds -gt $left ] && seconds=$left
  echo "-- $name ($(date +%T), limit ${seconds} s)"
  local start=$SECONDS
  LIMIT=$seconds "$fn" "$name"
  local rc=$?
  echo "   $name: $((SECONDS - start)) s, exit $rc"
  printf '| %s | %s | %s |\n' "$name" $((SECONDS - start)) "$rc" >> "$state/times.md"
  # finished, well or not, it is not run again; one that ran out of time is
  [ $rc -ne 124 ] && [ $rc -ne 137 ] && touch "$state/done/$name"
  return 0
}

# The stages of `quick`, each a function of its name that runs within $LIMIT seconds.
variant() { bench "$1" "$LIMIT" --model-only --steps "${QUICK_STEPS:-8}" --variants "$1"; }
zero_variant() { bench "$1" "$LIMIT" --model-only --steps "${QUICK_STEPS:-8}" --variants "$1" --mode train; }
shards_stage() { SHARDS=$shards OUT=$out PYTHON=$py timeout -k 10 "$LIMIT" "$here/launch/gpu_check.sh" shards; }
train_dali() { bench "$1" "$LIMIT" --mode train --steps "${QUICK_STEPS:-8}"; }
train_torch_loader() { bench "$1" "$LIMIT" --mode train --steps "${QUICK_STEPS:-8}" data.loader=torch; }
evaluation() { bench "$1" "$LIMIT" --mode infer data.eval_splits=train; }
gpu_tests() {
  limited "$LIMIT" "$out/gpu_tests.log" "$py" -m pytest -q -m gpu tests
  local rc=$?
  tail -n 3 "$out/gpu_tests.log"
  return $rc
}
loaders() {
  limited "$LIMIT" "$out/bench_loaders.txt" "$py" shards/bench_loaders.py --shards "$shards" --repeats 1 \
    --batch-size "$batch" --json "$out/bench_loaders.json"
}
profile() {
  limited "$LIMIT" "$out/profile.txt" "$py" launch/bench.py --preset "$preset" --batch "$batch" --shards "$shards" \
    --mode train --steps 2 --warmup 2 --profile --out "$out/bench_profile.json" "data.workers=$workers"
  local rc=$?
  head -n 30 "$out/profile.txt"
  return $rc
}

quick() {  # the stages of `quick` (header)
  began=$SECONDS budget=${QUICK_SECONDS:-480}
  [ "${FRESH:-0}" = 1 ] && rm -rf "$state"
  mkdir -p "$state/done"
  shards=${SHARDS:-$state/shards} rows=$state/rows.md
  [ -f "$state/times.md" ] || printf '| stage | seconds | exit |\n|---|---|---|\n' > "$state/times.md"
  local start=$SECONDS  # the install runs every call: it skips wheels already installed, and the tree may change
  echo "-- install ($(date +%T), limit $((60 * scale)) s)"
  if ! LIMIT=$((60 * scale)) timeout_install; then
    echo "quick: the carry or the project is not installed; nothing measured"; return 1
  fi
  echo "   install: $((SECONDS - start)) s"
  printf '| %s | %s | %s |\n' install $((SECONDS - start)) 0 >> "$state/times.md"
  export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH} PATH=$site/bin:$PATH
  gpu_info
  quick_stage eager 45 variant
  quick_stage all 90 variant
  quick_stage compile 75 variant
  quick_stage cuda_graphs 75 variant
  quick_stage zero0 30 zero_variant
  quick_stage zero1 30 zero_variant
  IMAGES=${IMAGES:-1000} quick_stage shards 40 shards_stage
  quick_stage train_dali 35 train_dali
  quick_stage gpu_tests 120 gpu_tests
  quick_stage evaluation 60 evaluation
  quick_stage loaders 60 loaders
  for name in fused fused_qkv channels_last single_key_gate residual16 fp32_frozen; do
    quick_stage "$name" 35 variant
  done
  quick_stage train_torch_loader 40 train_torch_loader
  quick_stage profile 40 profile
  echo "== rows so far"; cat "$rows" 2>/dev/null
  echo "== stage times (s)"; cat "$state/times.md"
}

rehearse() {  # quick on this CPU machine, in an environment of the GPU image's packages alone (header)
  local cache=$HOME/.cache/dcris/rehearsal pyver image_hash venv begun=$SECONDS
  pyver=$("$py" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')
  image_hash=$(cat launch/gpu_image.txt | sha256sum | cut -c1-12)
  venv=$cache/image-$pyver-$image_hash
  if [ ! -f "$venv/.complete" ]; then
    echo "== the image's packages into $venv ($(date +%T))"
    rm -rf "$venv" && "$py" -m venv "$venv" &&
      "$venv/bin/python" -m pip install -q --disable-pip-version-check -r launch/gpu_image.txt &&
      "$venv/bin/python" -m pip uninstall -q -y setuptools &&  # a Python 3.12 venv has none: the carry's is used
      touch "$venv/.complete" || { echo "rehearse: the image's environment failed to build"; return 1; }
  fi
  echo "   image environment: $((SECONDS - begun)) s"
  local t=$SECONDS
  echo "== the carry for Python $pyver ($(date +%T))"
  "$py" launch/gpu_carry.py --python "$pyver" --out "$cache/carry" | tail -n 3 || return 1
  echo "   carry: $((SECONDS - t)) s"
  rm -rf "$cache/site" "$cache/store" "$cache/quick" "$cache/out"
  local n k
  n=$("$py" -c 'import json, sys; print(json.load(open(sys.argv[1]))["pieces"])' "$cache/carry/manifest.json")
  for ((k = 0; k < n - 1; k++)); do  # one piece a call, as on the GPU machine
    CARRY=$cache/carry/call$k CARRY_STORE=$cache/store PYTHON=$venv/bin/python run_with_piece "$cache" "$k" receive
  done
  # its own results, and its own torch extensions (DeepSpeed builds one for the CPU, against this torch)
  OUT=${OUT:-$cache/out} TORCH_EXTENSIONS_DIR=$cache/torch_extensions \
    PATH=$venv/bin:$PATH PYTHON=$venv/bin/python CARRY_STORE=$cache/store SITE=$cache/site QUICK_STATE=$cache/quick \
    PRESET=${PRESET:-tiny-dcris} BATCH=${BATCH:-4} STEPS=${STEPS:-2} QUICK_STEPS=${QUICK_STEPS:-2} \
    IMAGES=${IMAGES:-24} LIMIT_SCALE=${LIMIT_SCALE:-8} QUICK_SECONDS=${QUICK_SECONDS:-100000} WORKERS=${WORKERS:-2} \
    CARRY=$cache/carry/call$((n - 1)) run_with_piece "$cache" $((n - 1)) quick
  echo "== rehearsal: $((SECONDS - begun)) s in all"
}

run_with_piece() {  # CACHE K STAGE: STAGE with only piece K in $CARRY, as a call that carries that piece
  rm -rf "$CARRY" && mkdir -p "$CARRY" && ln -s "$1/carry/piece$2" "$CARRY/piece$2" && "$here/launch/gpu_check.sh" "$3"
}

cd "$here" || exit 1
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(tests kernels shards model_only rows loaders profile compiled)
for stage in "${stages[@]}"; do
  echo "== $stage ($(date +%T))"
  case $stage in
    tests)
      gpu_info
      limited 240 "$out/gpu_tests.log" "$py" -m pytest -q -m gpu tests; tail -n 5 "$out/gpu_tests.log" ;;
    kernels)
      limited 240 "$out/bench_dense_branch.txt" "$py" kernels/bench.py --out "$out/bench_dense_branch.json"
      tail -n 40 "$out/bench_dense_branch.txt" ;;
    shards) make_shards ;;
    model_only)
      bench eager_model_only 150 --model-only
      bench fused_model_only 150 --model-only --fused ;;
    rows)
      bench eager 180
      bench fused 180 --fused ;;
    compiled)  # model-only: what compiling gains is the model's, and the loader can hide it
      bench compile_model_only 300 --model-only --variants compile
      bench cuda_graphs_model_only 300 --model-only --variants cuda_graphs
      bench all_model_only 300 --model-only --variants all ;;
    loaders)
      limited 180 "$out/bench_loaders.txt" "$py" shards/bench_loaders.py --shards "$shards" --repeats 2 \
        --batch-size "$batch" --json "$out/bench_loaders.json"
      tail -n 8 "$out/bench_loaders.txt" ;;
    profile)
      limited 180 "$out/profile.txt" "$py" launch/bench.py --preset "$preset" --batch "$batch" --shards "$shards" \
        --mode train --steps 3 --warmup 2 --profile --out "$out/bench_profile.json" "data.workers=$workers"
      head -n 35 "$out/profile.txt" ;;
    receive) receive ;;
    install) install_carry && install_project || exit 1 ;;
    quick) quick ;;
    rehearse) rehearse ;;
    *) echo "unknown stage '$stage' (receive, install, quick, rehearse, or: tests kernels shards model_only rows" \
         "loaders profile compiled)"
       exit 2 ;;
  esac
done
case " ${stages[*]} " in *" quick "* | *" rehearse "* | *" receive "* | *" install "*) ;; *) [ -f "$rows" ] && cat "$rows" ;; esac
exit 0
