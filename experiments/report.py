#!/usr/bin/python3
"""experiments/report.py - the accuracy grid's table and figures from the files experiments/grid.sh wrote.

    experiments/report.py --runs out/runs-*.tar.gz --speed out/speed.tar.gz   # collect, then table and figures
    experiments/report.py --baselines out/runs-baselines-*.tar.gz --speed-baselines out/speed-baselines.tar.gz
    experiments/report.py --gist out/runs-gist-*.tar.gz --speed-gist out/speed-gist.tar.gz
    experiments/report.py                                                     # table and figures from results/

Collecting writes experiments/results/runs.csv (one row per run: setting, seed, best validation NDCG@10 and its step,
test Recall / NDCG@{5,10,20}), valid_curves.csv (every validation of every run) and speed.csv (bench_cuda_llama:
prefill / decode ms and KV bytes per setting, shape, users, prompt length). The table (table.md) gives mean and
sample standard deviation over seeds, the KV per user after prefill and the speed-ups over Finetune; the figures
(accuracy_vs_k.png, accuracy_vs_cost.png) carry one-standard-deviation error bars. The baselines (grid.sh baselines)
go to baselines.csv (test metrics of every press on every Finetune seed) and speed_baselines.csv, and table.md gains
their section; Gist's runs (grid.sh gist) go to gist.csv and a section of their own.
"""
import argparse
import csv
import io
import json
import math
import statistics
import tarfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RES = HERE / "results"
L = 8  # layers of the grid's model

# name -> (label, k, r_p, r_s); k = L for Finetune (dense, no registers)
SETTINGS = {
    "finetune": ("Finetune", L, 0, 0),
    "earn-k1": ("EARN k=1", 1, 1, 1),
    "earn-k2": ("EARN k=2 (L/4)", 2, 1, 1),
    "earn-k4": ("EARN k=4 (L/2)", 4, 1, 1),
    "earn-k6": ("EARN k=6 (3L/4)", 6, 1, 1),
    "earn-k2-r0+1": ("EARN k=2, 0+1", 2, 0, 1),
    "earn-k2-r1+0": ("EARN k=2, 1+0", 2, 1, 0),
    "earn-k2-r2+2": ("EARN k=2, 2+2", 2, 2, 2),
    "earn-k2-r3+3": ("EARN k=2, 3+3", 2, 3, 3),
}
METRICS = ["recall@5", "recall@10", "recall@20", "ndcg@5", "ndcg@10", "ndcg@20"]
# The paper's Table 1, Beauty, LC-Rec on Llama-7B (k = 4 of 32, 1 + 1 registers).
PAPER = {"Finetune": {"recall@10": 0.0145, "recall@20": 0.0225, "ndcg@10": 0.0084, "ndcg@20": 0.0108},
         "EARN": {"recall@10": 0.0167, "recall@20": 0.0265, "ndcg@10": 0.0095, "ndcg@20": 0.0124}}
# Speed settings: the grid model at B users / prompt P, and Llama-7B dims; the k of each setting per shape.
SPEED_K = {"small": {"finetune": -1, "earn-k1": 1, "earn-k2": 2, "earn-k4": 4, "earn-k6": 6},
           "llama7b": {"finetune": -1, "earn-k1": 4, "earn-k2": 8, "earn-k4": 16, "earn-k6": 24}}
SPEED_AT = {"small": (256, 80), "llama7b": (32, 512)}


def setting_regs(name):
    _, _, rp, rs = SETTINGS[name]
    return f"{rp}+{rs}"


def collect_runs(tars):
    runs, curves = [], []
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                parts = Path(m.name).parts
                if len(parts) != 2:
                    continue
                run, fname = parts
                name, seed = run.rsplit("-s", 1)
                if fname == "result.json":
                    r = json.load(tf.extractfile(m))
                    row = {"setting": name, "seed": int(seed), "k": r["k"], "r_p": r["registers"][0],
                           "r_s": r["registers"][1], "params": r["params"], "steps": r["steps"],
                           "best_step": r["best_step"], "valid_ndcg@10": r["best_valid_ndcg@10"]}
                    row.update({m_: r["test"][m_] for m_ in METRICS})
                    runs.append(row)
                elif fname == "train_log.csv":
                    for x in csv.DictReader(io.TextIOWrapper(tf.extractfile(m))):
                        if x["valid_metric"]:
                            curves.append({"setting": name, "seed": int(seed), "step": int(x["step"]),
                                           "epoch": int(x["epoch"]), "loss": float(x["loss"]),
                                           "valid_ndcg@10": float(x["valid_metric"])})
    runs = list({(r["setting"], r["seed"]): r for r in reversed(runs)}.values())  # a run packed twice counts once
    curves = list({(r["setting"], r["seed"], r["step"]): r for r in reversed(curves)}.values())
    runs.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), r["seed"]))
    curves.sort(key=lambda r: (list(SETTINGS).index(r["setting"]), r["seed"], r["step"]))
    write_csv(RES / "runs.csv", runs)
    write_csv(RES / "valid_curves.csv", curves)


def speed_results(tar):
    """(the name's parts after "speed-", its JSON, one result) for every result of every bench_cuda_llama JSON in tar."""
    with tarfile.open(tar) as tf:
        for m in tf.getmembers():
            if m.name.endswith(".json"):
                j = json.load(tf.extractfile(m))
                for x in j["results"]:
                    yield Path(m.name).stem.split("-", 2)[1:], j, x


def collect_speed(tar):
    rows = []
    for (shape, regs), j, x in speed_results(tar):  # speed-<shape>-<finetune|rA+B>
        rows.append({"shape": shape, "layers": j["layers"], "dim": j["dim"], "r_p": j["prefix_registers"],
                     "r_s": j["suffix_registers"], "B": x["B"], "P": x["P"], "k": x["k"],
                     "prefill_ms": x["prefill_ms"], "decode_ms": x["decode_ms"],
                     "kv_prefill_bytes": x["kv_prefill_bytes"], "prefill_floor_ms": x["prefill_floor_ms"],
                     "decode_floor_ms": x["decode_floor_ms"], "card": j["card"]})
    rows.sort(key=lambda r: (r["shape"], r["B"], r["P"], r["r_p"], r["r_s"], r["k"]))
    write_csv(RES / "speed.csv", rows)


BASELINES = {"finetune": "Finetune (dense, full KV)", "streaming_llm": "StreamingLLM", "snapkv": "SnapKV",
             "h2o": "H2O", "pyramidkv": "PyramidKV", "truncate": "Truncation (last k/L of the items)"}


def results(tars):
    """(setting, seed, result.json) of every run packed in the tarballs (<setting>-s<seed>/result.json)."""
    for t in tars:
        with tarfile.open(t) as tf:
            for m in tf.getmembers():
                parts = Path(m.name).parts
                if len(parts) == 2 and parts[1] == "result.json":
                    name, seed = parts[0].rsplit("-s", 1)
                    yield name, int(seed), json.load(tf.extractfile(m))


def collect_baselines(tars):
    rows = []
    for _, seed, r in results(tars):
        match = r.get("press_match", {})
        for method, metrics in [("finetune", r["test"])] + list(r.get("test_press", {}).items()):
            row = {"method": method, "seed": seed, "match_k": match.get("k"), "match_registers": match.get("registers")}
            row.update({m_: metrics[m_] for m_ in METRICS})
            rows.append(row)
    rows.sort(key=lambda r: (list(BASELINES).index(r["method"]), r["seed"]))
    write_csv(RES / "baselines.csv", rows)


def collect_speed_baselines(tar):
    rows = []
    for (shape, _), j, x in speed_results(tar):  # speed-<shape>-baselines
        rows.append({"shape": shape, "layers": j["layers"], "schedule": x["schedule"], "B": x["B"], "P": x["P"],
                     "prefill_ms": x["prefill_ms"], "decode_ms": x["decode_ms"],
                     "kv_prefill_bytes": x["kv_prefill_bytes"], "prefill_floor_ms": x["prefill_floor_ms"],
                     "decode_floor_ms": x["decode_floor_ms"], "card": j["card"]})
    write_csv(RES / "speed_baselines.csv", rows)


def baselines_section(stats_earn, n_earn, speed, ref):
    """table.md's section on the inference-time baselines at EARN's KV, from baselines.csv and speed_baselines.csv."""
    rows = read_csv(RES / "baselines.csv")
    sp = read_csv(RES / "speed_baselines.csv") if (RES / "speed_baselines.csv").exists() else []
    by = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)
    st = {n: {m: mean_sd([r[m] for r in rs]) for m in METRICS} for n, rs in by.items()}
    k, regs = rows[0]["match_k"], rows[0]["match_registers"]

    def sp_of(shape, sched):
        B, P = SPEED_AT[shape]
        for r in sp:
            if (r["shape"], r["schedule"], int(r["B"]), int(r["P"])) == (shape, sched, B, P):
                return float(r["prefill_ms"]), float(r["decode_ms"]), float(r["kv_prefill_bytes"]) / B
        return None

    cols = ["recall@10", "ndcg@10", "recall@20", "ndcg@20"]
    out = ["| method | seeds | " + " | ".join(c.replace("recall", "R").replace("ndcg", "N") for c in cols) +
           " | N@10 vs EARN | KV/user (model) | prefill x | decode x | KV/user 7B | prefill x 7B | decode x 7B |",
           "|---" * (2 + len(cols) + 7) + "|"]

    # EARN at the KV the presses match: k = 2 of 8 at the grid's shape, k = 4 of 32 (the grid's "earn-k1" speed row,
    # k scaled by k / L... = 4) at Llama-7B dims.
    earn_at = {"small": "earn-k2", "llama7b": "earn-k1"}

    def cells_speed(sched, earn=False):
        c = []
        for shape in ("small", "llama7b"):
            s = speed_of(speed, shape, earn_at[shape]) if earn else sp_of(shape, sched)
            # Each ratio against the Finetune row of its own call: the grid's speed call for EARN, this one's else.
            r0 = ref.get(shape) if earn else sp_of(shape, "dense")
            c += [f"{s[2] / 1024:.0f} KiB", f"{r0[0] / s[0]:.2f}", f"{r0[1] / s[1]:.2f}"] if s and r0 else ["-"] * 3
        return c

    e_mu, e_sd = stats_earn["ndcg@10"] if stats_earn else (float("nan"), float("nan"))
    for n in BASELINES:
        if n not in st:
            continue
        cells = [BASELINES[n], str(len(by[n]))] + [f"{st[n][m][0]:.4f} ± {st[n][m][1]:.4f}" for m in cols]
        mu, sd = st[n]["ndcg@10"]
        se = math.sqrt(sd * sd / len(by[n]) + e_sd * e_sd / n_earn) if n_earn else float("nan")
        cells.append(f"{mu - e_mu:+.4f} ± {se:.4f}")
        cells += cells_speed(n if n != "finetune" else "dense")
        out.append("| " + " | ".join(cells) + " |")
    if stats_earn:
        cells = [f"EARN k = {k}, 1 + 1 (trained; grid; 7B: k = 4 of 32)", str(n_earn)]
        cells += [f"{stats_earn[m][0]:.4f} ± {stats_earn[m][1]:.4f}" for m in cols] + ["0"]
        cells += cells_speed(None, earn=True)
        out.append("| " + " | ".join(cells) + " |")
    (B1, P1), (B2, P2) = SPEED_AT["small"], SPEED_AT["llama7b"]
    return ["## Inference-time baselines at EARN's KV", "",
            f"The Finetune models trained again with the grid's recipe and seeds, each tested as it is and under every "
            f"press (kv/press.hpp) with Budget::matching_earn(k = {k}, L = {L}, {regs} registers): every layer keeps "
            f"{regs} + floor(P k / L) rows of a P-row prompt, at most the rows EARN caches (k (P + r) + (L - k) r over "
            f"its layers). Truncation keeps the last ceil(k / L x items) items of each history. Speed: the same presses "
            f"on random weights at the grid model's shape ({B1} users, prompt {P1}; budgets of k = {k} of 8) and at "
            f"Llama-7B dims ({B2} users, prompt {P2}; k = 4 of 32), speed-ups over Finetune measured in the same call; "
            f"EARN's row from the grid's speed table. N@10 vs EARN: difference of means ± its standard error.", ""] + out + [""]


GIST = {"gist-r1+1": ("Gist, 1 + 1 registers", 1, 1), "gist-r0+20": ("Gist, 0 + 20 (gist tokens after the prompt)", 0, 20)}


def collect_gist(tars):
    """gist.csv: test metrics of every Gist run (grid.sh gist)."""
    rows = []
    for name, seed, r in results(tars):
        row = {"setting": name, "seed": seed, "r_p": r["registers"][0], "r_s": r["registers"][1], "steps": r["steps"],
               "best_step": r["best_step"], "valid_ndcg@10": r["best_valid_ndcg@10"]}
        row.update({m_: r["test"][m_] for m_ in METRICS})
        rows.append(row)
    rows.sort(key=lambda r: (list(GIST).index(r["setting"]), r["seed"]))
    write_csv(RES / "gist.csv", rows)


def collect_speed_gist(tar):
    """gist_speed.csv: Gist, EARN and Finetune on the CUDA engine (grid.sh speed-gist), one row per schedule."""
    rows = []
    for (shape, regs), j, x in speed_results(tar):  # speed-<shape>-gist_<finetune|rA+B>
        rows.append({"shape": shape, "registers": regs.split("_", 1)[1], "schedule": x["schedule"], "k": x["k"],
                     "B": x["B"], "P": x["P"], "prefill_ms": x["prefill_ms"], "decode_ms": x["decode_ms"],
                     "kv_prefill_bytes": x["kv_prefill_bytes"], "prefill_floor_ms": x["prefill_floor_ms"],
                     "decode_floor_ms": x["decode_floor_ms"], "card": j["card"]})
    rows.sort(key=lambda r: (r["shape"], r["registers"], r["schedule"]))
    write_csv(RES / "gist_speed.csv", rows)


def gist_section(stats, by):
    """table.md's section on Gist against Finetune and EARN k = 2, from gist.csv, with the KV rows each caches."""
    rows = read_csv(RES / "gist.csv")
    g_by = {}
    for r in rows:
        g_by.setdefault(r["setting"], []).append(r)
    cols = ["recall@10", "ndcg@10", "recall@20", "ndcg@20"]
    P = 80  # a full 20-item history in the code template
    sp = read_csv(RES / "gist_speed.csv") if (RES / "gist_speed.csv").exists() else []

    def speed_cells(regs, sched):
        """prefill x, decode x, total x over the Finetune row of the same call, at both shapes."""
        c = []
        for shape in ("small", "llama7b"):
            s = [r for r in sp if (r["shape"], r["registers"], r["schedule"]) == (shape, regs, sched)]
            f = [r for r in sp if (r["shape"], r["registers"], r["schedule"]) == (shape, "finetune", "dense")]
            if s and f:
                s, f = s[0], f[0]
                ps, ds, pf, df = (float(s["prefill_ms"]), float(s["decode_ms"]), float(f["prefill_ms"]),
                                  float(f["decode_ms"]))
                c += [f"{pf / ps:.2f}", f"{df / ds:.2f}", f"{(pf + df) / (ps + ds):.2f}"]
            else:
                c += ["-"] * 3
        return c

    out = ["| method | seeds | " + " | ".join(c.replace("recall", "R").replace("ndcg", "N") for c in cols) +
           f" | N@10 vs EARN | KV rows / user at P = {P} | prefill x | decode x | total x | prefill x 7B | "
           "decode x 7B | total x 7B |", "|---" * (2 + len(cols) + 8) + "|"]
    e = stats.get("earn-k2")
    ne = len(by.get("earn-k2", []))

    def line(label, st, n, kv, speed, vs_earn=True):
        cells = [label, str(n)] + [f"{st[m][0]:.4f} ± {st[m][1]:.4f}" for m in cols]
        if e and vs_earn:
            (mu, sd), (emu, esd) = st["ndcg@10"], e["ndcg@10"]
            cells.append(f"{mu - emu:+.4f} ± {math.sqrt(sd * sd / n + esd * esd / ne):.4f}")
        else:
            cells.append("0" if e else "-")
        cells.append(str(kv))
        return "| " + " | ".join(cells + speed) + " |"

    if "finetune" in stats:
        out.append(line("Finetune", stats["finetune"], len(by["finetune"]), L * P, speed_cells("finetune", "dense")))
    for n, (label, rp, rs) in GIST.items():
        if n in g_by:
            st = {m: mean_sd([r[m] for r in g_by[n]]) for m in METRICS}
            out.append(line(label, st, len(g_by[n]), L * (rp + rs), speed_cells(f"r{rp}+{rs}", "gist")))
    if e:
        out.append(line("EARN k = 2, 1 + 1 (7B: k = 8 of 32)", e, ne, 2 * (P + 2) + (L - 2) * 2,
                        speed_cells("r1+1", "earn"), vs_earn=False))
    return ["## Gist: trained prompt compression from layer 0", "",
            "Gist models (attention/gist.hpp: every layer computes the prompt; the generated rows, in training and in "
            "decoding, see only the registers, whose rows alone are cached) trained with the grid's recipe and seeds "
            "(`grid.sh gist`), tested like every grid run. KV rows per user over the 8 layers after prefill of a "
            f"{P}-token prompt (each row 2 x 512 bf16 values: 2 KiB): Finetune L P, Gist L r, EARN k (P + r) + (L - k) r. "
            "N@10 vs EARN: difference of means ± its standard error. Speed-ups over Finetune on the CUDA engine "
            "(bench_cuda_llama, random weights, beam 20, 4 new tokens, medians of 5; `grid.sh speed-gist`): the grid's "
            "model at 256 users, prompt 80, and Llama-7B dims at 32 users, prompt 512; each Finetune row from the same "
            "call.", ""] + out + [""]


def write_csv(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    print(f"wrote {path.relative_to(HERE.parent)} ({len(rows)} rows)")


def read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def mean_sd(xs):
    xs = [float(x) for x in xs]
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else float("nan"))


def speed_of(speed, shape, name):
    """prefill ms, decode ms, KV bytes per user after prefill for setting `name` at the shape's reference B, P."""
    _, k, rp, rs = SETTINGS[name]
    kk = -1 if name == "finetune" else SPEED_K[shape].get(name, SPEED_K[shape]["earn-k2"])
    B, P = SPEED_AT[shape]
    for r in speed:
        if (r["shape"], int(r["B"]), int(r["P"]), int(r["k"]), int(r["r_p"]), int(r["r_s"])) == (shape, B, P, kk, rp, rs):
            return float(r["prefill_ms"]), float(r["decode_ms"]), float(r["kv_prefill_bytes"]) / B
    return None


def verdict(d, se):
    """A directional claim "A above B" from d = mean(A) - mean(B) and its standard error."""
    if d > 2 * se:
        return "reproduced (> 2 standard errors)"
    if d >= 0:
        return "same direction, within noise (< 2 standard errors)"
    if d >= -2 * se:
        return "opposite direction, within noise (< 2 standard errors)"
    return "not reproduced (opposite, > 2 standard errors)"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=[])
    ap.add_argument("--speed")
    ap.add_argument("--baselines", nargs="*", default=[])
    ap.add_argument("--speed-baselines")
    ap.add_argument("--gist", nargs="*", default=[])
    ap.add_argument("--speed-gist")
    a = ap.parse_args()
    if a.gist:
        collect_gist(a.gist)
    if a.speed_gist:
        collect_speed_gist(a.speed_gist)
    if a.runs:
        collect_runs(a.runs)
    if a.speed:
        collect_speed(a.speed)
    if a.baselines:
        collect_baselines(a.baselines)
    if a.speed_baselines:
        collect_speed_baselines(a.speed_baselines)
    runs = read_csv(RES / "runs.csv")
    speed = read_csv(RES / "speed.csv") if (RES / "speed.csv").exists() else []
    by = {}
    for r in runs:
        by.setdefault(r["setting"], []).append(r)
    stats = {n: {m: mean_sd([r[m] for r in rs]) for m in METRICS + ["valid_ndcg@10"]} for n, rs in by.items()}

    out = ["| setting | k | regs | seeds | " + " | ".join(m.replace("recall", "R").replace("ndcg", "N") for m in METRICS)
           + " | KV/user (model) | KV cut | prefill x | decode x | KV cut 7B | prefill x 7B | decode x 7B |",
           "|---" * (4 + len(METRICS) + 6) + "|"]
    ref = {s: speed_of(speed, s, "finetune") for s in SPEED_AT}
    for n in SETTINGS:
        if n not in by:
            continue
        label, k, rp, rs = SETTINGS[n]
        cells = [label, str(k), f"{rp}+{rs}", str(len(by[n]))]
        cells += [f"{stats[n][m][0]:.4f} ± {stats[n][m][1]:.4f}" for m in METRICS]
        for shape in ("small", "llama7b"):
            s, r0 = speed_of(speed, shape, n), ref[shape]
            if s and r0:
                if shape == "small":
                    cells.append(f"{s[2] / 1024:.0f} KiB")
                cells += [f"{100 * (1 - s[2] / r0[2]):.1f} %", f"{r0[0] / s[0]:.2f}", f"{r0[1] / s[1]:.2f}"]
            else:
                cells += ["-"] * (4 if shape == "small" else 3)
        out.append("| " + " | ".join(cells) + " |")
    (B1, P1), (B2, P2) = SPEED_AT["small"], SPEED_AT["llama7b"]
    card = speed[0]["card"] if speed else "?"
    text = ["# Finetune vs EARN on Amazon Beauty (from scratch, d 512, 8 layers, 26.75M parameters)", "",
            f"Test metrics of the best-validation checkpoint, mean ± sample standard deviation over seeds. KV per user "
            f"after prefill and speed-ups over Finetune measured on the CUDA engine ({card}), beam 20, 4 new tokens: "
            f"the grid's model at {B1} users, prompt {P1}; Llama-7B dims (32 layers; k scaled by k/L) at {B2} users, "
            f"prompt {P2}. The register ablations at Llama-7B dims use k = 8.", ""] + out + [""]

    # The paper's claims against the grid.
    def diff(a_, b_, m):
        (ma, sa), (mb, sb) = stats[a_][m], stats[b_][m]
        na, nb = len(by[a_]), len(by[b_])
        return ma - mb, math.sqrt(sa * sa / na + sb * sb / nb)

    claims = []
    if "finetune" in stats:
        r10 = stats["finetune"]["recall@10"]
        claims.append(("Finetune from scratch reaches the paper's LC-Rec Llama-7B Finetune (Recall@10 >= 0.0145) "
                       "with <= 100M parameters", "reproduced" if r10[0] >= 0.0145 else "not reproduced",
                       f"Recall@10 {r10[0]:.4f} ± {r10[1]:.4f} against 0.0145 ({100 * (r10[0] / 0.0145 - 1):+.1f} %)"))
    if "finetune" in stats and "earn-k2" in stats:
        for m in ("recall@10", "recall@20", "ndcg@10", "ndcg@20"):
            d, se = diff("earn-k2", "finetune", m)
            pd = PAPER["EARN"][m] - PAPER["Finetune"][m]
            base = stats["finetune"][m][0]
            claims.append((f"EARN (k = L/4, 1 + 1) above Finetune: {m}", verdict(d, se),
                           f"EARN − Finetune {d:+.4f} ± {se:.4f} ({100 * d / base:+.1f} %; EARN not worse than "
                           f"{100 * (d - 2 * se) / base:+.1f} % at 2 standard errors); paper {pd:+.4f} "
                           f"({100 * pd / PAPER['Finetune'][m]:+.1f} %)"))
    if "earn-k1" in stats and "earn-k2" in stats:
        d, se = diff("earn-k2", "earn-k1", "ndcg@10")
        claims.append(("Accuracy falls when k < L/4 (k = 1 below k = 2): NDCG@10", verdict(d, se),
                       f"k=2 − k=1 {d:+.4f} ± {se:.4f}"))
    for many in ("earn-k2-r2+2", "earn-k2-r3+3"):
        if many in stats and "earn-k2" in stats:
            d, se = diff("earn-k2", many, "ndcg@10")
            claims.append((f"More registers lower accuracy ({setting_regs(many)} below 1+1): NDCG@10", verdict(d, se),
                           f"1+1 − {setting_regs(many)} {d:+.4f} ± {se:.4f}"))
    if "earn-k2-r0+1" in stats and "earn-k2-r1+0" in stats:
        d, se = diff("earn-k2-r0+1", "earn-k2-r1+0", "ndcg@10")
        claims.append(("A suffix register matters more than a prefix one (0+1 above 1+0): NDCG@10", verdict(d, se),
                       f"0+1 − 1+0 {d:+.4f} ± {se:.4f}"))
    s7, r7 = speed_of(speed, "llama7b", "earn-k1"), ref["llama7b"]
    if s7 and r7:
        cut = 100 * (1 - s7[2] / r7[2])
        spd = (r7[0] + r7[1]) / (s7[0] + s7[1])
        claims.append(("KV cut 80.5 % and speed-up 3.79x at Llama-7B, k = 4 of 32", "see numbers",
                       f"KV after prefill −{cut:.1f} %; prefill + decode {spd:.2f}x (prefill {r7[0] / s7[0]:.2f}x, "
                       f"decode {r7[1] / s7[1]:.2f}x) at {B2} users, prompt {P2}"))
    text += ["## The paper's claims", "",
             "Differences of means ± their standard error (sqrt(s_a^2 / n_a + s_b^2 / n_b)); a claim is reproduced "
             "when the difference has the paper's sign and exceeds 2 standard errors.", "",
             "| claim | verdict | measured |", "|---|---|---|"]
    text += [f"| {c} | {v} | {m} |" for c, v, m in claims]
    if (RES / "baselines.csv").exists():
        text += [""] + baselines_section(stats.get("earn-k2"), len(by.get("earn-k2", [])), speed, ref)
    if (RES / "gist.csv").exists():
        text += [""] + gist_section(stats, by)
    (RES / "table.md").write_text("\n".join(text) + "\n")
    print(f"wrote experiments/results/table.md")
    figures(by, stats, speed, ref)


def figures(by, stats, speed, ref):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    ks = [n for n in ("earn-k1", "earn-k2", "earn-k4", "earn-k6") if n in stats]
    for ax, m in zip(axes, ("recall@10", "ndcg@10")):
        x = [SETTINGS[n][1] for n in ks]
        ax.errorbar(x, [stats[n][m][0] for n in ks], yerr=[stats[n][m][1] for n in ks], marker="o", capsize=4,
                    label="EARN 1+1")
        if "finetune" in stats:
            mu, sd = stats["finetune"][m]
            ax.axhline(mu, color="k", ls="--", label="Finetune (dense)")
            ax.axhspan(mu - sd, mu + sd, color="k", alpha=0.1)
        for n, mk in (("earn-k2-r0+1", "v"), ("earn-k2-r1+0", "^"), ("earn-k2-r2+2", "s"), ("earn-k2-r3+3", "D")):
            if n in stats:
                ax.errorbar([2.1], [stats[n][m][0]], yerr=[stats[n][m][1]], marker=mk, ls="none", capsize=3,
                            label=f"k=2, {setting_regs(n)}")
        ax.set_xlabel("split layer k (of 8)")
        ax.set_ylabel(f"test {m}")
        ax.set_xticks([1, 2, 4, 6, 8])
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Amazon Beauty, mean ± sd over seeds ({len(by.get('finetune', []))} per setting)")
    fig.tight_layout()
    fig.savefig(RES / "accuracy_vs_k.png", dpi=120)
    print("wrote experiments/results/accuracy_vs_k.png")

    if not speed:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for n in SETTINGS:
        if n not in stats:
            continue
        s, r0 = speed_of(speed, "small", n), ref["small"]
        if not (s and r0):
            continue
        mu, sd = stats[n]["ndcg@10"]
        axes[0].errorbar([(r0[0] + r0[1]) / (s[0] + s[1])], [mu], yerr=[sd], marker="o", capsize=3, label=SETTINGS[n][0])
        axes[1].errorbar([100 * (1 - s[2] / r0[2])], [mu], yerr=[sd], marker="o", capsize=3, label=SETTINGS[n][0])
    # Gist (gist.csv, gist_speed.csv): its speed-up over the Finetune row of its own speed call.
    g_rows = read_csv(RES / "gist.csv") if (RES / "gist.csv").exists() else []
    g_speed = read_csv(RES / "gist_speed.csv") if (RES / "gist_speed.csv").exists() else []
    for n, (label, rp, rs) in GIST.items():
        mine = [float(r["ndcg@10"]) for r in g_rows if r["setting"] == n]
        sp = {(r["registers"], r["schedule"]): r for r in g_speed if r["shape"] == "small"}
        s, f = sp.get((f"r{rp}+{rs}", "gist")), sp.get(("finetune", "dense"))
        if len(mine) < 2 or not (s and f):
            continue
        mu, sd = mean_sd(mine)
        x = (float(f["prefill_ms"]) + float(f["decode_ms"])) / (float(s["prefill_ms"]) + float(s["decode_ms"]))
        cut = 100 * (1 - float(s["kv_prefill_bytes"]) / float(f["kv_prefill_bytes"]))
        color = "k" if rs > 1 else "#17becf"  # colours no grid setting uses (it takes the cycle up to olive)
        axes[0].errorbar([x], [mu], yerr=[sd], marker="x", capsize=3, color=color, label=label)
        axes[1].errorbar([cut], [mu], yerr=[sd], marker="x", capsize=3, color=color, label=label)
    B, P = SPEED_AT["small"]
    axes[0].set_xlabel(f"speed-up over Finetune (prefill + 3 decode steps, {B} users, prompt {P})")
    axes[1].set_xlabel("KV cache cut after prefill (%)")
    for ax in axes:
        ax.set_ylabel("test NDCG@10")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RES / "accuracy_vs_cost.png", dpi=120)
    print("wrote experiments/results/accuracy_vs_cost.png")


if __name__ == "__main__":
    main()
