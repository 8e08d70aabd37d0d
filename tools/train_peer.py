#!/usr/bin/env python3
"""The training peer a researcher would otherwise write: the same models, samples and EARN masks as
bench/cuda/bench_cuda_train.cu in PyTorch, eager and torch.compile, bf16 autocast over fp32 parameters,
torch.optim.AdamW(fused=True), global-norm clipping at 1.0.

Samples: Amazon Beauty every-prefix training samples, in the same seeded order as the C++ benchmark (splitmix64
Fisher-Yates with seed 7 over the samples in the dataset's order), batches of 128, prompts in the code template
([BOS, INSTRUCTION] items separated by SEP, [RESPONSE]; item tokens 4 + level * 256 + code). Each batch is laid out
[R_p; prompt; R_s; answer[:3]] per sample and right-padded to one fixed length (the longest sample of all batches,
so torch.compile sees one shape); attention is F.scaled_dot_product_attention with a boolean mask per layer:
layers < k causal over the sample's rows, layers >= k causal over registers and answer rows only (prompt and pad
queries see themselves, their outputs are never read). Every row is computed in every layer, as a mask-based
implementation does. The loss is the cross-entropy of the answer's 4 tokens at the readout row and the 3 fed rows.
tokens/s counts the samples' own tokens (prompt + 4 answer tokens), as the C++ benchmark does.

    python3 tools/train_peer.py --data DIR [--json out.json] [--models small,large] [--steps 20] [--warmup 5]
"""

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

BASE = 4
VOCAB = BASE + 4 * 256
MODELS = {
    "small": dict(dim=512, hidden=1408, layers=8, heads=8),
    "large": dict(dim=1024, hidden=2816, layers=24, heads=16),
}
MASK64 = (1 << 64) - 1


class SplitMix64:
    """earn::Rng (core/tensor.hpp)."""

    def __init__(self, seed):
        self.s = seed & MASK64

    def next(self):
        self.s = (self.s + 0x9E3779B97F4A7C15) & MASK64
        z = self.s
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        return z ^ (z >> 31)


def load_batches(data_dir, batch, n_batches):
    with open(os.path.join(data_dir, "beauty.LCRec-1e-3lr.json")) as f:
        codes = json.load(f)

    def toks(item):  # 1-based item -> 4 code tokens
        return [BASE + lvl * 256 + int(t[3:-1]) for lvl, t in enumerate(codes[str(item - 1)])]

    samples = []
    with open(os.path.join(data_dir, "sequential_train.txt")) as f:
        for line in f:
            items = [int(x) for x in line.split()][1:]
            for j in range(1, len(items)):
                samples.append((items[max(0, j - 20):j], items[j]))
    order = list(range(len(samples)))
    rng = SplitMix64(7)
    for i in range(len(order) - 1, 0, -1):
        j = rng.next() % (i + 1)
        order[i], order[j] = order[j], order[i]
    out = []
    for b in range(n_batches):
        cur = []
        for j in range(batch):
            hist, nxt = samples[order[b * batch + j]]
            prompt = [0, 1]
            for i, it in enumerate(hist):
                if i:
                    prompt.append(2)
                prompt += toks(it)
            prompt.append(3)
            cur.append((prompt, toks(nxt)))
        out.append(cur)
    return out


def rope_tables(n, hd, theta=10000.0, device="cuda"):
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, device=device, dtype=torch.float32) / hd)
    ang = torch.arange(n, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cos(ang), torch.sin(ang)


def rope(x, cos, sin):  # x [B, H, L, hd], rotate-half
    hd = x.shape[-1]
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)


class Model(torch.nn.Module):
    def __init__(self, dim, hidden, layers, heads, regs):
        super().__init__()
        self.dim, self.heads, self.hd = dim, heads, dim // heads
        self.emb = torch.nn.Embedding(VOCAB, dim)
        self.regs = torch.nn.Parameter(torch.randn(max(regs, 1), dim) * 0.02) if regs else None
        self.blocks = torch.nn.ModuleList()
        for _ in range(layers):
            b = torch.nn.Module()
            b.n1 = torch.nn.RMSNorm(dim, eps=1e-5)
            b.qkv = torch.nn.Linear(dim, 3 * dim, bias=False)
            b.o = torch.nn.Linear(dim, dim, bias=False)
            b.n2 = torch.nn.RMSNorm(dim, eps=1e-5)
            b.w13 = torch.nn.Linear(dim, 2 * hidden, bias=False)
            b.w2 = torch.nn.Linear(hidden, dim, bias=False)
            self.blocks.append(b)
        self.norm = torch.nn.RMSNorm(dim, eps=1e-5)
        self.head = torch.nn.Linear(dim, VOCAB, bias=False)

    def forward(self, ids, reg_idx, masks, layer_mask, readout_idx, targets, cos, sin):
        x = self.emb(ids)
        if self.regs is not None:  # register rows replace their placeholder ids
            x = torch.where((reg_idx >= 0)[..., None], self.regs[reg_idx.clamp(min=0)], x)
        B, L, _ = x.shape
        for i, b in enumerate(self.blocks):
            h = b.n1(x)
            q, k, v = b.qkv(h).view(B, L, 3, self.heads, self.hd).permute(2, 0, 3, 1, 4)
            q, k = rope(q, cos, sin), rope(k, cos, sin)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=masks[layer_mask[i]])
            x = x + b.o(a.transpose(1, 2).reshape(B, L, self.dim))
            gu = b.w13(b.n2(x))
            g, u = gu.chunk(2, dim=-1)
            x = x + b.w2(F.silu(g) * u)
        rows = x.reshape(B * L, self.dim)[readout_idx]  # [B * 4, dim]: the readout row and the 3 fed rows
        logits = self.head(self.norm(rows)).float()
        return F.cross_entropy(logits, targets)


def make_inputs(batch, L, rp, rs, k, n_layers, device):
    B = len(batch)
    ids = torch.zeros(B, L, dtype=torch.long)
    reg = torch.full((B, L), -1, dtype=torch.long)
    kind = torch.full((B, L), 3, dtype=torch.long)  # 0 reg, 1 prompt, 2 answer, 3 pad
    readout, targets = [], []
    for s, (prompt, ans) in enumerate(batch):
        row = []
        for r in range(rp):
            reg[s, len(row)] = r
            kind[s, len(row)] = 0
            row.append(0)
        for t in prompt:
            kind[s, len(row)] = 1
            row.append(t)
        for r in range(rs):
            reg[s, len(row)] = rp + r
            kind[s, len(row)] = 0
            row.append(0)
        n_in = len(row)
        for t in ans[:3]:
            kind[s, len(row)] = 2
            row.append(t)
        ids[s, : len(row)] = torch.tensor(row)
        first = n_in - 1
        if k < n_layers and rp + rs:
            while kind[s, first] == 1:
                first -= 1
        readout += [s * L + first] + [s * L + n_in + j for j in range(3)]
        targets += ans
    causal = torch.tril(torch.ones(L, L, dtype=torch.bool))
    real = kind != 3
    dense = causal[None] & real[:, None, :]
    late = dense & (kind != 1)[:, None, :]
    eye = torch.eye(L, dtype=torch.bool)[None]
    dense = dense | eye  # pad queries see themselves (their output is never read)
    late = late | (eye & (kind == 1)[:, :, None]) | eye & (~real)[:, :, None]
    masks = torch.stack([dense, late])[:, :, None].to(device)  # [2, B, 1, L, L]
    layer_mask = [0 if l < k else 1 for l in range(n_layers)]
    return (ids.to(device), reg.to(device), masks, layer_mask, torch.tensor(readout, device=device),
            torch.tensor(targets, device=device))


def run(name, schedule, compiled, batches, L, warmup, steps):
    cfg = MODELS[name]
    n_layers = cfg["layers"]
    k = n_layers // 4 if schedule == "earn" else n_layers
    rp = rs = 1 if schedule == "earn" else 0
    torch.manual_seed(1)
    model = Model(cfg["dim"], cfg["hidden"], n_layers, cfg["heads"], rp + rs).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=True)
    cos, sin = rope_tables(L, cfg["dim"] // cfg["heads"])
    fwd = torch.compile(model) if compiled else model
    inputs = [make_inputs(b, L, rp, rs, k, n_layers, "cuda") for b in batches]
    times, tokens, losses = [], [], []
    for s in range(warmup + steps):
        b = s % len(batches)
        ids, reg, masks, lm, ro, tg = inputs[b]
        e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        e0.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = fwd(ids, reg, masks, lm, ro, tg, cos, sin)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        e1.record()
        torch.cuda.synchronize()
        losses.append(loss.item())
        if s >= warmup:
            times.append(e0.elapsed_time(e1))
            tokens.append(sum(len(p) + len(a) for p, a in batches[b]))
    ms = statistics.median(times)
    tok = sum(tokens) / len(tokens)
    params = sum(p.numel() for p in model.parameters())
    return dict(model=name, schedule=schedule, k=k, peer="torch.compile" if compiled else "eager", params=params,
                ms_per_step=ms, tokens_per_step=tok, tokens_per_s=tok / (ms * 1e-3), padded_len=L,
                loss_first=losses[0], loss_last=losses[-1], torch=torch.__version__,
                gpu=torch.cuda.get_device_name())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--json")
    ap.add_argument("--models", default="small,large")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--batch", type=int, default=128)
    a = ap.parse_args()
    batches = load_batches(a.data, a.batch, 8)
    L = max(len(p) + 2 + 3 for b in batches for p, _ in b)  # registers and fed answer rows included
    L = (L + 7) // 8 * 8
    res = []
    for name in a.models.split(","):
        for schedule in ("dense", "earn"):
            for compiled in (False, True):
                r = run(name, schedule, compiled, batches, L, a.warmup, a.steps)
                res.append(r)
                print(f"{r['model']:6s} {r['schedule']:6s} {r['peer']:14s} {r['ms_per_step']:9.2f} ms "
                      f"{r['tokens_per_s']:12.0f} tokens/s  loss {r['loss_first']:.3f}->{r['loss_last']:.3f}",
                      flush=True)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
