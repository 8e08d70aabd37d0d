// The attention observer (earn/attention/observer.hpp) on the CPU engine against the naive double-precision reference
// (tests/reference_model.hpp, explicit per-layer masks): recorded probability rows, head / tail mass, density and
// entropy for a dense and an EARN schedule with GQA, row selection, per-sample averaging, and refused requests.
#include <doctest/doctest.h>

#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "earn/attention/observer.hpp"
#include "earn/earn.hpp"
#include "reference_model.hpp"

using namespace earn;
using attention::Observer;
using attention::ObserverOptions;
using attention::RowQuery;
using earn::test::random_tokens;
using earn::test::RefKind;

namespace {

// Three query heads per KV head (GQA); dimensions small enough for the double-precision reference.
ModelConfig small_config() {
  return {.dim = 48, .hidden_dim = 70, .n_layers = 4, .n_heads = 6, .n_kv_heads = 2, .vocab_size = 97,
          .max_seq_len = 64, .rope_theta = 5000.0f};
}

// One prompt through the reference: every row's probabilities p[layer][row][head][key] (0 where masked), what each
// row may see, and which rows exist at each layer (EARN drops prompt rows from layer k on).
struct RefSample {
  int rp = 0;
  std::vector<RefKind> kind;                           // [rows]
  std::vector<std::vector<std::vector<std::vector<double>>>> p;  // [layer][row][head][key]
  std::vector<std::vector<std::vector<bool>>> vis;    // [layer][row][key]
  int k = 0;
  bool exists(int l, int t) const { return l < k || kind[t] != RefKind::kPrompt; }
  int rows() const { return static_cast<int>(kind.size()); }
};

RefSample reference(const ModelWeights& w, int k, const std::vector<int>& prompt) {
  const ModelConfig& c = w.config;
  RefSample r;
  r.k = k;
  r.rp = static_cast<int>(w.registers.prefix.rows());
  const auto input = earn::test::reference_input(w, prompt, {}, r.kind);
  const int n = r.rows();
  const auto mask = earn::test::earn_mask(k, r.kind);
  r.p.assign(c.n_layers, std::vector<std::vector<std::vector<double>>>(n, std::vector<std::vector<double>>(c.n_heads)));
  r.vis.assign(c.n_layers, std::vector<std::vector<bool>>(n, std::vector<bool>(n)));
  for (int l = 0; l < c.n_layers; ++l)
    for (int q = 0; q < n; ++q)
      for (int j = 0; j < n; ++j) r.vis[l][q][j] = mask(l, q, j);
  earn::test::reference_logits(w, input, mask,
                               [&](int l, int q, int h, const std::vector<double>& p) { r.p[l][q][h] = p; });
  return r;
}

// The definitions of observer.hpp, written out again over the reference's probabilities: keys in position order,
// head = the first th visible keys, tail = the last tt, density = p > eps (or > 1/visible when eps <= 0), entropy.
// fp32 probabilities differ from these by ~1e-6, so a key within kNear of the threshold may fall on either side:
// `density` counts it as below, `density_hi` as above, and the observer's density must lie between the two.
constexpr double kNear = 1e-5;
struct RefStats {
  attention::RowStats s;
  double density_hi = 0;
};

RefStats reference_stats(const RefSample& r, int l, int q, int h, int th, int tt, double eps) {
  std::vector<double> seen;
  for (int j = 0; j < r.rows(); ++j)
    if (r.vis[l][q][j]) seen.push_back(r.p[l][q][h][j]);
  const int n = static_cast<int>(seen.size());
  const double thr = eps > 0 ? eps : 1.0 / n;
  RefStats out;
  attention::RowStats& s = out.s;
  for (int j = 0; j < n; ++j) {
    if (j < th) s.head_mass += seen[j];
    if (j >= n - tt) s.tail_mass += seen[j];
    // A query seeing one key has p = 1 = 1/n exactly in both (kAboveUniform: not dense), so no ambiguity there.
    const double near = n > 1 ? kNear : 0.0;
    if (seen[j] > thr + near) s.density += 1.0 / n;
    if (seen[j] > thr - near) out.density_hi += 1.0 / n;
    if (seen[j] > 0) s.entropy -= seen[j] * std::log(seen[j]);
  }
  return out;
}

void check_stats(const attention::RowStats& got, const RefStats& want, double tol) {
  CHECK(std::abs(got.head_mass - want.s.head_mass) <= tol);
  CHECK(std::abs(got.tail_mass - want.s.tail_mass) <= tol);
  CHECK(got.density >= want.s.density - 1e-12);
  CHECK(got.density <= want.density_hi + 1e-12);
  CHECK(std::abs(got.entropy - want.s.entropy) <= tol);
}

RowKind row_kind(const RefSample& r, int t) {
  if (r.kind[t] == RefKind::kPrompt) return RowKind::kPrompt;
  return t < r.rp ? RowKind::kPrefixRegister : RowKind::kSuffixRegister;
}

// Query positions recorded for sample 0, head 0, layer l.
std::vector<int> recorded_positions(const Observer& obs, int l) {
  std::vector<int> out;
  for (const auto& r : obs.recorded())
    if (r.sample == 0 && r.head == 0 && r.layer == l) out.push_back(r.q_pos);
  return out;
}

}  // namespace

TEST_CASE("observer: recorded rows and statistics equal the naive reference (dense and EARN, GQA, two users)") {
  const ModelConfig c = small_config();
  const int L = c.n_layers, H = c.n_heads;
  struct Setting {
    std::string name;
    int k, rp, rs;
  };
  for (const Setting& set : {Setting{"dense", L, 0, 0}, Setting{"EARN k=2, 1+1", 2, 1, 1}}) {
    CAPTURE(set.name);
    const ModelWeights w =
        random_weights(c, {.seed = 31, .scale = 2.0f, .prefix_registers = set.rp, .suffix_registers = set.rs});
    const Engine<EarnSchedule> engine(w, EarnSchedule{set.k});
    // Two prompts of different lengths in one batch: per-sample averaging must weigh them equally.
    const std::vector<std::vector<int>> prompts = {random_tokens(7, c.vocab_size, 5), random_tokens(12, c.vocab_size, 6)};
    const int users[2] = {0, 1};
    std::vector<RefSample> ref;
    for (const auto& p : prompts) ref.push_back(reference(w, set.k, p));

    auto st = engine.make_state({.max_users = 2, .max_rows = 2, .max_prompt = 16, .max_new_tokens = 2});
    const Matrix plain = engine.prefill_batch(st, users, prompts);
    for (double eps : {0.05, 0.0}) {  // 0: DensityRule::kAboveUniform in reference_stats
      CAPTURE(eps);
      const int th = eps > 0 ? 2 : 1, tt = eps > 0 ? 3 : 1;
      Observer obs({.record = {.kinds = attention::kAllKinds}, .head_keys = th, .tail_keys = tt,
                    .threshold = eps > 0 ? eps : 0.5,
                    .density = eps > 0 ? attention::DensityRule::kAbsolute : attention::DensityRule::kAboveUniform});
      st.observe(&obs);
      const Matrix seen = engine.prefill_batch(st, users, prompts);
      st.observe(nullptr);
      CHECK((seen.array() == plain.array()).all());  // observing changes nothing
      CHECK(obs.samples() == 2);

      // Every row that exists at a layer is recorded once per head, over exactly the keys it may see.
      std::size_t expect_rows = 0;
      for (const auto& r : ref)
        for (int l = 0; l < L; ++l)
          for (int t = 0; t < r.rows(); ++t) expect_rows += r.exists(l, t) ? H : 0;
      const auto rec = obs.recorded();
      REQUIRE(rec.size() == expect_rows);
      double worst = 0;
      for (const auto& row : rec) {
        const RefSample& r = ref.at(row.sample);
        CHECK(row.user == row.sample);
        REQUIRE(r.exists(row.layer, row.q_pos));
        CHECK(row.q_kind == row_kind(r, row.q_pos));
        std::vector<int> want_keys;
        for (int j = 0; j < r.rows(); ++j)
          if (r.vis[row.layer][row.q_pos][j]) want_keys.push_back(j);
        REQUIRE(row.k_pos == want_keys);
        for (std::size_t j = 0; j < want_keys.size(); ++j) {
          REQUIRE(std::isfinite(row.p[j]));
          CHECK(row.k_kind[j] == row_kind(r, want_keys[j]));
          worst = std::max(worst, std::abs(row.p[j] - r.p[row.layer][row.q_pos][row.head][want_keys[j]]));
        }
      }
      CHECK(worst <= kNear);  // fp32 softmax after fp32 layers against double (about 1e-6 here)

      // Statistics: each sample's mean over its rows at (l, h), then the mean over the two samples.
      for (int l = 0; l < L; ++l)
        for (int h = 0; h < H; ++h) {
          CAPTURE(l);
          CAPTURE(h);
          RefStats want;
          std::int64_t rows = 0;
          for (const auto& r : ref) {
            RefStats sample;
            int n = 0;
            for (int t = 0; t < r.rows(); ++t)
              if (r.exists(l, t)) {
                const RefStats row = reference_stats(r, l, t, h, th, tt, eps);
                sample.s += row.s;
                sample.density_hi += row.density_hi;
                ++n;
              }
            want.s += sample.s.scaled(0.5 / n);
            want.density_hi += sample.density_hi * 0.5 / n;
            rows += n;
          }
          const attention::HeadStats& got = obs.stats(l, h);
          CHECK(got.samples == 2);
          CHECK(got.rows == rows);
          check_stats(got.mean(), want, 1e-5);
        }
    }
  }
}

TEST_CASE("observer: row queries pick readout, last-n, kinds, positions and layers") {
  const ModelConfig c = small_config();
  const auto prompt = random_tokens(7, c.vocab_size, 9);
  const std::vector<int> all_input = {0, 1, 2, 3, 4, 5, 6, 7, 8};
  const std::vector<int> registers = {0, 8};  // EARN k = 2, 1 + 1: late layers hold the two registers only
  const ModelWeights w = random_weights(c, {.seed = 3});
  const Engine<EarnSchedule> engine(w, EarnSchedule{2});
  auto st = engine.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 16, .max_new_tokens = 2});
  auto run = [&](RowQuery record) {
    Observer obs({.record = std::move(record)});
    st.observe(&obs);
    engine.prefill(st, 0, prompt);
    return obs;
  };
  SUBCASE("readout: the last suffix register in every layer") {
    const Observer obs = run({.readout = true});
    for (int l = 0; l < c.n_layers; ++l) CHECK(recorded_positions(obs, l) == std::vector<int>{8});
    CHECK(obs.recorded().size() == std::size_t(c.n_layers * c.n_heads));
  }
  SUBCASE("last 2 rows of each layer's rows") {
    const Observer obs = run({.last = 2});
    CHECK(recorded_positions(obs, 0) == std::vector<int>{7, 8});
    CHECK(recorded_positions(obs, 1) == std::vector<int>{7, 8});
    CHECK(recorded_positions(obs, 2) == registers);
    CHECK(recorded_positions(obs, 3) == registers);
  }
  SUBCASE("prompt rows of layers 1 and 3: none left at layer 3") {
    const Observer obs = run({.kinds = attention::kind_bit(RowKind::kPrompt), .layers = {1, 3}});
    CHECK(recorded_positions(obs, 0).empty());
    CHECK(recorded_positions(obs, 1) == std::vector<int>{1, 2, 3, 4, 5, 6, 7});
    CHECK(recorded_positions(obs, 3).empty());
  }
  SUBCASE("positions 0 and 3") {
    const Observer obs = run({.positions = {3, 0}});
    CHECK(recorded_positions(obs, 0) == std::vector<int>{0, 3});
    CHECK(recorded_positions(obs, 3) == std::vector<int>{0});
  }
  SUBCASE("every row, first sample only") {
    Observer obs({.record = {}, .record_samples = 1});
    st.observe(&obs);
    engine.prefill(st, 0, prompt);
    engine.prefill(st, 0, prompt);
    CHECK(recorded_positions(obs, 0) == all_input);
    for (const auto& r : obs.recorded()) CHECK(r.sample == 0);
    CHECK(obs.stats(0, 0).samples == 2);
    CHECK(obs.stats(0, 0).rows == 18);
    CHECK(obs.stats(3, 0).rows == 4);
  }
  SUBCASE("readout without suffix registers is the last prefix register") {
    const ModelWeights w0 = random_weights(c, {.seed = 3, .prefix_registers = 1, .suffix_registers = 0});
    const Engine<EarnSchedule> e0(w0, EarnSchedule{2});
    auto s0 = e0.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 16, .max_new_tokens = 2});
    Observer obs({.reduce = {.readout = true}, .record = {.readout = true}});
    s0.observe(&obs);
    e0.prefill(s0, 0, prompt);
    for (int l = 0; l < c.n_layers; ++l) CHECK(recorded_positions(obs, l) == std::vector<int>{0});
    // The prefix register sees only itself: all its mass is on the first and the last key, its entropy is 0.
    const attention::RowStats m = obs.stats(1, 2).mean();
    CHECK(m.head_mass == doctest::Approx(1.0));
    CHECK(m.tail_mass == doctest::Approx(1.0));
    CHECK(m.density == 1.0);
    CHECK(m.entropy == doctest::Approx(0.0));
    CHECK(obs.stats(1, 2).rows == 1);
  }
}

TEST_CASE("observer: bad requests are typed errors with clear messages") {
  using doctest::Contains;
  CHECK_THROWS_WITH_AS(Observer({.head_keys = 0}), Contains("head_keys (T_h) and tail_keys (T_t) must be >= 1"),
                       ConfigError);
  CHECK_THROWS_WITH_AS(Observer({.tail_keys = -2}), Contains("got 1 and -2"), ConfigError);
  for (double eps : {0.0, 1.0, -0.1, 1.5, std::numeric_limits<double>::quiet_NaN()})
    CHECK_THROWS_WITH_AS(Observer({.threshold = eps}), Contains("density threshold eps must lie in (0, 1)"),
                         ConfigError);
  CHECK_THROWS_WITH_AS(Observer({.reduce = {.last = -1}}), Contains("reduce.last must be >= 0, got -1"), RangeError);
  CHECK_THROWS_WITH_AS(Observer({.record = {.layers = {-1}}}), Contains("record asks for layer -1"), RangeError);
  CHECK_THROWS_WITH_AS(Observer({.record = {.positions = {-3}}}), Contains("record asks for row position -3"),
                       RangeError);
  CHECK_THROWS_AS(Observer({.record_samples = -1}), ConfigError);

  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 4});
  const Engine<EarnSchedule> engine(w, EarnSchedule{2});
  auto st = engine.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 16, .max_new_tokens = 2});
  const auto prompt = random_tokens(7, c.vocab_size, 10);
  Observer past_layers({.reduce = {.layers = {4}}});
  st.observe(&past_layers);
  CHECK_THROWS_WITH_AS(engine.prefill(st, 0, prompt), Contains("layer 4 requested, the model has 4 layers (0..3)"),
                       RangeError);
  CHECK(past_layers.samples() == 0);
  Observer past_rows({.record = {.positions = {9}}});
  st.observe(&past_rows);
  CHECK_THROWS_WITH_AS(engine.prefill(st, 0, prompt), Contains("row position 9 requested, sequence 0 has 9 input rows"),
                       RangeError);
  Observer ok;
  st.observe(&ok);
  engine.prefill(st, 0, prompt);  // the state still works after the refusals
  CHECK(ok.samples() == 1);
  CHECK_THROWS_WITH_AS(ok.stats(4, 0), Contains("stats(4, 0) outside 4 layers x 6 heads"), RangeError);
  CHECK_THROWS_AS(ok.stats(0, 6), RangeError);
  CHECK_THROWS_AS(ok.stats(0, -1), RangeError);

  ModelConfig c3 = c;
  c3.n_layers = 3;
  const ModelWeights w3 = random_weights(c3, {.seed = 4});
  const Engine<EarnSchedule> e3(w3, EarnSchedule{1});
  auto s3 = e3.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 16, .max_new_tokens = 2});
  s3.observe(&ok);
  CHECK_THROWS_WITH_AS(e3.prefill(s3, 0, prompt), Contains("clear() it or use another"), ConfigError);
}
