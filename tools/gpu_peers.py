#!/usr/bin/env python3
"""Peers of earn's GPU benchmark (bench/cuda/bench_cuda_llama.cu), same Llama-7B dimensions, random bf16 weights:

  hf     Hugging Face transformers `generate`, dense, beam 20, 4 new tokens (it expands every prompt to 20 beams
         before prefill, as its beam search does)
  eager  an eager PyTorch EARN a researcher would write: users batched, prefill once per user, layers >= k on the
         register rows only, then the caches repeated to 20 beams per user, 3 decode steps with log-softmax top-k
         beam selection and cache reordering (k = 32: the same code dense)

Times are wall-clock around the whole generation after torch.cuda.synchronize(), median of --reps after a warm-up.
Run by tools/gpu.sh on the GPU machine.
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def timed(fn, reps):
    fn()  # warm-up: cuBLAS heuristics, allocator
    ts = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append((time.perf_counter() - t) * 1e3)
    return sorted(ts)[len(ts) // 2]


def rotate(x, pos, inv_freq):
    """Hugging Face rotate_half RoPE; x [N, H, T, hd], pos [T] or [N, T]."""
    ang = pos[..., None].float() * inv_freq  # [.., T, hd/2]
    cos = torch.cat([ang.cos(), ang.cos()], -1).to(x.dtype)
    sin = torch.cat([ang.sin(), ang.sin()], -1).to(x.dtype)
    if cos.dim() == 2:
        cos, sin = cos[None, None], sin[None, None]
    else:
        cos, sin = cos[:, None], sin[:, None]
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


class EagerEarn:
    """EARN on a Hugging Face Llama's modules: [R_p; prompt; R_s], prompt rows dropped from layer k on."""

    def __init__(self, model, regs):
        self.m = model.model
        self.head = model.lm_head
        c = model.config
        self.H, self.hd = c.num_attention_heads, c.hidden_size // c.num_attention_heads
        # transformers 5 moved rope_theta into rope_parameters
        theta = getattr(c, "rope_theta", None) or (getattr(c, "rope_parameters", None) or {}).get("rope_theta", 1e4)
        self.inv_freq = 1.0 / (theta ** (torch.arange(0, self.hd, 2, device="cuda").float() / self.hd))
        self.regs = regs  # [2, dim]

    def attn_block(self, layer, x, pos, cache, causal):
        n, t, d = x.shape
        a = layer.self_attn
        h = layer.input_layernorm(x)
        q = a.q_proj(h).view(n, t, self.H, self.hd).transpose(1, 2)
        k = a.k_proj(h).view(n, t, self.H, self.hd).transpose(1, 2)
        v = a.v_proj(h).view(n, t, self.H, self.hd).transpose(1, 2)
        q, k = rotate(q, pos, self.inv_freq), rotate(k, pos, self.inv_freq)
        if cache is not None:
            k = torch.cat([cache[0], k], 2)
            v = torch.cat([cache[1], v], 2)
        o = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        x = x + a.o_proj(o.transpose(1, 2).reshape(n, t, d))
        mlp = layer.mlp
        h = layer.post_attention_layernorm(x)
        x = x + mlp.down_proj(F.silu(mlp.gate_proj(h)) * mlp.up_proj(h))
        return x, (k, v)

    @torch.inference_mode()
    def generate(self, ids, k, beam=20, new_tokens=4):
        B, P = ids.shape
        n = P + 2
        x = torch.cat([self.regs[0].expand(B, 1, -1), self.m.embed_tokens(ids), self.regs[1].expand(B, 1, -1)], 1)
        pos = torch.arange(n, device="cuda")
        caches = []
        for l, layer in enumerate(self.m.layers):
            if l == k:  # the prompt leaves the residual stream: registers only
                x, pos = x[:, [0, n - 1]], pos[[0, n - 1]]
            x, kv = self.attn_block(layer, x, pos, None, True)
            caches.append(kv)
        logits = self.head(self.m.norm(x[:, -1])).float()
        lp = F.log_softmax(logits, -1)
        scores, tok = lp.topk(beam, -1)  # [B, beam]
        scores, tok = scores.reshape(-1), tok.reshape(-1)
        caches = [(kk.repeat_interleave(beam, 0), vv.repeat_interleave(beam, 0)) for kk, vv in caches]
        V = logits.shape[-1]
        for g in range(new_tokens - 1):
            x = self.m.embed_tokens(tok)[:, None]
            p = torch.full((1,), n + g, device="cuda")
            new = []
            for layer, cache in zip(self.m.layers, caches):
                x, kv = self.attn_block(layer, x, p, cache, False)
                new.append(kv)
            lp = F.log_softmax(self.head(self.m.norm(x[:, -1])).float(), -1) + scores[:, None]
            s, idx = lp.view(B, beam * V).topk(beam, -1)
            parent = (idx // V + torch.arange(B, device="cuda")[:, None] * beam).reshape(-1)
            tok, scores = (idx % V).reshape(-1), s.reshape(-1)
            caches = [(kk.index_select(0, parent), vv.index_select(0, parent)) for kk, vv in new]
        return tok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hf-users", default="1,4")
    ap.add_argument("--eager-users", default="1,4,32")
    ap.add_argument("--prompts", default="256,512")
    a = ap.parse_args()
    from transformers import LlamaConfig, LlamaForCausalLM
    import transformers

    cfg = LlamaConfig(vocab_size=33024, hidden_size=4096, intermediate_size=11008, num_hidden_layers=a.layers,
                      num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=1024,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda"):
        model = LlamaForCausalLM(cfg)
    model.eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.cuda.get_device_name()}")
    regs = torch.randn(2, 1, cfg.hidden_size, device="cuda")
    eager = EagerEarn(model, regs)
    out = []
    prompts = [int(p) for p in a.prompts.split(",")]

    def record(peer, B, P, k, fn):
        try:
            ms = timed(fn, a.reps)
            print(f"{peer:6s} B={B:2d} P={P:3d} k={k:2d}  {ms:9.2f} ms", flush=True)
        except torch.OutOfMemoryError:
            ms = None
            print(f"{peer:6s} B={B:2d} P={P:3d} k={k:2d}  out of memory", flush=True)
        except Exception as e:  # keep the other peers' numbers
            ms = None
            print(f"{peer:6s} B={B:2d} P={P:3d} k={k:2d}  failed: {type(e).__name__}: {e}", flush=True)
        out.append({"peer": peer, "B": B, "P": P, "k": k, "ms": ms})
        torch.cuda.empty_cache()

    g = torch.Generator(device="cuda").manual_seed(3)
    for P in prompts:
        for B in [int(b) for b in a.hf_users.split(",") if b]:
            ids = torch.randint(0, cfg.vocab_size, (B, P), device="cuda", generator=g)

            def hf():
                with torch.inference_mode():
                    model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=20,
                                   max_new_tokens=4, min_new_tokens=4, do_sample=False, early_stopping=False)

            record("hf", B, P, a.layers, hf)
        for B in [int(b) for b in a.eager_users.split(",") if b]:
            ids = torch.randint(0, cfg.vocab_size, (B, P), device="cuda", generator=g)
            for k in (6, a.layers):
                if k == a.layers and B > 4:
                    continue  # dense eager repeats the whole prompt KV 20 times per user: > 80 GB at B = 32
                record("eager", B, P, k, lambda: eager.generate(ids, k))
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"card": torch.cuda.get_device_name(), "results": out}, f, indent=1)


if __name__ == "__main__":
    main()
