// Trie-constrained beam search against independent references: exhaustive scoring of every item with the naive
// double-precision model (beam >= items), and a naive beam search in which every beam owns its own prefilled copy
// of the prompt (beam < items), under the dense and EARN schedules; batching and tie policy.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <set>
#include <vector>

#include "earn/model/engine.hpp"
#include "earn/rec/beam_search.hpp"
#include "earn/rec/prompt.hpp"
#include "earn/schedule/presets.hpp"
#include "reference_model.hpp"

using namespace earn;
using namespace earn::rec;

namespace {

const ItemVocab kVocab(CodeTemplate::kBaseVocab);

ModelConfig tiny_config() {
  ModelConfig c;
  c.dim = 32;
  c.hidden_dim = 48;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = kVocab.size();  // 4 template ids + 1024 code tokens
  c.max_seq_len = 96;
  c.tied_embeddings = false;
  return c;
}

// n distinct items over 3 x 3 x 3 x 3 codes (so prefixes are shared), shuffled, and one collision: item 13 gets
// item 0's codes.
Catalogue tiny_catalogue(int n) {
  std::vector<ItemCodes> all;
  for (int a = 0; a < 3; ++a)
    for (int b = 0; b < 3; ++b)
      for (int c = 0; c < 3; ++c)
        for (int d = 0; d < 3; ++d) all.push_back({a * 100, b * 50 + 1, c * 7 + 2, d * 120 + 3});
  Rng rng(99);
  for (std::size_t i = all.size() - 1; i > 0; --i) std::swap(all[i], all[rng.next_u64() % (i + 1)]);
  std::vector<ItemCodes> codes(all.begin(), all.begin() + n);
  if (n > 13) codes[13] = codes[0];
  return Catalogue(codes);
}

std::vector<int> prompt_for(const Catalogue& cat, std::vector<int> history) {
  return PromptBuilder::code_tokens(kVocab).build(cat, history);
}

// log_softmax of a row of doubles, as a vector.
std::vector<double> log_softmax(const std::vector<double>& x) {
  double m = -INFINITY;
  for (double v : x) m = std::max(m, v);
  double s = 0;
  for (double v : x) s += std::exp(v - m);
  std::vector<double> out(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = x[i] - m - std::log(s);
  return out;
}

// Exhaustive reference: every identifier's summed log-probability from the naive explicit-mask model.
std::vector<double> exhaustive_scores(const ModelWeights& w, int k, const Catalogue& cat, const std::vector<int>& prompt) {
  std::vector<double> score(cat.n_identifiers());
  for (int id = 0; id < cat.n_identifiers(); ++id) {
    const ItemTokens t = kVocab.identifier_tokens(cat, id);
    std::vector<earn::test::RefKind> kinds;
    const auto input = earn::test::reference_input(w, prompt, {t[0], t[1], t[2]}, kinds);
    const auto logits = earn::test::reference_logits(w, input, earn::test::earn_mask(k, kinds));
    // With a suffix register the last input row reaches the top in every schedule and predicts token 1.
    const int first = static_cast<int>(input.size()) - 4;
    double s = 0;
    for (int j = 0; j < 4; ++j) s += log_softmax(logits[first + j])[t[j]];
    score[id] = s;
  }
  return score;
}

// Naive beam search: each beam owns a state with its own prefilled prompt and replays its tokens; full-vocabulary
// log_softmax, mask from the catalogue (not the trie), full stable sort over (beam, token) candidates.
template <class E>
std::vector<std::pair<int, double>> naive_beam(const E& engine, const Catalogue& cat, const std::vector<int>& prompt,
                                               int beam) {
  struct B {
    std::vector<int> tokens;
    double score;
  };
  std::vector<B> beams{{{}, 0.0}};
  for (int depth = 0; depth < 4; ++depth) {
    std::vector<B> cand;
    for (const B& b : beams) {
      auto st = engine.make_state({.max_users = 1, .max_rows = 1, .max_prompt = int(prompt.size()), .max_new_tokens = 4});
      Vector logits = engine.prefill(st, 0, prompt);
      const int row[1] = {0};
      st.set_rows(row);
      for (int t : b.tokens) {
        const int tok[1] = {t};
        logits = engine.decode(st, tok).row(0).transpose();
      }
      std::vector<double> x(logits.data(), logits.data() + logits.size());
      const auto lp = log_softmax(x);
      std::set<int> allowed;
      for (int id = 0; id < cat.n_identifiers(); ++id) {
        const ItemTokens t = kVocab.identifier_tokens(cat, id);
        if (std::equal(b.tokens.begin(), b.tokens.end(), t.begin())) allowed.insert(t[depth]);
      }
      for (int t : allowed) {
        B c = b;
        c.tokens.push_back(t);
        c.score += lp[t];
        cand.push_back(c);
      }
    }
    std::stable_sort(cand.begin(), cand.end(), [](const B& a, const B& b) { return a.score > b.score; });
    if (int(cand.size()) > beam) cand.resize(beam);
    beams = cand;
  }
  std::vector<std::pair<int, double>> out;
  for (const B& b : beams) out.emplace_back(*cat.find(kVocab.codes(std::span<const int, 4>(b.tokens.data(), 4))), b.score);
  return out;
}

// Scores from beam search vs the exhaustive reference: all identifiers, best first, scores within tolerance.
template <class E>
void check_exhaustive(const E& engine, const ModelWeights& w, int k) {
  const Catalogue cat = tiny_catalogue(14);
  const CodeTrie trie(cat, kVocab);
  REQUIRE(cat.n_identifiers() == 13);
  const std::vector<int> prompt = prompt_for(cat, {3, 1, 7});
  BeamSearch search(engine, trie, {.beam = 16}, 1, int(prompt.size()));
  const std::vector<std::vector<int>> prompts{prompt};
  const auto recs = search.run(prompts);
  REQUIRE(recs.size() == 1u);
  REQUIRE(int(recs[0].size()) == cat.n_identifiers());  // fewer continuations than beams: fewer beams
  const auto ref = exhaustive_scores(w, k, cat, prompt);
  std::set<int> ids;
  for (std::size_t j = 0; j < recs[0].size(); ++j) {
    const Recommendation& r = recs[0][j];
    ids.insert(r.identifier);
    CHECK(r.tokens == kVocab.identifier_tokens(cat, r.identifier));
    CHECK(std::abs(r.score - ref[r.identifier]) < 1e-4 * std::max(1.0, std::abs(ref[r.identifier])));
    if (j > 0) CHECK(recs[0][j - 1].score >= r.score);
  }
  CHECK(int(ids.size()) == cat.n_identifiers());
  // The reference's own ranking agrees wherever its scores are not within tolerance of each other.
  std::vector<int> order(ref.size());
  std::iota(order.begin(), order.end(), 0);
  std::sort(order.begin(), order.end(), [&](int a, int b) { return ref[a] > ref[b]; });
  for (std::size_t j = 0; j < order.size(); ++j)
    if ((j == 0 || ref[order[j - 1]] - ref[order[j]] > 1e-3) && (j + 1 == order.size() || ref[order[j]] - ref[order[j + 1]] > 1e-3))
      CHECK(recs[0][j].identifier == order[j]);
}

// Pruning (beam < items), several users per call (prefilled in one batch, and one by one): equal to the
// per-beam-prompt naive search and to one user per call.
template <class E>
void check_against_naive(const E& engine) {
  const Catalogue cat = tiny_catalogue(40);
  const CodeTrie trie(cat, kVocab);
  const std::vector<std::vector<int>> prompts{prompt_for(cat, {3, 1, 7}), prompt_for(cat, {}),
                                              prompt_for(cat, {5, 9, 2, 11, 30, 0})};
  int max_prompt = 0;
  for (const auto& p : prompts) max_prompt = std::max(max_prompt, int(p.size()));
  for (int beam : {1, 3, 7}) {
    CAPTURE(beam);
    BeamSearch batched(engine, trie, {.beam = beam}, 3, max_prompt);
    const auto all = batched.run(prompts);
    REQUIRE(all.size() == 3u);
    // The searcher prefills its users in one batch by default; one prefill per user finds the same.
    BeamSearch per_user(engine, trie, {.beam = beam}, 3, max_prompt, /*batched_prefill=*/false);
    const auto separate = per_user.run(prompts);
    for (std::size_t u = 0; u < prompts.size(); ++u) {
      CAPTURE(u);
      const auto want = naive_beam(engine, cat, prompts[u], beam);
      REQUIRE(separate[u].size() == want.size());
      for (std::size_t j = 0; j < want.size(); ++j) {
        CHECK(separate[u][j].identifier == want[j].first);
        CHECK(std::abs(separate[u][j].score - want[j].second) < 1e-4);
      }
      REQUIRE(all[u].size() == want.size());
      for (std::size_t j = 0; j < want.size(); ++j) {
        CHECK(all[u][j].identifier == want[j].first);
        CHECK(std::abs(all[u][j].score - want[j].second) < 1e-4);
      }
      BeamSearch single(engine, trie, {.beam = beam}, 1, max_prompt);
      const auto one = single.run(std::span(prompts).subspan(u, 1));
      REQUIRE(one[0].size() == all[u].size());
      for (std::size_t j = 0; j < one[0].size(); ++j) {
        CHECK(one[0][j].identifier == all[u][j].identifier);
        CHECK(std::abs(one[0][j].score - all[u][j].score) < 1e-5);
      }
    }
    // top_k < beam returns the best top_k of the same search.
    BeamSearch fewer(engine, trie, {.beam = beam, .top_k = 1}, 3, max_prompt);
    const auto top1 = fewer.run(prompts);
    for (std::size_t u = 0; u < prompts.size(); ++u) {
      REQUIRE(top1[u].size() == 1u);
      CHECK(top1[u][0].identifier == all[u][0].identifier);
    }
  }
}

}  // namespace

TEST_CASE("beam search with beam >= items equals exhaustive scoring by the naive model (dense and EARN)") {
  const ModelConfig c = tiny_config();
  const ModelWeights w = random_weights(c, {.seed = 5, .scale = 2.0f, .prefix_registers = 1, .suffix_registers = 1});
  SUBCASE("dense") { check_exhaustive(Engine<DenseSchedule>(w), w, c.n_layers); }
  SUBCASE("EARN, runtime split") {
    for (int k : {0, 1, 2}) {
      CAPTURE(k);
      check_exhaustive(Engine<EarnSchedule>(w, EarnSchedule{k}), w, k);
    }
  }
  SUBCASE("compile-time split") { check_exhaustive(Engine<EarnScheduleK<1>>(w), w, 1); }
}

TEST_CASE("beam search with pruning equals a naive search with a private prompt copy per beam (dense and EARN)") {
  const ModelConfig c = tiny_config();
  const ModelWeights w = random_weights(c, {.seed = 8, .scale = 2.0f, .prefix_registers = 1, .suffix_registers = 2});
  SUBCASE("dense") { check_against_naive(Engine<DenseSchedule>(w)); }
  SUBCASE("EARN k = 1") { check_against_naive(Engine<EarnSchedule>(w, EarnSchedule{1})); }
}

TEST_CASE("beam search ties: equal scores keep candidate order, so the lexicographically first items win") {
  ModelConfig c = tiny_config();
  ModelWeights w = random_weights(c, {.seed = 3});
  w.lm_head.setZero();  // every logit 0: every item scores 4 * log(1 / vocab)
  const Engine<DenseSchedule> engine(w);
  const Catalogue cat = tiny_catalogue(40);
  const CodeTrie trie(cat, kVocab);
  std::vector<std::pair<ItemTokens, int>> sorted;
  for (int id = 0; id < cat.n_identifiers(); ++id) sorted.emplace_back(kVocab.identifier_tokens(cat, id), id);
  std::sort(sorted.begin(), sorted.end());
  const std::vector<std::vector<int>> prompts{prompt_for(cat, {1, 2})};
  BeamSearch search(engine, trie, {.beam = 5}, 1, int(prompts[0].size()));
  const auto recs = search.run(prompts);
  REQUIRE(recs[0].size() == 5u);
  for (int j = 0; j < 5; ++j) {
    CHECK(recs[0][j].identifier == sorted[j].second);
    CHECK(recs[0][j].score == doctest::Approx(-4.0 * std::log(double(c.vocab_size))).epsilon(1e-6));
  }
}

TEST_CASE("beam search: refused options, sizes and the stats it keeps") {
  const ModelConfig c = tiny_config();
  const ModelWeights w = random_weights(c, {.seed = 1});
  const Engine<EarnSchedule> engine(w, EarnSchedule{1});
  const Catalogue cat = tiny_catalogue(20);
  const CodeTrie trie(cat, kVocab);
  CHECK_THROWS_AS(BeamSearch(engine, trie, {.beam = 0}, 1, 16), ConfigError);
  CHECK_THROWS_AS(BeamSearch(engine, trie, {.beam = 65}, 1, 16), ConfigError);
  CHECK_THROWS_AS(BeamSearch(engine, trie, {.beam = 4, .top_k = 5}, 1, 16), ConfigError);
  CHECK_THROWS_AS(BeamSearch(engine, trie, {.beam = 4}, 0, 16), ConfigError);
  const CodeTrie wide(cat, ItemVocab(100));  // needs 1124 ids, the model has 1028
  CHECK_THROWS_AS(BeamSearch(engine, wide, {.beam = 4}, 1, 16), ConfigError);

  BeamSearch search(engine, trie, {.beam = 64}, 2, 32);
  CHECK(search.options().top_k == 64);
  const std::vector<std::vector<int>> three(3, prompt_for(cat, {1}));
  CHECK_THROWS_AS(search.run(three), RangeError);
  const std::vector<std::vector<int>> too_long{std::vector<int>(33, 0)};
  CHECK_THROWS_AS(search.run(too_long), RangeError);
  CHECK(search.run(std::span<const std::vector<int>>{}).empty());

  const std::vector<std::vector<int>> two(2, prompt_for(cat, {1, 4}));
  const auto recs = search.run(two);
  CHECK(int(recs[0].size()) == cat.n_identifiers());
  CHECK(search.stats().users == 2);
  CHECK(search.stats().peak_kv_bytes > 0);
  CHECK(search.stats().prefill_s >= 0.0);

  // A model that produces NaN logits is refused, not ranked.
  ModelWeights broken = w;
  broken.lm_head(kVocab.token(0, 0), 0) = std::numeric_limits<float>::quiet_NaN();
  const Engine<DenseSchedule> nan_engine(broken);
  BeamSearch nan_search(nan_engine, trie, {.beam = 4}, 1, 32);
  CHECK_THROWS_AS(nan_search.run(std::span(two).first(1)), Error);

  // An empty catalogue recommends nothing.
  const CodeTrie none(Catalogue{}, kVocab);
  BeamSearch nothing(engine, none, {.beam = 4}, 1, 32);
  const auto empty = nothing.run(std::span(two).first(1));
  REQUIRE(empty.size() == 1u);
  CHECK(empty[0].empty());
}
