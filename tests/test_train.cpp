// The CPU training step: its forward agrees with the engine (prefill + decode on the same weights), a tiny model
// overfits a handful of samples until the trie beam search returns their targets first, runs repeat bit for bit,
// freezing keeps frozen tensors fixed, and NaN / Inf stop training with an error naming the step and the tensor.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "earn/backend/cpu/train.hpp"
#include "earn/earn.hpp"
#include "earn/train/cpu_step.hpp"
#include "reference_model.hpp"

using namespace earn;

namespace {

const rec::ItemVocab kVocab(rec::CodeTemplate::kBaseVocab);

ModelConfig rec_config(int layers) {
  ModelConfig c;
  c.dim = 32;
  c.hidden_dim = 64;
  c.n_layers = layers;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = kVocab.size();
  c.max_seq_len = 64;
  c.tied_embeddings = false;
  return c;
}

// 12 items over shared code prefixes.
rec::Catalogue small_catalogue() {
  std::vector<rec::ItemCodes> codes;
  for (int i = 0; i < 12; ++i) codes.push_back({i % 3, (i * 7) % 5, i % 4, i});
  return rec::Catalogue(codes);
}

}  // namespace

TEST_CASE("training forward (fp32) equals the engine's prefill and decode logits on the same weights") {
  ModelConfig c = rec_config(4);
  c.vocab_size = 60;
  c.qkv_bias = true;
  const ModelWeights w = random_weights(c, {.seed = 21, .scale = 2.0f, .prefix_registers = 1, .suffix_registers = 1});
  for (int k : {0, 1, 2, 4}) {
    CAPTURE(k);
    const EarnSchedule schedule{k};
    const std::vector<std::vector<int>> prompts{test::random_tokens(9, 60, 1), test::random_tokens(3, 60, 2)};
    const std::vector<std::vector<int>> answers{{5, 6, 7, 8}, {9, 10, 11, 12}};
    std::vector<plan::Sequence> seqs;
    std::vector<int> targets;
    for (std::size_t s = 0; s < prompts.size(); ++s) {
      seqs.push_back({prompts[s], std::span<const int>(answers[s]).first(3)});
      targets.insert(targets.end(), answers[s].begin(), answers[s].end());
    }
    const auto fp = plan::plan_forward(schedule, c.n_layers, 1, 1, std::span<const plan::Sequence>(seqs));
    cpu::TrainTape<float> tape;
    Matrix logits;
    cpu::train_forward(w, schedule, fp, targets, 1.0, tape, &logits);
    Engine<EarnSchedule> engine(w, schedule);
    int row = 0;
    for (std::size_t s = 0; s < prompts.size(); ++s) {
      auto st = engine.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 16, .max_new_tokens = 4});
      std::vector<Vector> want{engine.prefill(st, 0, prompts[s])};
      const int r[1] = {0};
      st.set_rows(r);
      for (int j = 0; j < 3; ++j) {
        const int tok[1] = {answers[s][j]};
        want.push_back(engine.decode(st, tok).row(0).transpose());
      }
      for (const Vector& v : want) {
        const float scale = std::max(1.0f, v.cwiseAbs().maxCoeff());
        CHECK((logits.row(row).transpose() - v).cwiseAbs().maxCoeff() <= 1e-5f * scale);
        ++row;
      }
    }
  }
}

TEST_CASE("a tiny EARN model overfits a handful of samples; the beam search then returns their targets first") {
  const rec::Catalogue cat = small_catalogue();
  const rec::CodeTrie trie(cat, kVocab);
  const auto pb = rec::PromptBuilder::code_tokens(kVocab);
  // Four users: a history and the item that follows it.
  const std::vector<std::vector<int>> histories{{0, 1, 2}, {3}, {4, 5}, {6, 7, 8, 9}};
  const std::vector<int> next{10, 2, 11, 0};
  std::vector<std::vector<int>> prompts, answers;
  for (std::size_t i = 0; i < histories.size(); ++i) {
    prompts.push_back(pb.build(cat, histories[i]));
    const rec::ItemTokens t = kVocab.item_tokens(cat, next[i]);
    answers.emplace_back(t.begin(), t.end());
  }
  std::vector<plan::Sequence> seqs;
  std::vector<int> targets;
  for (std::size_t s = 0; s < prompts.size(); ++s) {
    seqs.push_back({prompts[s], std::span<const int>(answers[s]).first(3)});
    targets.insert(targets.end(), answers[s].begin(), answers[s].end());
  }
  const ModelConfig c = rec_config(2);
  const EarnSchedule schedule{1};
  train::CpuStep<EarnSchedule> step(random_weights(c, {.seed = 3}), schedule, {.weight_decay = 0.0});
  const train::LrSchedule lr{.lr = 1e-2, .warmup_ratio = 0.05, .total_steps = 150};
  double first = 0, last = 0;
  for (long long s = 0; s < lr.total_steps; ++s) {
    last = step.accumulate(seqs, targets, double(targets.size()));
    if (s == 0) first = last;
    step.apply(lr.at(s));
  }
  INFO("loss " << first << " -> " << last);
  CHECK(last < 0.05 * first);
  Engine<EarnSchedule> engine(step.weights(), schedule);
  rec::BeamSearch search(engine, trie, {.beam = 5}, 4, 32);
  const auto recs = search.run(prompts);
  for (std::size_t u = 0; u < prompts.size(); ++u) {
    REQUIRE(!recs[u].empty());
    CHECK(recs[u][0].identifier == cat.identifier(next[u]));
  }
}

TEST_CASE("training repeats bit for bit; freezing keeps frozen tensors; NaN stops training naming step and tensor") {
  const ModelConfig c = rec_config(2);
  const std::vector<int> prompt{0, 1, 4, 300, 600, 900, 3};
  const std::vector<int> answer{10, 270, 530, 790};
  const plan::Sequence seq{prompt, std::span<const int>(answer).first(3)};
  auto run = [&](train::AdamWOptions opt, int steps) {
    train::CpuStep<EarnSchedule> step(random_weights(c, {.seed = 8}), EarnSchedule{1}, opt);
    for (int s = 0; s < steps; ++s) {
      step.accumulate(std::span(&seq, 1), answer, 4.0);
      step.apply(1e-3);
    }
    return step.weights();
  };
  const ModelWeights a = run({}, 3), b = run({}, 3);
  for (std::size_t t = 0; t < a.tensors().size(); ++t) {
    const auto x = a.tensors()[t], y = b.tensors()[t];
    CHECK(std::equal(x.data, x.data + x.size, y.data));
  }
  const ModelWeights init = random_weights(c, {.seed = 8});
  train::AdamWOptions regs_only;
  regs_only.freeze.all_but_registers = true;
  const ModelWeights r = run(regs_only, 2);
  train::AdamWOptions layer0;
  layer0.freeze.layers = {0};
  layer0.freeze.names = {"tok_embeddings"};
  const ModelWeights f = run(layer0, 2);
  for (std::size_t t = 0; t < init.tensors().size(); ++t) {
    const auto i0 = init.tensors()[t], ri = r.tensors()[t], fi = f.tensors()[t];
    CAPTURE(i0.name);
    const bool r_same = std::equal(i0.data, i0.data + i0.size, ri.data);
    const bool f_same = std::equal(i0.data, i0.data + i0.size, fi.data);
    CHECK(r_same == (i0.role != TensorRole::kRegister));
    CHECK(f_same == (i0.layer == 0 || i0.name == "tok_embeddings"));
  }

  // NaN in the weights: the loss is NaN and the first accumulate says so.
  ModelWeights bad = random_weights(c, {.seed = 8});
  bad.registers.suffix(0, 3) = std::nanf("");
  train::CpuStep<EarnSchedule> nan_step(bad, EarnSchedule{1}, {});
  CHECK_THROWS_WITH_AS(nan_step.accumulate(std::span(&seq, 1), answer, 4.0), doctest::Contains("step 1: the loss"),
                       NumericError);
  // An Inf in one gradient: apply names the tensor.
  train::CpuStep<EarnSchedule> inf_step(random_weights(c, {.seed = 8}), EarnSchedule{1}, {});
  inf_step.accumulate(std::span(&seq, 1), answer, 4.0);
  inf_step.gradients().layers[1].w3(2, 2) = INFINITY;
  CHECK_THROWS_WITH_AS(inf_step.apply(1e-3), doctest::Contains("step 1: the gradient of layers.1.w3"), NumericError);
}
