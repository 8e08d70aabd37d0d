#!/usr/bin/env bash
# tools/cpu_peers.sh - earn's CPU decode and prefill beside llama2.c's run.c and llama.cpp, programs alternating in
# one loop (bench/README.md, "small-model decode against llama2.c" and "with llama.cpp too").
#
#   tools/cpu_peers.sh PEERS_DIR [rounds=3]
#
# PEERS_DIR holds, built outside the repository from the peers' public sources:
#   runomp        llama2.c's run.c (350e04f) as its Makefile's runomp: gcc -Ofast -march=native -fopenmp run.c -lm
#   llama-build/  llama.cpp built with cmake (GGML_NATIVE=ON, Release), targets llama-bench and
#                 llama-convert-llama2c-to-ggml (e.g. from the vendored tree of `pip download --no-binary :all:
#                 llama-cpp-python`, when GitHub is out of reach)
# The random checkpoints (tools/make_llama2c_random.py) and their GGUF conversions are made here if absent.
# Prints one line per round and setting: decode tokens/s of run.c, llama.cpp (tg200) and earn (generate, warm-up
# excluded), then prefill tokens/s of llama.cpp (pp128) and earn (bench_model's BM_Prefill_Checkpoint/128).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
peers=$(cd "${1:?usage: tools/cpu_peers.sh PEERS_DIR [rounds]}" && pwd)
rounds=${2:-3}
tok=${EARN_TOKENIZER:-$root/../shared/data/llama2c/tokenizer.bin}
gen=$root/build/examples/generate
bm=$root/build/bench/bench_model
export LD_LIBRARY_PATH=$peers/llama-build/bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
for m in stories15M stories110M; do
  [ -f "$peers/$m.bin" ] || /usr/bin/python3 "$root/tools/make_llama2c_random.py" "$m" "$peers/$m.bin"
  [ -f "$peers/$m.gguf" ] || "$peers/llama-build/bin/llama-convert-llama2c-to-ggml" --copy-vocab-from-model "$tok" \
    --llama2c-model "$peers/$m.bin" --llama2c-output-model "$peers/$m.gguf" >/dev/null 2>&1
done
bench_ts() {  # llama-bench's avg_ts of one repetition
  "$peers/llama-build/bin/llama-bench" -m "$1" "${@:2}" -r 1 -o csv 2>/dev/null | tail -1 | awk -F, '{gsub(/"/, ""); print $(NF-1)}'
}
lscpu | grep -E "Model name" || true
for m in stories15M stories110M; do
  for t in 1 2; do
    for r in $(seq "$rounds"); do
      a=$(OMP_NUM_THREADS=$t "$peers/runomp" "$peers/$m.bin" -z "$tok" -t 0 -n 200 2>&1 >/dev/null | awk '/achieved/{print $3}')
      l=$(bench_ts "$peers/$m.gguf" -p 0 -n 200 -t "$t")
      e=$("$gen" --model "$peers/$m.bin" --tokenizer "$tok" --steps 200 --threads "$t" | grep -oP 's, \K[0-9.]+(?= tokens/s \()')
      echo "$m threads=$t decode: run.c $a llama.cpp $l earn $e"
      lp=$(bench_ts "$peers/$m.gguf" -p 128 -n 0 -t "$t")
      ep=$(OMP_NUM_THREADS=$t "$bm" --model "$peers/$m.bin" --benchmark_filter='Prefill_Checkpoint/128' \
        --benchmark_min_time=1 2>/dev/null | grep -oP 'tokens/s=\K[0-9.]+k?')
      echo "$m threads=$t prefill128: llama.cpp $lp earn $ep"
    done
  done
done
