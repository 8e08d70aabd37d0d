// KV presses (the paper's inference-time baselines): the engine's prefill and decode under StreamingLLM, SnapKV,
// H2O and PyramidKV against the naive double-precision reference, whose per-head masks come from a selection
// written here independently (probabilities of the reference's own prefill rows, iterative arg-max); kept rows per
// head, KV bytes, per-layer schedules and refusals; Gist (kind rule + register-only cache) and a kind rule among
// prefill rows against explicit masks.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <set>
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

// The rows one KV head keeps, written without kv::select_rows: raw scores from the reference's probabilities
// probs[h][t][j] of the n prefill rows, pooled by a direct sum, then sinks, recent and repeated arg-max.
std::vector<int> naive_keep(const kv::PressRule& r, int n, int g, int group,
                            const std::vector<std::vector<std::vector<double>>>& probs) {
  std::set<int> kept;
  const int keep = std::min(r.keep, n);
  if (keep >= n) {
    for (int j = 0; j < n; ++j) kept.insert(j);
    return {kept.begin(), kept.end()};
  }
  std::vector<double> raw(n, 0.0);
  if (r.score != kv::Score::kNone) {
    const int t0 = r.score == kv::Score::kWindow ? n - std::min(r.window, n) : 0;
    for (int h = g * group; h < (g + 1) * group; ++h)
      for (int t = t0; t < n; ++t)
        for (int j = 0; j < n; ++j) raw[j] += probs[h][t][j] / double(group * (r.score == kv::Score::kWindow ? n - t0 : 1));
  }
  const int sinks = std::min(r.sinks, keep), recent = std::min(r.recent, keep - sinks), m = n - recent;
  for (int j = 0; j < sinks; ++j) kept.insert(j);
  for (int j = m; j < n; ++j) kept.insert(j);
  std::vector<double> pooled(m, 0.0);
  for (int j = 0; j < m; ++j) {
    for (int t = j - r.pool / 2; t <= j + r.pool / 2; ++t)
      if (t >= 0 && t < m) pooled[j] += raw[t];
    pooled[j] /= r.pool;
  }
  while (static_cast<int>(kept.size()) < keep) {
    int best = -1;
    for (int j = sinks; j < m; ++j)
      if (!kept.count(j) && (best < 0 || pooled[j] > pooled[best])) best = j;
    REQUIRE(best >= 0);
    kept.insert(best);
  }
  return {kept.begin(), kept.end()};
}

// Prefill `prompt` and decode `gen` under schedule `s`; compare every logit row with the reference whose generated
// rows see, at layer l and query head h, only the rows naive_keep chose for h's KV head (and generated rows).
template <class S, class Rule>
void check_press(const ModelWeights& w, const S& s, Rule rule_of, const std::vector<int>& prompt,
                 const std::vector<int>& gen) {
  const ModelConfig& c = w.config;
  const int L = c.n_layers, group = c.n_heads / c.n_kv_heads, rp = w.registers.count();
  const int n = rp + static_cast<int>(prompt.size());  // registers all prefix or suffix: rows the prefill computes
  Engine<S> engine(w, s);
  auto st = engine.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 64, .max_new_tokens = 4});

  std::vector<RefKind> kinds;
  const auto input = earn::test::reference_input(w, prompt, gen, kinds);
  // probs[l][h][t] = row t's probabilities (prefill rows only).
  std::vector<std::vector<std::vector<std::vector<double>>>> probs(
      L, std::vector<std::vector<std::vector<double>>>(c.n_heads, std::vector<std::vector<double>>(n)));
  std::vector<std::vector<std::vector<int>>> sel(L);  // [l][kv head] kept rows, computed at the first decode row
  auto on_probs = [&](int l, int t, int h, const std::vector<double>& p) {
    if (t < n) probs[l][h][t].assign(p.begin(), p.begin() + n);
  };
  auto mask = [&](int l, int q, int h, int k) {
    if (k > q) return false;
    if (q < n || k >= n) return true;
    if (sel[l].empty())
      for (int g = 0; g < c.n_kv_heads; ++g) sel[l].push_back(naive_keep(rule_of(l, n), n, g, group, probs[l]));
    const auto& keep = sel[l][h / group];
    return std::binary_search(keep.begin(), keep.end(), k);
  };
  const auto ref = earn::test::reference_logits(w, input, mask, on_probs);

  check_close(engine.prefill(st, 0, prompt), ref[n - 1], 1e-5, "prefill");
  Index rows_held = 0;
  for (int l = 0; l < L; ++l) {
    CAPTURE(l);
    const auto& cache = st.layer_cache(l);
    const int keep = std::min(rule_of(l, n).keep, n);
    REQUIRE(cache.prefix_len(0) == keep);
    rows_held += keep;
    const auto& hp = cache.prefix_head_positions(0);
    REQUIRE(hp.size() == std::size_t(keep) * c.n_kv_heads);
    for (int g = 0; g < c.n_kv_heads; ++g) {
      const std::vector<int> want = naive_keep(rule_of(l, n), n, g, group, probs[l]);
      std::vector<int> got;
      for (int j = 0; j < keep; ++j) got.push_back(hp[std::size_t(j) * c.n_kv_heads + g]);
      CHECK(got == want);
    }
  }
  const Index row_bytes = 2 * Index{c.kv_dim()} * Index{sizeof(float)};
  CHECK(st.kv_bytes() == rows_held * row_bytes);
  const int rows[1] = {0};
  st.set_rows(rows);
  for (int g = 0; g < static_cast<int>(gen.size()); ++g) {
    const int tok[1] = {gen[g]};
    check_close(engine.decode(st, tok).row(0).transpose(), ref[n + g], 1e-5, "decode");
  }
  CHECK(st.kv_bytes() == (rows_held + Index{L} * static_cast<Index>(gen.size())) * row_bytes);
}

template <class P>
void check_press_value(const ModelWeights& w, const P& press, const std::vector<int>& prompt,
                       const std::vector<int>& gen) {
  CAPTURE(P::name);
  const int L = w.config.n_layers;
  check_press(w, press_schedule(press), [&](int l, int n) { return press.rule(l, L, n); }, prompt, gen);
}

// README's score-based press, and its position-only policy.
struct LastQueries {
  static constexpr const char* name = "last_queries";
  kv::PressRule rule(int, int, int) const { return {.keep = 17, .sinks = 1, .score = kv::Score::kWindow, .window = 4}; }
};
struct SinkWindow {
  static constexpr const char* name = "sink_window";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(RowKind) { return true; }
  static constexpr bool visible(int q, int k) { return k <= q && (k < 4 || q - k < 64); }
};

}  // namespace

TEST_CASE("README's new press and new policy run as written and keep what the reference keeps") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 8, .scale = 2.0f, .prefix_registers = 0, .suffix_registers = 0});
  const auto prompt = random_tokens(40, c.vocab_size, 3);
  const auto gen = random_tokens(3, c.vocab_size, 4);
  using LastLayer = Layer<attention::DenseCausal, kv::Pressed<LastQueries>>;
  check_press(w, Uniform<LastLayer>{}, [](int l, int n) { return LastQueries{}.rule(l, 4, n); }, prompt, gen);

  // The sink + window policy over 70 rows: the explicit mask of the same rule.
  using SinkLayer = Layer<SinkWindow, kv::Contiguous>;
  Engine<Uniform<SinkLayer>> engine(w);
  auto st = engine.make_state({.max_prompt = 100, .max_new_tokens = 4});
  const auto long_prompt = random_tokens(70, c.vocab_size, 5);
  std::vector<RefKind> kinds;
  const auto input = earn::test::reference_input(w, long_prompt, {}, kinds);
  const auto ref = earn::test::reference_logits(w, input, [](int, int q, int k) { return k <= q && (k < 4 || q - k < 64); });
  check_close(engine.prefill(st, 0, long_prompt), ref.back(), 1e-5, "sink + window prefill");
}

TEST_CASE("Presses keep the rows an independent selection keeps, and prefill + decode equal the reference") {
  const ModelConfig c = small_config();
  for (int regs : {0, 1}) {
    CAPTURE(regs);
    const ModelWeights w = random_weights(c, {.seed = std::uint64_t(31 + regs), .scale = 2.0f,
                                              .prefix_registers = regs, .suffix_registers = regs});
    const auto prompt = random_tokens(29, c.vocab_size, 5);
    const auto gen = random_tokens(3, c.vocab_size, 6);
    check_press_value(w, kv::press::StreamingLLM{.budget = {.rows = 9}, .sinks = 2}, prompt, gen);
    check_press_value(w, kv::press::SnapKV{.budget = {.ratio = 0.25, .rows = 2}, .window = 4, .pool = 5}, prompt, gen);
    check_press_value(w, kv::press::SnapKV{.budget = {.rows = 6}, .window = 2, .pool = 1}, prompt, gen);
    check_press_value(w, kv::press::H2O{.budget = {.ratio = 0.3, .rows = 1}}, prompt, gen);
    check_press_value(w, kv::press::PyramidKV{.budget = {.ratio = 0.3, .rows = 2}, .window = 3, .pool = 3, .beta = 4},
                      prompt, gen);
    // A budget past the prompt keeps everything: the dense model.
    check_press_value(w, kv::press::SnapKV{.budget = {.rows = 1000}}, prompt, gen);
  }
}

TEST_CASE("Press rules: budgets, PyramidKV's per-layer schedule, EARN-matched budgets") {
  CHECK(kv::Budget{.ratio = 0.3, .rows = 2}.of(29) == 10);
  CHECK(kv::Budget{.ratio = 0.0, .rows = 50}.of(29) == 29);
  // PyramidKV, mean 10 of 29 rows, window 3, beta 4: a = 7, top layer 7 / 4 = 1 (+3), bottom 2 * 7 - 1 = 13 (+3).
  const kv::press::PyramidKV pyr{.budget = {.ratio = 0.3, .rows = 2}, .window = 3, .pool = 3, .beta = 4};
  const int want[4] = {16, 12, 8, 4};
  for (int l = 0; l < 4; ++l) CHECK(pyr.rule(l, 4, 29).keep == want[l]);
  const kv::press::StreamingLLM sl{.budget = {.rows = 9}, .sinks = 2};
  CHECK(sl.rule(0, 4, 29).sinks == 2);
  CHECK(sl.rule(0, 4, 29).recent == 7);

  // EARN at k = 1 of 4 with 1 + 1 registers caches 1 * (29 + 2) + 3 * 2 = 37 rows of a 29-token prompt; a press
  // over the dense model with Budget::matching_earn(1, 4, 2) keeps 2 + floor(29 / 4) = 9 a layer: 36 rows.
  const ModelConfig c = small_config();
  const ModelWeights earn_w = random_weights(c, {.seed = 3, .prefix_registers = 1, .suffix_registers = 1});
  const ModelWeights dense_w = random_weights(c, {.seed = 3, .prefix_registers = 0, .suffix_registers = 0});
  const auto prompt = random_tokens(29, c.vocab_size, 9);
  Engine<EarnSchedule> earn_engine(earn_w, EarnSchedule{1});
  auto est = earn_engine.make_state({.max_prompt = 64, .max_new_tokens = 4});
  earn_engine.prefill(est, 0, prompt);
  const auto snap = press_schedule(kv::press::SnapKV{.budget = kv::Budget::matching_earn(1, 4, 2)});
  Engine<decltype(snap)> press_engine(dense_w, snap);
  auto pst = press_engine.make_state({.max_prompt = 64, .max_new_tokens = 4});
  press_engine.prefill(pst, 0, prompt);
  const Index row_bytes = 2 * Index{c.kv_dim()} * Index{sizeof(float)};
  CHECK(est.kv_bytes() == 37 * row_bytes);
  CHECK(pst.kv_bytes() == 36 * row_bytes);
  // The pressed cache reserves what the press keeps of max_prompt rows, not the prompt: 2 + 64 / 4 = 18 a layer
  // (as many as EARN's over all layers, a quarter of the dense model's).
  CHECK(pst.layer_cache(0).prefix_capacity() == 18);
  CHECK(pst.kv_capacity_bytes() <= est.kv_capacity_bytes());
  Engine<DenseSchedule> dense_engine(dense_w);
  const auto dst = dense_engine.make_state({.max_prompt = 64, .max_new_tokens = 4});
  CHECK(dst.layer_cache(0).prefix_capacity() == 64);
  CHECK_THROWS_AS(kv::Budget::matching_earn(5, 4, 2), ConfigError);
}

TEST_CASE("PerLayer lists per-layer values: SnapKV with PyramidKV's budgets equals PyramidKV bit for bit") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 17, .scale = 2.0f});
  const auto prompt = random_tokens(29, c.vocab_size, 2);
  const kv::press::PyramidKV pyr{.budget = {.ratio = 0.3, .rows = 2}, .window = 3, .pool = 3, .beta = 4};
  using Snap = PressLayer<kv::press::SnapKV>;
  std::vector<Snap> layers;
  for (int l = 0; l < c.n_layers; ++l)
    layers.push_back(Snap{{}, {{.budget = {.rows = pyr.rule(l, c.n_layers, 29 + w.registers.count()).keep},
                                .window = 3, .pool = 3}}});
  Engine<PerLayer<Snap>> per_layer(w, PerLayer<Snap>{layers});
  Engine<PressSchedule<kv::press::PyramidKV>> pyramid(w, press_schedule(pyr));
  auto a = per_layer.make_state({.max_prompt = 64, .max_new_tokens = 4});
  auto b = pyramid.make_state({.max_prompt = 64, .max_new_tokens = 4});
  CHECK(per_layer.prefill(a, 0, prompt) == pyramid.prefill(b, 0, prompt));
  const int rows[1] = {0}, tok[1] = {7};
  a.set_rows(rows);
  b.set_rows(rows);
  CHECK(per_layer.decode(a, tok) == pyramid.decode(b, tok));
  CHECK(a.kv_bytes() == b.kv_bytes());

  CHECK_THROWS_AS(Engine<PerLayer<Snap>>(w, PerLayer<Snap>{std::vector<Snap>(3)}), ConfigError);
  CHECK_THROWS_AS(PerLayer<Snap>{std::vector<Snap>{}}, ConfigError);
}

TEST_CASE("Presses refuse rules the pipeline does not take with ConfigError") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 1});
  const auto prompt = random_tokens(29, c.vocab_size, 2);
  auto refuses = [&](const auto& press) {  // at make_state (which sizes the cache by the press) or at prefill
    const auto s = press_schedule(press);
    Engine<std::decay_t<decltype(s)>> e(w, s);
    CHECK_THROWS_AS(
        {
          auto st = e.make_state({.max_prompt = 64, .max_new_tokens = 4});
          e.prefill(st, 0, prompt);
        },
        ConfigError);
  };
  refuses(kv::press::SnapKV{.budget = {.rows = 9}, .pool = 4});     // even pool width
  refuses(kv::press::SnapKV{.budget = {.rows = 9}, .window = 0});   // no observation window
  refuses(kv::press::StreamingLLM{.budget = {.rows = 9}, .sinks = -1});
  refuses(kv::press::H2O{.budget = {.rows = 9}, .recent_share = 1.5});
  refuses(kv::press::SnapKV{.budget = {.ratio = 2.0}});
  refuses(kv::press::SnapKV{.budget = {.rows = -3}});
}

TEST_CASE("Gist: registers read the prompt, decode rows only the registers, the cache holds only the registers") {
  const ModelConfig c = small_config(RopeStyle::kInterleaved, true);
  for (const auto& split : {std::pair{1, 1}, std::pair{2, 0}, std::pair{0, 3}}) {
    const int rp = split.first, rs = split.second;  // not a structured binding: clang's CAPTURE cannot take one
    CAPTURE(rp); CAPTURE(rs);
    const ModelWeights w = random_weights(c, {.seed = std::uint64_t(50 + rp * 3 + rs), .scale = 2.0f,
                                              .prefix_registers = rp, .suffix_registers = rs});
    const auto prompt = random_tokens(23, c.vocab_size, 7);
    const auto gen = random_tokens(3, c.vocab_size, 8);
    std::vector<RefKind> kinds;
    const auto input = earn::test::reference_input(w, prompt, gen, kinds);
    // Gist's semantics as an explicit mask over [R_p; prompt; R_s; generated], every layer.
    const auto ref = earn::test::reference_logits(w, input, [&](int, int q, int k) {
      return k <= q && !(kinds[q] == RefKind::kGenerated && kinds[k] == RefKind::kPrompt);
    });
    const int n = rp + 23 + rs, L = c.n_layers;
    Engine<GistSchedule> engine(w);
    auto st = engine.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 64, .max_new_tokens = 4});
    check_close(engine.prefill(st, 0, prompt), ref[n - 1], 1e-5, "prefill");
    std::vector<int> regs;
    for (int j = 0; j < rp; ++j) regs.push_back(j);
    for (int j = n - rs; j < n; ++j) regs.push_back(j);
    for (int l = 0; l < L; ++l) {
      CAPTURE(l);
      const auto& cache = st.layer_cache(l);
      REQUIRE(cache.prefix_len(0) == rp + rs);
      CHECK(cache.prefix_capacity() == rp + rs);
      const auto& hp = cache.prefix_head_positions(0);
      for (int g = 0; g < c.n_kv_heads; ++g)
        for (int j = 0; j < rp + rs; ++j) CHECK(hp[std::size_t(j) * c.n_kv_heads + g] == regs[j]);
    }
    const Index row_bytes = 2 * Index{c.kv_dim()} * Index{sizeof(float)};
    CHECK(st.kv_bytes() == Index{L} * (rp + rs) * row_bytes);
    const int rows[1] = {0};
    st.set_rows(rows);
    for (int g = 0; g < static_cast<int>(gen.size()); ++g) {
      const int tok[1] = {gen[g]};
      check_close(engine.decode(st, tok).row(0).transpose(), ref[n + g], 1e-5, "decode");
    }
    CHECK(st.kv_bytes() == Index{L} * (rp + rs + static_cast<Index>(gen.size())) * row_bytes);
  }
  // No registers: nothing would carry the prompt to the answer.
  const ModelWeights bare = random_weights(c, {.seed = 2, .prefix_registers = 0, .suffix_registers = 0});
  CHECK_THROWS_AS(Engine<GistSchedule>{bare}, ConfigError);
}

namespace {
// A kind rule among prefill rows (the CPU engine takes it; the CUDA engine refuses it at compile time).
struct PromptIgnoresPrefix {
  static constexpr const char* name = "prompt_ignores_prefix";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(RowKind) { return true; }
  static constexpr bool visible(int q, int k) { return k <= q; }
  static constexpr bool sees(RowKind q, RowKind k) { return !(q == RowKind::kPrompt && k == RowKind::kPrefixRegister); }
};
}  // namespace

TEST_CASE("A kind rule among prefill rows: the CPU engine's prefill and decode equal the explicit mask") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 61, .scale = 2.0f, .prefix_registers = 2, .suffix_registers = 1});
  const auto prompt = random_tokens(19, c.vocab_size, 3);
  const auto gen = random_tokens(2, c.vocab_size, 4);
  std::vector<RefKind> kinds;
  const auto input = earn::test::reference_input(w, prompt, gen, kinds);
  const int rp = 2, n = 2 + 19 + 1;
  // RefKind has one register kind: the prefix registers are rows [0, rp).
  const auto ref = earn::test::reference_logits(w, input, [&](int, int q, int k) {
    return k <= q && !(kinds[q] == RefKind::kPrompt && k < rp);
  });
  Engine<Uniform<Layer<PromptIgnoresPrefix, kv::Contiguous>>> engine(w);
  auto st = engine.make_state({.max_prompt = 64, .max_new_tokens = 4});
  check_close(engine.prefill(st, 0, prompt), ref[n - 1], 1e-5, "prefill");
  const int rows[1] = {0};
  st.set_rows(rows);
  for (int g = 0; g < 2; ++g) {
    const int tok[1] = {gen[g]};
    check_close(engine.decode(st, tok).row(0).transpose(), ref[n + g], 1e-5, "decode");
  }
}

namespace {

// probs[l][h][t] = row t's probabilities over the n prefill rows.
using LayerProbs = std::vector<std::vector<std::vector<std::vector<double>>>>;

// H2O evicting during decode, written here without kv::evict_range / evict_row: live[l][s][g] = the rows KV head g
// of layer l holds when decode step s attends (s = 0..T; T: after the last step). Each kept row's score starts at
// its attention summed over the n prefill rows (mean over the group's heads); step s adds each beam's
// probabilities divided by group x beams; then, while prefix + (s + 1) generated rows exceed keep, the row of
// least score (the oldest of equals) among those not in the last recent - (s + 1) goes.
std::vector<std::vector<std::vector<std::vector<int>>>> h2o_live(const kv::PressRule& r, int n, int n_kv, int group,
                                                                 int steps, const LayerProbs& prefill,
                                                                 const std::vector<LayerProbs>& beams) {
  const int L = static_cast<int>(prefill.size());
  std::vector<std::vector<std::vector<std::vector<int>>>> live(L);
  for (int l = 0; l < L; ++l) {
    std::vector<std::vector<int>> cur(n_kv);
    std::vector<std::vector<double>> score(n_kv, std::vector<double>(n, 0.0));
    for (int g = 0; g < n_kv; ++g) {
      cur[g] = naive_keep(r, n, g, group, prefill[l]);
      for (int h = g * group; h < (g + 1) * group; ++h)
        for (int t = 0; t < n; ++t)
          for (int j = 0; j < n; ++j) score[g][j] += prefill[l][h][t][j] / group;
    }
    for (int s = 0; s <= steps; ++s) {
      live[l].push_back(cur);
      if (s == steps) break;
      for (const LayerProbs& b : beams)
        for (int h = 0; h < n_kv * group; ++h)
          for (int j = 0; j < n; ++j) score[h / group][j] += b[l][h][s][j] / (double(group) * double(beams.size()));
      for (int g = 0; g < n_kv; ++g) {
        std::vector<int>& rows = cur[g];
        const int held = static_cast<int>(rows.size());
        if (held + s + 1 <= r.keep) continue;
        const int protect = std::max(0, std::min(held, r.recent - (s + 1)));
        int worst = -1;
        for (int i = 0; i < held - protect; ++i)
          if (worst < 0 || score[g][rows[i]] < score[g][rows[worst]]) worst = i;
        if (worst >= 0) rows.erase(rows.begin() + worst);
      }
    }
  }
  return live;
}

// Prefill `prompt`, then decode one row per entry of `beams` (all of user 0) under H2O evicting during decode;
// every logit row, the rows each KV head holds and kv_bytes() after every step against the reference whose decode
// rows see only h2o_live's rows. The beams' probabilities feed each other's evictions, so the references iterate
// to their fixed point (an eviction at step s depends only on earlier steps and lower layers).
void check_h2o_decode(const ModelWeights& w, const kv::press::H2O& press, const std::vector<int>& prompt,
                      const std::vector<std::vector<int>>& beams) {
  const ModelConfig& c = w.config;
  const int L = c.n_layers, H = c.n_heads, group = H / c.n_kv_heads, B = static_cast<int>(beams.size());
  const int n = w.registers.count() + static_cast<int>(prompt.size()), T = static_cast<int>(beams[0].size());
  const kv::PressRule rule = press.rule(0, L, n);
  REQUIRE(rule.evict);
  LayerProbs prefill(L, std::vector<std::vector<std::vector<double>>>(
                            H, std::vector<std::vector<double>>(n, std::vector<double>(n, 0.0))));
  std::vector<LayerProbs> dec(B, LayerProbs(L, std::vector<std::vector<std::vector<double>>>(
                                                   H, std::vector<std::vector<double>>(T, std::vector<double>(n, 0.0)))));
  std::vector<earn::test::Mat> ref(B);
  auto live = h2o_live(rule, n, c.n_kv_heads, group, T, prefill, dec);
  bool fixed = false;
  for (int iter = 0; iter < L * T + 3 && !fixed; ++iter) {
    for (int b = 0; b < B; ++b) {
      std::vector<RefKind> kinds;
      const auto input = earn::test::reference_input(w, prompt, beams[b], kinds);
      ref[b] = earn::test::reference_logits(
          w, input,
          [&](int l, int q, int h, int k) {
            if (k > q) return false;
            if (q < n || k >= n) return true;
            const auto& rows = live[l][q - n][h / group];
            return std::find(rows.begin(), rows.end(), k) != rows.end();
          },
          [&](int l, int t, int h, const std::vector<double>& p) {
            if (t < n) prefill[l][h][t].assign(p.begin(), p.begin() + n);
            else dec[b][l][h][t - n].assign(p.begin(), p.begin() + n);
          });
    }
    auto next = h2o_live(rule, n, c.n_kv_heads, group, T, prefill, dec);
    fixed = next == live;
    live = std::move(next);
  }
  REQUIRE(fixed);

  Engine<PressSchedule<kv::press::H2O>> engine(w, press_schedule(press));
  auto st = engine.make_state({.max_users = 1, .max_rows = B, .max_prompt = 64, .max_new_tokens = T});
  check_close(engine.prefill(st, 0, prompt), ref[0][n - 1], 1e-5, "prefill");
  const std::vector<int> users(B, 0);
  st.set_rows(users);
  const Index row_bytes = 2 * Index{c.kv_dim()} * Index{sizeof(float)};
  int evicted = 0;
  for (int s = 0; s < T; ++s) {
    CAPTURE(s);
    std::vector<int> tok(B);
    for (int b = 0; b < B; ++b) tok[b] = beams[b][s];
    const Matrix out = engine.decode(st, tok);
    for (int b = 0; b < B; ++b) check_close(out.row(b).transpose(), ref[b][n + s], 1e-5, "decode");
    Index held = 0;
    for (int l = 0; l < L; ++l) {
      CAPTURE(l);
      const auto& cache = st.layer_cache(l);
      const int len = cache.prefix_len(0);
      REQUIRE(len == static_cast<int>(live[l][s + 1][0].size()));
      CHECK(len + s + 1 <= rule.keep);  // the settings below keep the recent rows within the budget
      evicted += static_cast<int>(live[l][s][0].size()) - len;
      held += len + Index{B} * (s + 1);
      for (int g = 0; g < c.n_kv_heads; ++g) {
        std::vector<int> got;
        for (int j = 0; j < len; ++j) got.push_back(cache.prefix_head_positions(0)[std::size_t(j) * c.n_kv_heads + g]);
        CHECK(got == live[l][s + 1][g]);
      }
    }
    CHECK(st.kv_bytes() == held * row_bytes);
  }
  CHECK(evicted > 0);  // the settings below all evict
}

// A press asking to evict by an observation window's scores (refused).
struct WindowEvict {
  static constexpr const char* name = "window_evict";
  kv::PressRule rule(int, int, int) const {
    return {.keep = 5, .recent = 1, .score = kv::Score::kWindow, .window = 2, .evict = true};
  }
};

}  // namespace

TEST_CASE("H2O evicting during decode: each user's rows stay within the budget, beams share the prefix's scores, "
          "and every step equals an independent reference") {
  const ModelConfig c = small_config();
  for (int regs : {0, 1}) {
    CAPTURE(regs);
    const ModelWeights w = random_weights(c, {.seed = std::uint64_t(61 + regs), .scale = 2.0f,
                                              .prefix_registers = regs, .suffix_registers = regs});
    const auto prompt = random_tokens(21, c.vocab_size, 11);
    const std::vector<std::vector<int>> two = {random_tokens(3, c.vocab_size, 12), random_tokens(3, c.vocab_size, 13)};
    // A budget below the prompt: the press keeps 1 + 30 % of it, then each step drops one more prefix row.
    check_h2o_decode(w, {.budget = {.ratio = 0.3, .rows = 1}, .evict_in_decode = true}, prompt, two);
    check_h2o_decode(w, {.budget = {.ratio = 0.3, .rows = 1}, .evict_in_decode = true}, prompt, {two[1]});
    // A budget of the prompt and one row: the prefill keeps all, the second step starts dropping; no recent rows.
    const int n = 21 + 2 * regs;
    check_h2o_decode(w, {.budget = {.rows = n + 1}, .recent_share = 0.0, .evict_in_decode = true}, prompt, two);
  }
  // Eviction ranks rows by attention accumulated over every query row: a rule scoring a window is refused.
  const ModelWeights w = random_weights(c, {.seed = 1});
  // A budget of INT_MAX rows keeps everything and never evicts (no overflow in the bound).
  const kv::press::H2O all{.budget = {.rows = std::numeric_limits<int>::max()}, .evict_in_decode = true};
  CHECK(all.rule(0, 4, 29).keep >= 29 + 4);
  Engine<PressSchedule<kv::press::H2O>> keep_all(w, press_schedule(all));
  auto ka = keep_all.make_state({.max_prompt = 64, .max_new_tokens = 4});
  keep_all.prefill(ka, 0, random_tokens(29, c.vocab_size, 2));
  const int one[1] = {0}, tok[1] = {5};
  ka.set_rows(one);
  keep_all.decode(ka, tok);
  CHECK(ka.layer_cache(0).prefix_len(0) == ka.input_len(0));
  Engine<PressSchedule<WindowEvict>> e(w, press_schedule(WindowEvict{}));
  auto st = e.make_state({.max_prompt = 64, .max_new_tokens = 4});
  CHECK_THROWS_AS(e.prefill(st, 0, random_tokens(29, c.vocab_size, 2)), ConfigError);
}
