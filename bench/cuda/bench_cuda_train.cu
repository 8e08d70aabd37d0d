// bench/cuda/bench_cuda_train.cu - training throughput of earn's CUDA step (bf16 GEMM operands, fp32 master weights
// and AdamW state) on real Amazon Beauty samples: from-scratch recommendation models on the code-token vocabulary
// (4 template ids + 1024 codes), batches of 128 every-prefix training samples (histories of 1-20 items) drawn in a
// seeded order, dense (Finetune: no registers) and EARN k = L/4 (1 + 1 registers). Per setting: ms per optimizer
// step (forward + backward + AdamW; median over timed steps, each timed by CUDA events around its launches and the
// step's one synchronisation), tokens/s (the samples' own tokens: prompt + 4 answer tokens, the same count as the
// PyTorch peer tools/train_peer.py), rows computed over all layers, the FLOPs the step's GEMMs and attention need,
// and MFU against the bf16 GEMM rate measured on this card in the same run.
//
//   bench_cuda_train --data DIR [--json out.json] [--models small,large] [--batch 128] [--steps 20] [--warmup 8]
//                    [--tc 1] [--profile 0]
// --profile 1: also time each phase of the step with CUDA events (and the host's time in accumulate / apply).
// The 8 batches cycle; the warm-up (8 by default) sees each once, so timed steps replay the CUDA graph of their shape
// (training runs for thousands of steps over a few dozen shapes).
// small: d 512, 8 layers, 8 heads, FFN 1408 (~27M parameters); large: d 1024, 24 layers, 16 heads, FFN 2816 (~305M).
#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "common.cuh"
#include "earn/backend/cuda/train_step.cuh"
#include "earn/cuda.cuh"
#include "earn/rec/dataset.hpp"
#include "earn/rec/prompt.hpp"

using namespace earn;

namespace {

ModelConfig model(const std::string& name) {
  ModelConfig c;
  const bool large = name == "large";
  c.dim = large ? 1024 : 512;
  c.hidden_dim = large ? 2816 : 1408;
  c.n_layers = large ? 24 : 8;
  c.n_heads = large ? 16 : 8;
  c.n_kv_heads = c.n_heads;
  c.vocab_size = rec::ItemVocab(rec::CodeTemplate::kBaseVocab).size();
  c.max_seq_len = 256;
  c.tied_embeddings = false;
  return c;
}

struct Sample {
  std::vector<int> prompt;
  std::vector<int> answer;
};

struct Outcome {
  std::string model, schedule;
  int k = 0;
  double params = 0, ms = 0, tokens = 0, rows = 0, flops = 0, loss0 = 0, loss1 = 0;
  std::vector<std::pair<std::string, double>> phases;  // --profile: ms per step by phase
};

// FLOPs of one step over `batch`: forward + backward = 3x the forward's 2 x rows x parameters of every layer's GEMMs,
// the classifier on the answer rows, attention's Q K^T and P V over each segment's visible pairs (counted as
// 4 n^2 d per layer and segment, causal masks not discounted).
template <class Schedule>
double step_flops(const ModelConfig& c, const Schedule& sch, int rp, int rs, std::span<const plan::Sequence> seqs) {
  const auto fp = plan::plan_forward(sch, c.n_layers, rp, rs, seqs);
  const double d = c.dim, qd = double(c.n_heads) * c.head_dim(), kvd = c.kv_dim();
  const double layer_params = d * (qd + 2 * kvd) + qd * d + 3 * d * c.hidden_dim;
  double f = 0;
  for (int l = 0; l < c.n_layers; ++l) {
    const plan::RowSet& r = fp.layer_rows(l);
    f += 2.0 * r.size() * layer_params;
    for (int s = 0; s < r.segments(); ++s) f += 4.0 * double(r.seg_n[s]) * r.seg_n[s] * qd;
  }
  f += 2.0 * fp.all_answer_rows().size() * d * c.vocab_size;
  return 3.0 * f;
}

template <class Schedule>
Outcome run(const std::string& name, const Schedule& sch, int rp, int rs, const std::vector<std::vector<Sample>>& batches,
            int warmup, int steps, bool tc, bool profile) {
  const ModelConfig c = model(name);
  const ModelWeights w = random_weights(c, {.seed = 1, .prefix_registers = rp, .suffix_registers = rs});
  train::CudaStep<Schedule, dtype::Bf16> step(w, sch, {});
  step.use_tensor_core_attention(tc);
  Outcome o;
  o.model = name;
  o.params = double(w.parameter_count());
  const train::LrSchedule lr{.lr = 1e-3, .warmup_ratio = 0.02, .total_steps = warmup + steps};
  std::vector<float> ms;
  bench::Timer t;
  // As the trainer runs a step: launch the prepared micro-batch, prepare the next one while the GPU works, apply.
  struct Prepared {
    std::vector<plan::Sequence> seqs;
    std::vector<int> targets;
    double tokens = 0;
  };
  auto make = [&](int s) {
    Prepared p;
    for (const Sample& x : batches[std::size_t(s) % batches.size()]) {
      p.seqs.push_back({x.prompt, std::span<const int>(x.answer).first(3)});
      p.targets.insert(p.targets.end(), x.answer.begin(), x.answer.end());
      p.tokens += double(x.prompt.size() + x.answer.size());
    }
    return p;
  };
  Prepared cur = make(0), next;
  step.prepare(cur.seqs, cur.targets, double(cur.targets.size()));
  for (int s = 0; s < warmup + steps; ++s) {
    if (profile && s == warmup) step.set_profiling(true);
    t.start(step.stream());
    step.accumulate();
    const long long rows = step.last_layer_rows();
    if (s + 1 < warmup + steps) {
      next = make(s + 1);
      step.prepare(next.seqs, next.targets, double(next.targets.size()));
    }
    const train::StepResult r = step.apply(lr.at(s));
    const float m = t.stop(step.stream());
    if (s == 0) o.loss0 = r.loss;
    o.loss1 = r.loss;
    if (s >= warmup) {
      ms.push_back(m);
      o.tokens += cur.tokens;
      o.rows += double(rows);
      o.flops += step_flops(c, sch, rp, rs, cur.seqs);
    }
    std::swap(cur, next);
  }
  if (profile) {
    o.phases = step.profile();
    for (auto& [n, v] : o.phases) v /= steps;
  }
  o.ms = bench::median(ms);
  o.tokens /= steps;
  o.rows /= steps;
  o.flops /= steps;
  return o;
}

}  // namespace

int main(int argc, char** argv) {
  std::string data, json;
  std::vector<std::string> models = {"small", "large"};
  int batch = 128, steps = 20, warmup = 8, tc = 1, profile = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--data") data = argv[i + 1];
    else if (a == "--json") json = argv[i + 1];
    else if (a == "--batch") batch = std::atoi(argv[i + 1]);
    else if (a == "--steps") steps = std::atoi(argv[i + 1]);
    else if (a == "--warmup") warmup = std::atoi(argv[i + 1]);
    else if (a == "--tc") tc = std::atoi(argv[i + 1]);
    else if (a == "--profile") profile = std::atoi(argv[i + 1]);
    else if (a == "--models") {
      models.clear();
      std::stringstream ss(argv[i + 1]);
      std::string m;
      while (std::getline(ss, m, ',')) models.push_back(m);
    } else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (data.empty()) {
    std::fprintf(stderr, "usage: bench_cuda_train --data <amazon-beauty dir> [--json out] [--models small,large]\n");
    return 2;
  }
  try {
    const rec::Dataset ds = rec::Dataset::load(data);
    const auto pb = rec::PromptBuilder::code_tokens();
    const auto cases = ds.cases(rec::DataSplit::kTrain);
    // A seeded order of the training samples, cut into batches.
    std::vector<int> order(cases.size());
    for (std::size_t i = 0; i < order.size(); ++i) order[i] = int(i);
    Rng rng(7);
    for (std::size_t i = order.size() - 1; i > 0; --i) std::swap(order[i], order[rng.next_u64() % (i + 1)]);
    std::vector<std::vector<Sample>> batches(8);
    for (std::size_t b = 0; b < batches.size(); ++b)
      for (int j = 0; j < batch; ++j) {
        const rec::Case& cs = cases[order[b * batch + j]];
        const rec::ItemTokens t = pb.vocab().item_tokens(ds.catalogue(), cs.target_items[0]);
        batches[b].push_back({pb.build(ds.catalogue(), cs.history), std::vector<int>(t.begin(), t.end())});
      }
    cudaDeviceProp prop{};
    EARN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const bench::GemmRate rate = bench::measure_gemm_rate();
    std::printf("%s; bf16 GEMM %.0f TFLOP/s sustained (%.0f burst); batch %d, %d timed steps after %d\n", prop.name,
                rate.sustained / 1e12, rate.burst / 1e12, batch, steps, warmup);
    std::printf("%-6s %-10s %10s %10s %12s %10s %10s %8s %14s\n", "model", "schedule", "params", "ms/step", "tokens/s",
                "rows", "TFLOP/s", "MFU", "loss");
    nlohmann::json out = nlohmann::json::array();
    for (const std::string& m : models) {
      const ModelConfig c = model(m);
      const int k = c.n_layers / 4;
      std::vector<Outcome> res;
      res.push_back(run(m, DenseSchedule{}, 0, 0, batches, warmup, steps, tc, profile));
      res.back().schedule = "dense";
      res.back().k = c.n_layers;
      res.push_back(run(m, EarnSchedule{k}, 1, 1, batches, warmup, steps, tc, profile));
      res.back().schedule = "earn";
      res.back().k = k;
      for (const Outcome& o : res) {
        const double tflops = o.flops / (o.ms * 1e-3) / 1e12;
        std::printf("%-6s %-4s k=%-3d %9.1fM %10.2f %12.0f %10.0f %10.1f %7.1f%% %6.3f->%.3f\n", o.model.c_str(),
                    o.schedule.c_str(), o.k, o.params / 1e6, o.ms, o.tokens / (o.ms * 1e-3), o.rows, tflops,
                    100.0 * tflops * 1e12 / rate.sustained, o.loss0, o.loss1);
        out.push_back({{"model", o.model}, {"schedule", o.schedule}, {"k", o.k}, {"params", o.params},
                       {"ms_per_step", o.ms}, {"tokens_per_step", o.tokens}, {"tokens_per_s", o.tokens / (o.ms * 1e-3)},
                       {"layer_rows", o.rows}, {"flops_per_step", o.flops}, {"tflops", tflops},
                       {"mfu", tflops * 1e12 / rate.sustained}, {"batch", batch}, {"gpu", prop.name},
                       {"bf16_sustained", rate.sustained}, {"tensor_core_attention", tc}});
      }
      for (const Outcome& o : res)
        if (!o.phases.empty()) {
          std::printf("  %s %s, ms per step by phase (profiling on):\n", o.model.c_str(), o.schedule.c_str());
          for (const auto& [n, v] : o.phases) std::printf("    %-52s %8.3f\n", n.c_str(), v);
        }
      std::printf("%-6s EARN k=%d over dense: %.2fx step time (rows ratio %.2fx, FLOP ratio %.2fx)\n", m.c_str(), k,
                  res[0].ms / res[1].ms, res[0].rows / res[1].rows, res[0].flops / res[1].flops);
    }
    if (!json.empty()) std::ofstream(json) << out.dump(1) << "\n";
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench_cuda_train: %s\n", e.what());
    return 1;
  }
  return 0;
}
