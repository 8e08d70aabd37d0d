#!/usr/bin/env python3
"""Sum ncu's per-kernel durations (a --csv log of gpu__time_duration.sum) by kernel family, largest first.

    ncu --csv --metrics gpu__time_duration.sum ... > ncu.csv; python3 bench/cuda/ncu_summary.py ncu.csv [scale]

scale also shows every total multiplied (e.g. 32 / layers profiled, to read a 4-layer profile as the 32-layer
model's; per-step kernels such as the classifier GEMM are then overcounted: read their raw column)."""
import csv
import re
import sys
from collections import defaultdict


def family(name):
    if "softmax_rows" in name: return "softmax_rows"
    for k in ("flash_attention", "decode_combine", "gen_scores", "gen_pv", "qkv_post", "rmsnorm", "swiglu", "embed", "gather_rows", "gather_generated",
              "scatter_generated"):
        if k in name: return k
    if "gemv" in name.lower(): return "cublas gemv: " + re.sub(r"<.*", "", name)[:60]
    if "batched" in name.lower() or "Batched" in name: return "cublas batched: " + name[:60]
    return "cublas/other: " + re.sub(r"\(.*", "", name)[:90]


def main():
    path = sys.argv[1]
    scale = float(sys.argv[2]) if len(sys.argv) > 2 else 1.0
    lines = open(path, errors="replace").read().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith('"ID"'))
    tot, cnt, grids = defaultdict(float), defaultdict(int), defaultdict(set)
    for row in csv.DictReader(lines[start:]):
        if row.get("Metric Name") != "gpu__time_duration.sum": continue
        v = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "nsecond")
        ns = v * {"nsecond": 1, "usecond": 1e3, "msecond": 1e6, "second": 1e9}.get(unit, 1)
        f = family(row["Kernel Name"])
        tot[f] += ns
        cnt[f] += 1
        grids[f].add(row.get("Grid Size", ""))
    all_ns = sum(tot.values())
    print(f"kernels: {sum(cnt.values())}, total {all_ns * scale / 1e6:.3f} ms (x{scale:g})")
    for f, ns in sorted(tot.items(), key=lambda x: -x[1]):
        print(f"{ns / 1e6:8.3f} ms (x{scale:g}: {ns * scale / 1e6:8.3f}) {100 * ns / all_ns:5.1f}%  n={cnt[f]:5d}  {f}  "
              f"grids={sorted(grids[f])[:3]}")


if __name__ == "__main__":
    main()
