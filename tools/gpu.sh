#!/usr/bin/env bash
# tools/gpu.sh - earn's CUDA checks on a GPU machine: build (or take prebuilt binaries), run the CUDA tests,
# compute-sanitizer memcheck and racecheck over them, then the GPU benchmark and its Python peers (Hugging Face
# generate, an eager PyTorch EARN). Logs and result files go to $OUT (default ./out/gpu).
#
#   tools/gpu.sh [all|test|bench|peers] [bench args...]
#   EARN_GPU_BIN=dir   use prebuilt test_cuda_engine / bench_cuda_llama from dir (built with nvcc elsewhere)
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
  cmake --build "$root/build-gpu" --target test_cuda_engine bench_cuda_llama >"$OUT/build.log" 2>&1 ||
    { tail -40 "$OUT/build.log"; exit 1; }
  bin=$root/build-gpu/bin
  mkdir -p "$bin"
  cp "$root/build-gpu/tests/cuda/test_cuda_engine" "$root/build-gpu/bench/cuda/bench_cuda_llama" "$bin/"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"

status=0
if [ "$mode" = all ] || [ "$mode" = test ]; then
  echo "== CUDA tests"
  (cd "$root" && "$bin/test_cuda_engine") >"$OUT/test.log" 2>&1
  rc=$?
  tail -25 "$OUT/test.log"
  echo "tests rc=$rc"
  [ $rc = 0 ] || status=1
  echo "== compute-sanitizer memcheck (all tests)"
  (cd "$root" && timeout "${EARN_SANITIZER_TIMEOUT:-300}" compute-sanitizer --tool memcheck --error-exitcode 3 "$bin/test_cuda_engine") \
    >"$OUT/memcheck.log" 2>&1
  echo "memcheck rc=$?"; tail -4 "$OUT/memcheck.log"
  echo "== compute-sanitizer racecheck (fp32 engine tests)"
  (cd "$root" && timeout 300 compute-sanitizer --tool racecheck --error-exitcode 3 "$bin/test_cuda_engine" \
    -tc='*F32*') >"$OUT/racecheck.log" 2>&1
  echo "racecheck rc=$?"; tail -4 "$OUT/racecheck.log"
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
exit $status
