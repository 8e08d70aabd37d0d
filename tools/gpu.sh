#!/usr/bin/env bash
# tools/gpu.sh - earn's CUDA checks on a GPU machine: build (or take prebuilt binaries), run the CUDA tests,
# compute-sanitizer memcheck and racecheck over them, then the GPU benchmark and its Python peers (Hugging Face
# generate, an eager PyTorch EARN). Logs and result files go to $OUT (default ./out/gpu).
#
#   tools/gpu.sh [all|test|press|kinds|where|micro|beam|profile|bench|peers|train-test|train-bench|train-run] [bench args...]
#   press     the KV presses' and the GPU observer's tests (test_cuda_press, test_cuda_observer) under memcheck, and
#             racecheck over the press kernels
#   kinds     the row-kind rule's tests (Gist: test_cuda_press, test_cuda_train) and memcheck over their Gist cases
#   where     every CUDA test binary, then memcheck / racecheck over the cases of policies with run-time values and
#             per-head rules (SinkWindow, HeadWise: engine, observer, trainer) and of H2O evicting during decode
#   micro     the attention microbenchmarks (bench_cuda_attention, Google Benchmark) and the decode GEMMs'
#             cuBLAS bandwidth (bench_cuda_gemm)
#   beam      the whole beam search, selection on the host vs on the device (bench_cuda_beam)
#   profile   ncu kernel times of the B = 32, P = 512 dense decode steps (4 layers, scaled to 32), then the same
#             settings with and without decode graphs
#   train-test   the CUDA training tests, then compute-sanitizer memcheck over the graph / tensor-core / refusal cases
#                and racecheck over the tensor-core attention case
#   train-bench  training throughput (bench_cuda_train, small and large models, dense and EARN) and, in the same
#                call, the PyTorch peer (tools/train_peer.py: eager and torch.compile); needs EARN_DATA (Beauty dir)
#   train-run    examples/train (train_cuda --device cuda) on Beauty: the small model, dense and EARN k = 2 side by
#                side, 10 epochs, validation every 2 epochs; the runs' logs, curves and results go to $OUT
#   EARN_GPU_BIN=dir   use prebuilt test_cuda_{engine,threads,press,observer,attention,gemm} / bench_cuda_{llama,attention,beam,gemm} from dir (built with
#                      nvcc elsewhere; a libbenchmark.so* placed there is found through LD_LIBRARY_PATH)
set -uo pipefail
mode=${1:-all}
shift || true
root=$(cd "$(dirname "$0")/.." && pwd)
OUT=${OUT:-$root/out/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1

bin=${EARN_GPU_BIN:-}
if [ -z "$bin" ]; then
  # Needs what tools/deps.sh installs (Eigen, nlohmann-json, doctest) next to the CUDA toolkit.
  cmake -S "$root" -B "$root/build-gpu" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEARN_ENABLE_CUDA=ON \
    -DEARN_BUILD_EXAMPLES=OFF >"$OUT/configure.log" 2>&1 || { tail -20 "$OUT/configure.log"; exit 1; }
  cmake --build "$root/build-gpu" --target test_cuda_engine test_cuda_threads test_cuda_press test_cuda_observer test_cuda_attention test_cuda_gemm test_cuda_train bench_cuda_llama bench_cuda_attention bench_cuda_beam bench_cuda_gemm bench_cuda_train train_cuda \
    >"$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
  bin=$root/build-gpu/bin
  mkdir -p "$bin"
  cp "$root/build-gpu/tests/cuda/test_cuda_engine" "$root/build-gpu/tests/cuda/test_cuda_attention" \
    "$root/build-gpu/tests/cuda/test_cuda_gemm" "$root/build-gpu/tests/cuda/test_cuda_train" \
    "$root/build-gpu/tests/cuda/test_cuda_threads" "$root/build-gpu/tests/cuda/test_cuda_press" "$root/build-gpu/tests/cuda/test_cuda_observer" \
    "$root/build-gpu/bench/cuda/bench_cuda_train" "$root/build-gpu/examples/train_cuda" \
    "$root/build-gpu/bench/cuda/bench_cuda_llama" "$root/build-gpu/bench/cuda/bench_cuda_gemm" \
    "$root/build-gpu/bench/cuda/bench_cuda_attention" "$root/build-gpu/bench/cuda/bench_cuda_beam" "$bin/"
fi
export LD_LIBRARY_PATH="$bin${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

status=0
# sanitize TOOL BINARY LOG [doctest filter]: one compute-sanitizer run, its exit code and summary printed.
sanitize() {
  local tool=$1 binary=$2 log=$3 filter=${4:-}
  (cd "$root" && timeout "${EARN_SANITIZER_TIMEOUT:-400}" compute-sanitizer --tool "$tool" --error-exitcode 3 \
    "$bin/$binary" ${filter:+"-tc=$filter"}) >"$OUT/$log" 2>&1
  echo "$tool rc=$?"; tail -3 "$OUT/$log"
}
# run_test BINARY: one CUDA test binary, its log's tail and exit code; a failure marks the call failed.
run_test() {
  echo "== CUDA tests: $1"
  (cd "$root" && "$bin/$1") >"$OUT/$1.log" 2>&1
  local rc=$?
  tail -4 "$OUT/$1.log"
  echo "$1 rc=$rc"
  [ $rc = 0 ] || status=1
}
if [ "$mode" = all ] || [ "$mode" = test ]; then
  for t in test_cuda_attention test_cuda_gemm test_cuda_engine test_cuda_threads test_cuda_press test_cuda_observer; do
    echo "== CUDA tests: $t"
    (cd "$root" && "$bin/$t") >"$OUT/$t.log" 2>&1
    rc=$?
    grep -E "worst|error" "$OUT/$t.log" | sort | uniq -c | sort -rn | head -20
    tail -4 "$OUT/$t.log"
    echo "$t rc=$rc"
    [ $rc = 0 ] || status=1
  done
  [ "${EARN_SANITIZER:-1}" = 1 ] || exit $status
  for t in test_cuda_attention test_cuda_gemm test_cuda_engine test_cuda_threads test_cuda_press test_cuda_observer; do
    echo "== compute-sanitizer memcheck: $t"
    sanitize memcheck "$t" "memcheck_$t.log"
  done
  echo "== compute-sanitizer racecheck (flash kernels, stream_gemm: kernel tests in bf16, engine tests in bf16)"
  sanitize racecheck test_cuda_attention racecheck_attention.log '*bfloat16*'
  sanitize racecheck test_cuda_engine racecheck_engine.log '*Bf16*'
  sanitize racecheck test_cuda_gemm racecheck_gemm.log '*bfloat16*'
fi
if [ "$mode" = press ]; then  # the KV presses and the GPU observer: their tests, memcheck and racecheck over them
  for t in test_cuda_press test_cuda_observer; do
    run_test "$t"
    sanitize memcheck "$t" "memcheck_$t.log"
  done
  sanitize racecheck test_cuda_press racecheck_press.log
fi
if [ "$mode" = kinds ]; then  # row-kind rules (Gist): the engine and training tests, memcheck over their Gist cases
  for t in test_cuda_press test_cuda_train; do
    run_test "$t"
    sanitize memcheck "$t" "memcheck_gist_$t.log" '*Gist*'
  done
fi
if [ "$mode" = where ]; then  # visibility with run-time values and per-head rules (attention/windowed.hpp)
  for t in test_cuda_attention test_cuda_gemm test_cuda_engine test_cuda_threads test_cuda_press test_cuda_observer test_cuda_train; do
    run_test "$t"
  done
  sanitize memcheck test_cuda_press memcheck_where_press.log '*run-time*'
  sanitize memcheck test_cuda_train memcheck_where_train.log '*run-time*'
  sanitize memcheck test_cuda_observer memcheck_where_observer.log
  sanitize racecheck test_cuda_press racecheck_where_press.log '*run-time*'
  sanitize memcheck test_cuda_press memcheck_evict_press.log '*evicting*'
  sanitize racecheck test_cuda_press racecheck_evict_press.log '*evicting*'
fi
if [ "$mode" = all ] || [ "$mode" = micro ]; then
  echo "== attention microbenchmarks"
  timeout 200 "$bin/bench_cuda_attention" --benchmark_out="$OUT/bench_attention.json" --benchmark_out_format=json \
    --benchmark_counters_tabular=true 2>&1 | tee "$OUT/bench_attention.log" || status=1
  echo "== decode GEMMs: cublasGemmEx's default against every cuBLASLt heuristic algorithm"
  timeout 200 "$bin/bench_cuda_gemm" 2>&1 | tee "$OUT/bench_gemm.log" || status=1
fi
if [ "$mode" = all ] || [ "$mode" = beam ]; then
  echo "== beam search: selection on the host vs on the device"
  timeout 240 "$bin/bench_cuda_beam" --users 1,4,32 2>&1 | tee "$OUT/bench_beam.log" || status=1
fi
if [ "$mode" = profile ]; then
  echo "== ncu: B=32 P=512 dense decode, 3 steps, 4 layers (times x8 = 32 layers), kernels launched one by one"
  timeout 300 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
    "$bin/bench_cuda_llama" --layers 4 --users 32 --prompts 512 --ks -1 --reps 1 --profile 1 --graphs 0 \
    >"$OUT/ncu_decode.csv" 2>"$OUT/ncu_decode.err"
  echo "ncu rc=$?"; tail -3 "$OUT/ncu_decode.err"
  python3 "$root/bench/cuda/ncu_summary.py" "$OUT/ncu_decode.csv" 8 | tee "$OUT/ncu_decode.txt"
  echo "== ncu: B=32 P=512 dense prefill, 4 layers (times x8)"
  timeout 200 ncu --profile-from-start off --clock-control none --metrics gpu__time_duration.sum --csv \
    "$bin/bench_cuda_llama" --layers 4 --users 32 --prompts 512 --ks -1 --reps 1 --profile 2 \
    >"$OUT/ncu_prefill.csv" 2>"$OUT/ncu_prefill.err"
  echo "ncu rc=$?"; tail -3 "$OUT/ncu_prefill.err"
  python3 "$root/bench/cuda/ncu_summary.py" "$OUT/ncu_prefill.csv" 8 | tee "$OUT/ncu_prefill.txt"
  echo "== decode with and without graphs (B=1,32; P=512; dense, k=6)"
  for g in 0 1; do
    timeout 200 "$bin/bench_cuda_llama" --users 1,32 --prompts 512 --ks -1,6 --graphs $g 2>&1 | tee "$OUT/graphs_$g.log"
  done
fi
if [ "$mode" = all ] || [ "$mode" = bench ]; then
  echo "== earn GPU benchmark"
  timeout "${EARN_BENCH_TIMEOUT:-300}" "$bin/bench_cuda_llama" --json "$OUT/bench_earn.json" "$@" 2>&1 |
    tee "$OUT/bench_earn.log" || status=1
fi
if [ "$mode" = all ] || [ "$mode" = peers ]; then
  echo "== peers: Hugging Face generate and eager PyTorch EARN"
  timeout "${EARN_PEERS_TIMEOUT:-300}" python3 "$root/tools/gpu_peers.py" --json "$OUT/bench_peers.json" 2>&1 |
    tee "$OUT/bench_peers.log" || status=1
fi
data=${EARN_DATA:-$root/../shared/data/amazon-beauty}
if [ "$mode" = train-test ]; then
  echo "== CUDA training tests"
  (cd "$root" && timeout 300 "$bin/test_cuda_train") >"$OUT/test_cuda_train.log" 2>&1
  rc=$?; tail -4 "$OUT/test_cuda_train.log"; echo "test_cuda_train rc=$rc"; [ $rc = 0 ] || status=1
  echo "== compute-sanitizer memcheck: graphs, tensor-core attention, refusals"
  sanitize memcheck test_cuda_train memcheck_train.log '*graph*,*tensor-core*,*refuses*'
  echo "== compute-sanitizer racecheck: tensor-core training attention (the race probe case)"
  sanitize racecheck test_cuda_train racecheck_train.log '*race probe*'
fi
if [ "$mode" = train-bench ]; then
  echo "== training throughput: earn"
  timeout 400 "$bin/bench_cuda_train" --data "$data" --json "$OUT/bench_train.json" "$@" 2>&1 | tee "$OUT/bench_train.log" || status=1
  echo "== training throughput: PyTorch eager and torch.compile"
  timeout 500 python3 "$root/tools/train_peer.py" --data "$data" --json "$OUT/bench_train_peer.json" 2>&1 |
    tee "$OUT/bench_train_peer.log" || status=1
fi
if [ "$mode" = train-run ]; then
  echo "== examples/train on Beauty: small model, dense and EARN k = 2, side by side"
  common=(--device cuda --data "$data" --preset small --epochs "${EARN_EPOCHS:-10}" --eval-every "${EARN_EVAL_EVERY:-1608}"
          --seed "${EARN_SEED:-0}" --no-resume)
  "$bin/train_cuda" "${common[@]}" --schedule dense --out /tmp/run-dense >"$OUT/train_dense.log" 2>&1 &
  p1=$!
  "$bin/train_cuda" "${common[@]}" --schedule earn --k 2 --out /tmp/run-earn >"$OUT/train_earn.log" 2>&1 &
  p2=$!
  wait $p1 || status=1
  wait $p2 || status=1
  for r in dense earn; do
    tail -12 "$OUT/train_$r.log" | tr '\r' '\n' | tail -12
    cp /tmp/run-$r/result.json "$OUT/train_${r}_result.json" 2>/dev/null
    cp /tmp/run-$r/train_log.csv "$OUT/train_${r}_log.csv" 2>/dev/null
  done
fi
exit $status
