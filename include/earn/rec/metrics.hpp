// earn/rec/metrics.hpp - Recall@K and NDCG@K of ranked recommendations, as in the LLMRec protocol (EARN.md) and
// AtSpeed's computeTopNAccuracy.
//
// Per user, with ranked identifiers r_0, r_1, ... (rank order as returned: ties are broken by that order) and the
// list T of the identifiers of every target item - repeats kept: two test items that share one code are two
// targets, so |T| counts items, not distinct identifiers:
//   hits@K    = ranks j < K whose r_j is in T (a ranked identifier equal to a repeated target is one hit; a
//               repeated ranked identifier counts at its first rank only, so hits@K <= |T|)
//   Recall@K  = hits@K / |T|
//   NDCG@K    = sum over those hit ranks j of 1/log2(j + 2), divided by
//               IDCG@K = sum over j < min(|T|, K) of 1/log2(j + 2)
// Averages are over users with a non-empty T; users with no targets are counted apart and change nothing.
#pragma once

#include <algorithm>
#include <cmath>
#include <span>
#include <string>
#include <vector>

#include "earn/core/error.hpp"

namespace earn::rec {

/// One user's Recall@K and NDCG@K.
struct UserMetrics {
  double recall = 0;
  double ndcg = 0;
};

/// Recall@K and NDCG@K of one ranked list against targets (see the file comment). Empty targets: both 0.
inline UserMetrics user_metrics(std::span<const int> ranked, std::span<const int> targets, int k) {
  if (k < 1) throw ConfigError("metrics: K must be >= 1, got " + std::to_string(k));
  if (targets.empty()) return {};
  // Membership in a sorted copy; the denominator and the ideal DCG keep every target, repeats included.
  std::vector<int> t(targets.begin(), targets.end());
  std::sort(t.begin(), t.end());
  std::vector<int> found;  // identifiers already hit: one repeated in the ranked list counts once
  double dcg = 0;
  const std::size_t top = std::min<std::size_t>(ranked.size(), std::size_t(k));
  for (std::size_t j = 0; j < top; ++j) {
    const int id = ranked[j];
    if (!std::binary_search(t.begin(), t.end(), id)) continue;
    if (std::find(found.begin(), found.end(), id) != found.end()) continue;
    found.push_back(id);
    dcg += 1.0 / std::log2(double(j) + 2.0);
  }
  double idcg = 0;
  for (std::size_t j = 0; j < std::min<std::size_t>(targets.size(), std::size_t(k)); ++j)
    idcg += 1.0 / std::log2(double(j) + 2.0);
  return {double(found.size()) / double(targets.size()), dcg / idcg};
}

/// Sums per-user metrics for several K and averages them over users with targets.
/// \code
///   earn::rec::MetricAccumulator acc;            // K = 5, 10, 20
///   acc.add(ranked_identifiers, case.targets);   // once per user
///   acc.recall(10); acc.ndcg(10);
/// \endcode
class MetricAccumulator {
 public:
  explicit MetricAccumulator(std::vector<int> ks = {5, 10, 20}) : ks_(std::move(ks)) {
    if (ks_.empty()) throw ConfigError("metrics: no K given");
    for (int k : ks_)
      if (k < 1) throw ConfigError("metrics: K must be >= 1, got " + std::to_string(k));
    recall_.assign(ks_.size(), 0.0);
    ndcg_.assign(ks_.size(), 0.0);
  }

  /// Adds one user; a user with no targets is counted in skipped() only.
  void add(std::span<const int> ranked, std::span<const int> targets) {
    if (targets.empty()) {
      ++skipped_;
      return;
    }
    for (std::size_t i = 0; i < ks_.size(); ++i) {
      const UserMetrics m = user_metrics(ranked, targets, ks_[i]);
      recall_[i] += m.recall;
      ndcg_[i] += m.ndcg;
    }
    ++users_;
  }

  /// Adds the users of another accumulator with the same K list (parallel evaluation).
  void merge(const MetricAccumulator& o) {
    if (o.ks_ != ks_) throw ConfigError("metrics: merging accumulators with different K lists");
    for (std::size_t i = 0; i < ks_.size(); ++i) {
      recall_[i] += o.recall_[i];
      ndcg_[i] += o.ndcg_[i];
    }
    users_ += o.users_;
    skipped_ += o.skipped_;
  }

  const std::vector<int>& ks() const { return ks_; }
  /// Users with targets (the denominator).
  int users() const { return users_; }
  /// Users added without targets.
  int skipped() const { return skipped_; }
  /// Mean Recall@K over users with targets (0 when there are none); K must be one of ks().
  double recall(int k) const { return users_ ? recall_[slot(k)] / users_ : 0.0; }
  double ndcg(int k) const { return users_ ? ndcg_[slot(k)] / users_ : 0.0; }

 private:
  std::size_t slot(int k) const {
    auto it = std::find(ks_.begin(), ks_.end(), k);
    if (it == ks_.end()) throw RangeError("metrics: K = " + std::to_string(k) + " was not accumulated");
    return static_cast<std::size_t>(it - ks_.begin());
  }

  std::vector<int> ks_;
  std::vector<double> recall_, ndcg_;  // per K: sums over users
  int users_ = 0, skipped_ = 0;
};

}  // namespace earn::rec
