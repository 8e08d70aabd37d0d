// The decoding constraint and the scoring of the recommendation loop: the code trie against brute force over random
// catalogues, and Recall/NDCG against hand-computed cases and an independent per-position recount.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <set>
#include <vector>

#include "earn/core/tensor.hpp"
#include "earn/rec/metrics.hpp"
#include "earn/rec/trie.hpp"

using namespace earn;
using namespace earn::rec;

namespace {

// A random catalogue whose codes come from small ranges, so prefixes are shared and some items collide.
Catalogue random_catalogue(Rng& rng, int n_items, int spread) {
  std::vector<ItemCodes> codes(n_items);
  for (auto& c : codes)
    for (int l = 0; l < 4; ++l) c[l] = static_cast<int>(rng.next_u64() % std::uint64_t(spread)) * 51;  // up to 255
  return Catalogue(codes);
}

// Brute force: the tokens that may follow `prefix`, from the catalogue's code lists.
std::vector<int> naive_allowed(const Catalogue& cat, const ItemVocab& v, const std::vector<int>& prefix) {
  std::set<int> next;
  for (int id = 0; id < cat.n_identifiers(); ++id) {
    const ItemTokens t = v.identifier_tokens(cat, id);
    if (std::equal(prefix.begin(), prefix.end(), t.begin())) next.insert(t[prefix.size()]);
  }
  return {next.begin(), next.end()};
}

// Walks every path the trie allows; returns (tokens, identifier at the leaf) of each complete path.
void walk(const CodeTrie& trie, int depth, int node, std::vector<int>& path, std::vector<std::pair<std::vector<int>, int>>& out) {
  if (depth == 4) {
    out.emplace_back(path, trie.identifier(node));
    return;
  }
  const TrieChildren ch = trie.children(depth, node);
  for (std::size_t j = 0; j < ch.size(); ++j) {
    if (j > 0) REQUIRE(ch.tokens[j - 1] < ch.tokens[j]);  // ascending, no repeats
    path.push_back(ch.tokens[j]);
    walk(trie, depth + 1, ch.first_child + static_cast<int>(j), path, out);
    path.pop_back();
  }
}

}  // namespace

TEST_CASE("CodeTrie: on random catalogues every allowed path is an item and every item is reachable") {
  Rng rng(2024);
  for (int trial = 0; trial < 40; ++trial) {
    const int n = 1 + static_cast<int>(rng.next_u64() % 300);
    const int spread = 1 + static_cast<int>(rng.next_u64() % 6);
    const ItemVocab vocab(static_cast<int>(rng.next_u64() % 1000));
    const Catalogue cat = random_catalogue(rng, n, spread);
    const CodeTrie trie(cat, vocab);
    CAPTURE(trial);
    CAPTURE(n);
    CAPTURE(spread);
    CHECK(trie.n_identifiers() == cat.n_identifiers());
    CHECK(trie.vocab_size() == vocab.size());

    std::vector<int> path;
    std::vector<std::pair<std::vector<int>, int>> paths;
    walk(trie, 0, 0, path, paths);
    REQUIRE(int(paths.size()) == cat.n_identifiers());
    std::set<int> seen;
    for (const auto& [tokens, id] : paths) {
      const ItemTokens want = vocab.identifier_tokens(cat, id);  // the leaf's identifier has exactly these tokens
      CHECK(std::equal(tokens.begin(), tokens.end(), want.begin()));
      seen.insert(id);
    }
    CHECK(int(seen.size()) == cat.n_identifiers());

    for (int item = 0; item < cat.n_items(); ++item) {
      const ItemTokens t = vocab.item_tokens(cat, item);
      const auto leaf = trie.find(t);
      REQUIRE(leaf.has_value());
      CHECK(trie.identifier(*leaf) == cat.identifier(item));
      CHECK(trie.identifier_of(t) == cat.identifier(item));
      // Every prefix of an item allows exactly the brute-force continuation set.
      for (int d = 0; d < 4; ++d) {
        const std::vector<int> prefix(t.begin(), t.begin() + d);
        const auto got = trie.allowed(prefix);
        CHECK(std::vector<int>(got.begin(), got.end()) == naive_allowed(cat, vocab, prefix));
      }
    }
    // Prefixes that lead nowhere: a code token of another level, an unused code, a non-code id.
    const ItemTokens t0 = vocab.item_tokens(cat, 0);
    for (int bad : {t0[1], vocab.token(0, 5), vocab.base() - 1, vocab.size()}) {
      const std::vector<int> prefix{bad};
      CHECK(trie.allowed(prefix).empty());
      CHECK(!trie.find(prefix).has_value());
    }
    const std::vector<int> three(t0.begin(), t0.begin() + 3);
    std::vector<int> wrong_last = three;
    wrong_last.push_back(vocab.token(3, 255) + 1);
    CHECK(!trie.identifier_of(wrong_last).has_value());
    CHECK(!trie.identifier_of(three).has_value());  // 3 tokens are not an item
  }
}

TEST_CASE("CodeTrie: mask keeps allowed log-probs, sets the rest to -inf; bad queries are RangeErrors") {
  const ItemVocab vocab(3);
  const Catalogue cat({{0, 1, 2, 3}, {0, 1, 2, 4}, {2, 0, 0, 0}});
  const CodeTrie trie(cat, vocab);
  CHECK(trie.nodes(0) == 1);
  CHECK(trie.nodes(1) == 2);
  CHECK(trie.nodes(4) == 3);
  Vector scores = Vector::LinSpaced(vocab.size(), -1.0f, -2.0f);
  const Vector before = scores;
  const std::vector<int> prefix{vocab.token(0, 0), vocab.token(1, 1), vocab.token(2, 2)};
  CodeTrie::mask(scores, trie.allowed(prefix));
  for (Index t = 0; t < scores.size(); ++t) {
    const bool ok = t == vocab.token(3, 3) || t == vocab.token(3, 4);
    CHECK(scores[t] == (ok ? before[t] : -std::numeric_limits<float>::infinity()));
  }
  CHECK_THROWS_AS(trie.children(4, 0), RangeError);
  CHECK_THROWS_AS(trie.children(1, 2), RangeError);
  CHECK_THROWS_AS(trie.children(-1, 0), RangeError);
  CHECK_THROWS_AS(trie.identifier(3), RangeError);
  const std::vector<int> five(5, vocab.token(0, 0));
  CHECK_THROWS_AS(trie.find(five), RangeError);
  CHECK_THROWS_AS(trie.allowed(std::vector<int>(4, 0)), RangeError);

  const CodeTrie empty(Catalogue{}, vocab);
  CHECK(empty.children(0, 0).empty());
  CHECK(empty.nodes(1) == 0);
}

namespace {
constexpr double kL3 = 0.6309297535714575;   // 1/log2(3)
constexpr double kL4 = 0.5;                  // 1/log2(4)
constexpr double kL5 = 0.43067655807339306;  // 1/log2(5)
constexpr double kL6 = 0.38685280723454163;  // 1/log2(6)
}  // namespace

TEST_CASE("metrics: hand-computed Recall and NDCG") {
  SUBCASE("one target at rank 1") {
    const std::vector<int> ranked{5, 3, 9, 1}, targets{3};
    for (int k : {2, 5, 20}) {
      const UserMetrics m = user_metrics(ranked, targets, k);
      CHECK(m.recall == doctest::Approx(1.0).epsilon(1e-12));
      CHECK(m.ndcg == doctest::Approx(kL3).epsilon(1e-12));
    }
    const UserMetrics m1 = user_metrics(ranked, targets, 1);
    CHECK(m1.recall == 0.0);
    CHECK(m1.ndcg == 0.0);
  }
  SUBCASE("three targets, two hit; ideal DCG over min(|T|, K)") {
    const std::vector<int> ranked{7, 2, 4, 8, 1, 6}, targets{1, 2, 3};
    const UserMetrics m5 = user_metrics(ranked, targets, 5);
    CHECK(m5.recall == doctest::Approx(2.0 / 3.0).epsilon(1e-12));
    CHECK(m5.ndcg == doctest::Approx((kL3 + kL6) / (1.0 + kL3 + kL4)).epsilon(1e-12));
    const UserMetrics m2 = user_metrics(ranked, targets, 2);
    CHECK(m2.recall == doctest::Approx(1.0 / 3.0).epsilon(1e-12));
    CHECK(m2.ndcg == doctest::Approx(kL3 / (1.0 + kL3)).epsilon(1e-12));  // 2 ideal positions, not 3
    const UserMetrics m4 = user_metrics(ranked, targets, 4);
    CHECK(m4.recall == doctest::Approx(1.0 / 3.0).epsilon(1e-12));  // item 1 sits at rank 4, outside the top 4
  }
  SUBCASE("a repeated identifier counts once, at its first rank") {
    const std::vector<int> ranked{3, 3, 4}, targets{3, 4};
    const UserMetrics m2 = user_metrics(ranked, targets, 2);
    CHECK(m2.recall == doctest::Approx(0.5).epsilon(1e-12));
    CHECK(m2.ndcg == doctest::Approx(1.0 / (1.0 + kL3)).epsilon(1e-12));
    const UserMetrics m3 = user_metrics(ranked, targets, 3);
    CHECK(m3.recall == doctest::Approx(1.0).epsilon(1e-12));
    CHECK(m3.ndcg == doctest::Approx((1.0 + kL4) / (1.0 + kL3)).epsilon(1e-12));
  }
  SUBCASE("two target items sharing one identifier are two targets, as AtSpeed's computeTopNAccuracy counts") {
    // A user whose two test items share a code: the ranked identifier is one hit of |T| = 2 targets, and the
    // ideal DCG runs over min(|T|, K) = 2 positions (merging the repeats gave recall 1 and NDCG kL3).
    const std::vector<int> ranked{9, 4}, targets{4, 4};
    const UserMetrics m = user_metrics(ranked, targets, 5);
    CHECK(m.recall == doctest::Approx(0.5).epsilon(1e-12));
    CHECK(m.ndcg == doctest::Approx(kL3 / (1.0 + kL3)).epsilon(1e-12));
    const UserMetrics m1 = user_metrics(ranked, targets, 1);  // K = 1: one ideal position
    CHECK(m1.recall == 0.0);
    CHECK(m1.ndcg == 0.0);
    const std::vector<int> first{4, 7, 9}, three{4, 7, 4};  // both distinct targets hit, at ranks 0 and 1
    const UserMetrics m3 = user_metrics(first, three, 20);
    CHECK(m3.recall == doctest::Approx(2.0 / 3.0).epsilon(1e-12));
    CHECK(m3.ndcg == doctest::Approx((1.0 + kL3) / (1.0 + kL3 + kL4)).epsilon(1e-12));
  }
  SUBCASE("ties: the order as returned decides the rank") {
    // Items 1 and 2 tied in score; whichever is returned first gets rank 0.
    const std::vector<int> a{1, 2}, b{2, 1}, targets{2};
    CHECK(user_metrics(a, targets, 5).ndcg == doctest::Approx(kL3).epsilon(1e-12));
    CHECK(user_metrics(b, targets, 5).ndcg == doctest::Approx(1.0).epsilon(1e-12));
  }
  SUBCASE("no targets, short lists, bad K") {
    const std::vector<int> ranked{1}, none{}, targets{1, 2, 3, 4, 5, 6};
    CHECK(user_metrics(ranked, none, 5).recall == 0.0);
    const UserMetrics m = user_metrics(ranked, targets, 20);
    CHECK(m.recall == doctest::Approx(1.0 / 6.0).epsilon(1e-12));
    CHECK(m.ndcg == doctest::Approx(1.0 / (1.0 + kL3 + kL4 + kL5 + kL6 + 0.35620718710802218)).epsilon(1e-12));
    CHECK_THROWS_AS(user_metrics(ranked, targets, 0), ConfigError);
  }
}

TEST_CASE("metrics: the accumulator averages over users with targets only") {
  MetricAccumulator acc;  // K = 5, 10, 20
  const std::vector<int> hit_first{4, 1}, miss{7, 8}, none{}, t4{4};
  acc.add(hit_first, t4);  // recall 1, ndcg 1
  acc.add(miss, t4);       // 0, 0
  acc.add(hit_first, none);  // skipped: no targets
  CHECK(acc.users() == 2);
  CHECK(acc.skipped() == 1);
  for (int k : {5, 10, 20}) {
    CHECK(acc.recall(k) == doctest::Approx(0.5).epsilon(1e-12));
    CHECK(acc.ndcg(k) == doctest::Approx(0.5).epsilon(1e-12));
  }
  MetricAccumulator other;
  const std::vector<int> second{1, 4};
  other.add(second, t4);  // recall 1, ndcg 1/log2(3)
  acc.merge(other);
  CHECK(acc.users() == 3);
  CHECK(acc.recall(5) == doctest::Approx(2.0 / 3.0).epsilon(1e-12));
  CHECK(acc.ndcg(5) == doctest::Approx((1.0 + kL3) / 3.0).epsilon(1e-12));
  CHECK_THROWS_AS(acc.recall(7), RangeError);
  CHECK_THROWS_AS(acc.merge(MetricAccumulator({5})), ConfigError);
  CHECK_THROWS_AS(MetricAccumulator({0}), ConfigError);
  CHECK_THROWS_AS(MetricAccumulator(std::vector<int>{}), ConfigError);
  CHECK(MetricAccumulator().recall(5) == 0.0);  // no users yet
}

TEST_CASE("metrics: random lists against a per-position recount") {
  Rng rng(77);
  for (int trial = 0; trial < 500; ++trial) {
    std::vector<int> ranked(rng.next_u64() % 25), targets(rng.next_u64() % 6);
    for (int& x : ranked) x = static_cast<int>(rng.next_u64() % 15);
    for (int& x : targets) x = static_cast<int>(rng.next_u64() % 15);
    const int k = 1 + static_cast<int>(rng.next_u64() % 22);
    // Recount: walk positions, remember hits in a std::map from target to first rank.
    std::map<int, int> first_rank;
    std::set<int> tset(targets.begin(), targets.end());
    for (int j = 0; j < int(ranked.size()) && j < k; ++j)
      if (tset.count(ranked[j]) && !first_rank.count(ranked[j])) first_rank[ranked[j]] = j;
    double dcg = 0, idcg = 0;
    for (const auto& [id, j] : first_rank) dcg += std::log(2.0) / std::log(j + 2.0);
    // |T| and the ideal DCG count every target, repeats included (EARN.md, AtSpeed's computeTopNAccuracy).
    for (int j = 0; j < int(targets.size()) && j < k; ++j) idcg += std::log(2.0) / std::log(j + 2.0);
    const UserMetrics m = user_metrics(ranked, targets, k);
    CAPTURE(trial);
    CHECK(m.recall ==
          doctest::Approx(targets.empty() ? 0.0 : double(first_rank.size()) / targets.size()).epsilon(1e-12));
    CHECK(m.ndcg == doctest::Approx(targets.empty() ? 0.0 : dcg / idcg).epsilon(1e-12));
  }
}
