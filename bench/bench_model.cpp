// bench_model: prefill and decode throughput of the dense CPU engine (earn::Engine<DenseSchedule, Cpu>) for
// stories260K's shape and a ~110M-parameter Llama, next to this machine's measured memory bandwidth (memcpy) and
// GEMM rate (Eigen sgemm), the two hardware ceilings bench/README.md compares against.
#include <benchmark/benchmark.h>

#include <cstring>
#include <vector>

#include "common.hpp"

using namespace earn;

// Memory bandwidth: copy a 256 MiB buffer (bytes read + bytes written).
static void BM_Memcpy(benchmark::State& state) {
  const std::size_t n = std::size_t(256) << 20;
  std::vector<char> a(n, 1), b(n, 2);
  for (auto _ : state) {
    std::memcpy(b.data(), a.data(), n);
    benchmark::DoNotOptimize(b.data());
    benchmark::ClobberMemory();
  }
  state.counters["bytes/s"] = benchmark::Counter(2.0 * n, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Memcpy)->Unit(benchmark::kMillisecond)->UseRealTime();

// Memory bandwidth as decode sees it: a threaded fp32 GEMV over a 440 MB matrix (read once per iteration).
static void BM_Gemv_Stream(benchmark::State& state) {
  Matrix w = Matrix::Constant(32000 * 4, 860, 0.5f);
  Matrix x = Matrix::Constant(1, 860, 1.0f), y;
  for (auto _ : state) {
    cpu::linear(x, w, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["bytes/s"] = benchmark::Counter(double(w.size()) * 4, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Gemv_Stream)->Unit(benchmark::kMillisecond)->UseRealTime();

// GEMM rate: [512, 768] x [768, 2048] as one prefill projection of the 110M model.
static void BM_Gemm_Eigen(benchmark::State& state) {
  Rng rng(1);
  Matrix x(512, 768), w(2048, 768), y;
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = rng.symmetric(1);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = rng.symmetric(1);
  for (auto _ : state) {
    cpu::linear(x, w, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * 512 * 768 * 2048, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Gemm_Eigen)->Unit(benchmark::kMillisecond)->UseRealTime();

template <ModelConfig (*Cfg)()>
static const ModelWeights& model() {
  static const ModelWeights w = random_weights(Cfg(), {.seed = 7, .prefix_registers = 0, .suffix_registers = 0});
  return w;
}

// Prefill of P tokens (range 0) of model w.
static void prefill_body(benchmark::State& state, const ModelWeights& w) {
  Engine<DenseSchedule> e(w);
  const int P = int(state.range(0));
  const std::vector<int> prompt = bench::prompt_of(P, w.config.vocab_size);
  auto st = e.make_state({.max_prompt = P, .max_new_tokens = 1});
  for (auto _ : state) benchmark::DoNotOptimize(e.prefill(st, 0, prompt).data());
  state.counters["tokens/s"] = benchmark::Counter(P, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["FLOP/s"] =
      benchmark::Counter(P * bench::token_flops(w.config, P / 2.0), benchmark::Counter::kIsIterationInvariantRate);
}

// Decode one token of model w after a prompt of P tokens (range 0); the state is rewound every 64 steps.
static void decode_body(benchmark::State& state, const ModelWeights& w) {
  Engine<DenseSchedule> e(w);
  const int P = int(state.range(0));
  constexpr int kSteps = 64;
  bench::time_decode(state, e, bench::prompt_of(P, w.config.vocab_size), kSteps);
  state.counters["tokens/s"] = benchmark::Counter(1, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes/s"] =
      benchmark::Counter(bench::decode_bytes(w, P + kSteps / 2.0), benchmark::Counter::kIsIterationInvariantRate);
}

template <ModelConfig (*Cfg)()>
static void BM_Prefill(benchmark::State& state) {
  prefill_body(state, model<Cfg>());
}
BENCHMARK(BM_Prefill<bench::stories_260k>)->Arg(256)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Prefill<bench::llama_110m>)->Arg(128)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();

template <ModelConfig (*Cfg)()>
static void BM_Decode(benchmark::State& state) {
  decode_body(state, model<Cfg>());
}
BENCHMARK(BM_Decode<bench::stories_260k>)->Arg(16)->Unit(benchmark::kMillisecond)->UseRealTime();
BENCHMARK(BM_Decode<bench::llama_110m>)->Arg(16)->Arg(512)->Unit(benchmark::kMillisecond)->UseRealTime();

// The same prefill and decode for the --model checkpoint (registered only when one is given).
static void BM_Prefill_Checkpoint(benchmark::State& state) { prefill_body(state, *bench::checkpoint()); }
static void BM_Decode_Checkpoint(benchmark::State& state) { decode_body(state, *bench::checkpoint()); }
static void register_checkpoint() {
  if (!bench::checkpoint()) return;
  const int ctx = bench::checkpoint()->config.max_seq_len;
  auto* p = benchmark::RegisterBenchmark("BM_Prefill_Checkpoint", BM_Prefill_Checkpoint);
  for (int P : {128, 512})
    if (P <= ctx) p->Arg(P);
  p->Unit(benchmark::kMillisecond)->UseRealTime();
  auto* d = benchmark::RegisterBenchmark("BM_Decode_Checkpoint", BM_Decode_Checkpoint);
  for (int P : {16, 512})
    if (P + 64 <= ctx) d->Arg(P);
  d->Unit(benchmark::kMillisecond)->UseRealTime();
}

EARN_BENCH_MAIN(register_checkpoint)
