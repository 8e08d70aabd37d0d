// Training's backward pass: finite-difference gradient checks in double precision, op by op (backend/cpu/backward.hpp)
// and for whole tiny models under dense and EARN schedules (k in {0, 1, L/2, L}, r_p and r_s in {0, 1, 2}, GQA,
// biases, both RoPE conventions, tied and untied heads), every parameter tensor, registers included; and the
// training forward's answer-row logits against the naive explicit-mask reference (tests/reference_model.hpp).
#include <doctest/doctest.h>

#include <cmath>
#include <functional>
#include <vector>

#include "earn/backend/cpu/train.hpp"
#include "earn/earn.hpp"
#include "reference_model.hpp"

using namespace earn;
using MatD = MatrixT<double>;
using VecD = VectorT<double>;

namespace {

MatD random_mat(Index r, Index c, std::uint64_t seed, double scale = 1.0) {
  Rng rng(seed);
  MatD m(r, c);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = rng.symmetric(1.0f) * scale;
  return m;
}

// Central difference of f at every element of `x` (or `samples` of them, spread by a seeded generator) against the
// analytic gradient `an`: |fd - an| <= tol * max(1, max |an|). Returns the worst ratio seen (for messages).
double check_fd(double* x, Index n, const double* an, const std::function<double()>& f, const std::string& what,
                int samples = -1, double eps = 1e-5, double tol = 1e-7) {
  double scale = 1.0;
  for (Index i = 0; i < n; ++i) {
    REQUIRE(std::isfinite(an[i]));
    scale = std::max(scale, std::abs(an[i]));
  }
  std::vector<Index> idx;
  if (samples < 0 || samples >= n) {
    for (Index i = 0; i < n; ++i) idx.push_back(i);
  } else {
    Rng rng(static_cast<std::uint64_t>(n) * 31 + what.size());
    for (int s = 0; s < samples; ++s) idx.push_back(static_cast<Index>(rng.next_u64() % std::uint64_t(n)));
  }
  double worst = 0;
  for (Index i : idx) {
    const double keep = x[i];
    x[i] = keep + eps;
    const double up = f();
    x[i] = keep - eps;
    const double down = f();
    x[i] = keep;
    const double fd = (up - down) / (2 * eps);
    worst = std::max(worst, std::abs(fd - an[i]) / scale);
  }
  INFO(what << ": worst |fd - analytic| / scale = " << worst << " (scale " << scale << ")");
  CHECK(worst <= tol);
  return worst;
}

ModelConfig tiny_config(int kv_heads, bool bias, RopeStyle style, bool tied) {
  ModelConfig c;
  c.dim = 16;
  c.hidden_dim = 24;
  c.n_layers = 4;
  c.n_heads = 4;
  c.n_kv_heads = kv_heads;
  c.vocab_size = 11;
  c.max_seq_len = 64;
  c.rope_theta = 100.0f;
  c.qkv_bias = bias;
  c.rope_style = style;
  c.tied_embeddings = tied;
  return c;
}

// A few sequences (prompts of 1..5 tokens, answers of 3 tokens, the first 2 fed) and their targets.
struct Batch {
  std::vector<std::vector<int>> prompts, answers;
  std::vector<plan::Sequence> seqs;
  std::vector<int> targets;
};
Batch tiny_batch(int vocab, std::uint64_t seed) {
  Batch b;
  Rng rng(seed);
  for (int s = 0; s < 3; ++s) {
    const int P = 1 + static_cast<int>(rng.next_u64() % 5);
    b.prompts.push_back(test::random_tokens(P, vocab, seed * 7 + s));
    b.answers.push_back(test::random_tokens(3, vocab, seed * 11 + s));
  }
  for (int s = 0; s < 3; ++s) {
    b.seqs.push_back({b.prompts[s], std::span<const int>(b.answers[s]).first(2)});
    b.targets.insert(b.targets.end(), b.answers[s].begin(), b.answers[s].end());
  }
  return b;
}

template <class Schedule>
void check_model(const ModelWeights& wf, const Schedule& schedule, int samples, std::uint64_t seed) {
  BasicModelWeights<double> w = wf.cast<double>();
  const Batch b = tiny_batch(w.config.vocab_size, seed);
  const auto fp = plan::plan_forward(schedule, w.config.n_layers, int(w.registers.prefix.rows()),
                                     int(w.registers.suffix.rows()), std::span<const plan::Sequence>(b.seqs));
  const double norm = double(b.targets.size());
  cpu::TrainTape<double> tape;
  auto loss = [&] { return cpu::train_forward(w, schedule, fp, b.targets, norm, tape); };
  const double l0 = loss();
  REQUIRE(std::isfinite(l0));
  BasicModelWeights<double> g = w.zeros_like();
  cpu::train_backward(w, schedule, fp, tape, g);
  auto params = w.tensors();
  auto grads = g.tensors();
  REQUIRE(params.size() == grads.size());
  for (std::size_t t = 0; t < params.size(); ++t) {
    REQUIRE(params[t].name == grads[t].name);
    check_fd(params[t].data, params[t].size, grads[t].data, loss, params[t].name, samples);
  }
}

}  // namespace

TEST_CASE("backward ops against finite differences (double)") {
  SUBCASE("rmsnorm") {
    MatD x = random_mat(5, 7, 1), dy = random_mat(5, 7, 2);
    VecD g = random_mat(7, 1, 3).col(0);
    auto f = [&] {
      MatD y;
      cpu::rmsnorm(x, g, 1e-5f, y);
      return (y.array() * dy.array()).sum();
    };
    MatD y, dx;
    VecD inv, dg = VecD::Zero(7);
    cpu::rmsnorm(x, g, 1e-5f, y, &inv);
    cpu::rmsnorm_backward(x, g, inv, dy, dx, dg);
    check_fd(x.data(), x.size(), dx.data(), f, "rmsnorm dx", -1);
    check_fd(g.data(), g.size(), dg.data(), f, "rmsnorm dg", -1);
  }
  SUBCASE("linear with bias") {
    MatD x = random_mat(4, 6, 4), w = random_mat(3, 6, 5), dy = random_mat(4, 3, 6);
    VecD b = random_mat(3, 1, 7).col(0);
    auto f = [&] {
      MatD y;
      cpu::linear(x, w, y);
      y.rowwise() += b.transpose();
      return (y.array() * dy.array()).sum();
    };
    MatD dx, dw = MatD::Zero(3, 6);
    VecD db = VecD::Zero(3);
    cpu::linear_backward(x, w, dy, dx, dw, &db);
    check_fd(x.data(), x.size(), dx.data(), f, "linear dx");
    check_fd(w.data(), w.size(), dw.data(), f, "linear dw");
    check_fd(b.data(), b.size(), db.data(), f, "linear db");
  }
  SUBCASE("swiglu") {
    MatD gate = random_mat(3, 5, 8, 3.0), up = random_mat(3, 5, 9), da = random_mat(3, 5, 10);
    auto f = [&] {
      MatD a = gate;
      cpu::swiglu(a, up);
      return (a.array() * da.array()).sum();
    };
    MatD dgate, dup;
    cpu::swiglu_backward(gate, up, da, dgate, dup);
    check_fd(gate.data(), gate.size(), dgate.data(), f, "swiglu dgate");
    check_fd(up.data(), up.size(), dup.data(), f, "swiglu dup");
  }
  SUBCASE("RoPE's inverse is its adjoint (both conventions)") {
    for (RopeStyle style : {RopeStyle::kRotateHalf, RopeStyle::kInterleaved}) {
      const std::vector<int> pos{0, 3, 7, 20};
      const cpu::BasicRopeTable<double> table(pos, 8, 500.0f);
      MatD x = random_mat(4, 16, 11), y = random_mat(4, 16, 12), rx = x, ry = y;
      cpu::apply_rope(rx, 2, 8, table, style);
      cpu::apply_rope(ry, 2, 8, table, style, true);
      CHECK(std::abs((rx.array() * y.array()).sum() - (x.array() * ry.array()).sum()) < 1e-12);
      cpu::apply_rope(ry, 2, 8, table, style);  // rotating back then forward is the identity
      CHECK((ry - y).cwiseAbs().maxCoeff() < 1e-12);
    }
  }
  SUBCASE("attention over one segment, GQA, causal and register-only masks") {
    const int n = 6, H = 4, KV = 2, hd = 4, group = H / KV;
    const std::vector<int> pos{0, 1, 2, 5, 6, 9};
    MatD q = random_mat(n, H * hd, 13), k = random_mat(n, KV * hd, 14), v = random_mat(n, KV * hd, 15);
    const MatD dout = random_mat(n, H * hd, 16);
    auto f = [&] {
      MatD out(n, H * hd);
      cpu::attention_prefill<attention::DenseCausal>(q, pos, k, v, pos, H, KV, hd, out);
      return (out.array() * dout.array()).sum();
    };
    std::vector<MatD> probs(H);
    MatD out(n, H * hd);
    cpu::attention_prefill<attention::DenseCausal>(q, pos, k, v, pos, H, KV, hd, out,
                                                   [&](int h, const MatD& p) { probs[h] = p; });
    MatD dq = MatD::Zero(n, H * hd), dk = MatD::Zero(n, KV * hd), dv = MatD::Zero(n, KV * hd);
    for (int kvh = 0; kvh < KV; ++kvh)
      cpu::attention_backward_group<double>(probs.data() + kvh * group, group, hd, 1.0 / std::sqrt(double(hd)),
                                            q.middleCols(kvh * group * hd, group * hd), k.middleCols(kvh * hd, hd),
                                            v.middleCols(kvh * hd, hd), dout.middleCols(kvh * group * hd, group * hd),
                                            dq.middleCols(kvh * group * hd, group * hd), dk.middleCols(kvh * hd, hd),
                                            dv.middleCols(kvh * hd, hd));
    check_fd(q.data(), q.size(), dq.data(), f, "attention dq");
    check_fd(k.data(), k.size(), dk.data(), f, "attention dk");
    check_fd(v.data(), v.size(), dv.data(), f, "attention dv");
  }
  SUBCASE("cross-entropy") {
    MatD logits = random_mat(3, 9, 17, 4.0);
    const std::vector<int> targets{2, 8, 0};
    MatD dl;
    auto f = [&] {
      MatD tmp;
      return cpu::cross_entropy(logits, targets, 3.0, tmp) / 3.0;
    };
    cpu::cross_entropy(logits, targets, 3.0, dl);
    check_fd(logits.data(), logits.size(), dl.data(), f, "cross-entropy dlogits");
  }
}

TEST_CASE("whole-model gradients against finite differences: every tensor, dense and EARN, registers 0-2 a side") {
  int variant = 0;
  for (int rp : {0, 1, 2})
    for (int rs : {0, 1, 2}) {
      // Model variants rotate over the register settings so every feature meets several schedules.
      const int v = variant++;
      const ModelConfig c = tiny_config(v % 2 ? 2 : 4, v % 3 == 1, v % 2 ? RopeStyle::kInterleaved : RopeStyle::kRotateHalf,
                                        v % 4 < 2);
      const ModelWeights w =
          random_weights(c, {.seed = 40 + std::uint64_t(v), .scale = 1.5f, .prefix_registers = rp, .suffix_registers = rs});
      CAPTURE(rp); CAPTURE(rs); CAPTURE(c.n_kv_heads); CAPTURE(c.qkv_bias); CAPTURE(c.tied_embeddings);
      check_model(w, DenseSchedule{}, 12, 100 + v);
      for (int k : {0, 1, c.n_layers / 2, c.n_layers}) {
        CAPTURE(k);
        if (k < c.n_layers && rp + rs == 0) continue;  // undefined (the engines refuse it)
        check_model(w, EarnSchedule{k}, 12, 200 + v * 10 + k);
      }
    }
}

TEST_CASE("whole-model gradients, every element: GQA + Qwen2 biases + interleaved RoPE + untied head, EARN k = 1") {
  const ModelConfig c = tiny_config(2, true, RopeStyle::kInterleaved, false);
  const ModelWeights w = random_weights(c, {.seed = 77, .scale = 1.5f, .prefix_registers = 2, .suffix_registers = 1});
  check_model(w, EarnSchedule{1}, -1, 300);
}

TEST_CASE("whole-model gradients under Gist's kind rule (fed rows see the registers, not the prompt)") {
  for (int v = 0; v < 3; ++v) {
    const int rp = v == 2 ? 0 : 1, rs = v == 1 ? 0 : 2;  // 1 + 2, 1 + 0, 0 + 2
    const ModelConfig c = tiny_config(v % 2 ? 2 : 4, v == 1, v == 2 ? RopeStyle::kInterleaved : RopeStyle::kRotateHalf,
                                      v != 1);
    const ModelWeights w =
        random_weights(c, {.seed = 60 + std::uint64_t(v), .scale = 1.5f, .prefix_registers = rp, .suffix_registers = rs});
    CAPTURE(rp); CAPTURE(rs);
    check_model(w, GistSchedule{}, 12, 400 + v);
  }
}

TEST_CASE("training forward under Gist: answer-row logits equal the explicit Gist mask (fed rows never see the prompt)") {
  const ModelConfig c = tiny_config(2, true, RopeStyle::kRotateHalf, false);
  const ModelWeights wf = random_weights(c, {.seed = 21, .scale = 2.0f, .prefix_registers = 1, .suffix_registers = 2});
  const BasicModelWeights<double> w = wf.cast<double>();
  const Batch b = tiny_batch(c.vocab_size, 77);
  const auto fp = plan::plan_forward(GistSchedule{}, c.n_layers, 1, 2, std::span<const plan::Sequence>(b.seqs));
  cpu::TrainTape<double> tape;
  MatD logits;
  cpu::train_forward(w, GistSchedule{}, fp, b.targets, 1.0, tape, &logits);
  int row = 0;
  for (std::size_t s = 0; s < b.seqs.size(); ++s) {
    std::vector<test::RefKind> kinds;
    const std::vector<int> fed(b.seqs[s].fed.begin(), b.seqs[s].fed.end());
    const auto input = test::reference_input(wf, b.prompts[s], fed, kinds);
    const auto ref = test::reference_logits(wf, input, [&](int, int q, int k) {
      return k <= q && !(kinds[q] == test::RefKind::kGenerated && kinds[k] == test::RefKind::kPrompt);
    });
    const int n_in = 1 + int(b.prompts[s].size()) + 2;  // the readout is the last suffix register
    for (int r = n_in - 1; r < n_in + int(fed.size()); ++r) {
      double err = 0;
      for (int t = 0; t < c.vocab_size; ++t) err = std::max(err, std::abs(logits(row, t) - ref[r][t]));
      CHECK(err < 1e-10);
      ++row;
    }
    // The mask matters: the plain causal reference differs on the fed rows.
    const auto causal = test::reference_logits(wf, input, [](int, int q, int k) { return k <= q; });
    CHECK(std::abs(causal[n_in][0] - ref[n_in][0]) > 1e-6);
  }
  CHECK(row == logits.rows());
  CHECK_THROWS_AS(GistSchedule{}.validate(c.n_layers, 0), ConfigError);  // what the trainers and engines call
}

TEST_CASE("training forward: answer-row logits equal the naive explicit-mask reference") {
  for (int k : {0, 2, 4}) {
    CAPTURE(k);
    const ModelConfig c = tiny_config(2, k == 2, k == 4 ? RopeStyle::kInterleaved : RopeStyle::kRotateHalf, k != 0);
    const ModelWeights wf = random_weights(c, {.seed = 9 + std::uint64_t(k), .scale = 2.0f, .prefix_registers = 1,
                                               .suffix_registers = 2});
    const BasicModelWeights<double> w = wf.cast<double>();
    const Batch b = tiny_batch(c.vocab_size, 50 + k);
    const EarnSchedule schedule{k};
    const auto fp = plan::plan_forward(schedule, c.n_layers, 1, 2, std::span<const plan::Sequence>(b.seqs));
    cpu::TrainTape<double> tape;
    MatD logits;
    cpu::train_forward(w, schedule, fp, b.targets, 1.0, tape, &logits);
    int row = 0;
    for (std::size_t s = 0; s < b.seqs.size(); ++s) {
      std::vector<test::RefKind> kinds;
      const std::vector<int> fed(b.seqs[s].fed.begin(), b.seqs[s].fed.end());
      const auto input = test::reference_input(wf, b.prompts[s], fed, kinds);
      const auto ref = test::reference_logits(wf, input, test::earn_mask(k, kinds));
      // Rows scored: the last input row that reaches the top, then each fed row.
      const int n_in = 1 + int(b.prompts[s].size()) + 2;
      std::vector<int> want_rows{n_in - 1};
      for (std::size_t j = 0; j < fed.size(); ++j) want_rows.push_back(n_in + int(j));
      for (int r : want_rows) {
        double err = 0;
        for (int t = 0; t < c.vocab_size; ++t) err = std::max(err, std::abs(logits(row, t) - ref[r][t]));
        CHECK(err < 1e-10);
        ++row;
      }
    }
    CHECK(row == logits.rows());
  }
}
