// bench_model: prefill and decode throughput of the dense CPU engine (earn::Engine<DenseSchedule, Cpu>) for
// stories260K's shape and a ~110M-parameter Llama, next to this machine's measured memory bandwidth (memcpy) and
// arithmetic peak (register-only FMAs), the two hardware ceilings bench/README.md compares against; and the linear
// layer (cpu::linear) beside Eigen's GEMM at the recommendation model's shapes.
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

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

// Memory bandwidth as decode sees it: a threaded fp32 GEMV over a 440 MB matrix (read once per iteration), in
// 4 KiB pages (range 0 = 0) or in the 2 MiB pages the CPU engine gives its weights (1: cpu::advise_huge_pages).
static void BM_Gemv_Stream(benchmark::State& state) {
  Matrix w = Matrix::Constant(32000 * 4, 860, 0.5f);
  Matrix x = Matrix::Constant(1, 860, 1.0f), y;
  if (state.range(0) != 0) cpu::advise_huge_pages({{w.data(), std::size_t(w.size()) * sizeof(float)}});
  for (auto _ : state) {
    cpu::linear(x, w, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["bytes/s"] = benchmark::Counter(double(w.size()) * 4, benchmark::Counter::kIsIterationInvariantRate);
}
BENCHMARK(BM_Gemv_Stream)->ArgName("huge")->Arg(0)->Arg(1)->Unit(benchmark::kMillisecond)->UseRealTime();

// Arithmetic ceiling: every thread runs 12 independent chains of fp32 FMAs on registers (no memory), 8 lanes wide
// (AVX2) and, where the build has AVX-512, 16 lanes wide (the width of gemm.hpp's tiles there). On Zen 4 a 512-bit FMA
// takes both 256-bit pipes, so the two should agree; where they differ, the higher is the floor to quote.
template <class V, class Set, class Fma, class Add>
static void fma_chains(benchmark::State& state, long steps, int lanes, Set set1, Fma fmadd, Add add) {
  int threads = 1;
  for (auto _ : state) {
#pragma omp parallel
    {
#ifdef _OPENMP
#pragma omp single
      threads = omp_get_num_threads();
#endif
      volatile float seed = 1.0f;
      V a[12];
      for (int i = 0; i < 12; ++i) a[i] = set1(seed + float(i));
      const V b = set1(0.9999999f), c = set1(1e-7f);
      for (long s = 0; s < steps; ++s) {
#define EARN_FMA(i) a[i] = fmadd(a[i], b, c);
        EARN_FMA(0) EARN_FMA(1) EARN_FMA(2) EARN_FMA(3) EARN_FMA(4) EARN_FMA(5)
        EARN_FMA(6) EARN_FMA(7) EARN_FMA(8) EARN_FMA(9) EARN_FMA(10) EARN_FMA(11)
#undef EARN_FMA
      }
      V sum = a[0];
      for (int i = 1; i < 12; ++i) sum = add(sum, a[i]);
      benchmark::DoNotOptimize(sum);
    }
  }
  state.counters["FLOP/s"] =
      benchmark::Counter(double(threads) * double(steps) * 12 * 2 * lanes, benchmark::Counter::kIsIterationInvariantRate);
}
static void BM_Fma_Peak(benchmark::State& state) {
#if defined(__AVX2__) && defined(__FMA__)
  fma_chains<__m256>(state, 1L << 22, 8, [](float v) { return _mm256_set1_ps(v); },
                     [](__m256 x, __m256 y, __m256 z) { return _mm256_fmadd_ps(x, y, z); },
                     [](__m256 x, __m256 y) { return _mm256_add_ps(x, y); });
#else
  state.SkipWithError("needs AVX2 + FMA");
#endif
}
BENCHMARK(BM_Fma_Peak)->Unit(benchmark::kMillisecond)->UseRealTime();
static void BM_Fma_Peak16(benchmark::State& state) {
#if defined(__AVX512F__)
  fma_chains<__m512>(state, 1L << 21, 16, [](float v) { return _mm512_set1_ps(v); },
                     [](__m512 x, __m512 y, __m512 z) { return _mm512_fmadd_ps(x, y, z); },
                     [](__m512 x, __m512 y) { return _mm512_add_ps(x, y); });
#else
  state.SkipWithError("needs AVX-512");
#endif
}
BENCHMARK(BM_Fma_Peak16)->Unit(benchmark::kMillisecond)->UseRealTime();

// One linear layer y = x w^T at the shapes of the recommendation loop's ~30M model (d 512, FFN 1408, vocab 8192):
// rows (range 0) x in (range 1) x out (range 2). cpu::linear (earn's tiled kernel, gemm.hpp) and, beside it, the
// same product as one Eigen expression (Eigen's GEMM / GEMV, what cpu::linear was before).
// cold: each iteration takes the next of enough distinct weight matrices to fill 96 MiB (three times a 32 MiB L3), so
// the weights come from memory as in the recommendation loop, where each layer's are evicted before they come round
// again; otherwise the same w every time (from cache when it fits).
static void linear_body(benchmark::State& state, bool eigen, bool cold = false) {
  Rng rng(1);
  const Index m = state.range(0), k = state.range(1), n = state.range(2);
  const Index pool = cold ? std::max<Index>(1, (Index{96} << 20) / (n * k * Index{sizeof(float)})) : 1;
  Matrix x(m, k), y;
  std::vector<Matrix> ws(static_cast<std::size_t>(pool), Matrix(n, k));
  for (Index i = 0; i < x.size(); ++i) x.data()[i] = rng.symmetric(1);
  for (Matrix& w : ws)
    for (Index i = 0; i < w.size(); ++i) w.data()[i] = rng.symmetric(1);
  std::size_t next = 0;
  for (auto _ : state) {
    const Matrix& w = ws[next];
    next = (next + 1) % ws.size();
    if (eigen)
      y.noalias() = x * w.transpose();
    else
      cpu::linear(x, w, y);
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["FLOP/s"] = benchmark::Counter(2.0 * double(m * k * n), benchmark::Counter::kIsIterationInvariantRate);
}
static void BM_Linear(benchmark::State& state) { linear_body(state, false); }
static void BM_Linear_Cold(benchmark::State& state) { linear_body(state, false, true); }
static void BM_Gemm_Eigen(benchmark::State& state) { linear_body(state, true); }
static void linear_shapes(benchmark::internal::Benchmark* b) {
  b->Args({1, 512, 1536})->Args({20, 512, 1536})->Args({160, 512, 1536})->Args({160, 1408, 512})
      ->Args({160, 512, 8192})->Args({432, 512, 2816})->Args({512, 768, 2048});
  b->Unit(benchmark::kMicrosecond)->UseRealTime();
}
BENCHMARK(BM_Linear)->Apply(linear_shapes);
BENCHMARK(BM_Linear_Cold)->Apply(linear_shapes);
BENCHMARK(BM_Gemm_Eigen)->Apply(linear_shapes);

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
// Decode of the checkpoint (prompt range 0) with its weights in 2 MiB pages (range 1 = 1: the engine's default,
// cpu::advise_huge_pages) or in 4 KiB pages (0: a copy of the weights, the engine built with EARN_HUGE_PAGES=0).
// Run with --benchmark_enable_random_interleaving=true and repetitions, so the two alternate in one process.
static void BM_Decode_Checkpoint_Pages(benchmark::State& state) {
  static const ModelWeights small_pages = *bench::checkpoint();  // fresh allocations, never advised
  if (state.range(1) != 0) return decode_body(state, *bench::checkpoint());
  const char* had = std::getenv("EARN_HUGE_PAGES");
  const std::string saved = had ? had : "";
  setenv("EARN_HUGE_PAGES", "0", 1);
  decode_body(state, small_pages);  // the engine is built (and reads the variable) before the timing starts
  if (had) setenv("EARN_HUGE_PAGES", saved.c_str(), 1);
  else unsetenv("EARN_HUGE_PAGES");
}
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
  benchmark::RegisterBenchmark("BM_Decode_Checkpoint_Pages", BM_Decode_Checkpoint_Pages)
      ->Args({16, 0})->Args({16, 1})->ArgNames({"P", "huge"})->Unit(benchmark::kMillisecond)->UseRealTime();
}

EARN_BENCH_MAIN(register_checkpoint)
