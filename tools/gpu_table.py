#!/usr/bin/env python3
"""Markdown tables of bench/README.md's CUDA section from the GPU benchmark's JSON (tools/gpu.sh writes them).

    python3 tools/gpu_table.py bench_earn.json [bench_peers.json]

Table 1: per (B, P, schedule) prefill / decode / total ms against the floors the benchmark computed in the same
run (sustained GEMM rate; the burst-rate and layer-sequential ratios beside it, the latter where the JSON has
prefill_seq_floor_ms), KV bytes and the speed-up over earn dense.
Table 2 (with the peers' JSON): Hugging Face generate and the eager PyTorch EARN against earn dense and EARN k = 6.
"""
import json
import sys


def main(earn_path, peers_path=None):
    e = json.load(open(earn_path))
    rows = e["results"]
    dense = {(r["B"], r["P"]): r["prefill_ms"] + r["decode_ms"] for r in rows if r["k"] < 0}
    print(f"card {e['card']}: copy {e['copy_bandwidth_Bps'] / 1e9:.0f} GB/s, bf16 GEMM "
          f"{e['bf16_gemm_flops'] / 1e12:.0f} TFLOP/s sustained ({e.get('bf16_gemm_flops_burst', 0) / 1e12:.0f} burst)\n")
    seq = all("prefill_seq_floor_ms" in r for r in rows)
    print("| B | P | schedule | prefill ms (floor) | decode ms, 3 steps (floor) | total ms | floor ms | measured / floor "
          "| / burst floor |" + (" / layer-seq floor |" if seq else "") + " KV MB | vs earn dense |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if seq else "") + "---:|---:|")
    for r in rows:
        total = r["prefill_ms"] + r["decode_ms"]
        floor = r["prefill_floor_ms"] + r["decode_floor_ms"]
        name = "dense" if r["k"] < 0 else f"EARN k={r['k']}"
        print(f"| {r['B']} | {r['P']} | {name} | {r['prefill_ms']:.1f} ({r['prefill_floor_ms']:.1f}) | "
              f"{r['decode_ms']:.1f} ({r['decode_floor_ms']:.1f}) | {total:.1f} | {floor:.1f} | {total / floor:.2f} | "
              f"{total / r['burst_floor_ms']:.2f} | "
              + (f"{total / (r['prefill_seq_floor_ms'] + r['decode_floor_ms']):.2f} | " if seq else "")
              + f"{r['kv_bytes'] / 1e6:.0f} | {dense[(r['B'], r['P'])] / total:.2f}x |")
    if not peers_path:
        return
    p = json.load(open(peers_path))
    mine = {(r["B"], r["P"], r["k"]): r["prefill_ms"] + r["decode_ms"] for r in rows}
    print("\n| B | P | peer | peer ms | earn dense ms | earn EARN k=6 ms | peer / earn dense | peer / earn k=6 |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in p["results"]:
        what = ("HF generate (dense)" if r["peer"] == "hf" else
                "eager PyTorch " + ("dense" if r["k"] >= e["layers"] else f"EARN k={r['k']}"))
        d, k6 = mine.get((r["B"], r["P"], -1)), mine.get((r["B"], r["P"], 6))
        ms = r.get("ms")
        if ms is None:
            print(f"| {r['B']} | {r['P']} | {what} | {r.get('error', 'not run')} | {d:.1f} | {k6:.1f} | - | - |")
            continue
        print(f"| {r['B']} | {r['P']} | {what} | {ms:.1f} | {d:.1f} | {k6:.1f} | {ms / d:.1f}x | {ms / k6:.1f}x |")


if __name__ == "__main__":
    main(*sys.argv[1:3])
