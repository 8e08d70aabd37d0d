// bench_earn: prefill and decode of the CPU engine, dense (k = L) against EARN at several split layers k, for
// prompts P in {128, 512, 2048}. Each run reports the FLOPs (prefill) or bytes (decode) the cost model predicts for
// its k, so tools/bench_table.py can put predicted and measured speedups side by side (bench/README.md).
//
// Model: the examples' CPU-sized random Llama (d 512, 8 layers, FFN 1408, vocab 8192), r_p = r_s = 1.
#include <benchmark/benchmark.h>

#include <vector>

#include "../examples/model_source.hpp"
#include "common.hpp"

using namespace earn;

namespace {

const ModelWeights& model() {
  static const ModelWeights w = random_weights(examples::cpu_sized_llama(), {.seed = 7});
  return w;
}

using bench::layer_flops;

// Predicted prefill FLOPs for split layer k: early layers over the whole input, late layers over the registers.
double prefill_flops(const ModelWeights& w, int k, int P) {
  const ModelConfig& c = w.config;
  const double r = w.registers.count(), n = P + r;
  return k * layer_flops(c, n, n) + (c.n_layers - k) * layer_flops(c, r, r) + 2.0 * c.dim * c.vocab_size;
}

// Bytes prefill must move at least once: every weight, plus the K/V rows it writes.
double prefill_bytes(const ModelWeights& w, int k, int P) {
  const ModelConfig& c = w.config;
  const double r = w.registers.count(), n = P + r;
  return bench::decode_bytes(w, 0) + (k * n + (c.n_layers - k) * r) * 2.0 * c.kv_dim() * 4.0;
}

// Predicted decode bytes per token at split layer k: all weights + the KV rows each layer reads.
double decode_bytes(const ModelWeights& w, int k, int P, double g) {
  const ModelConfig& c = w.config;
  const double r = w.registers.count(), n = P + r;
  const double rows = k * (n + g) + (c.n_layers - k) * (r + g);
  return bench::decode_bytes(w, 0) + rows * 2.0 * c.kv_dim() * 4.0;
}

void BM_Prefill_Earn(benchmark::State& state) {
  const ModelWeights& w = model();
  const int P = int(state.range(0)), k = int(state.range(1));
  Engine<EarnSchedule> e(w, EarnSchedule{k});
  const std::vector<int> prompt = bench::prompt_of(P, w.config.vocab_size);
  auto st = e.make_state({.max_prompt = P, .max_new_tokens = 1});
  for (auto _ : state) benchmark::DoNotOptimize(e.prefill(st, 0, prompt).data());
  state.counters["pred_flop"] = prefill_flops(w, k, P);
  state.counters["pred_bytes"] = prefill_bytes(w, k, P);
  state.counters["FLOP/s"] = benchmark::Counter(prefill_flops(w, k, P), benchmark::Counter::kIsIterationInvariantRate);
  state.counters["kv_bytes"] = double(st.kv_bytes());
}

void BM_Decode_Earn(benchmark::State& state) {
  const ModelWeights& w = model();
  const int P = int(state.range(0)), k = int(state.range(1));
  constexpr int kSteps = 32;
  Engine<EarnSchedule> e(w, EarnSchedule{k});
  bench::time_decode(state, e, bench::prompt_of(P, w.config.vocab_size), kSteps);
  const double keys = P + w.registers.count() + kSteps / 2.0;
  state.counters["pred_flop"] = k * layer_flops(w.config, 1, keys) + (w.config.n_layers - k) *
                                layer_flops(w.config, 1, w.registers.count() + kSteps / 2.0) +
                                2.0 * w.config.dim * w.config.vocab_size;
  state.counters["pred_bytes"] = decode_bytes(w, k, P, kSteps / 2.0);
  state.counters["bytes/s"] =
      benchmark::Counter(decode_bytes(w, k, P, kSteps / 2.0), benchmark::Counter::kIsIterationInvariantRate);
}

void grid(benchmark::internal::Benchmark* b) {
  for (int P : {128, 512, 2048})
    for (int k : {0, 2, 4, 8}) b->Args({P, k});  // k = 8 = L: dense
  b->Unit(benchmark::kMillisecond)->UseRealTime();
}

}  // namespace

BENCHMARK(BM_Prefill_Earn)->Apply(grid);
BENCHMARK(BM_Decode_Earn)->Apply(grid);
BENCHMARK_MAIN();
