// earn/backend/cpu/press.hpp - the CPU side of a KV press (kv/press.hpp): scores from one user's prefill attention
// probabilities, per-head selection, and the gathered rows the layer's cache keeps.
#pragma once

#include <algorithm>
#include <span>
#include <vector>

#include "earn/backend/cpu/kv_store.hpp"
#include "earn/core/tensor.hpp"
#include "earn/kv/press.hpp"

namespace earn::cpu {

/// Scores of one user's n keys under a press rule, accumulated head by head from the prefill's probabilities
/// [n, n] (queries = keys = the layer's rows of the user). add() is called from each head's thread and touches only
/// that head's row; scores() then reduces the query heads of each KV group (mean).
class PressScores {
 public:
  PressScores(const kv::PressRule& rule, int n, int n_heads, int n_kv_heads)
      : rule_(rule), n_(n), group_(n_heads / n_kv_heads), rows_(kv::scored_rows(rule, n)),
        per_head_(rows_ > 0 ? std::size_t(n_heads) * n : 0, 0.0) {}

  template <class M>
  void add(int head, const M& p) {
    if (rows_ == 0) return;  // a press that keeps every row, or selects by position, needs no scores
    double* s = per_head_.data() + std::size_t(head) * n_;
    for (int i = n_ - rows_; i < n_; ++i)
      for (int j = 0; j <= i; ++j) s[j] += double(p(Index(i), Index(j)));  // causal: keys after i have p = 0
  }

  /// Raw scores of KV head g [n] (before pooling), as the rule defines them.
  std::vector<double> scores(int g) const {
    std::vector<double> out(static_cast<std::size_t>(n_), 0.0);
    if (rows_ == 0) return out;
    const double scale = kv::score_scale(rule_, n_, group_);
    for (int h = g * group_; h < (g + 1) * group_; ++h)
      for (int j = 0; j < n_; ++j) out[j] += per_head_[std::size_t(h) * n_ + j] * scale;
    return out;
  }

 private:
  kv::PressRule rule_;
  int n_, group_, rows_;  // rows_: the scored query rows (the last rows_ of the n)
  std::vector<double> per_head_;  // [heads, n]
};

/// The gathered K / V [keep, kv_dim] of the rows every KV head keeps (row j of head g = head g's j-th kept row, in
/// ascending order), with each gathered row's position: the largest of the heads' (every kept key precedes the
/// decode rows, so a causal policy sees all of them whatever the heads chose).
struct PressedRows {
  std::vector<int> pos;                // [keep]
  std::vector<int> head_pos;           // [keep * kv heads], row-major: position of row j at head g
  std::vector<double> head_score;      // [keep * kv heads] raw score of row j at head g (rule.evict), else empty
  Matrix k, v;                         // [keep, kv_dim]
};

template <class KM>
PressedRows press_rows(const kv::PressRule& rule, const PressScores& scores, const KM& k, const KM& v,
                       std::span<const int> pos, int n_kv_heads, int hd) {
  const int n = static_cast<int>(k.rows());
  std::vector<std::vector<int>> rows;  // [kv heads][keep]
  std::vector<std::vector<double>> raw;  // [kv heads][n]
  for (int g = 0; g < n_kv_heads; ++g) {
    raw.push_back(scores.scores(g));
    rows.push_back(kv::select_rows(rule, n, raw.back()));
  }
  const int keep = static_cast<int>(rows.front().size());
  PressedRows out;
  out.k.resize(keep, k.cols());
  out.v.resize(keep, v.cols());
  out.pos.assign(static_cast<std::size_t>(keep), 0);
  out.head_pos.assign(std::size_t(keep) * n_kv_heads, 0);
  if (rule.evict) out.head_score.assign(std::size_t(keep) * n_kv_heads, 0.0);
  for (int g = 0; g < n_kv_heads; ++g)
    for (int j = 0; j < keep; ++j) {
      const int r = rows[g][j];
      out.k.block(j, Index{g} * hd, 1, hd) = k.block(r, Index{g} * hd, 1, hd);
      out.v.block(j, Index{g} * hd, 1, hd) = v.block(r, Index{g} * hd, 1, hd);
      out.pos[j] = std::max(out.pos[j], pos[r]);
      out.head_pos[std::size_t(j) * n_kv_heads + g] = pos[r];
      if (rule.evict) out.head_score[std::size_t(j) * n_kv_heads + g] = raw[g][r];
    }
  return out;
}

/// Step 4 of kv/press.hpp after one decode step at a layer whose cache `store` evicts for some users: each such
/// user's prefix scores gain the step's probabilities (probs: decode row i's [n_heads, prefix_len] at i * stride;
/// mean over the user's rows and the group's heads), then every KV head drops its row of least score while the
/// user's rows hold more than the rule's keep with `generated` rows each.
inline void evict_after_step(kv::Store<Cpu>& store, std::span<const int> row_user, std::span<const float> probs,
                             Index stride, int generated, int n_heads, int n_kv_heads, int hd) {
  const int group = n_heads / n_kv_heads, rows = static_cast<int>(row_user.size());
  std::vector<char> done;
  for (int i0 = 0; i0 < rows; ++i0) {
    const int u = row_user[i0];
    if (u >= static_cast<int>(done.size())) done.resize(std::size_t(u) + 1, 0);
    if (done[u] || !store.press_rule(u).evict) continue;
    done[u] = 1;
    const int a = store.prefix_len(u);
    int beams = 0;
    for (int i = i0; i < rows; ++i) beams += row_user[i] == u;
    std::vector<double>& sc = store.prefix_scores(u);
    const double w = 1.0 / (double(group) * beams);
    for (int i = i0; i < rows; ++i) {
      if (row_user[i] != u) continue;
      const float* p = probs.data() + Index{i} * stride;
      for (int h = 0; h < n_heads; ++h)
        for (int j = 0; j < a; ++j) sc[std::size_t(j) * n_kv_heads + h / group] += double(p[Index{h} * a + j]) * w;
    }
    const std::pair<int, int> range = kv::evict_range(store.press_rule(u), a, generated);
    if (range.first == range.second) continue;
    std::vector<int> drop(static_cast<std::size_t>(n_kv_heads));
    std::vector<double> col(static_cast<std::size_t>(a));
    for (int g = 0; g < n_kv_heads; ++g) {
      for (int j = 0; j < a; ++j) col[j] = sc[std::size_t(j) * n_kv_heads + g];
      drop[g] = kv::evict_row(range, col);
    }
    store.evict_prefix(u, drop, hd);
  }
}

}  // namespace earn::cpu
