// The backend-independent plan of a forward pass (earn/plan/forward.hpp): input rows, kinds, positions, the rows
// each layer keeps, readout and answer rows, refusals, and the KV accounting against EARN.md's formula; the CPU
// engine's batched prefill against its one-user prefill and the naive explicit-mask reference (the last layer
// computes only the readout rows of a prefill, but caches every row).
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "earn/earn.hpp"
#include "engine_checks.hpp"
#include "reference_model.hpp"

using namespace earn;

namespace {

// A policy that keeps no row at all (to test the refusal).
struct DropsAll {
  static constexpr const char* name = "drops_all";
  static constexpr bool keeps_prompt = false;
  static constexpr bool keeps(RowKind) { return false; }
  static constexpr bool visible(int q, int k) { return k <= q; }
};
using DropAllLayer = Layer<DropsAll, kv::Register>;

}  // namespace

TEST_CASE("plan: input rows [R_p; prompt; R_s; fed], kinds, positions, sources") {
  const std::vector<int> p0{7, 8, 9}, f0{4, 5}, p1{3};
  const plan::Sequence seqs[2] = {{p0, f0}, {p1}};
  const auto fp = plan::plan_forward(DenseSchedule{}, 3, 2, 1, seqs);
  const plan::RowSet& in = fp.input();
  REQUIRE(in.size() == (2 + 3 + 1 + 2) + (2 + 1 + 1));
  CHECK(in.segments() == 2);
  CHECK(in.seg_off == std::vector<int>{0, 8});
  CHECK(in.seg_n == std::vector<int>{8, 4});
  CHECK(fp.source == std::vector<int>{-1, -2, 7, 8, 9, -3, 4, 5, -1, -2, 3, -3});
  CHECK(in.pos == std::vector<int>{0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3});
  using K = RowKind;
  CHECK(in.kind == std::vector<K>{K::kPrefixRegister, K::kPrefixRegister, K::kPrompt, K::kPrompt, K::kPrompt,
                                  K::kSuffixRegister, K::kGenerated, K::kGenerated, K::kPrefixRegister,
                                  K::kPrefixRegister, K::kPrompt, K::kSuffixRegister});
  CHECK(fp.input_len(0) == 6);
  CHECK(fp.input_len(1) == 4);
  // Dense: one phase, readout at the last non-fed row, answer rows = readout + fed rows.
  CHECK(fp.phases.size() == 1u);
  CHECK(fp.layer_phase == std::vector<int>{0, 0, 0});
  CHECK(fp.readout == std::vector<int>{5, 11});
  CHECK(fp.answer_rows(0) == std::vector<int>{5, 6, 7});
  CHECK(fp.all_answer_rows() == std::vector<int>{5, 6, 7, 11});
}

TEST_CASE("plan: EARN drops the prompt at layer k, keeps positions, reads out at the last register") {
  const std::vector<int> p0{7, 8, 9}, f0{4};
  const plan::Sequence seq{p0, f0};
  for (int k = 0; k <= 4; ++k) {
    CAPTURE(k);
    const auto fp = plan::plan_forward(EarnSchedule{k}, 4, 1, 2, std::span(&seq, 1));
    CHECK(fp.phases.size() == (k < 4 ? 2u : 1u));
    for (int l = 0; l < 4; ++l) CHECK(fp.layer_phase[l] == (l < k ? 0 : 1));
    for (int l = 0; l < 4; ++l) CHECK(fp.gathers_before(l) == (l == k));
    if (k < 4) {
      const plan::Phase& late = fp.phases[1];
      CHECK(late.keep == std::vector<int>{0, 4, 5, 6});  // R_p, R_s, R_s, fed
      CHECK(late.rows.pos == std::vector<int>{0, 4, 5, 6});
    }
    CHECK(fp.readout[0] == (k < 4 ? 2 : 5));  // the last suffix register in either phase
    CHECK(fp.answer_rows(0).size() == 2u);
  }
  // No suffix register: the last prefix register carries the prompt; dense: the last prompt token.
  const auto a = plan::plan_forward(EarnSchedule{1}, 4, 2, 0, std::span(&seq, 1));
  CHECK(a.readout[0] == 1);
  CHECK(a.top().pos[a.readout[0]] == 1);
  const auto d = plan::plan_forward(DenseSchedule{}, 4, 0, 0, std::span(&seq, 1));
  CHECK(d.readout[0] == 2);
}

TEST_CASE("plan: refusals") {
  const std::vector<int> empty, p{1, 2};
  const plan::Sequence e{empty}, ok{p};
  CHECK_THROWS_AS(plan::plan_forward(DenseSchedule{}, 2, 1, 1, std::span(&e, 1)), ConfigError);
  CHECK_THROWS_AS(plan::plan_forward(DenseSchedule{}, 2, 1, 1, std::span<const plan::Sequence>()), ConfigError);
  CHECK_THROWS_AS(plan::plan_forward(DenseSchedule{}, 0, 1, 1, std::span(&ok, 1)), ConfigError);
  CHECK_THROWS_AS(plan::plan_forward(Split<1, DenseLayer, DropAllLayer>{}, 2, 1, 1, std::span(&ok, 1)), ConfigError);
  // EARN without registers: nothing reaches the top to read out.
  CHECK_THROWS_AS(plan::plan_forward(EarnSchedule{1}, 2, 0, 0, std::span(&ok, 1)), ConfigError);
}

TEST_CASE("plan: KV rows per user equal EARN.md's k(P+G) + (L-k)(r+G)") {
  for (int L : {1, 4, 7})
    for (int k = 0; k <= L; ++k)
      for (int r : {1, 2, 3})
        for (int P : {1, 20, 101})
          for (int G : {0, 3}) {
            const int rp = r / 2 + r % 2, rs = r / 2, n = P + r;  // EARN.md's P counts the registers
            const long long want = (long long)k * (n + G) + (long long)(L - k) * (r + G);
            CHECK(plan::kv_rows_per_user(EarnSchedule{k}, L, P, rp, rs, G) == want);
          }
  CHECK(plan::kv_rows_per_user(DenseSchedule{}, 6, 30, 1, 1, 4) == 6 * (32 + 4));
}

TEST_CASE("CPU engine: prefill_batch equals one-user prefills; per-layer KV bytes add up") {
  ModelConfig c;
  c.dim = 32;
  c.hidden_dim = 40;
  c.n_layers = 4;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 50;
  c.max_seq_len = 64;
  const ModelWeights w = random_weights(c, {.seed = 3, .scale = 2.0f, .prefix_registers = 1, .suffix_registers = 2});
  for (int k : {0, 2, 4}) {
    CAPTURE(k);
    Engine<EarnSchedule> engine(w, EarnSchedule{k});
    const std::vector<std::vector<int>> prompts{test::random_tokens(5, 50, 1), test::random_tokens(1, 50, 2),
                                                test::random_tokens(17, 50, 3)};
    const std::vector<int> users{2, 0, 1};
    auto batch = engine.make_state({.max_users = 3, .max_rows = 3, .max_prompt = 20, .max_new_tokens = 2});
    const Matrix got = engine.prefill_batch(batch, users, prompts);
    REQUIRE(got.rows() == 3);
    for (int i = 0; i < 3; ++i) {
      auto one = engine.make_state({.max_users = 3, .max_rows = 3, .max_prompt = 20, .max_new_tokens = 2});
      const Vector want = engine.prefill(one, users[i], prompts[i]);
      CHECK((got.row(i).transpose() - want).cwiseAbs().maxCoeff() <= 1e-5f * std::max(1.0f, want.cwiseAbs().maxCoeff()));
      CHECK(batch.input_len(users[i]) == one.input_len(users[i]));
    }
    // Decoding continues from the batched prefill: one row per user. Both against the naive reference, which
    // computes every row at every layer: the engine's last layer computed only the readout rows, so the decode
    // step checks that it still cached every row's K and V there.
    const std::vector<int> rows{0, 1, 2};
    batch.set_rows(rows);
    const std::vector<int> tok{4, 5, 6};
    const Matrix step = engine.decode(batch, tok);
    for (int i = 0; i < 3; ++i) {  // prompt i is user users[i]'s, whose decode row is row users[i]
      CAPTURE(i);
      const int u = users[i];
      std::vector<test::RefKind> kinds;
      const auto input = test::reference_input(w, prompts[i], {tok[u]}, kinds);
      const auto ref = test::reference_logits(w, input, test::earn_mask(k, kinds));
      const int n_in = static_cast<int>(input.size()) - 1;
      int last = n_in - 1;  // the readout: the last input row that reaches the top
      while (k < c.n_layers && kinds[last] == test::RefKind::kPrompt) --last;
      test::check_close(got.row(i).transpose(), ref[last], 1e-5, "batched prefill");
      test::check_close(step.row(u).transpose(), ref[n_in], 1e-5, "decode after the batched prefill");
    }
    Index sum = 0;
    for (int l = 0; l < c.n_layers; ++l) sum += batch.layer_kv_bytes(l);
    CHECK(sum == batch.kv_bytes());
    const Index rows_held = plan::kv_rows_per_user(EarnSchedule{k}, 4, 5, 1, 2, 1) +
                            plan::kv_rows_per_user(EarnSchedule{k}, 4, 1, 1, 2, 1) +
                            plan::kv_rows_per_user(EarnSchedule{k}, 4, 17, 1, 2, 1);
    CHECK(batch.kv_bytes() == rows_held * 2 * c.kv_dim() * Index(sizeof(float)));
    // Refused: a user twice, a user out of range, prompts and users of different counts.
    const std::vector<int> twice{1, 1, 0};
    CHECK_THROWS_AS(engine.prefill_batch(batch, twice, prompts), ConfigError);
    const std::vector<int> far{0, 1, 3};
    CHECK_THROWS_AS(engine.prefill_batch(batch, far, prompts), RangeError);
    CHECK_THROWS_AS(engine.prefill_batch(batch, std::span(users).first(2), prompts), ConfigError);
  }
}
