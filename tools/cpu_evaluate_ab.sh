#!/usr/bin/env bash
# tools/cpu_evaluate_ab.sh - the recommendation loop's users/s, an older commit against this tree, alternating.
#
#   tools/cpu_evaluate_ab.sh BASE_COMMIT ROUNDS [OUT]
#
# Builds `evaluate` of BASE_COMMIT in a git worktree (build-ab-base/, Release, no CUDA) and of this tree (build/,
# the README's build), then runs both in turn, ROUNDS times, on the Beauty test split (../shared/data, first 240
# users, beam 20, batches of 8, 2 threads): the dense model (k = 8) and EARN k = 2 of 8, the built-in ~30M random
# model. Every line `evaluate` prints for the timing is appended to OUT (default ab.txt), with its round, schedule
# and side, and the share of CPU time the hypervisor stole during it; a per-round ratio table follows, also over the
# rounds where neither run lost more than 1 % to steal. On a VM whose speed drifts between minutes, only ratios
# within one round mean anything.
set -euo pipefail
base=${1:?base commit}
rounds=${2:?rounds}
out=${3:-ab.txt}
root=$(cd "$(dirname "$0")/.." && pwd)
data=${EARN_DATA:-$root/../shared/data/amazon-beauty}
wt=$root/build-ab-base/src
if [ ! -d "$wt" ]; then git -C "$root" worktree add --detach "$wt" "$base" >/dev/null; fi
git -C "$wt" checkout --detach -q "$base"
cmake -S "$wt" -B "$root/build-ab-base/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DEARN_ENABLE_CUDA=OFF >/dev/null
cmake --build "$root/build-ab-base/build" --target evaluate >/dev/null
cmake --build "$root/build" --target evaluate >/dev/null
bins=("$root/build-ab-base/build/examples/evaluate" "$root/build/examples/evaluate")
names=("base" "head")
echo "# base $(git -C "$wt" rev-parse --short HEAD), head $(git -C "$root" rev-parse --short HEAD)$(git -C "$root" diff --quiet || echo '+changes'), $(date -u +%F), $(nproc) cpus: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2)" >>"$out"
# CPU time the hypervisor gave to other guests while a run ran (/proc/stat's steal column, as a share of all CPUs): a
# slow run with high steal was slowed by its neighbours, not by its code.
steal() { awk 'NR == 1 { print $9 }' /proc/stat; }
for r in $(seq "$rounds"); do
  for k in 8 2; do
    for i in 0 1; do
      s0=$(steal); t0=$(date +%s.%N)
      line=$(OMP_NUM_THREADS=2 "${bins[$i]}" --data "$data" --limit 240 --k "$k" 2>&1 | grep '^users')
      st=$(awk -v a="$s0" -v b="$(steal)" -v t0="$t0" -v t1="$(date +%s.%N)" -v n="$(nproc)" -v hz="$(getconf CLK_TCK)" \
        'BEGIN { printf "%.1f", 100 * (b - a) / hz / (n * (t1 - t0)) }')
      echo "round $r k=$k ${names[$i]}: $line; steal $st %" | tee -a "$out"
    done
  done
done
python3 - "$out" <<'EOF'
import re, statistics, sys
runs, steal = {}, {}
for line in open(sys.argv[1]):
    m = re.match(r"round (\d+) k=(\d+) (\w+): users \d+ in [0-9.]+ s: ([0-9.]+) users/s.*?(?:steal ([0-9.]+) %)?$", line)
    if m:
        runs.setdefault((m[2], m[3]), {})[int(m[1])] = float(m[4])
        if m[5] is not None:
            steal.setdefault((m[2], m[3]), {})[int(m[1])] = float(m[5])
for k in ("8", "2"):
    b, h = runs.get((k, "base"), {}), runs.get((k, "head"), {})
    common = sorted(set(b) & set(h))
    if not common:
        continue
    ratios = [h[r] / b[r] for r in common]
    print(f"k={k}: base median {statistics.median(b[r] for r in common):.2f} users/s, head median "
          f"{statistics.median(h[r] for r in common):.2f}, per-round head/base median {statistics.median(ratios):.2f}x "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}, {len(common)} rounds)")
    sb, sh = steal.get((k, "base"), {}), steal.get((k, "head"), {})
    if sb and sh:
        q = [h[r] / b[r] for r in common if r in sb and r in sh and max(sb[r], sh[r]) <= 1.0]
        print(f"     steal median base {statistics.median(sb.values()):.1f} %, head {statistics.median(sh.values()):.1f} %; "
              + (f"rounds with both <= 1 %: {len(q)}, per-round median {statistics.median(q):.2f}x "
                 f"(range {min(q):.2f}-{max(q):.2f})" if q else "no round with both <= 1 %"))
EOF
