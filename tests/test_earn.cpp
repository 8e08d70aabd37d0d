// EARN core: the fast path (engine with Split schedules) against the naive explicit-mask reference, the dense
// equivalence at k = L, refusals of undefined schedules, and exact KV byte accounting.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "earn/earn.hpp"
#include "engine_checks.hpp"
#include "reference_model.hpp"

using namespace earn;
using earn::test::check_close;
using earn::test::small_config;
using earn::test::random_tokens;
using earn::test::RefKind;

namespace {

}  // namespace

TEST_CASE("EARN fast path equals the explicit-mask reference through prefill and decode") {
  const ModelConfig c = small_config();
  const int L = c.n_layers;
  for (int rp : {0, 1, 3})
    for (int rs : {0, 1, 3}) {
      const ModelWeights w = random_weights(c, {.seed = std::uint64_t(10 * rp + rs), .scale = 2.0f,
                                                .prefix_registers = rp, .suffix_registers = rs});
      for (int k : {0, 1, L / 2, L - 1, L}) {
        if (k < L && rp + rs == 0) {
          CHECK_THROWS_AS(Engine<EarnSchedule>(w, EarnSchedule{k}), ConfigError);
          continue;
        }
        for (int P : {1, 7, 64}) {
          CAPTURE(rp); CAPTURE(rs); CAPTURE(k); CAPTURE(P);
          const auto prompt = random_tokens(P, c.vocab_size, 100 + P);
          const std::vector<int> gen = random_tokens(3, c.vocab_size, 7 + k);
          Engine<EarnSchedule> engine(w, EarnSchedule{k});
          auto st = engine.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 64, .max_new_tokens = 4});

          std::vector<RefKind> kinds;
          const auto input = earn::test::reference_input(w, prompt, gen, kinds);
          const auto ref = earn::test::reference_logits(w, input, earn::test::earn_mask(k, kinds));
          // The first answer token is predicted at the last input row that reaches the top.
          const int n_in = rp + P + rs;
          int last = n_in - 1;
          if (k < L)
            while (kinds[last] == RefKind::kPrompt) --last;
          check_close(engine.prefill(st, 0, prompt), ref[last], 1e-5, "prefill");
          const int rows[1] = {0};
          st.set_rows(rows);
          for (int g = 0; g < 3; ++g) {
            const int tok[1] = {gen[g]};
            check_close(engine.decode(st, tok).row(0).transpose(), ref[n_in + g], 1e-5, "decode");
          }
        }
      }
    }
}

TEST_CASE("EARN matches the reference with Qwen2 biases and interleaved RoPE too") {
  for (auto style : {RopeStyle::kRotateHalf, RopeStyle::kInterleaved}) {
    const ModelConfig c = small_config(style, /*bias=*/true);
    const ModelWeights w = random_weights(c, {.seed = 5, .scale = 2.0f});
    Engine<EarnSchedule> engine(w, EarnSchedule{2});
    auto st = engine.make_state({.max_prompt = 16, .max_new_tokens = 2});
    const auto prompt = random_tokens(9, c.vocab_size, 3);
    std::vector<RefKind> kinds;
    const std::vector<int> gen{4};
    const auto ref = earn::test::reference_logits(w, earn::test::reference_input(w, prompt, gen, kinds),
                                                  earn::test::earn_mask(2, kinds));
    check_close(engine.prefill(st, 0, prompt), ref[1 + 9], 1e-5, "prefill");
    const int rows[1] = {0};
    st.set_rows(rows);
    check_close(engine.decode(st, gen).row(0).transpose(), ref[1 + 9 + 1], 1e-5, "decode");
  }
}

TEST_CASE("k = L with registers equals the dense model on [R_p; prompt; R_s]") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 9, .scale = 2.0f, .prefix_registers = 2, .suffix_registers = 1});
  Engine<EarnSchedule> earn_engine(w, EarnSchedule{c.n_layers});
  Engine<DenseSchedule> dense(w);
  Engine<EarnScheduleK<4>> fixed(w);  // the same split fixed at compile time
  const auto prompt = random_tokens(20, c.vocab_size, 1);
  auto s1 = earn_engine.make_state({.max_prompt = 20, .max_new_tokens = 3});
  auto s2 = dense.make_state({.max_prompt = 20, .max_new_tokens = 3});
  auto s3 = fixed.make_state({.max_prompt = 20, .max_new_tokens = 3});
  const Vector a = earn_engine.prefill(s1, 0, prompt), b = dense.prefill(s2, 0, prompt), f = fixed.prefill(s3, 0, prompt);
  CHECK((a - b).cwiseAbs().maxCoeff() == 0.0f);  // same arithmetic in the same order: bit-identical
  CHECK((f - b).cwiseAbs().maxCoeff() == 0.0f);
  CHECK(s1.kv_bytes() == s2.kv_bytes());
}

TEST_CASE("Undefined schedules are refused with ConfigError") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.prefix_registers = 0, .suffix_registers = 0});
  CHECK_THROWS_AS(Engine<EarnSchedule>(w, EarnSchedule{c.n_layers + 1}), ConfigError);  // k > L
  CHECK_THROWS_AS(Engine<EarnSchedule>(w, EarnSchedule{2}), ConfigError);               // no registers, k < L
  CHECK_THROWS_AS(EarnSchedule{-3}, ConfigError);
  CHECK_NOTHROW(Engine<EarnSchedule>(w, EarnSchedule{c.n_layers}));  // k = L without registers is just dense
  const ModelWeights wr = random_weights(c);
  Engine<EarnSchedule> e(wr, EarnSchedule{1});
  auto st = e.make_state({.max_prompt = 8, .max_new_tokens = 2});
  CHECK_THROWS_AS(e.prefill(st, 0, std::vector<int>{}), ConfigError);          // empty prompt
  CHECK_THROWS_AS(e.prefill(st, 0, std::vector<int>{1, c.vocab_size}), RangeError);  // token out of range
  CHECK_THROWS_AS(e.prefill(st, 0, std::vector<int>(9, 1)), RangeError);       // longer than the state holds
  CHECK_THROWS_AS(e.prefill(st, 1, std::vector<int>{1}), RangeError);          // no such user
  CHECK_THROWS_AS(e.make_state({.max_prompt = c.max_seq_len}), ConfigError);   // past the context
}

TEST_CASE("KV bytes equal EARN.md's formula for every k, and late layers never reserve prompt-sized buffers") {
  const ModelConfig c = small_config();
  const int L = c.n_layers, rp = 1, rs = 1, r = rp + rs;
  const ModelWeights w = random_weights(c, {.seed = 2, .prefix_registers = rp, .suffix_registers = rs});
  const int prompt_len = 50, G = 4;
  const Index row_bytes = 2 * Index{c.kv_dim()} * Index{sizeof(float)};
  const auto prompt = random_tokens(prompt_len, c.vocab_size, 4);
  for (int k = 0; k <= L; ++k) {
    CAPTURE(k);
    Engine<EarnSchedule> e(w, EarnSchedule{k});
    auto st = e.make_state({.max_prompt = prompt_len, .max_new_tokens = G});
    e.prefill(st, 0, prompt);
    const int rows[1] = {0};
    st.set_rows(rows);
    for (int g = 0; g < G; ++g) {
      const int tok[1] = {g + 1};
      e.decode(st, tok);
    }
    // P counts the registers (EARN.md): early layers hold P + G rows, late layers r + G.
    const Index P = prompt_len + r;
    CHECK(st.kv_bytes() == (Index{k} * (P + G) + Index{L - k} * (r + G)) * row_bytes);
    const double dense_rows = double(L) * (P + G);
    const double reduction = 1.0 - double(k * (P + G) + (L - k) * (r + G)) / dense_rows;
    CHECK(1.0 - double(st.kv_bytes()) / (dense_rows * row_bytes) == doctest::Approx(reduction).epsilon(1e-12));
    for (int l = 0; l < L; ++l) {
      const auto& cache = st.layer_cache(l);
      // Late layers: capacity is the registers alone, independent of the prompt.
      CHECK(cache.prefix_capacity() == (l < k ? P : r));
      // Each cache's own bytes: EARN.md's per-layer rows.
      CHECK(st.layer_kv_bytes(l) == (l < k ? P + G : r + G) * row_bytes);
    }
    CHECK(st.kv_capacity_bytes() == (Index{k} * (P + G) + Index{L - k} * (r + G)) * row_bytes);
  }
}

TEST_CASE("Prefill of N tokens then decode equals N+1 single-token steps") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 8, .scale = 2.0f, .prefix_registers = 0, .suffix_registers = 0});
  Engine<DenseSchedule> e(w);
  const auto tokens = random_tokens(12, c.vocab_size, 6);
  auto a = e.make_state({.max_prompt = 12, .max_new_tokens = 1});
  e.prefill(a, 0, std::span<const int>(tokens).first(11));
  const int rows[1] = {0};
  a.set_rows(rows);
  const Matrix la = e.decode(a, std::span<const int>(tokens).subspan(11, 1));
  auto b = e.make_state({.max_prompt = 1, .max_new_tokens = 11});
  e.prefill(b, 0, std::span<const int>(tokens).first(1));
  b.set_rows(rows);
  Matrix lb;
  for (int i = 1; i < 12; ++i) lb = e.decode(b, std::span<const int>(tokens).subspan(i, 1));
  const float err = (la - lb).cwiseAbs().maxCoeff() / std::max(1.0f, lb.cwiseAbs().maxCoeff());
  CHECK(err <= 1e-5f);
}

TEST_CASE("Beams sharing a prompt equal separately prefilled users, and reorder carries generated KV") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 3, .scale = 2.0f});
  for (int k : {0, 2, 4}) {
    Engine<EarnSchedule> e(w, EarnSchedule{k});
    const auto prompt = random_tokens(10, c.vocab_size, 11);
    // Shared: one user, three rows. Separate: three users, one row each.
    auto shared = e.make_state({.max_users = 1, .max_rows = 3, .max_prompt = 10, .max_new_tokens = 3});
    auto sep = e.make_state({.max_users = 3, .max_rows = 3, .max_prompt = 10, .max_new_tokens = 3});
    e.prefill(shared, 0, prompt);
    for (int u = 0; u < 3; ++u) e.prefill(sep, u, prompt);
    const int su[3] = {0, 0, 0}, pu[3] = {0, 1, 2};
    shared.set_rows(su);
    sep.set_rows(pu);
    const int t1[3] = {5, 6, 7};
    Matrix a = e.decode(shared, t1), b = e.decode(sep, t1);
    CHECK((a - b).cwiseAbs().maxCoeff() <= 1e-6f);
    const int parent[3] = {2, 2, 0};
    shared.reorder(parent);
    sep.reorder(parent);
    CHECK(sep.row_user()[0] == 2);
    const int t2[3] = {1, 2, 3};
    a = e.decode(shared, t2);
    b = e.decode(sep, t2);
    CHECK((a - b).cwiseAbs().maxCoeff() <= 1e-6f);
    // Row 1 now continues old row 2 (token 7 then 2): same as a fresh single sequence doing exactly that.
    auto one = e.make_state({.max_prompt = 10, .max_new_tokens = 3});
    e.prefill(one, 0, prompt);
    const int r0[1] = {0};
    one.set_rows(r0);
    e.decode(one, std::vector<int>{7});
    const Matrix c1 = e.decode(one, std::vector<int>{2});
    // Different row counts take different GEMM kernels: equal up to fp32 rounding, 1e-5 relative.
    CHECK((a.row(1) - c1.row(0)).cwiseAbs().maxCoeff() <= 1e-5f * std::max(1.0f, c1.cwiseAbs().maxCoeff()));
  }
}

namespace {
struct WindowPolicy {  // a policy without the causal promise: the kernels must ask it pair by pair
  static constexpr const char* name = "window";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(RowKind) { return true; }
  static constexpr bool visible(int q, int k) { return k <= q && q - k < 4; }
};
}  // namespace

TEST_CASE("Policies that declare attention::is_causal keep the promise: visible(q, k) is exactly k <= q") {
  static_assert(attention::Policy<WindowPolicy>);
  static_assert(attention::is_causal<attention::DenseCausal>() && attention::is_causal<attention::RegisterOnly>());
  static_assert(!attention::is_causal<WindowPolicy>());
  for (int q = -3; q < 70; ++q)
    for (int k = -3; k < 70; ++k) {
      CHECK(attention::DenseCausal::visible(q, k) == (k <= q));
      CHECK(attention::RegisterOnly::visible(q, k) == (k <= q));
    }
}
