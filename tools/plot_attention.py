#!/usr/bin/env python3
"""Figures of examples/analyze's CSVs: per-layer density (the sparsity inversion) and head / tail mass (the dual
sinks), each a mean over heads with the standard deviation over heads as error bars; and, when attention_rows.csv
holds rows, the readout row's attention over key positions per layer (first sample, mean over heads).

    python3 tools/plot_attention.py OUT_DIR      # writes OUT_DIR/attention_density.png, attention_sinks.png,
                                                 # attention_readout.png (definitions: OUT_DIR/definitions.txt)
"""
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def per_layer(rows, field):
    """[(layer, mean over heads, sd over heads)] of one column, heads without samples left out."""
    by_layer = defaultdict(list)
    for r in rows:
        if int(r["samples"]) > 0:
            by_layer[int(r["layer"])].append(float(r[field]))
    return [(l, statistics.fmean(v), statistics.pstdev(v)) for l, v in sorted(by_layer.items())]


def errorbar(ax, series, label):
    ax.errorbar([s[0] for s in series], [s[1] for s in series], yerr=[s[2] for s in series], marker="o", capsize=3,
                label=label)


def main(out):
    out = Path(out)
    with open(out / "attention_layers.csv") as f:
        layers = list(csv.DictReader(f))
    if not layers:
        sys.exit(f"{out}/attention_layers.csv has no rows")

    fig, ax = plt.subplots(figsize=(5, 3.4))
    errorbar(ax, per_layer(layers, "density"), "density")
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of visible keys above eps")
    ax.set_title("Attention density per layer (sparsity inversion)")
    ax.set_ylim(bottom=0)
    fig.tight_layout()
    fig.savefig(out / "attention_density.png", dpi=130)

    fig, ax = plt.subplots(figsize=(5, 3.4))
    errorbar(ax, per_layer(layers, "head_mass"), "head mass (first T_h keys)")
    errorbar(ax, per_layer(layers, "tail_mass"), "tail mass (last T_t keys)")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass")
    ax.set_title("Head and tail mass per layer (dual sinks)")
    ax.set_ylim(0, 1.05)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "attention_sinks.png", dpi=130)
    written = ["attention_density.png", "attention_sinks.png"]

    rows_path = out / "attention_rows.csv"
    if rows_path.exists():
        with open(rows_path) as f:
            rows = [r for r in csv.DictReader(f) if r["sample"] == "0"]
        if rows:
            # p summed over heads per (layer, key position), divided by the heads: the mean row over heads.
            heads = defaultdict(set)
            mass = defaultdict(float)
            for r in rows:
                heads[int(r["layer"])].add(r["head"])
                mass[(int(r["layer"]), int(r["k_pos"]))] += float(r["p"])
            fig, ax = plt.subplots(figsize=(6, 3.4))
            for layer in sorted(heads):
                keys = sorted(k for (l, k) in mass if l == layer)
                ax.plot(keys, [mass[(layer, k)] / len(heads[layer]) for k in keys], marker=".", label=f"layer {layer}")
            ax.set_xlabel("key position")
            ax.set_ylabel("p (mean over heads)")
            ax.set_title("Recorded query row of sample 0, per layer")
            ax.legend(fontsize=7, ncol=2)
            fig.tight_layout()
            fig.savefig(out / "attention_readout.png", dpi=130)
            written.append("attention_readout.png")
    print("wrote " + ", ".join(str(out / w) for w in written))


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
