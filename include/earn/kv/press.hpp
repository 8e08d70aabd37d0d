// earn/kv/press.hpp - KV presses: after a layer's prefill attention, keep a bounded set of each user's rows in the
// cache, chosen per KV head by position and by attention scores. The paper's inference-time baselines
// (StreamingLLM, SnapKV, H2O, PyramidKV) are presses over the dense model; EARN is compared with them at equal KV.
//
// A press is plain data with run-time parameters (budgets, windows, pooling): no new instantiation per value. For
// each layer and user it states a PressRule for the n rows that layer computed; every backend then runs the same
// pipeline, written out here once (select_rows) and mirrored on the GPU (backend/cuda/press.cuh, tested against it):
//   1. scores   per KV head g, a score s_g[j] for each of the n keys:
//                 Score::kNone    none (the selection is by position only)
//                 Score::kWindow  mean over the last `window` query rows and the query heads of group g of the
//                                 attention probabilities p(i, j) (SnapKV's observation window)
//                 Score::kAll     sum over every query row i, mean over the group's heads, of p(i, j) (H2O's
//                                 accumulated attention: the heavy hitters)
//   2. pooling  s_g over the keys [0, n - recent) averaged over a window of `pool` keys centred on each (zero
//               padding, divided by `pool`: torch's avg_pool1d with padding pool / 2), as SnapKV and kvpress do;
//               pool = 1 leaves the scores as they are
//   3. keep     min(keep, n) rows per KV head: the first min(sinks, keep) rows, the last `recent` of the rest, then
//               the highest pooled scores among the others (ties: the lower index first), in ascending order
//   4. evict    (PressRule::evict, H2O's eviction during decode; Score::kAll only) each kept row carries on its
//               accumulated score; a decode step adds, per KV head, the probabilities of the step's query rows
//               (mean over the user's decode rows, its beams, and over the group's heads: a step counts as one
//               query row, as in H2O with one sequence), then, while a user's rows would hold more than `keep`
//               (prefix + generated), every KV head drops the prefix row of least score (ties: the oldest) among
//               its candidates: neither the first `sinks` rows nor the last recent - generated ones (the recent
//               window slides over the generated rows). Generated rows are never dropped. See evict_range.
// What a layer keeps is what its cache holds: kv_bytes() drops by every row a press leaves out, and a pressed
// cache reserves only the largest keep a prompt of max_prompt tokens asks for. Decode rows then attend to the kept
// rows of their user (every one of them: a press needs a causal policy, and all kept keys precede any generated
// one) and to their own generated rows. The prefill itself is dense: presses change what is cached, not the rows
// of the residual stream (EARN's register layers drop the rows themselves).
//
// \code
//   // SnapKV at a quarter of the prompt (plus 2 rows) per layer, over a dense model:
//   using SnapLayer = earn::Layer<earn::attention::DenseCausal, earn::kv::Pressed<earn::kv::press::SnapKV>>;
//   earn::Uniform<SnapLayer> schedule{SnapLayer{{}, {{.budget = {.ratio = 0.25, .rows = 2}}}}};
//   earn::Engine<earn::Uniform<SnapLayer>> engine(weights, schedule);
// \endcode
#pragma once

#include <algorithm>
#include <cmath>
#include <concepts>
#include <cstdint>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "earn/core/error.hpp"

namespace earn::kv {

/// Where a press's scores come from (see the file comment).
enum class Score : std::uint8_t { kNone, kWindow, kAll };

/// What a press decides for one layer of one user whose layer computed n rows. Checked by check_rule.
struct PressRule {
  int keep = 0;    ///< rows kept per KV head (at most n are)
  int sinks = 0;   ///< the first rows, always kept
  int recent = 0;  ///< the last rows, always kept
  Score score = Score::kNone;
  int window = 0;  ///< Score::kWindow: query rows observed (the last `window`)
  int pool = 1;    ///< odd width of the average pooling of scores (1: none)
  bool evict = false;  ///< go on evicting during decode, so prefix + generated rows stay within keep (step 4)
};

/// ConfigError unless `r` is a rule the pipeline takes for n rows: counts >= 0, sinks + recent <= keep (when fewer
/// than n are kept), a score source when rows are left to choose by score, an odd pool width, a window >= 1.
inline void check_rule(const PressRule& r, int n, const char* press) {
  const std::string who = std::string("press ") + press + ": ";
  if (r.keep < 0 || r.sinks < 0 || r.recent < 0 || r.window < 0)
    throw ConfigError(who + "negative keep / sinks / recent / window");
  if (r.pool < 1 || r.pool % 2 == 0) throw ConfigError(who + "pool width must be odd and >= 1, got " + std::to_string(r.pool));
  if (r.score == Score::kWindow && r.window < 1) throw ConfigError(who + "an observation window needs >= 1 query rows");
  if (r.evict && (r.score != Score::kAll || r.pool != 1))
    throw ConfigError(who + "eviction during decode needs scores accumulated over every query row (Score::kAll), "
                            "unpooled");
  if (r.keep < n && r.sinks + r.recent > r.keep)
    throw ConfigError(who + "sinks " + std::to_string(r.sinks) + " + recent " + std::to_string(r.recent) +
                      " exceed the " + std::to_string(r.keep) + " rows kept");
  if (r.keep < n && r.score == Score::kNone && r.sinks + r.recent < r.keep)
    throw ConfigError(who + "rows left to choose by score, but the press has no score source");
}

/// How many rows a press keeps of n: min(n, rows + floor(ratio * n)).
struct Budget {
  double ratio = 0.0;  ///< share of the layer's rows
  int rows = 0;        ///< plus this many rows
  int of(int n) const { return std::min(rows_for(n), n); }
  /// rows + floor(ratio * n), not capped at n: the bound of a cache that also holds generated rows (H2O evicting
  /// during decode).
  int rows_for(int n) const {
    if (!(ratio >= 0.0 && ratio <= 1.0) || rows < 0)  // also refuses NaN
      throw ConfigError("press budget: ratio must lie in [0, 1] and rows be >= 0, got ratio " + std::to_string(ratio) +
                        ", rows " + std::to_string(rows));
    const double r = std::floor(ratio * double(n) + 1e-9);
    return static_cast<int>(std::clamp<double>(double(rows) + r, 0.0, double(1 << 30)));  // an int for any rows
  }
  /// The budget whose cache matches EARN's at split layer k of L with r registers, prompt for prompt: EARN caches
  /// k (P + r) + (L - k) r = k P + L r rows of a P-token prompt over its L layers; a press over the dense model
  /// keeping P k / L + r rows of each layer caches at most as many (floor).
  static Budget matching_earn(int k, int n_layers, int registers) {
    if (k < 0 || n_layers < 1 || k > n_layers || registers < 0)
      throw ConfigError("press budget: EARN's k = " + std::to_string(k) + " of " + std::to_string(n_layers) +
                        " layers with " + std::to_string(registers) + " registers is not a setting");
    return {double(k) / double(n_layers), registers};
  }
};

/// A type usable as a press: a name and a rule per (layer, layers, rows).
template <class P>
concept Press = requires(const P& p, int l, int n) {
  { P::name } -> std::convertible_to<const char*>;
} && (requires(const P& p, int l, int n) {
  { p.rule(l, l, n) } -> std::same_as<PressRule>;
} || requires(const P& p, int l, int n) {
  { p.rule(l, l, n, l, l) } -> std::same_as<PressRule>;  // also given the model's register counts
});

namespace press {

/// StreamingLLM: the first `sinks` rows (attention sinks) and the most recent ones, nothing by score.
struct StreamingLLM {
  static constexpr const char* name = "streaming_llm";
  Budget budget;
  int sinks = 4;
  PressRule rule(int /*layer*/, int /*n_layers*/, int n) const {
    const int keep = budget.of(n), s = std::min(sinks, keep);
    return {keep, s, keep - s, Score::kNone, 0, 1};
  }
};

/// SnapKV: the last `window` rows observe the prompt; each KV head keeps the keys they attend to most (pooled), and
/// the window itself.
struct SnapKV {
  static constexpr const char* name = "snapkv";
  Budget budget;
  int window = 8;
  int pool = 7;
  PressRule rule(int /*layer*/, int /*n_layers*/, int n) const {
    const int keep = budget.of(n);
    return {keep, 0, std::min(window, keep), Score::kWindow, std::min(window, n), pool};
  }
};

/// H2O: heavy hitters (the keys with the largest attention accumulated over every query row of the prefill) and
/// the most recent rows, `recent_share` of the budget. Applied at the end of each layer's prefill, and with
/// `evict_in_decode` also after every decode step (step 4 of the file comment): each user's rows then stay within
/// the budget, rows + floor(ratio * n), generated rows included.
struct H2O {
  static constexpr const char* name = "h2o";
  Budget budget;
  double recent_share = 0.5;
  bool evict_in_decode = false;
  PressRule rule(int /*layer*/, int /*n_layers*/, int n) const {
    if (!(recent_share >= 0.0 && recent_share <= 1.0))
      throw ConfigError("press h2o: recent_share must lie in [0, 1], got " + std::to_string(recent_share));
    const int keep = evict_in_decode ? budget.rows_for(n) : budget.of(n);
    const int recent = std::clamp(static_cast<int>(std::floor(recent_share * keep + 1e-9)), 0, keep);
    return {keep, 0, recent, Score::kAll, 0, 1, evict_in_decode};
  }
};

/// PyramidKV: SnapKV's selection with per-layer budgets falling linearly with depth around the same mean (the
/// PyramidKV paper's schedule: the top layer keeps (budget - window) / beta + window rows, the bottom one twice the
/// mean less that, before the window).
struct PyramidKV {
  static constexpr const char* name = "pyramidkv";
  Budget budget;
  int window = 8;
  int pool = 7;
  int beta = 20;
  PressRule rule(int layer, int n_layers, int n) const {
    const int mean = budget.of(n), w = std::min(window, mean), a = mean - w;
    int keep = mean;
    if (n_layers > 1 && beta > 0) {
      const int lo = a / beta, hi = 2 * a - lo;
      keep = hi - static_cast<int>((long long)layer * (hi - lo) / (n_layers - 1)) + w;
    }
    keep = std::clamp(keep, 0, n);
    return {keep, 0, std::min(w, keep), Score::kWindow, std::min(window, n), pool};
  }
};

/// Gist: the registers' rows, nothing of the prompt (rows [0, r_p) and the last r_s of the user's rows). The press
/// of Gist's layers (attention/gist.hpp), whose decode rows see no prompt row; over a model not trained that way it
/// is StreamingLLM with a budget of the registers. Its rule takes the model's register counts (rule_of).
struct Gist {
  static constexpr const char* name = "gist";
  static constexpr bool holds_prompt = false;  // what it keeps are registers
  PressRule rule(int /*layer*/, int /*n_layers*/, int n, int prefix_registers, int suffix_registers) const {
    if (prefix_registers + suffix_registers < 1)
      throw ConfigError("press gist: the model has no registers, so it would keep nothing of the prompt's rows");
    const int keep = std::min(prefix_registers + suffix_registers, n);
    return {keep, std::min(prefix_registers, keep), keep - std::min(prefix_registers, keep), Score::kNone, 0, 1};
  }
};

}  // namespace press

/// The rule of press p for layer l of n_layers and a user's n rows, of which r_p and r_s are the prefix and suffix
/// registers (a press whose rule takes them: press::Gist); the one way engines ask a press.
template <class P>
PressRule rule_of(const P& p, int l, int n_layers, int n, int prefix_registers, int suffix_registers) {
  if constexpr (requires { p.rule(l, n_layers, n, prefix_registers, suffix_registers); })
    return p.rule(l, n_layers, n, prefix_registers, suffix_registers);
  else
    return p.rule(l, n_layers, n);
}

/// Whether press P may keep prompt rows (every press but press::Gist).
template <class P>
constexpr bool press_holds_prompt() {
  if constexpr (requires { P::holds_prompt; })
    return static_cast<bool>(P::holds_prompt);
  else
    return true;
}

/// Query rows whose probabilities score the keys of n rows under rule r: the last `scored_rows` of them (0: the
/// selection is by position alone, or every row is kept).
inline int scored_rows(const PressRule& r, int n) {
  if (r.evict) return n;  // the kept rows carry their scores on into decode
  if (r.keep >= n || r.score == Score::kNone) return 0;
  return r.score == Score::kWindow ? std::min(r.window, n) : n;
}

/// The factor of each probability in a KV head's raw score: 1 / (group x window rows) for Score::kWindow (a mean),
/// 1 / group for Score::kAll (a sum over rows, a mean over the group's query heads).
inline double score_scale(const PressRule& r, int n, int group) {
  return 1.0 / (double(group) * double(r.score == Score::kWindow ? std::max(scored_rows(r, n), 1) : 1));
}

/// Step 4 of the file comment: the prefix rows [first, second) of a user's `prefix` rows that a KV head may drop
/// after a decode step leaving `generated` rows per decode row, or an empty range when nothing is dropped (the
/// rows fit within keep, or every one is a sink or recent).
inline std::pair<int, int> evict_range(const PressRule& r, int prefix, int generated) {
  if (!r.evict || prefix + generated <= r.keep) return {0, 0};
  const int lo = std::min(r.sinks, prefix), hi = prefix - std::clamp(r.recent - generated, 0, prefix);
  return lo < hi ? std::pair{lo, hi} : std::pair{0, 0};
}

/// The row a KV head drops among [range.first, range.second) by its scores s: the least, the oldest of equals.
inline int evict_row(std::pair<int, int> range, std::span<const double> s) {
  int best = range.first;
  for (int j = range.first + 1; j < range.second; ++j)
    if (s[j] < s[best]) best = j;
  return best;
}

/// Calls f(press) with the press named `name` (streaming_llm, snapkv, h2o, pyramidkv: their `name`s; h2o_evict:
/// H2O evicting during decode) at budget b and its default parameters: the programs' --press options. ConfigError
/// for another name.
template <class F>
decltype(auto) visit_press(const std::string& name, Budget b, F&& f) {
  if (name == press::StreamingLLM::name) return std::forward<F>(f)(press::StreamingLLM{b});
  if (name == press::SnapKV::name) return std::forward<F>(f)(press::SnapKV{b});
  if (name == press::H2O::name) return std::forward<F>(f)(press::H2O{b});
  if (name == "h2o_evict") return std::forward<F>(f)(press::H2O{.budget = b, .evict_in_decode = true});
  if (name == press::PyramidKV::name) return std::forward<F>(f)(press::PyramidKV{b});
  throw ConfigError("unknown press " + name + " (streaming_llm, snapkv, h2o, h2o_evict, pyramidkv)");
}

/// Scores of the keys [0, m) averaged over a centred window of `pool` keys (zero padding, divided by pool).
inline std::vector<double> pool_scores(std::span<const double> s, int m, int pool) {
  std::vector<double> out(static_cast<std::size_t>(m), 0.0);
  const int h = pool / 2;
  for (int j = 0; j < m; ++j) {
    double sum = 0;
    for (int t = std::max(0, j - h); t <= std::min(m - 1, j + h); ++t) sum += s[t];
    out[j] = pool == 1 ? s[j] : sum / double(pool);
  }
  return out;
}

/// The rows one KV head keeps of n under rule r, in ascending order, from its raw scores s [n] (ignored for
/// Score::kNone): pooling, then sinks, recent and the best scores (the pipeline of the file comment).
inline std::vector<int> select_rows(const PressRule& r, int n, std::span<const double> s) {
  std::vector<int> out;
  const int keep = std::min(r.keep, n);
  if (keep == n) {
    for (int j = 0; j < n; ++j) out.push_back(j);
    return out;
  }
  const int sinks = std::min(r.sinks, keep), recent = std::min(r.recent, keep - sinks);
  std::vector<char> kept(static_cast<std::size_t>(n), 0);
  for (int j = 0; j < sinks; ++j) kept[j] = 1;
  for (int j = n - recent; j < n; ++j) kept[j] = 1;
  const int rest = keep - sinks - recent;
  if (rest > 0) {
    const int m = n - recent;  // scores of the keys outside the recent rows are pooled
    const std::vector<double> p = pool_scores(s, m, r.pool);
    std::vector<int> cand;
    for (int j = sinks; j < m; ++j) cand.push_back(j);
    std::stable_sort(cand.begin(), cand.end(), [&](int a, int b) { return p[a] > p[b]; });
    for (int i = 0; i < rest && i < static_cast<int>(cand.size()); ++i) kept[cand[i]] = 1;
  }
  for (int j = 0; j < n; ++j)
    if (kept[j]) out.push_back(j);
  return out;
}

}  // namespace earn::kv
