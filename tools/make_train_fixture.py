#!/usr/bin/env python3
"""Builds the PyTorch-autograd training fixtures under tests/fixtures/train/ (tests/test_train_parity.cpp reads them).

The reference a researcher would write by hand, independent of earn's code: a Llama decoder in plain torch (float64),
the EARN input [R_prefix; prompt; R_suffix; answer] with *explicit per-layer boolean masks* built here (layers < k
causal over every row; layers >= k: registers and answer rows see only registers and earlier answer rows), the
next-token loss on the answer's 4 code tokens only (mean over the batch's answer tokens), autograd gradients of
every parameter, then three steps of torch.optim.AdamW (parameter groups: weight decay 0.01 on matrices,
embeddings and the head, none on norms, biases and registers; torch.nn.utils.clip_grad_norm_ to 1.0 before each
step; learning rate 1e-2 * 0.5 * (1 + cos(pi * s / 10)) at step s = 0, 1, 2, i.e. transformers' cosine schedule
with no warm-up over 10 steps).

Samples: real Amazon Beauty training samples (every prefix of a user's training sequence predicts its next item,
history capped at 20), read here from ../shared/data/amazon-beauty directly, prompts in the code template of a
from-scratch model: [BOS=0, INSTRUCTION=1] items (4 code tokens each, id 4 + level*256 + code) separated by
[SEP=2], then [RESPONSE=3]; six samples with histories of 1 to 20 items.

Models (float64 here; the fixture stores float64):
    dense   Finetune: no registers, dense in every layer, untied head, rotate-half RoPE, MHA
    earn    EARN k = 1 of 4 (L/4), 1 prefix + 2 suffix registers, GQA (4 heads / 2 kv heads), q/k/v biases (Qwen2),
            tied embeddings, interleaved RoPE (llama2.c)
Each file holds init.<name>, grad.<name> (at init, on the six samples), step3.<name> (after three AdamW steps on
the six samples), with earn's tensor names (tok_embeddings, registers.prefix/suffix, layers.i.{attn_norm,wq,wk,wv,
bq,bk,bv,wo,ffn_norm,w1,w3,w2}, final_norm, lm_head), and __metadata__: the config, samples, loss at init and the
losses of the three steps.

Run (the committed fixtures): python3 tools/make_train_fixture.py --data ../shared/data/amazon-beauty \
    --out tests/fixtures/train    (CPU; torch 2.15.0, safetensors 0.8.0, Python 3.11; generate.log beside them)
"""

import argparse
import json
import math
import os

import torch
from safetensors.torch import save_file

BASE = 4  # code tokens start after BOS, INSTRUCTION, SEP, RESPONSE
VOCAB = BASE + 4 * 256


def load_samples(data_dir, want_lengths):
    """Every-prefix training samples of the first users, one per wanted history length."""
    with open(os.path.join(data_dir, "beauty.LCRec-1e-3lr.json")) as f:
        codes = json.load(f)
    def item_tokens(item):  # 1-based item of the txt files -> its 4 code token ids
        out = []
        for level, tok in enumerate(codes[str(item - 1)]):
            assert tok[1] == "abcd"[level]
            out.append(BASE + level * 256 + int(tok[3:-1]))
        return out
    picked = {}
    with open(os.path.join(data_dir, "sequential_train.txt")) as f:
        for line in f:
            ids = [int(x) for x in line.split()]
            items = ids[1:]
            for j in range(1, len(items)):
                hist = items[max(0, j - 20):j]
                if len(hist) in want_lengths and len(hist) not in picked:
                    picked[len(hist)] = (hist, items[j])
            if len(picked) == len(want_lengths):
                break
    samples = []
    for n in want_lengths:
        hist, nxt = picked[n]
        prompt = [0, 1]
        for i, it in enumerate(hist):
            if i > 0:
                prompt.append(2)
            prompt += item_tokens(it)
        prompt.append(3)
        samples.append({"prompt": prompt, "answer": item_tokens(nxt)})
    return samples


def rope(x, pos, theta, interleaved):
    """x [n, heads, hd] rotated by position; both conventions written out."""
    hd = x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    ang = pos[:, None].double() * inv[None, :]  # [n, hd/2]
    c, s = torch.cos(ang)[:, None, :], torch.sin(ang)[:, None, :]
    if interleaved:
        a, b = x[..., 0::2], x[..., 1::2]
        out = torch.empty_like(x)
        out[..., 0::2] = a * c - b * s
        out[..., 1::2] = a * s + b * c
        return out
    a, b = x[..., : hd // 2], x[..., hd // 2:]
    return torch.cat([a * c - b * s, a * s + b * c], dim=-1)


def rmsnorm(x, g, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * g


class Model(torch.nn.Module):
    def __init__(self, cfg, gen):
        super().__init__()
        self.cfg = cfg
        d, hid, nh, nkv = cfg["dim"], cfg["hidden_dim"], cfg["n_heads"], cfg["n_kv_heads"]
        hd = d // nh
        def u(*shape, fan_in, scale=1.5):
            return torch.nn.Parameter((torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1)
                                      * scale / math.sqrt(fan_in))
        def gain(n):
            return torch.nn.Parameter(1 + (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * 0.2)
        self.tok = torch.nn.Parameter(torch.randn(VOCAB, d, generator=gen, dtype=torch.float64))
        self.reg_p = torch.nn.Parameter(torch.randn(cfg["rp"], d, generator=gen, dtype=torch.float64))
        self.reg_s = torch.nn.Parameter(torch.randn(cfg["rs"], d, generator=gen, dtype=torch.float64))
        self.layers = torch.nn.ModuleList()
        for _ in range(cfg["n_layers"]):
            m = torch.nn.Module()
            m.attn_norm, m.ffn_norm = gain(d), gain(d)
            m.wq, m.wk, m.wv = u(nh * hd, d, fan_in=d), u(nkv * hd, d, fan_in=d), u(nkv * hd, d, fan_in=d)
            if cfg["bias"]:
                m.bq = torch.nn.Parameter(torch.randn(nh * hd, generator=gen, dtype=torch.float64) * 0.1)
                m.bk = torch.nn.Parameter(torch.randn(nkv * hd, generator=gen, dtype=torch.float64) * 0.1)
                m.bv = torch.nn.Parameter(torch.randn(nkv * hd, generator=gen, dtype=torch.float64) * 0.1)
            m.wo = u(d, nh * hd, fan_in=nh * hd)
            m.w1, m.w3, m.w2 = u(hid, d, fan_in=d), u(hid, d, fan_in=d), u(d, hid, fan_in=hid)
            self.layers.append(m)
        self.final_norm = gain(d)
        self.head = None if cfg["tied"] else u(VOCAB, d, fan_in=d)

    def named(self):
        """(earn name, parameter) in earn's order."""
        out = [("tok_embeddings", self.tok)]
        if self.cfg["rp"]:
            out.append(("registers.prefix", self.reg_p))
        if self.cfg["rs"]:
            out.append(("registers.suffix", self.reg_s))
        for i, m in enumerate(self.layers):
            p = f"layers.{i}."
            out += [(p + "attn_norm", m.attn_norm), (p + "wq", m.wq), (p + "wk", m.wk), (p + "wv", m.wv)]
            if self.cfg["bias"]:
                out += [(p + "bq", m.bq), (p + "bk", m.bk), (p + "bv", m.bv)]
            out += [(p + "wo", m.wo), (p + "ffn_norm", m.ffn_norm), (p + "w1", m.w1), (p + "w3", m.w3),
                    (p + "w2", m.w2)]
        out.append(("final_norm", self.final_norm))
        if self.head is not None:
            out.append(("lm_head", self.head))
        return out

    def sample_loss_terms(self, prompt, answer):
        """Sum of -log p over the answer's 4 tokens for one sample (rows computed densely, masks explicit)."""
        cfg = self.cfg
        rp, rs, k, L = cfg["rp"], cfg["rs"], cfg["k"], cfg["n_layers"]
        nh, nkv = cfg["n_heads"], cfg["n_kv_heads"]
        d = cfg["dim"]
        hd = d // nh
        fed = answer[:3]
        kinds = ["reg"] * rp + ["prompt"] * len(prompt) + ["reg"] * rs + ["ans"] * len(fed)
        n = len(kinds)
        x = torch.cat([self.reg_p, self.tok[torch.tensor(prompt)], self.reg_s, self.tok[torch.tensor(fed)]], 0)
        pos = torch.arange(n)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        late = causal.clone()
        for j, kind in enumerate(kinds):
            if kind == "prompt":
                late[:, j] = False  # prompt keys are gone from layer k on
        for i, kind in enumerate(kinds):
            if kind == "prompt":  # prompt queries of late layers are never read; let them see themselves only
                late[i, :] = False
                late[i, i] = True
        for l, m in enumerate(self.layers):
            mask = causal if l < k else late
            h = rmsnorm(x, m.attn_norm, cfg["eps"])
            q, kk, v = h @ m.wq.T, h @ m.wk.T, h @ m.wv.T
            if cfg["bias"]:
                q, kk, v = q + m.bq, kk + m.bk, v + m.bv
            q = rope(q.view(n, nh, hd), pos, cfg["theta"], cfg["interleaved"])
            kk = rope(kk.view(n, nkv, hd), pos, cfg["theta"], cfg["interleaved"])
            v = v.view(n, nkv, hd)
            rep = nh // nkv
            kk, v = kk.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            s = torch.einsum("ihd,jhd->hij", q, kk) / math.sqrt(hd)
            s = s.masked_fill(~mask[None], float("-inf"))
            att = torch.einsum("hij,jhd->ihd", torch.softmax(s, -1), v).reshape(n, nh * hd)
            x = x + att @ m.wo.T
            h2 = rmsnorm(x, m.ffn_norm, cfg["eps"])
            x = x + (torch.nn.functional.silu(h2 @ m.w1.T) * (h2 @ m.w3.T)) @ m.w2.T
        n_in = rp + len(prompt) + rs
        # The first answer token is predicted at the last input row that reaches the top layer.
        readout = n_in - 1
        if k < L:
            while kinds[readout] == "prompt":
                readout -= 1
        rows = [readout] + list(range(n_in, n))
        hf = rmsnorm(x[rows], self.final_norm, cfg["eps"])
        logits = hf @ (self.tok if self.head is None else self.head).T
        return torch.nn.functional.cross_entropy(logits, torch.tensor(answer), reduction="sum")

    def loss(self, samples):
        total = sum(self.sample_loss_terms(s["prompt"], s["answer"]) for s in samples)
        return total / (4 * len(samples))


def build(name, cfg, samples, out_dir, log):
    gen = torch.Generator().manual_seed(cfg["seed"])
    model = Model(cfg, gen)
    named = model.named()
    tensors = {f"init.{n}": p.detach().clone() for n, p in named}
    loss = model.loss(samples)
    loss.backward()
    for n, p in named:
        tensors[f"grad.{n}"] = p.grad.detach().clone()
    decay = [p for n, p in named if n.endswith(("wq", "wk", "wv", "wo", "w1", "w2", "w3")) or n in ("tok_embeddings", "lm_head")]
    no_decay = [p for n, p in named if not any(p is q for q in decay)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.999), eps=1e-8)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / 10)))
    step_losses = []
    for _ in range(3):
        opt.zero_grad()
        l = model.loss(samples)
        l.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        sched.step()
        step_losses.append(l.item())
    for n, p in named:
        tensors[f"step3.{n}"] = p.detach().clone()
    meta = {"config": json.dumps(cfg), "samples": json.dumps(samples), "loss": repr(loss.item()),
            "step_losses": json.dumps(step_losses), "torch": torch.__version__}
    path = os.path.join(out_dir, f"{name}.safetensors")
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=meta)
    log.write(f"{name}: loss {loss.item():.12f}, step losses {step_losses}, {len(named)} tensors -> {path}\n")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default="../shared/data/amazon-beauty")
    ap.add_argument("--out", default="tests/fixtures/train")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    samples = load_samples(a.data, [1, 2, 3, 5, 9, 20])
    common = dict(dim=16, hidden_dim=40, n_layers=4, eps=1e-5, theta=10000.0)
    configs = {
        "dense": dict(common, n_heads=4, n_kv_heads=4, rp=0, rs=0, k=4, bias=False, tied=False, interleaved=False,
                      seed=1),
        "earn": dict(common, n_heads=4, n_kv_heads=2, rp=1, rs=2, k=1, bias=True, tied=True, interleaved=True,
                     seed=2),
    }
    with open(os.path.join(a.out, "generate.log"), "w") as log:
        for name, cfg in configs.items():
            build(name, cfg, samples, a.out, log)
    print(open(os.path.join(a.out, "generate.log")).read())


if __name__ == "__main__":
    main()
