#!/usr/bin/env bash
# tests/fuzz/run.sh BUILD_DIR SECONDS [HARNESS...] - builds the seed corpora from the real files (make_corpus, from
# ../shared/data at run time; nothing derived from them is committed), replays the recorded regressions, then
# fuzzes each harness (default: all five) for SECONDS with libFuzzer, one after another. BUILD_DIR is a configured
# fuzz build (see README.md beside this script); the harnesses and make_corpus are built here.
# Corpora grow in BUILD_DIR/fuzz/corpus/<harness>; crashes land in BUILD_DIR/fuzz/artifacts/<harness>, and the
# run fails. Each harness prints its executions and coverage; a summary line per harness follows.
set -euo pipefail
build=$1 seconds=$2
shift 2
harnesses=("$@")
[ ${#harnesses[@]} -gt 0 ] || harnesses=(safetensors hf llama2c tokenizer dataset)
here=$(cd "$(dirname "$0")" && pwd)
data=${EARN_DATA_DIR:-$here/../../../shared/data}
cmake --build "$build" -j2 --target make_corpus $(printf 'fuzz_%s ' "${harnesses[@]}")

seeds=$build/fuzz/seeds
rm -rf "$seeds"
"$build/tests/fuzz/make_corpus" "$data" "$seeds"
status=0
for h in "${harnesses[@]}"; do
  corpus=$build/fuzz/corpus/$h artifacts=$build/fuzz/artifacts/$h
  mkdir -p "$corpus" "$artifacts"
  # Known crashers first: each must now run clean (a harness without findings has no directory: git keeps none).
  if [ -d "$here/regressions/$h" ]; then
    "$build/tests/fuzz/fuzz_$h" -runs=0 "$here/regressions/$h" 2>&1 | tail -n 1
  fi
  # -rss_limit_mb: an input that makes a loader allocate past 2 GB is a finding (a size not checked first);
  # -timeout: one that takes 10 s is a hang.
  log=$build/fuzz/$h.log
  if ! "$build/tests/fuzz/fuzz_$h" -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -print_final_stats=1 \
      -artifact_prefix="$artifacts/" "$corpus" "$seeds/$h" >"$log" 2>&1; then
    status=1
    echo "fuzz_$h: FAILED - crash input in $artifacts, log in $log"
    grep -E "ERROR|==[0-9]+==|terminate|fuzz_tokenizer:" "$log" | head -n 20 || true
  fi
  runs=$(grep -Eo 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -Eo '[0-9]+$' || echo "?")
  cov=$(grep -Eo 'cov: [0-9]+' "$log" | tail -n 1 || echo "cov: ?")
  echo "fuzz_$h: $runs executions in ${seconds} s, $cov, corpus $(ls "$corpus" | wc -l) inputs"
done
exit $status
