#!/usr/bin/env bash
# tools/hardening.sh [asan] [tsan] [fuzz] - the hardening runs CI makes after the README's test command (.ci/run),
# each in a build directory of its own, with clang (tools/deps.sh installs it):
#   asan  ASan + UBSan build (build-asan) of the CPU tests and the example programs, and every CPU test under it
#         (the compile-fail and packaging tests are left out: they check g++'s messages and rebuild consumers)
#   tsan  ThreadSanitizer build (build-tsan, OpenMP off: libgomp is not instrumented) of tests/test_threads.cpp
#   fuzz  libFuzzer build (build-fuzz) of the five loader harnesses, each fuzzed for EARN_FUZZ_SECONDS (60) from
#         seed corpora cut from ../shared/data (tests/fuzz/run.sh)
# No argument: all three. Each step prints a line when it starts and one with its time when it ends.
set -euo pipefail
cd "$(dirname "$0")/.."
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(asan tsan fuzz)
launcher=()
command -v ccache >/dev/null && launcher=(-DCMAKE_CXX_COMPILER_LAUNCHER=ccache)
# Sanitizer builds: clang, no CUDA, no benchmarks; each directory configured once.
configure() {
  local dir=$1
  shift
  cmake -S . -B "$dir" -G Ninja -DCMAKE_CXX_COMPILER=clang++ -DEARN_ENABLE_CUDA=OFF -DEARN_BUILD_BENCHMARKS=OFF \
    "${launcher[@]}" "$@" >/dev/null
}
step() {
  echo "== hardening: $1"
  SECONDS=0
}
done_step() { echo "== hardening: $1 passed in ${SECONDS} s"; }

for s in "${steps[@]}"; do
  case $s in
    asan)
      step "ASan + UBSan build of the CPU tests and examples (build-asan)"
      configure build-asan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEARN_SANITIZE=address,undefined
      # Every test program the configured tree registers (test_ops_avx2 is test_ops.cpp built a second time).
      targets=$(ctest --test-dir build-asan -N | awk '$1 == "Test" && $3 ~ /^test_/ {print $3}')
      examples=$(for f in examples/*.cpp; do basename "$f" .cpp; done)
      cmake --build build-asan -j2 --target $targets $examples
      echo "== hardening: every CPU test under ASan + UBSan (built in ${SECONDS} s)"
      ASAN_OPTIONS=detect_leaks=1:abort_on_error=1:strict_string_checks=1 UBSAN_OPTIONS=print_stacktrace=1 \
        ctest --test-dir build-asan --output-on-failure -j2 -E '^(compile_fail_|package_)'
      done_step "ASan + UBSan"
      ;;
    tsan)
      step "ThreadSanitizer build of tests/test_threads.cpp (build-tsan)"
      configure build-tsan -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEARN_SANITIZE=thread \
        -DCMAKE_DISABLE_FIND_PACKAGE_OpenMP=ON -DEARN_BUILD_EXAMPLES=OFF
      cmake --build build-tsan -j2 --target test_threads
      # setarch -R: ThreadSanitizer's fixed shadow layout clashes with the high mmap randomisation of newer kernels.
      TSAN_OPTIONS=halt_on_error=1:second_deadlock_stack=1 setarch "$(uname -m)" -R ./build-tsan/tests/test_threads
      done_step "ThreadSanitizer"
      ;;
    fuzz)
      step "libFuzzer harnesses, ${EARN_FUZZ_SECONDS:-60} s each (build-fuzz)"
      configure build-fuzz -DCMAKE_BUILD_TYPE=RelWithDebInfo -DEARN_BUILD_TESTS=OFF -DEARN_BUILD_EXAMPLES=OFF \
        -DEARN_BUILD_FUZZERS=ON
      bash tests/fuzz/run.sh build-fuzz "${EARN_FUZZ_SECONDS:-60}"
      done_step "fuzzing"
      ;;
    *)
      echo "tools/hardening.sh: unknown step '$s' (asan, tsan, fuzz)" >&2
      exit 2
      ;;
  esac
done
