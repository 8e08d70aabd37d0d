// bench/common.hpp - model configurations and counters shared by earn's CPU benchmarks.
#pragma once

#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "earn/earn.hpp"
#include "../examples/model_source.hpp"

namespace earn::bench {

/// A ~110M-parameter Llama (stories110M's shape), shared with the examples.
inline ModelConfig llama_110m() { return examples::llama_110m(); }

/// stories260K's shape (the real model is used when ../shared is present; its timing equals a random one's).
inline ModelConfig stories_260k() {
  ModelConfig c;
  c.dim = 64;
  c.hidden_dim = 172;
  c.n_layers = 5;
  c.n_heads = 8;
  c.n_kv_heads = 4;
  c.vocab_size = 512;
  c.max_seq_len = 4096;
  c.rope_style = RopeStyle::kInterleaved;
  return c;
}

/// Bytes one decode step must read: every weight once (the head once when tied) plus the KV rows attended.
inline double decode_bytes(const ModelWeights& w, double kv_rows_per_layer) {
  const ModelConfig& c = w.config;
  const double weights = double(w.parameter_count() - w.registers.prefix.size() - w.registers.suffix.size()) * 4.0;
  return weights + kv_rows_per_layer * c.n_layers * 2.0 * c.kv_dim() * 4.0;
}

/// FLOPs of one token through the model's matrix products (2 per multiply-add), attention over `ctx` keys included.
inline double token_flops(const ModelConfig& c, double ctx) {
  const double d = c.dim, h = c.hidden_dim, kv = c.kv_dim();
  const double per_layer = 2.0 * (d * d + 2 * d * kv + d * d + 3 * d * h) + 4.0 * ctx * d;
  return c.n_layers * per_layer + 2.0 * d * c.vocab_size;
}

}  // namespace earn::bench
