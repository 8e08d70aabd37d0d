// earn/backend/cpu/press.hpp - the CPU side of a KV press (kv/press.hpp): scores from one user's prefill attention
// probabilities, per-head selection, and the gathered rows the layer's cache keeps.
#pragma once

#include <algorithm>
#include <span>
#include <vector>

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
  Matrix k, v;                         // [keep, kv_dim]
};

template <class KM>
PressedRows press_rows(const kv::PressRule& rule, const PressScores& scores, const KM& k, const KM& v,
                       std::span<const int> pos, int n_kv_heads, int hd) {
  const int n = static_cast<int>(k.rows());
  std::vector<std::vector<int>> rows;  // [kv heads][keep]
  for (int g = 0; g < n_kv_heads; ++g) rows.push_back(kv::select_rows(rule, n, scores.scores(g)));
  const int keep = static_cast<int>(rows.front().size());
  PressedRows out;
  out.k.resize(keep, k.cols());
  out.v.resize(keep, v.cols());
  out.pos.assign(static_cast<std::size_t>(keep), 0);
  out.head_pos.assign(std::size_t(keep) * n_kv_heads, 0);
  for (int g = 0; g < n_kv_heads; ++g)
    for (int j = 0; j < keep; ++j) {
      const int r = rows[g][j];
      out.k.block(j, Index{g} * hd, 1, hd) = k.block(r, Index{g} * hd, 1, hd);
      out.v.block(j, Index{g} * hd, 1, hd) = v.block(r, Index{g} * hd, 1, hd);
      out.pos[j] = std::max(out.pos[j], pos[r]);
      out.head_pos[std::size_t(j) * n_kv_heads + g] = pos[r];
    }
  return out;
}

}  // namespace earn::cpu
