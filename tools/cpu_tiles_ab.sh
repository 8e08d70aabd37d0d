#!/usr/bin/env bash
# tools/cpu_tiles_ab.sh - gemm.hpp's two tile families side by side: bench_model (native, with AVX-512 where the CPU
# has it: 32 x 8 tiles of 16 lanes) against bench_model_avx2 (the same source built with -mno-avx512f: 16 x 6 tiles
# of 8 lanes), alternating within each round, on the recommendation model's product shapes with weights from memory
# (BM_Linear_Cold) and from cache (BM_Linear), beside the FMA peak.
#
#   tools/cpu_tiles_ab.sh ROUNDS [OUT]      (OUT: default tiles_ab.txt; run from a configured build/)
#
# Prints every run's rate per benchmark and, per benchmark, the median over rounds of the 16-lane / 8-lane ratio.
set -euo pipefail
rounds=${1:?rounds}
out=${2:-tiles_ab.txt}
root=$(cd "$(dirname "$0")/.." && pwd)
cmake --build "$root/build" --target bench_model bench_model_avx2 >/dev/null
filter='BM_Fma_Peak|BM_Linear(_Cold)?/(160|432)/'
echo "# $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet || echo '+changes'), $(date -u +%F), $(nproc) cpus: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), OMP_NUM_THREADS=${OMP_NUM_THREADS:-all}" >>"$out"
for r in $(seq "$rounds"); do
  for bin in bench_model bench_model_avx2; do
    "$root/build/bench/$bin" --benchmark_filter="$filter" --benchmark_min_time=0.3 --benchmark_format=json 2>/dev/null |
      python3 -c 'import json, sys
for b in json.load(sys.stdin)["benchmarks"]:
    name, rate = b["name"], b["FLOP/s"] / 1e9
    print(f"round {sys.argv[1]} {sys.argv[2]} {name} {rate:.2f} GFLOP/s")' "$r" "$bin" | tee -a "$out"
  done
done
python3 - "$out" <<'PY'
import re, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    m = re.match(r"round (\d+) (\S+) (\S+) ([0-9.]+) GFLOP/s", line)
    if m:
        runs.setdefault(m[3], {}).setdefault(m[2], {})[int(m[1])] = float(m[4])
for name, by in runs.items():
    a, b = by.get("bench_model", {}), by.get("bench_model_avx2", {})
    common = sorted(set(a) & set(b))
    if not common:
        continue
    ratios = [a[r] / b[r] for r in common]
    print(f"{name}: 16-lane {statistics.median(a[r] for r in common):.1f}, 8-lane "
          f"{statistics.median(b[r] for r in common):.1f} GFLOP/s; per-round ratio median {statistics.median(ratios):.3f} "
          f"(range {min(ratios):.3f}-{max(ratios):.3f}, {len(common)} rounds)")
PY
