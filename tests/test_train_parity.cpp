// Training against PyTorch autograd: tests/fixtures/train/{dense,earn}.safetensors, made by
// tools/make_train_fixture.py with a plain-torch Llama in float64 whose per-layer masks over [R_p; prompt; R_s;
// answer] are built there, on six real Amazon Beauty samples: the loss, every parameter's gradient, and the
// parameters after three AdamW steps (weight-decay groups, clipping, cosine learning rate). The double-precision
// path must agree to 1e-9, the fp32 path's loss and gradients to 1e-5 (relative to each tensor's largest entry).
#include <doctest/doctest.h>

#include <cmath>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/backend/cpu/train.hpp"
#include "earn/earn.hpp"
#include "earn/train/cpu_step.hpp"
#include "support.hpp"

using namespace earn;
using json = nlohmann::json;

namespace {

struct Fixture {
  io::SafetensorsFile file;
  json cfg;
  std::vector<std::vector<int>> prompts, answers;
  double loss = 0;
};

Fixture load(const std::string& name) {
  Fixture f{io::SafetensorsFile::open(test::source_path("tests/fixtures/train/" + name + ".safetensors")), {}, {}, {}, 0};
  f.cfg = json::parse(f.file.metadata().at("config"));
  for (const auto& s : json::parse(f.file.metadata().at("samples"))) {
    f.prompts.push_back(s.at("prompt").get<std::vector<int>>());
    f.answers.push_back(s.at("answer").get<std::vector<int>>());
  }
  f.loss = std::stod(f.file.metadata().at("loss"));
  return f;
}

// The fixture's model as BasicModelWeights<T>, tensors under `prefix` ("init.", "grad.", "step3.").
template <class T>
BasicModelWeights<T> weights(const Fixture& f, const std::string& prefix) {
  ModelConfig c;
  c.dim = f.cfg.at("dim");
  c.hidden_dim = f.cfg.at("hidden_dim");
  c.n_layers = f.cfg.at("n_layers");
  c.n_heads = f.cfg.at("n_heads");
  c.n_kv_heads = f.cfg.at("n_kv_heads");
  c.vocab_size = rec::ItemVocab(rec::CodeTemplate::kBaseVocab).size();
  c.max_seq_len = 128;
  c.norm_eps = f.cfg.at("eps").get<float>();
  c.rope_theta = f.cfg.at("theta").get<float>();
  c.qkv_bias = f.cfg.at("bias");
  c.tied_embeddings = f.cfg.at("tied");
  c.rope_style = f.cfg.at("interleaved").get<bool>() ? RopeStyle::kInterleaved : RopeStyle::kRotateHalf;
  BasicModelWeights<T> w = random_weights(c, {.prefix_registers = f.cfg.at("rp"), .suffix_registers = f.cfg.at("rs")})
                               .template cast<T>();
  for (auto& t : w.tensors()) {
    const io::TensorInfo* info = f.file.find(prefix + t.name);
    INFO(prefix << t.name << " missing from the fixture");
    REQUIRE(info != nullptr);
    REQUIRE(info->numel == t.size);
    const std::vector<double> v = f.file.read_doubles(*info);
    for (Index i = 0; i < t.size; ++i) t.data[i] = static_cast<T>(v[std::size_t(i)]);
  }
  return w;
}

// Worst |got - want| over max(1e-30, max |want|) for one tensor.
template <class T>
double rel_err(const TensorView<const T>& got, const TensorView<const double>& want) {
  double err = 0, scale = 1e-30;
  for (Index i = 0; i < want.size; ++i) {
    REQUIRE(std::isfinite(double(got.data[i])));
    err = std::max(err, std::abs(double(got.data[i]) - want.data[i]));
    scale = std::max(scale, std::abs(want.data[i]));
  }
  return err / scale;
}

template <class T>
void check_parity(const std::string& name, double tol, bool steps) {
  const Fixture f = load(name);
  const BasicModelWeights<double> want_grad = weights<double>(f, "grad.");
  const EarnSchedule schedule{f.cfg.at("k").get<int>()};
  std::vector<plan::Sequence> seqs;
  std::vector<int> targets;
  for (std::size_t s = 0; s < f.prompts.size(); ++s) {
    seqs.push_back({f.prompts[s], std::span<const int>(f.answers[s]).first(3)});
    targets.insert(targets.end(), f.answers[s].begin(), f.answers[s].end());
  }
  train::AdamWOptions opt;  // defaults: the fixture's groups, clipping at 1.0
  train::CpuStep<EarnSchedule, T> step(weights<T>(f, "init."), schedule, opt);
  // Two micro-batches of three samples accumulate to the six-sample batch.
  const double norm = double(targets.size());
  const std::span<const plan::Sequence> all(seqs);
  const std::span<const int> tg(targets);
  const double loss = step.accumulate(all.first(3), tg.first(12), norm) + step.accumulate(all.subspan(3), tg.subspan(12), norm);
  INFO(name << ": loss " << loss << ", torch " << f.loss);
  CHECK(std::abs(loss - f.loss) <= tol * std::abs(f.loss));
  const auto got = std::as_const(step).gradients().tensors();
  const auto want = want_grad.tensors();
  REQUIRE(got.size() == want.size());
  for (std::size_t t = 0; t < got.size(); ++t) {
    INFO(name << ": gradient of " << want[t].name);
    CHECK(rel_err(got[t], want[t]) <= tol);
  }
  if (!steps) return;
  // Three AdamW steps at the fixture's learning rates (cosine over 10 steps, no warm-up), gradients recomputed.
  const train::LrSchedule lr{.lr = 1e-2, .warmup_ratio = 0.0, .total_steps = 10};
  step.apply(lr.at(0));
  for (long long s = 1; s < 3; ++s) {
    step.accumulate(all, tg, norm);
    step.apply(lr.at(s));
  }
  const BasicModelWeights<double> want_w = weights<double>(f, "step3.");
  const auto gw = step.weights().tensors();
  const auto ww = want_w.tensors();
  for (std::size_t t = 0; t < gw.size(); ++t) {
    INFO(name << ": parameters after three steps, " << ww[t].name);
    double err = 0;
    for (Index i = 0; i < ww[t].size; ++i) err = std::max(err, std::abs(double(gw[t].data[i]) - ww[t].data[i]));
    CHECK(err <= 1e-5);
    CHECK(err <= tol);
  }
}

}  // namespace

TEST_CASE("training parity with PyTorch autograd, double precision: loss, gradients, three AdamW steps") {
  check_parity<double>("dense", 1e-9, true);
  check_parity<double>("earn", 1e-9, true);
}

TEST_CASE("training parity with PyTorch autograd, fp32: loss and gradients within 1e-5 relative") {
  check_parity<float>("dense", 1e-5, false);
  check_parity<float>("earn", 1e-5, false);
}
