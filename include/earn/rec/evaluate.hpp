// earn/rec/evaluate.hpp - the LLMRec evaluation loop: every case of a split with targets, in batches of users,
// through a trie-constrained beam search (rec::BeamSearch on any engine, or earn::cuda::DeviceBeamSearch), ranked
// identifiers against the case's targets into Recall@K / NDCG@K (metrics.hpp). One loop for examples/evaluate, the
// trainer's validation and the accuracy grid.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <span>
#include <vector>

#include "earn/core/error.hpp"
#include "earn/rec/dataset.hpp"
#include "earn/rec/metrics.hpp"
#include "earn/rec/prompt.hpp"

namespace earn::rec {

/// Which cases and how many users per beam-search call.
struct EvalOptions {
  int batch = 32;               ///< users per search.run call (at most the searcher's max_users)
  int limit = 0;                ///< the first N cases with targets (0: all)
  std::vector<int> ks{5, 10, 20};
  /// The truncation baseline: each prompt holds only the last ceil(history_share x items) items of the history (at
  /// least one); 1 keeps the whole history. The prompt template's tokens stay.
  double history_share = 1.0;
};

/// The last ceil(share x |history|) items of `history` (at least one when it has any).
inline std::span<const int> truncated_history(std::span<const int> history, double share) {
  if (!(share > 0.0 && share <= 1.0)) throw ConfigError("evaluate: history_share must lie in (0, 1]");
  if (history.empty()) return history;
  const auto n = static_cast<std::size_t>(std::ceil(share * double(history.size()) - 1e-9));
  return history.last(std::clamp<std::size_t>(n, 1, history.size()));
}

/// What an evaluation measured.
struct EvalResult {
  MetricAccumulator metrics;
  double seconds = 0;  ///< wall time of the searches (prompt building included)
  int cases = 0;       ///< cases evaluated (users with targets)
};

/// The cases of `split` that have targets, the first `limit` of them (0: all), in dataset order.
inline std::vector<const Case*> cases_with_targets(const Dataset& ds, DataSplit split, int limit = 0) {
  if (limit < 0) throw ConfigError("evaluate: negative limit");
  std::vector<const Case*> out;
  for (const Case& c : ds.cases(split))
    if (!c.targets.empty() && (limit == 0 || static_cast<int>(out.size()) < limit)) out.push_back(&c);
  return out;
}

/// Runs `search` (anything with run(std::span<const std::vector<int>>) returning per-user Recommendation lists and
/// max_users()) over `cases`, prompts from `pb`. `progress(done, total)` is called after each batch when given.
template <class Search>
EvalResult evaluate(Search& search, const Dataset& ds, const PromptBuilder& pb, std::span<const Case* const> cases,
                    const EvalOptions& opt = {}, const std::function<void(int, int)>& progress = {}) {
  if (opt.batch < 1 || opt.batch > search.max_users())
    throw ConfigError("evaluate: batch " + std::to_string(opt.batch) + " is outside [1, the searcher's " +
                      std::to_string(search.max_users()) + " users]");
  truncated_history({}, opt.history_share);  // checks the share before any search
  EvalResult r{MetricAccumulator(opt.ks), 0.0, 0};
  std::vector<std::vector<int>> prompts;
  std::vector<int> ranked;
  const auto t0 = std::chrono::steady_clock::now();
  const int total = static_cast<int>(cases.size());
  for (int i = 0; i < total; i += opt.batch) {
    const int n = std::min(opt.batch, total - i);
    prompts.resize(static_cast<std::size_t>(n));
    for (int j = 0; j < n; ++j)
      prompts[j] = pb.build(ds.catalogue(), truncated_history(cases[i + j]->history, opt.history_share));
    const auto recs = search.run(prompts);
    for (int j = 0; j < n; ++j) {
      ranked.clear();
      for (const auto& rc : recs[j]) ranked.push_back(rc.identifier);
      r.metrics.add(ranked, cases[i + j]->targets);
    }
    r.cases += n;
    if (progress) progress(i + n, total);
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace earn::rec
