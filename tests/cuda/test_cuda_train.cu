// The CUDA training step against the CPU one: fp32 losses and every gradient within 1e-4 (dense and EARN, several
// k, 0-2 registers a side, GQA, Qwen2 biases, both RoPE styles, tied and untied heads), the fused AdamW kernel
// against the CPU AdamW applied to the same gradients, the tensor-core attention kernels against the CUDA-core
// ones (bf16), both under Gist's kind rule too, bf16 training following fp32's loss curve, and NaN / Inf refused
// naming the tensor.
#include <doctest/doctest.h>

#include <cmath>
#include <span>
#include <vector>

#include "earn/backend/cuda/train_step.cuh"
#include "earn/cuda.cuh"
#include "earn/train/cpu_step.hpp"
#include "../reference_model.hpp"  // random_tokens

using namespace earn;
using earn::test::random_tokens;

namespace {

ModelConfig train_config(int v) {
  ModelConfig c;
  c.dim = 64;
  c.hidden_dim = 96;
  c.n_layers = 4;
  c.n_heads = 4;
  c.n_kv_heads = v % 2 ? 2 : 4;
  c.vocab_size = 150;
  c.max_seq_len = 256;
  c.rope_theta = 10000.0f;
  c.rope_style = v % 3 == 1 ? RopeStyle::kInterleaved : RopeStyle::kRotateHalf;
  c.qkv_bias = v % 3 == 2;
  c.tied_embeddings = v % 2 == 0;
  return c;
}

struct Batch {
  std::vector<std::vector<int>> prompts, answers;
  std::vector<plan::Sequence> seqs;
  std::vector<int> targets;
};
Batch make_batch(int n, int vocab, int max_prompt, std::uint64_t seed) {
  Batch b;
  Rng rng(seed);
  for (int s = 0; s < n; ++s) {
    b.prompts.push_back(random_tokens(1 + int(rng.next_u64() % std::uint64_t(max_prompt)), vocab, seed * 13 + s));
    b.answers.push_back(random_tokens(4, vocab, seed * 17 + s));
  }
  for (int s = 0; s < n; ++s) {
    b.seqs.push_back({b.prompts[s], std::span<const int>(b.answers[s]).first(3)});
    b.targets.insert(b.targets.end(), b.answers[s].begin(), b.answers[s].end());
  }
  return b;
}

double rel_err(const TensorView<const float>& a, const TensorView<const float>& b) {
  double err = 0, scale = 1e-30;
  for (Index i = 0; i < a.size; ++i) {
    REQUIRE(std::isfinite(a.data[i]));
    err = std::max(err, std::abs(double(a.data[i]) - double(b.data[i])));
    scale = std::max(scale, std::abs(double(b.data[i])));
  }
  return err / scale;
}

template <class Schedule>
void compare_fp32(const ModelWeights& w, const Schedule& schedule, std::uint64_t seed) {
  const Batch b = make_batch(6, w.config.vocab_size, 60, seed);
  const double norm = double(b.targets.size());
  train::CpuStep<Schedule> cpu(w, schedule, {});
  train::CudaStep<Schedule, dtype::F32> gpu(w, schedule, {});
  const std::span<const plan::Sequence> all(b.seqs);
  const std::span<const int> tg(b.targets);
  // Two micro-batches accumulate on both.
  const double cpu_loss = cpu.accumulate(all.first(2), tg.first(8), norm) + cpu.accumulate(all.subspan(2), tg.subspan(8), norm);
  gpu.accumulate(all.first(2), tg.first(8), norm);
  gpu.accumulate(all.subspan(2), tg.subspan(8), norm);
  const ModelWeights gg = gpu.gradients();
  const auto gt = gg.tensors();
  const auto ct = std::as_const(cpu).gradients().tensors();
  REQUIRE(gt.size() == ct.size());
  for (std::size_t t = 0; t < gt.size(); ++t) {
    INFO("gradient of " << ct[t].name);
    CHECK(rel_err(gt[t], ct[t]) <= 1e-4);
  }
  // AdamW on the device against the CPU optimizer applied to the GPU's own gradients.
  train::AdamW<float> ref(w, {});
  ModelWeights want = w, g_copy = gg;
  ref.step(want, g_copy, 1e-2);
  const train::StepResult r = gpu.apply(1e-2);
  INFO("loss: cpu " << cpu_loss << ", gpu " << r.loss);
  CHECK(std::abs(r.loss - cpu_loss) <= 1e-4 * std::abs(cpu_loss));
  CHECK(std::abs(r.grad_norm - ref.grad_norm(gg)) <= 1e-5 * r.grad_norm);
  const ModelWeights got = gpu.weights();
  const auto wt = got.tensors(), rt = std::as_const(want).tensors();
  for (std::size_t t = 0; t < wt.size(); ++t) {
    INFO("parameters after the step: " << rt[t].name);
    double err = 0;
    for (Index i = 0; i < rt[t].size; ++i) err = std::max(err, std::abs(double(wt[t].data[i]) - double(rt[t].data[i])));
    CHECK(err <= 1e-6);
  }
}

}  // namespace

TEST_CASE("CUDA training step, fp32: loss and gradients equal the CPU step's (1e-4), AdamW equal to the CPU's") {
  for (int v = 0; v < 6; ++v) {
    const ModelConfig c = train_config(v);
    const int rp = v % 3, rs = (v + 1) % 3;
    CAPTURE(v); CAPTURE(rp); CAPTURE(rs);
    const ModelWeights w = random_weights(c, {.seed = 70 + std::uint64_t(v), .scale = 1.5f, .prefix_registers = rp,
                                              .suffix_registers = rs});
    compare_fp32(w, DenseSchedule{}, 10 + v);
    for (int k : {0, 1, 2, c.n_layers}) {
      if (k < c.n_layers && rp + rs == 0) continue;
      CAPTURE(k);
      compare_fp32(w, EarnSchedule{k}, 20 + v * 5 + k);
    }
  }
}

namespace {
// The tensor-core attention kernels against the CUDA-core ones under `schedule` (bf16): every gradient within 3e-2.
template <class Schedule>
void compare_tensor_cores(const ModelWeights& w, const Schedule& schedule, const Batch& b) {
  train::CudaStep<Schedule, dtype::Bf16> tc(w, schedule, {}), ref(w, schedule, {});
  ref.use_tensor_core_attention(false);
  tc.accumulate(b.seqs, b.targets, 20.0);
  ref.accumulate(b.seqs, b.targets, 20.0);
  const ModelWeights gt = tc.gradients(), gr = ref.gradients();
  const auto a = gt.tensors(), r = gr.tensors();
  for (std::size_t t = 0; t < a.size(); ++t) {
    INFO("gradient of " << r[t].name);
    CHECK(rel_err(a[t], r[t]) <= 3e-2);
  }
  const double la = tc.apply(0.0).loss, lr = ref.apply(0.0).loss;
  CHECK(std::abs(la - lr) <= 1e-2 * std::abs(lr));
}

ModelConfig head_config(int hd) {
  ModelConfig c = train_config(1);
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.dim = hd * 4;
  c.hidden_dim = 2 * c.dim;
  return c;
}
}  // namespace

TEST_CASE("tensor-core training attention equals the CUDA-core kernels (bf16, head sizes 32 / 64 / 128)") {
  for (int hd : {32, 64, 128}) {
    CAPTURE(hd);
    const ModelConfig c = head_config(hd);
    const ModelWeights w = random_weights(c, {.seed = 5, .scale = 1.5f, .prefix_registers = 1, .suffix_registers = 1});
    const Batch b = make_batch(5, c.vocab_size, 100, 90 + hd);  // segments of up to 100 + 5 rows
    for (int k : {1, 4}) {
      CAPTURE(k);
      compare_tensor_cores(w, EarnSchedule{k}, b);
    }
  }
}

TEST_CASE("CUDA training under Gist's kind rule: fp32 equal to the CPU step, tensor cores to CUDA cores") {
  for (int v = 0; v < 3; ++v) {
    const int rp = v == 2 ? 0 : 1 + v, rs = v == 1 ? 0 : 1;  // 1 + 1, 2 + 0, 0 + 1
    CAPTURE(v); CAPTURE(rp); CAPTURE(rs);
    const ModelWeights w = random_weights(train_config(v), {.seed = 80 + std::uint64_t(v), .scale = 1.5f,
                                                            .prefix_registers = rp, .suffix_registers = rs});
    compare_fp32(w, GistSchedule{}, 40 + v);
  }
  const ModelConfig c = head_config(64);
  const ModelWeights w = random_weights(c, {.seed = 6, .scale = 1.5f, .prefix_registers = 1, .suffix_registers = 1});
  compare_tensor_cores(w, GistSchedule{}, make_batch(5, c.vocab_size, 100, 95));
}

TEST_CASE("CUDA training under per-head run-time visibility (HeadWise): fp32 equal to the CPU step, tensor cores too") {
  using Duo = Layer<attention::HeadWise, kv::Contiguous>;
  for (int v = 0; v < 2; ++v) {
    CAPTURE(v);
    const ModelWeights w = random_weights(train_config(v), {.seed = 90 + std::uint64_t(v), .scale = 1.5f,
                                                            .prefix_registers = 1, .suffix_registers = 1});
    compare_fp32(w, Uniform<Duo>{Duo{{.streaming = 0b01ull << v, .sinks = 1, .window = 4 + v}}}, 50 + v);
  }
  const ModelConfig c = head_config(64);
  const ModelWeights w = random_weights(c, {.seed = 7, .scale = 1.5f, .prefix_registers = 1, .suffix_registers = 1});
  compare_tensor_cores(w, Uniform<Duo>{Duo{{.streaming = 0b0110, .sinks = 2, .window = 9}}},
                       make_batch(5, c.vocab_size, 100, 97));
}

TEST_CASE("CUDA training step: graph replays equal launch-by-launch steps bit for bit; one graph per padded shape") {
  const ModelConfig c = train_config(3);
  const ModelWeights w = random_weights(c, {.seed = 31, .scale = 1.5f, .prefix_registers = 1, .suffix_registers = 2});
  train::CudaStep<EarnSchedule, dtype::Bf16> graphs(w, EarnSchedule{2}, {}), eager(w, EarnSchedule{2}, {});
  eager.use_graphs(false);
  // Three micro-batches of different lengths and counts that pad to the same shape, then one that does not.
  const Batch b1 = make_batch(5, c.vocab_size, 9, 1), b2 = make_batch(6, c.vocab_size, 9, 2);
  const Batch b3 = make_batch(3, c.vocab_size, 9, 3), b4 = make_batch(40, c.vocab_size, 50, 4);
  for (const Batch* b : {&b1, &b2, &b3, &b4}) {
    graphs.accumulate(b->seqs, b->targets, 400.0);
    eager.accumulate(b->seqs, b->targets, 400.0);
  }
  CHECK(graphs.graph_count() == 2);
  const ModelWeights gg = graphs.gradients(), ge = eager.gradients();
  const auto a = gg.tensors(), e = ge.tensors();
  for (std::size_t t = 0; t < a.size(); ++t) {
    INFO(a[t].name);
    CHECK(std::equal(a[t].data, a[t].data + a[t].size, e[t].data));
  }
  const train::StepResult ra = graphs.apply(1e-3), re = eager.apply(1e-3);
  CHECK(ra.loss == re.loss);
  CHECK(ra.grad_norm == re.grad_norm);
  CHECK(std::isfinite(ra.loss));
}

TEST_CASE("race probe: one small tensor-core attention step (bf16, head size 64) for compute-sanitizer racecheck") {
  ModelConfig c = train_config(1);
  c.dim = 256;
  c.hidden_dim = 64;
  c.n_layers = 2;
  const ModelWeights w = random_weights(c, {.seed = 8, .prefix_registers = 1, .suffix_registers = 1});
  const Batch b = make_batch(3, c.vocab_size, 90, 77);  // segments in several length buckets
  train::CudaStep<EarnSchedule, dtype::Bf16> step(w, EarnSchedule{1}, {});
  step.accumulate(b.seqs, b.targets, 12.0);
  const train::StepResult r = step.apply(1e-3);
  CHECK(std::isfinite(r.loss));
  CHECK(std::isfinite(r.grad_norm));
}

TEST_CASE("bf16 training follows fp32's loss curve over 300 steps (within 3% of the starting loss)") {
  ModelConfig c = train_config(1);
  c.dim = 128;
  c.hidden_dim = 256;
  const ModelWeights w = random_weights(c, {.seed = 12, .prefix_registers = 1, .suffix_registers = 1});
  // A learnable task: the answer is a function of the prompt's last tokens.
  std::vector<std::vector<int>> prompts, answers;
  for (int s = 0; s < 32; ++s) {
    prompts.push_back(random_tokens(8 + s % 24, c.vocab_size, 400 + s));
    const int x = prompts.back().back(), y = prompts.back()[prompts.back().size() - 2];
    answers.push_back({x, (x + y) % c.vocab_size, (3 * x + 1) % c.vocab_size, y});
  }
  std::vector<plan::Sequence> seqs;
  std::vector<int> targets;
  for (int s = 0; s < 32; ++s) {
    seqs.push_back({prompts[s], std::span<const int>(answers[s]).first(3)});
    targets.insert(targets.end(), answers[s].begin(), answers[s].end());
  }
  const train::LrSchedule lr{.lr = 3e-3, .warmup_ratio = 0.05, .total_steps = 300};
  train::CudaStep<EarnSchedule, dtype::F32> f32(w, EarnSchedule{1}, {});
  train::CudaStep<EarnSchedule, dtype::Bf16> bf16(w, EarnSchedule{1}, {});
  double first = 0, worst = 0, last32 = 0, last16 = 0;
  for (long long s = 0; s < lr.total_steps; ++s) {
    f32.accumulate(seqs, targets, double(targets.size()));
    bf16.accumulate(seqs, targets, double(targets.size()));
    const double a = f32.apply(lr.at(s)).loss, b = bf16.apply(lr.at(s)).loss;
    if (s == 0) first = a;
    worst = std::max(worst, std::abs(a - b));
    last32 = a;
    last16 = b;
  }
  INFO("loss " << first << " -> fp32 " << last32 << ", bf16 " << last16 << "; worst gap " << worst);
  CHECK(last32 < 0.5 * first);  // it learns
  CHECK(worst <= 0.03 * first);
}

TEST_CASE("CUDA training refuses NaN naming the tensor, and bad input before any work") {
  const ModelConfig c = train_config(0);
  ModelWeights w = random_weights(c, {.seed = 3, .prefix_registers = 1, .suffix_registers = 1});
  const Batch b = make_batch(2, c.vocab_size, 10, 4);
  w.layers[2].w3(1, 1) = std::nanf("");
  train::CudaStep<EarnSchedule, dtype::Bf16> step(w, EarnSchedule{3}, {});
  step.accumulate(b.seqs, b.targets, 8.0);
  CHECK_THROWS_AS(step.apply(1e-3), NumericError);
  std::vector<int> bad = b.targets;
  bad[0] = c.vocab_size;
  CHECK_THROWS_AS(step.accumulate(b.seqs, bad, 8.0), RangeError);
  CHECK_THROWS_AS(step.accumulate(b.seqs, std::span(b.targets).first(3), 8.0), ConfigError);
  CHECK_THROWS_AS((train::CudaStep<EarnSchedule, dtype::Bf16>(w, EarnSchedule{c.n_layers + 1}, {})), ConfigError);
}
