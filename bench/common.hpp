// bench/common.hpp - model configurations and counters shared by earn's CPU benchmarks.
#pragma once

#include <benchmark/benchmark.h>

#include <cstdio>
#include <cstring>
#include <exception>
#include <optional>
#include <string>
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

/// Matrix-product FLOPs of `rows` rows through one layer whose attention scores are [rows, keys] (the CPU engine
/// computes the full score block and masks it, so `keys` is all cached keys; 0 leaves attention out).
inline double layer_flops(const ModelConfig& c, double rows, double keys) {
  const double d = c.dim, qd = double(c.n_heads) * c.head_dim(), kv = c.kv_dim(), h = c.hidden_dim;
  return rows * 2.0 * (d * qd + 2 * d * kv + qd * d + 3 * d * h) + 4.0 * rows * keys * qd;
}

/// A deterministic prompt of P tokens spread over the vocabulary.
inline std::vector<int> prompt_of(int P, int vocab) {
  std::vector<int> prompt(P);
  for (int i = 0; i < P; ++i) prompt[i] = (i * 7919) % vocab;
  return prompt;
}

/// Times one single-row decode step per iteration after prefilling `prompt`; every `steps` tokens the state is
/// rewound to the end of the prompt outside the timed region, so the attended context stays in [P, P + steps).
template <class EngineT>
void time_decode(benchmark::State& state, const EngineT& e, const std::vector<int>& prompt, int steps) {
  auto st = e.make_state({.max_prompt = int(prompt.size()), .max_new_tokens = steps});
  e.prefill(st, 0, prompt);
  const int rows[1] = {0};
  st.set_rows(rows);
  int tok[1] = {3};
  for (auto _ : state) {
    if (st.gen_len() == steps) {
      state.PauseTiming();
      st.set_rows(rows);
      state.ResumeTiming();
    }
    tok[0] = argmax(e.decode(st, tok).row(0));
  }
}

/// `--model PATH` (or --model=PATH) given to a CPU benchmark: a Hugging Face directory or a llama2.c .bin. Empty when
/// absent. parse_model_flag removes it from argv before Google Benchmark reads its own flags.
inline std::string& model_flag() {
  static std::string path;
  return path;
}
inline void parse_model_flag(int& argc, char** argv) {
  int out = 1;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--model" && i + 1 < argc) {
      model_flag() = argv[++i];
    } else if (a.rfind("--model=", 0) == 0) {
      model_flag() = a.substr(8);
    } else {
      argv[out++] = argv[i];
    }
  }
  argc = out;
}

/// The --model checkpoint, loaded once (with random 1 + 1 registers when it has none, so EARN schedules are
/// defined: timings and KV sizes are then meaningful, its recommendations are not); nullptr without --model.
inline const ModelWeights* checkpoint() {
  static const std::optional<ModelWeights> w = []() -> std::optional<ModelWeights> {
    if (model_flag().empty()) return std::nullopt;
    examples::ModelSource src;
    src.path = model_flag();
    ModelWeights m = src.load(1, 1);
    std::fprintf(stderr, "model: %s, %.2fM parameters\n", src.description().c_str(), m.parameter_count() / 1e6);
    return m;
  }();
  return w ? &*w : nullptr;
}

}  // namespace earn::bench

/// main() of earn's CPU benchmarks: --model PATH is theirs (see checkpoint()), the rest is Google Benchmark's; a
/// checkpoint that does not load is an error message and exit 1. `register_extra` adds benchmarks at run time
/// (those of the checkpoint).
#define EARN_BENCH_MAIN(register_extra)                                              \
  int main(int argc, char** argv) {                                                  \
    earn::bench::parse_model_flag(argc, argv);                                       \
    try {                                                                            \
      if (!earn::bench::model_flag().empty()) (void)earn::bench::checkpoint();       \
      register_extra();                                                              \
    } catch (const std::exception& e) {                                              \
      std::fprintf(stderr, "error: %s\n", e.what());                                \
      return 1;                                                                      \
    }                                                                                \
    benchmark::Initialize(&argc, argv);                                              \
    if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;                \
    benchmark::RunSpecifiedBenchmarks();                                             \
    benchmark::Shutdown();                                                           \
    return 0;                                                                        \
  }
