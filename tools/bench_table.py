#!/usr/bin/env python3
"""Predicted vs measured speedups of EARN over dense from bench_earn's JSON output.

    ./build/bench/bench_earn --benchmark_out=earn.json --benchmark_out_format=json
    python3 tools/bench_table.py earn.json            # prints the markdown table of bench/README.md

Each benchmark carries the cost model's prediction for its split layer k (pred_flop for prefill, pred_bytes for
decode). Predicted speedup = prediction(dense) / prediction(k); measured = median time(dense) / median time(k).
"""
import json
import statistics
import sys
from collections import defaultdict


def main(path):
    data = json.load(open(path))
    runs = defaultdict(list)
    pred = {}
    for b in data["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        name = b["run_name"] if "run_name" in b else b["name"]
        kind, p, k = name.split("/")[0], int(name.split("/")[1]), int(name.split("/")[2])
        runs[(kind, p, k)].append(b["real_time"])
        pred[(kind, p, k)] = b.get("pred_flop", b.get("pred_bytes"))
    dense_k = max(k for (_, _, k) in runs)
    print("| phase | P | k | median ms | measured speedup | predicted speedup | measured/predicted |")
    print("|---|---|---|---|---|---|---|")
    for (kind, p, k) in sorted(runs):
        t = statistics.median(runs[(kind, p, k)])
        td = statistics.median(runs[(kind, p, dense_k)])
        ms, ps = td / t, pred[(kind, p, dense_k)] / pred[(kind, p, k)]
        phase = "prefill" if "Prefill" in kind else "decode"
        label = f"{k} (dense)" if k == dense_k else str(k)
        print(f"| {phase} | {p} | {label} | {t:.3f} | {ms:.2f}x | {ps:.2f}x | {ms / ps:.2f} |")


if __name__ == "__main__":
    main(sys.argv[1])
