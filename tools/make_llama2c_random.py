#!/usr/bin/python3
"""tools/make_llama2c_random.py - a random llama2.c checkpoint (run.c's format, shared classifier) of a named shape,
for speed comparisons with llama2.c and llama.cpp that need no downloaded weights.

    tools/make_llama2c_random.py stories15M /tmp/s15.bin     # dim 288, 6 layers, 6 heads, FFN 768, vocab 32000
    tools/make_llama2c_random.py stories110M /tmp/s110.bin   # dim 768, 12 layers, 12 heads, FFN 2048
    tools/make_llama2c_random.py --dim 512 --layers 8 --heads 8 --hidden 1408 --vocab 1028 --seq 256 out.bin

Weights N(0, 0.02) from a seed, norms 1; the header's positive vocab size says the classifier is the embedding.
"""
import argparse
import struct

import numpy as np

SHAPES = {  # dim, hidden, layers, heads, kv heads, vocab, seq_len (karpathy/tinyllamas)
    "stories15M": (288, 768, 6, 6, 6, 32000, 256),
    "stories42M": (512, 1376, 8, 8, 8, 32000, 1024),
    "stories110M": (768, 2048, 12, 12, 12, 32000, 1024),
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("shape", nargs="?", choices=sorted(SHAPES))
    ap.add_argument("out")
    ap.add_argument("--dim", type=int)
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    dim, hidden, layers, heads, kv_heads, vocab, seq = SHAPES[a.shape] if a.shape else (0,) * 7
    dim, hidden, layers = a.dim or dim, a.hidden or hidden, a.layers or layers
    heads = a.heads or heads
    kv_heads = a.heads or kv_heads
    vocab, seq = a.vocab or vocab, a.seq or seq
    if min(dim, hidden, layers, heads, vocab, seq) <= 0 or dim % heads:
        ap.error("give a shape or every dimension (dim divisible by heads)")
    rng = np.random.default_rng(a.seed)
    hd = dim // heads
    kv_dim = kv_heads * hd

    def normal(*shape):
        return (rng.standard_normal(shape, dtype=np.float32) * 0.02).astype("<f4")

    with open(a.out, "wb") as f:
        f.write(struct.pack("<7i", dim, hidden, layers, heads, kv_heads, vocab, seq))
        f.write(normal(vocab, dim).tobytes())
        f.write(np.ones((layers, dim), "<f4").tobytes())  # rms_att
        f.write(normal(layers, dim, dim).tobytes())  # wq
        f.write(normal(layers, kv_dim, dim).tobytes())  # wk
        f.write(normal(layers, kv_dim, dim).tobytes())  # wv
        f.write(normal(layers, dim, dim).tobytes())  # wo
        f.write(np.ones((layers, dim), "<f4").tobytes())  # rms_ffn
        f.write(normal(layers, hidden, dim).tobytes())  # w1
        f.write(normal(layers, dim, hidden).tobytes())  # w2
        f.write(normal(layers, hidden, dim).tobytes())  # w3
        f.write(np.ones(dim, "<f4").tobytes())  # rms_final
        f.write(np.zeros((seq, hd // 2), "<f4").tobytes())  # freq_cis_real (unused by run.c)
        f.write(np.zeros((seq, hd // 2), "<f4").tobytes())  # freq_cis_imag
    print(f"wrote {a.out}: dim {dim}, FFN {hidden}, {layers} layers, {heads} heads, vocab {vocab}, seq {seq}")


if __name__ == "__main__":
    main()
