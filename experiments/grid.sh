#!/usr/bin/env bash
# experiments/grid.sh - the accuracy grid of issue 16 on one GPU machine: Finetune (dense, no registers) against
# EARN at several split layers and register counts on Amazon Beauty, each setting trained from scratch with several
# seeds by examples/train (train_cuda --device cuda); then the speed of every setting on the CUDA engine at the
# model's size and at Llama-7B dimensions (bench_cuda_llama). Small runs share the GPU side by side, under CUDA MPS
# when the machine has it (kernels of different processes then overlap instead of time-slicing).
#
#   experiments/grid.sh [all]         the whole grid, 5 seeds, then the speed table
#   experiments/grid.sh train [--seeds 0,1,2] [--settings all|name,name] [--jobs 27] [--epochs 10]
#   experiments/grid.sh speed
#   experiments/grid.sh baselines [--seeds 0,1,2,3,4]   the inference-time baselines (kv/press.hpp: StreamingLLM,
#                  SnapKV, H2O, PyramidKV, and truncation of the history to its last k / L items) on Finetune models
#                  trained again with the grid's recipe and seeds, each at the KV of EARN k = 2 with 1 + 1 registers;
#                  then their speed beside Finetune's at both shapes (EARN's KV at k = 2 of 8 and k = 4 of 32)
#   experiments/grid.sh gist [--seeds 0,1,2,3,4]   the trained prompt-compression baseline (attention/gist.hpp:
#                  answer rows see only the registers, from layer 0) with the grid's recipe and seeds: 1 + 1 registers
#                  (EARN's count) and 0 + 20 (gist tokens after the prompt, about EARN k = 2's KV at a full history)
#   experiments/grid.sh speed-gist   Gist's speed beside Finetune's and EARN's at both shapes
#
#   EARN_GPU_BIN   folder with train_cuda and bench_cuda_llama (default: build them in build-gpu)
#   EARN_DATA      Beauty in AtSpeed's layout (default ../shared/data/amazon-beauty)
#   EARN_RUN_TIMEOUT  seconds a run may take (default 3000), so that a call with a limit still packs what finished
#   OUT            where results go (default ./out/grid): one runs-<seeds>.tar.gz of every run's result.json,
#                  train_log.csv and console log (checkpoints stay behind: the script remakes them), speed-*.json
#
# The model (preset small: d 512, 8 layers, 8 heads, FFN 1408, untied head, 26.75M parameters) and its recipe (AdamW
# lr 1e-3, cosine with warm-up 0.02, batch 128, 10 epochs, beam 20, the best validation NDCG@10 of 5 validations
# kept and tested) are the paper's recipe on a from-scratch model; experiments/README.md says how they were chosen.
# experiments/report.py turns the tarballs and speed files into runs.csv, the table and the figures.
set -uo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$root/out/grid}
mkdir -p "$OUT"
data=${EARN_DATA:-$root/../shared/data/amazon-beauty}
mode=${1:-all}
shift || true
if [ "$mode" = all ]; then  # the whole grid (5 seeds; ~25 minutes of an H200 under MPS), then the speed table
  "$0" train --seeds 0,1,2,3,4 --jobs 18 "$@" && exec "$0" speed
fi
if [ "$mode" = baselines ]; then
  "$0" train --settings finetune --tag baselines --extra "--test-presses streaming_llm,snapkv,h2o,pyramidkv,truncate --press-k 2 --press-registers 2" "$@" &&
    exec "$0" speed-baselines
fi

if [ "$mode" = gist ]; then
  exec "$0" train --settings gist-r1+1,gist-r0+20 --tag gist "$@"
fi

# name  schedule  k  r_p  r_s   (L = 8: L/4 = 2, L/2 = 4, 3L/4 = 6)
settings_all="finetune:dense:8:0:0 earn-k1:earn:1:1:1 earn-k2:earn:2:1:1 earn-k4:earn:4:1:1 earn-k6:earn:6:1:1
earn-k2-r0+1:earn:2:0:1 earn-k2-r1+0:earn:2:1:0 earn-k2-r2+2:earn:2:2:2 earn-k2-r3+3:earn:2:3:3"
settings_named="gist-r1+1:gist:0:1:1 gist-r0+20:gist:0:0:20"  # run only when named (--settings)
seeds=0,1,2 which=all jobs=27 epochs=10 extra="" tag=""
while [ $# -gt 0 ]; do
  case $1 in
    --seeds) seeds=$2; shift 2 ;;
    --settings) which=$2; shift 2 ;;
    --jobs) jobs=$2; shift 2 ;;
    --epochs) epochs=$2; shift 2 ;;
    --extra) extra=$2; shift 2 ;;  # more train_cuda arguments for every run
    --tag) tag=$2; shift 2 ;;      # names the runs' folder and tarball
    *) echo "unknown argument $1" >&2; exit 2 ;;
  esac
done

bin=${EARN_GPU_BIN:-}
if [ -z "$bin" ]; then
  cmake -S "$root" -B "$root/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEARN_ENABLE_CUDA=ON >"$OUT/configure.log" 2>&1 &&
    cmake --build "$root/build-gpu" --target train_cuda bench_cuda_llama >"$OUT/build.log" 2>&1 ||
    { tail -30 "$OUT/build.log"; exit 1; }
  bin=$root/build-gpu/bin
  mkdir -p "$bin"
  cp "$root/build-gpu/examples/train_cuda" "$root/build-gpu/bench/cuda/bench_cuda_llama" "$bin/"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# CUDA MPS, when present: one server for this script's processes, stopped on exit.
mps_start() {
  command -v nvidia-cuda-mps-control >/dev/null || { echo "MPS: not installed, runs time-slice the GPU"; return; }
  export CUDA_MPS_PIPE_DIRECTORY=/tmp/earn-mps-pipe CUDA_MPS_LOG_DIRECTORY=/tmp/earn-mps-log
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  if nvidia-cuda-mps-control -d; then
    echo "MPS: on"
    trap 'echo quit | nvidia-cuda-mps-control' EXIT
  else
    echo "MPS: failed to start, runs time-slice the GPU"
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
  fi
}

if [ "$mode" = train ]; then
  mps_start
  runs=/tmp/earn-grid${tag:+-$tag}
  mkdir -p "$runs"
  list=()
  for s in ${seeds//,/ }; do
    for st in $settings_all $settings_named; do
      name=${st%%:*}
      if [ "$which" = all ] && [[ " $settings_named " == *" $st "* ]]; then continue; fi
      if [ "$which" != all ] && [[ ",$which," != *",$name,"* ]]; then continue; fi
      list+=("$name:$s:$st")
    done
  done
  echo "grid: ${#list[@]} runs, $jobs at a time, $epochs epochs each"
  t0=$(date +%s)
  running=0
  for item in "${list[@]}"; do
    IFS=: read -r name seed _ schedule k rp rs <<<"$item"
    dir=$runs/$name-s$seed
    mkdir -p "$dir"
    # Validation 5 times (every 2 epochs' steps: 804 steps an epoch at batch 128), the best tested at the end.
    OMP_NUM_THREADS=1 timeout "${EARN_RUN_TIMEOUT:-3000}" "$bin/train_cuda" --device cuda --data "$data" --preset small --epochs "$epochs" \
      --eval-every $((804 * epochs / 5)) --seed "$seed" --schedule "$schedule" --k "$k" \
      --prefix-registers "$rp" --suffix-registers "$rs" --out "$dir" --no-resume $extra >"$dir/console.log" 2>&1 &
    running=$((running + 1))
    if [ "$running" -ge "$jobs" ]; then wait -n; running=$((running - 1)); fi
  done
  wait
  echo "grid: done in $(( $(date +%s) - t0 )) s"
  fails=0
  for item in "${list[@]}"; do
    IFS=: read -r name seed _ <<<"$item"
    dir=$runs/$name-s$seed
    if [ -f "$dir/result.json" ]; then
      python3 -c "import json,sys; r=json.load(open(sys.argv[1])); t=r['test']; print('%-14s seed %s  valid N@10 %.4f  test R@10 %.4f N@10 %.4f' % (sys.argv[2], sys.argv[3], r['best_valid_ndcg@10'], t['recall@10'], t['ndcg@10']))" "$dir/result.json" "$name" "$seed"
    else
      fails=$((fails + 1)); echo "$name seed $seed: FAILED"; tail -5 "$dir/console.log"
    fi
  done
  packed=()
  for item in "${list[@]}"; do
    IFS=: read -r name seed _ <<<"$item"
    for f in result.json train_log.csv console.log; do [ -f "$runs/$name-s$seed/$f" ] && packed+=("$name-s$seed/$f"); done
  done
  (cd "$runs" && tar czf "$OUT/runs-${tag:+$tag-}${seeds//,/_}-${which//[,+]/_}.tar.gz" "${packed[@]}")
  [ "$fails" = 0 ] || exit 1
fi

if [ "$mode" = speed ]; then
  # Every setting's prefill (B users, prompt P) and 3 decode steps at beam 20, dense Finetune without registers as
  # the reference; medians of 5 repetitions, the floors from the bandwidth and GEMM rate measured in each call.
  small=(--layers 8 --dim 512 --hidden 1408 --heads 8 --vocab 1028 --users 32,256 --prompts 40,80)
  big=(--layers 32 --users 8,32 --prompts 80,512)
  run() {  # tag registers ks-small ks-llama
    timeout 200 "$bin/bench_cuda_llama" --reps 5 "${small[@]}" --registers "$2" --ks "$3" --json "$OUT/speed-small-$1.json" || exit 1
    timeout 200 "$bin/bench_cuda_llama" --reps 5 "${big[@]}" --registers "$2" --ks "$4" --json "$OUT/speed-llama7b-$1.json" || exit 1
  }
  run finetune 0,0 -1 -1
  run r1+1 1,1 1,2,4,6 4,8,16,24
  run r0+1 0,1 2 8
  run r1+0 1,0 2 8
  run r2+2 2,2 2 8
  run r3+3 3,3 2 8
  (cd "$OUT" && tar czf speed.tar.gz speed-*.json && rm speed-*.json)
fi

if [ "$mode" = speed-gist ]; then
  # Gist beside Finetune and EARN at the grid model's shape (256 users, prompt 80; EARN k = 2 of 8) and at Llama-7B
  # dims (32 users, prompt 512; k = 8 of 32): one invocation per register count (the weights differ), one call.
  for shape in small llama7b; do
    if [ $shape = small ]; then
      dims=(--layers 8 --dim 512 --hidden 1408 --heads 8 --vocab 1028 --users 256 --prompts 80) k=2
    else
      dims=(--layers 32 --users 32 --prompts 512) k=8
    fi
    timeout 300 "$bin/bench_cuda_llama" --reps 5 "${dims[@]}" --registers 0,0 --ks -1 --json "$OUT/speed-$shape-gist_finetune.json" || exit 1
    timeout 300 "$bin/bench_cuda_llama" --reps 5 "${dims[@]}" --registers 1,1 --ks $k --gist 1 --json "$OUT/speed-$shape-gist_r1+1.json" || exit 1
    timeout 300 "$bin/bench_cuda_llama" --reps 5 "${dims[@]}" --registers 0,20 --ks "" --gist 1 --json "$OUT/speed-$shape-gist_r0+20.json" || exit 1
  done
  (cd "$OUT" && tar czf speed-gist.tar.gz speed-*-gist_*.json && rm speed-*-gist_*.json)
fi

if [ "$mode" = speed-baselines ]; then
  # Finetune and the four presses at EARN's KV (k = 2 of 8 with 1 + 1 registers; k = 4 of 32 at Llama-7B dims), one
  # call per shape so they are measured side by side; EARN's own rows come from `speed` (r1+1).
  presses=streaming_llm,snapkv,h2o,pyramidkv
  timeout 300 "$bin/bench_cuda_llama" --reps 5 --layers 8 --dim 512 --hidden 1408 --heads 8 --vocab 1028 --users 32,256 \
    --prompts 40,80 --registers 0,0 --ks -1 --presses $presses --press-k 2 --json "$OUT/speed-small-baselines.json" || exit 1
  timeout 300 "$bin/bench_cuda_llama" --reps 5 --layers 32 --users 8,32 --prompts 80,512 --registers 0,0 --ks -1 \
    --presses $presses --press-k 4 --json "$OUT/speed-llama7b-baselines.json" || exit 1
  (cd "$OUT" && tar czf speed-baselines.tar.gz speed-*-baselines.json && rm speed-*-baselines.json)
fi
