// The training loop (train/trainer.hpp) on the CPU step: a run interrupted after a checkpoint and resumed continues
// the uninterrupted run's losses and weights bit for bit; validation keeps the best step and patience stops early;
// the CSV log holds every step; bad settings are refused before the first step. Also the stated initialisations
// (train/init.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "earn/earn.hpp"
#include "earn/train/cpu_step.hpp"
#include "earn/train/init.hpp"
#include "earn/train/trainer.hpp"
#include "support.hpp"

using namespace earn;
namespace fs = std::filesystem;
using earn::test::TempDir;

namespace {

ModelConfig loop_config() {
  ModelConfig c;
  c.dim = 16;
  c.hidden_dim = 32;
  c.n_layers = 2;
  c.n_heads = 2;
  c.n_kv_heads = 1;
  c.vocab_size = rec::ItemVocab(rec::CodeTemplate::kBaseVocab).size();
  c.max_seq_len = 64;
  return c;
}

// 30 synthetic examples: prompts of code-template shape, answers of 4 code tokens.
std::vector<train::Example> synthetic_examples() {
  std::vector<train::Example> ex;
  Rng rng(3);
  for (int i = 0; i < 30; ++i) {
    train::Example e;
    e.prompt = {0, 1};
    const int items = 1 + int(rng.next_u64() % 4);
    for (int j = 0; j < items; ++j) {
      if (j) e.prompt.push_back(2);
      for (int l = 0; l < 4; ++l) e.prompt.push_back(4 + l * 256 + int(rng.next_u64() % 8));
    }
    e.prompt.push_back(3);
    for (int l = 0; l < 4; ++l) e.answer[l] = 4 + l * 256 + int(rng.next_u64() % 8);
    e.user = i;
    ex.push_back(e);
  }
  return ex;
}

// A validation metric that is a deterministic function of the weights.
train::Evaluation fake_eval(const ModelWeights& w) { return {double(w.final_norm.sum()), {}}; }

std::vector<std::string> lines(const fs::path& p) {
  std::ifstream in(p);
  std::vector<std::string> out;
  for (std::string l; std::getline(in, l);) out.push_back(l);
  return out;
}

}  // namespace

TEST_CASE("trainer: an interrupted run resumed from its checkpoint continues the uninterrupted one bit for bit") {
  const auto ex = synthetic_examples();
  const ModelWeights w0 = train::init_model(loop_config(), {.seed = 4});
  train::TrainOptions o;
  o.batch = 8;
  o.micro_batch = 4;
  o.max_steps = 7;  // crosses an epoch boundary (30 examples = 4 steps of 8, the last short)
  o.lr = 1e-2;
  o.eval_every = 3;
  o.seed = 11;
  o.progress = false;
  TempDir a, b;
  o.out = a.path;
  train::CpuStep<EarnSchedule> full(w0, EarnSchedule{1}, {});
  const train::TrainSummary whole = train::Trainer(full, ex, o, fake_eval).run();
  REQUIRE(whole.log.size() == 7u);
  CHECK(whole.steps == 7);
  // The same run crashing inside the validation of step 6 (after the checkpoint of step 3), then resumed.
  o.out = b.path;
  train::CpuStep<EarnSchedule> first(w0, EarnSchedule{1}, {});
  auto crash = [](const ModelWeights& w) -> train::Evaluation {
    static int calls = 0;
    if (++calls == 2) throw Error("simulated crash");
    return fake_eval(w);
  };
  CHECK_THROWS_WITH(train::Trainer(first, ex, o, crash).run(), "simulated crash");
  train::CpuStep<EarnSchedule> second(w0, EarnSchedule{1}, {});
  const train::TrainSummary rest = train::Trainer(second, ex, o, fake_eval).run();
  CHECK(rest.resumed_from == 3);
  REQUIRE(rest.log.size() == 4u);
  for (std::size_t i = 0; i < rest.log.size(); ++i) {
    CAPTURE(i);
    CHECK(rest.log[i].step == whole.log[i + 3].step);
    CHECK(rest.log[i].loss == whole.log[i + 3].loss);
    CHECK(rest.log[i].grad_norm == whole.log[i + 3].grad_norm);
    CHECK(rest.log[i].lr == whole.log[i + 3].lr);
  }
  const auto x = full.weights().tensors(), y = second.weights().tensors();
  for (std::size_t t = 0; t < x.size(); ++t) CHECK(std::equal(x[t].data, x[t].data + x[t].size, y[t].data));
  CHECK(rest.best_step == whole.best_step);
  // The log: a header and one row per step, the resumed run appending to the interrupted one's rows.
  CHECK(lines(a.path / "train_log.csv").size() == 8u);
  const auto lb = lines(b.path / "train_log.csv");
  REQUIRE(lb.size() == 8u);
  for (std::size_t i = 1; i < lb.size(); ++i) CHECK(std::atoi(lb[i].c_str()) == int(i));
  CHECK(lines(a.path / "train_log.csv")[0].rfind("step,epoch,loss", 0) == 0);
}

TEST_CASE("trainer: validation keeps the best step, patience stops early, bad settings are refused") {
  const auto ex = synthetic_examples();
  const ModelWeights w0 = train::init_model(loop_config(), {.seed = 5});
  train::TrainOptions o;
  o.batch = 6;
  o.max_steps = 40;
  o.eval_every = 2;
  o.patience = 3;
  o.progress = false;
  train::CpuStep<EarnSchedule> step(w0, EarnSchedule{1}, {});
  int calls = 0;
  // The metric peaks at the second validation, then falls: stop after three worse ones (step 10).
  auto evaluate = [&](const ModelWeights&) { ++calls; return train::Evaluation{calls == 2 ? 1.0 : 0.5 - calls, {}}; };
  const train::TrainSummary s = train::Trainer(step, ex, o, evaluate).run();
  CHECK(s.stopped_early);
  CHECK(s.steps == 10);
  CHECK(s.best_step == 4);
  CHECK(*s.best_metric == 1.0);
  CHECK(calls == 5);

  train::TrainOptions bad = o;
  bad.micro_batch = 4;  // 6 is not a multiple of 4
  CHECK_THROWS_AS(train::Trainer(step, ex, bad), ConfigError);
  bad = o;
  bad.lr = -1;
  CHECK_THROWS_AS(train::Trainer(step, ex, bad), ConfigError);
  CHECK_THROWS_AS(train::Trainer(step, std::span<const train::Example>(), o), ConfigError);
}

TEST_CASE("initialisation: the stated distributions; extending a checkpoint keeps every old parameter") {
  ModelConfig c = loop_config();
  c.dim = 64;
  c.n_layers = 4;
  c.hidden_dim = 128;
  c.n_heads = 4;
  c.n_kv_heads = 4;
  c.tied_embeddings = false;
  const ModelWeights w = train::init_model(c, {.seed = 1, .std = 0.02, .prefix_registers = 2, .suffix_registers = 1});
  auto stdev = [](const Matrix& m) { return std::sqrt(double(m.squaredNorm()) / double(m.size())); };
  CHECK(std::abs(stdev(w.tok_embeddings) - 0.02) < 0.001);
  CHECK(std::abs(stdev(w.layers[0].w1) - 0.02) < 0.001);
  CHECK(std::abs(stdev(w.layers[0].wo) - 0.02 / std::sqrt(8.0)) < 0.0008);
  CHECK(w.layers[3].attn_norm.isOnes());
  CHECK(w.registers.prefix.rows() == 2);
  CHECK(train::init_model(c, {.seed = 1}).tok_embeddings == train::init_model(c, {.seed = 1}).tok_embeddings);
  CHECK(train::init_model(c, {.seed = 2}).tok_embeddings != train::init_model(c, {.seed = 1}).tok_embeddings);

  ModelConfig t = c;
  t.vocab_size = 100;
  const ModelWeights base = random_weights(t, {.seed = 9, .prefix_registers = 0, .suffix_registers = 0});
  const ModelWeights ext = train::extend_vocab(base, 1, 1, 3);
  CHECK(ext.config.vocab_size == 100 + 1024);
  CHECK(ext.tok_embeddings.topRows(100) == base.tok_embeddings);
  CHECK(ext.lm_head.topRows(100) == base.lm_head);
  CHECK(ext.layers[2].w2 == base.layers[2].w2);
  CHECK(ext.registers.count() == 2);
  // New rows sit around the old ones: their mean near the old rows' mean.
  const double old_mean = base.tok_embeddings.cast<double>().mean(), new_mean = ext.tok_embeddings.bottomRows(1024).cast<double>().mean();
  CHECK(std::abs(old_mean - new_mean) < 0.02);
  Engine<EarnSchedule> engine(ext, EarnSchedule{1});  // a usable EARN model
  auto st = engine.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 8, .max_new_tokens = 1});
  const int prompt[3] = {5, 100, 1123};
  CHECK(engine.prefill(st, 0, prompt).allFinite());
}
