#!/usr/bin/env python3
"""Predicted vs measured speedups of EARN over dense, from bench_earn's and bench_model's JSON output.

    ./build/bench/bench_model --benchmark_out=model.json --benchmark_out_format=json
    ./build/bench/bench_earn  --benchmark_out=earn.json  --benchmark_out_format=json
    python3 tools/bench_table.py earn.json model.json     # prints the markdown table of bench/README.md

Every bench_earn run carries its cost model: pred_flop and pred_bytes for its split layer k. The roofline time is
max(pred_flop / F, pred_bytes / B), with F the arithmetic peak (BM_Fma_Peak) and B the streaming bandwidth
(BM_Gemv_Stream) measured on the same machine. Predicted speedup = roofline(dense) / roofline(k); measured speedup =
median time(dense) / median time(k); measured/floor = median time / roofline time.
"""
import json
import sys
from collections import defaultdict


def medians(path):
    out = {}
    for b in json.load(open(path))["benchmarks"]:
        if b.get("run_type") == "aggregate" and b.get("aggregate_name") != "median":
            continue
        name = b.get("run_name", b["name"]).replace("/real_time", "")
        out[name] = b
    return out


def main(earn_path, model_path):
    model = medians(model_path)
    F = model["BM_Fma_Peak"]["FLOP/s"]
    # The engine's weights sit in 2 MiB pages (cpu::advise_huge_pages): the stream over 2 MiB pages is their floor.
    B = model.get("BM_Gemv_Stream/huge:1", model.get("BM_Gemv_Stream", {})).get("bytes/s")
    print(f"Ceilings measured in the same session: FMA peak {F / 1e9:.0f} GFLOP/s, streaming read {B / 1e9:.1f} GB/s.\n")
    runs = defaultdict(dict)
    for name, b in medians(earn_path).items():
        kind, p, k = name.split("/")[:3]
        runs[(kind, int(p))][int(k)] = b
    print("| phase | P | k | median ms | roofline ms | measured/floor | measured speedup | predicted speedup |")
    print("|---|---|---|---|---|---|---|---|")
    for (kind, p) in sorted(runs, key=lambda x: (x[0], x[1])):
        ks = runs[(kind, p)]
        dense = max(ks)
        roof = {k: max(b["pred_flop"] / F, b["pred_bytes"] / B) * 1e3 for k, b in ks.items()}
        for k in sorted(ks):
            t = ks[k]["real_time"]
            phase = "prefill" if "Prefill" in kind else "decode"
            label = f"{k} (dense)" if k == dense else str(k)
            print(f"| {phase} | {p} | {label} | {t:.2f} | {roof[k]:.2f} | {t / roof[k]:.2f} | "
                  f"{ks[dense]['real_time'] / t:.2f}x | {roof[dense] / roof[k]:.2f}x |")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
