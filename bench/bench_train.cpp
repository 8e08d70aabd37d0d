// bench_train: training throughput of the CPU step (train::CpuStep: forward, backward and AdamW in fp32 with Eigen)
// for a recommendation model on the code-token vocabulary, dense (Finetune) and EARN k = L/4 (1 + 1 registers), over
// micro-batches of real Amazon Beauty training samples (every-prefix, histories of 1-20 items; seeded order) when
// ../shared/data is present, else synthetic samples of Beauty's length distribution. Beside it, this machine's Eigen
// GEMM rate at the step's largest product, the ceiling bench/README.md compares the step's GFLOP/s with.
//
// Counters: tokens/s (the samples' prompt + 4 answer tokens, as bench_cuda_train), GFLOP/s of the step's GEMMs and
// attention (3x the forward's, as bench_cuda_train counts them), rows (layer rows computed).
#include <benchmark/benchmark.h>

#include <filesystem>
#include <vector>

#include "common.hpp"
#include "earn/train/cpu_step.hpp"
#include "earn/train/data.hpp"

using namespace earn;

namespace {

// d 256, 4 layers, FFN 704, 4 heads: ~3.5M parameters, a model a 2-core machine trains in minutes per epoch.
ModelConfig cpu_rec_model() {
  ModelConfig c;
  c.dim = 256;
  c.hidden_dim = 704;
  c.n_layers = 4;
  c.n_heads = 4;
  c.n_kv_heads = 4;
  c.vocab_size = rec::ItemVocab(rec::CodeTemplate::kBaseVocab).size();
  c.max_seq_len = 256;
  c.tied_embeddings = false;
  return c;
}

struct Sample {
  std::vector<int> prompt, answer;
};

// 32 samples: real Beauty training samples in a seeded order, or synthetic ones (1-20 items of 4 codes).
const std::vector<Sample>& samples() {
  static const std::vector<Sample> s = [] {
    std::vector<Sample> out;
    const std::filesystem::path dir = std::filesystem::path(EARN_SHARED_DATA_DIR) / "amazon-beauty";
    const auto pb = rec::PromptBuilder::code_tokens();
    Rng rng(7);
    if (std::filesystem::exists(dir / "sequential_train.txt")) {
      const rec::Dataset ds = rec::Dataset::load(dir);
      const auto ex = train::make_examples(ds, pb, rec::DataSplit::kTrain);
      for (int i = 0; i < 32; ++i) {
        const auto& e = ex[train::uniform_below(rng, ex.size())];
        out.push_back({e.prompt, std::vector<int>(e.answer.begin(), e.answer.end())});
      }
    } else {
      for (int i = 0; i < 32; ++i) {
        Sample x;
        const int items = 1 + int(rng.next_u64() % 20);
        x.prompt = {0, 1};
        for (int j = 0; j < items; ++j) {
          if (j) x.prompt.push_back(2);
          for (int l = 0; l < 4; ++l) x.prompt.push_back(4 + l * 256 + int(rng.next_u64() % 256));
        }
        x.prompt.push_back(3);
        for (int l = 0; l < 4; ++l) x.answer.push_back(4 + l * 256 + int(rng.next_u64() % 256));
        out.push_back(x);
      }
    }
    return out;
  }();
  return s;
}

template <class Schedule>
void train_step(benchmark::State& state, Schedule sch, int rp, int rs) {
  const ModelConfig c = cpu_rec_model();
  train::CpuStep<Schedule> step(random_weights(c, {.seed = 1, .prefix_registers = rp, .suffix_registers = rs}), sch,
                                {});
  std::vector<plan::Sequence> seqs;
  std::vector<int> targets;
  double tokens = 0;
  for (const Sample& x : samples()) {
    seqs.push_back({x.prompt, std::span<const int>(x.answer).first(3)});
    targets.insert(targets.end(), x.answer.begin(), x.answer.end());
    tokens += double(x.prompt.size() + x.answer.size());
  }
  const auto fp = plan::plan_forward(sch, c.n_layers, rp, rs, std::span<const plan::Sequence>(seqs));
  const double d = c.dim, layer_params = 4 * d * d + 3 * d * c.hidden_dim;
  double flops = 0, rows = 0;
  for (int l = 0; l < c.n_layers; ++l) {
    const plan::RowSet& r = fp.layer_rows(l);
    rows += r.size();
    flops += 2.0 * r.size() * layer_params;
    for (int s = 0; s < r.segments(); ++s) flops += 4.0 * double(r.seg_n[s]) * r.seg_n[s] * d;
  }
  flops = 3.0 * (flops + 2.0 * double(targets.size()) * d * c.vocab_size);
  for (auto _ : state) {
    step.accumulate(seqs, targets, double(targets.size()));
    benchmark::DoNotOptimize(step.apply(1e-3).loss);
  }
  state.counters["tokens/s"] = benchmark::Counter(tokens, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["GFLOP/s"] = benchmark::Counter(flops / 1e9, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["rows"] = rows;
}

void BM_TrainStep_Dense(benchmark::State& state) { train_step(state, DenseSchedule{}, 0, 0); }
void BM_TrainStep_Earn(benchmark::State& state) { train_step(state, EarnSchedule{1}, 1, 1); }

// The ceiling: Eigen's fp32 GEMM at the step's largest product, [rows, 256] x [256, 704] (the MLP's).
void BM_Gemm_EigenTrainShape(benchmark::State& state) {
  Rng rng(1);
  const Index n = 1536, k = 256, m = 704;
  Matrix a(n, k), w(m, k), y;
  for (Index i = 0; i < a.size(); ++i) a.data()[i] = rng.symmetric(1.0f);
  for (Index i = 0; i < w.size(); ++i) w.data()[i] = rng.symmetric(1.0f);
  for (auto _ : state) {
    y.noalias() = a * w.transpose();
    benchmark::DoNotOptimize(y.data());
  }
  state.counters["GFLOP/s"] =
      benchmark::Counter(2.0 * double(n) * k * m / 1e9, benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK(BM_TrainStep_Dense)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_TrainStep_Earn)->Unit(benchmark::kMillisecond)->UseRealTime()->MinTime(2.0);
BENCHMARK(BM_Gemm_EigenTrainShape)->Unit(benchmark::kMillisecond)->UseRealTime();

BENCHMARK_MAIN();
