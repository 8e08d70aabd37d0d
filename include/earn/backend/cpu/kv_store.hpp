// earn/backend/cpu/kv_store.hpp - host storage of one layer's KV cache (prefix per user, generated per row).
#pragma once

#include <algorithm>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "earn/backend/cpu/tag.hpp"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/kv/layout.hpp"
#include "earn/kv/press.hpp"

namespace earn::kv {

/// One layer's cache on the host. K rows are stored after RoPE, so decode never re-rotates them.
template <>
class Store<Cpu> {
 public:
  Store() = default;
  /// `prefix_capacity` rows per user; `max_new` generated rows per decode row.
  Store(Index prefix_capacity, int max_users, int max_rows, int max_new, int kv_dim)
      : prefix_capacity_(prefix_capacity), max_rows_(max_rows), max_new_(max_new), kv_dim_(kv_dim),
        prefix_k_(max_users, Matrix(prefix_capacity, kv_dim)), prefix_v_(max_users, Matrix(prefix_capacity, kv_dim)),
        prefix_pos_(max_users), prefix_head_pos_(max_users), prefix_score_(max_users), rule_(max_users),
        prefix_len_(max_users, 0),
        gen_k_(Index{max_rows} * max_new, kv_dim), gen_v_(Index{max_rows} * max_new, kv_dim) {}

  Index prefix_capacity() const { return prefix_capacity_; }
  int max_new() const { return max_new_; }
  int kv_dim() const { return kv_dim_; }
  int prefix_len(int user) const { return prefix_len_[user]; }
  const std::vector<int>& prefix_positions(int user) const { return prefix_pos_[user]; }

  /// Replace user `user`'s prefix with rows k, v [n, kv_dim] at `positions`. A pressed layer (kv/press.hpp), whose
  /// heads keep rows of different positions, also gives each row's position at every KV head ([n * kv heads]).
  template <class KM, class VM>
  void write_prefix(int user, const KM& k, const VM& v, std::span<const int> positions,
                    std::span<const int> head_positions = {}) {
    if (k.rows() > prefix_capacity_)
      throw RangeError("kv cache: " + std::to_string(k.rows()) + " prefix rows exceed the layer's capacity of " +
                       std::to_string(prefix_capacity_));
    prefix_k_[user].topRows(k.rows()) = k;
    prefix_v_[user].topRows(v.rows()) = v;
    prefix_pos_[user].assign(positions.begin(), positions.end());
    prefix_head_pos_[user].assign(head_positions.begin(), head_positions.end());
    prefix_score_[user].clear();
    rule_[user] = {};
    prefix_len_[user] = static_cast<int>(k.rows());
  }
  /// A pressed layer that evicts during decode (kv::PressRule::evict): the user's rule and each prefix row's score
  /// at every KV head ([prefix_len * kv heads], row-major like prefix_head_positions), after write_prefix.
  void set_eviction(int user, const kv::PressRule& rule, std::vector<double> head_scores) {
    rule_[user] = rule;
    prefix_score_[user] = std::move(head_scores);
  }
  const kv::PressRule& press_rule(int user) const { return rule_[user]; }
  std::vector<double>& prefix_scores(int user) { return prefix_score_[user]; }
  /// Drops prefix row rows[g] of `user` at every KV head g (heads of head_dim columns): each head's later rows move
  /// up one, with their positions and scores, and the user holds one prefix row less (kv_bytes() shrinks).
  void evict_prefix(int user, std::span<const int> rows, int head_dim) {
    const int n = prefix_len_[user], heads = static_cast<int>(rows.size());
    std::vector<int>& hp = prefix_head_pos_[user];
    std::vector<double>& sc = prefix_score_[user];
    if (n == 0 || std::size_t(n) * heads != hp.size() || sc.size() != hp.size() || heads * head_dim != kv_dim_)
      throw ConfigError("kv cache: eviction of a prefix without per-head positions and scores");
    Matrix& k = prefix_k_[user];
    Matrix& v = prefix_v_[user];
    for (int g = 0; g < heads; ++g) {
      const int r = rows[g];
      if (r < 0 || r >= n) throw RangeError("kv cache: evicted row " + std::to_string(r) + " of " + std::to_string(n));
      for (int j = r; j + 1 < n; ++j) {
        k.block(j, Index{g} * head_dim, 1, head_dim) = k.block(j + 1, Index{g} * head_dim, 1, head_dim);
        v.block(j, Index{g} * head_dim, 1, head_dim) = v.block(j + 1, Index{g} * head_dim, 1, head_dim);
        hp[std::size_t(j) * heads + g] = hp[std::size_t(j + 1) * heads + g];
        sc[std::size_t(j) * heads + g] = sc[std::size_t(j + 1) * heads + g];
      }
    }
    --prefix_len_[user];
    hp.resize(std::size_t(n - 1) * heads);
    sc.resize(hp.size());
    std::vector<int>& pos = prefix_pos_[user];  // a row's position: the largest of its heads' (press_rows)
    pos.assign(std::size_t(n - 1), 0);
    for (int j = 0; j + 1 < n; ++j)
      for (int g = 0; g < heads; ++g) pos[j] = std::max(pos[j], hp[std::size_t(j) * heads + g]);
  }
  /// Position of every prefix row at every KV head ([prefix_len * kv heads], row-major) when a press chose them per
  /// head; empty otherwise (every head holds the rows at prefix_positions).
  const std::vector<int>& prefix_head_positions(int user) const { return prefix_head_pos_[user]; }
  /// [prefix_len, kv_dim] views of a user's prefix.
  auto prefix_k(int user) const { return prefix_k_[user].topRows(prefix_len_[user]); }
  auto prefix_v(int user) const { return prefix_v_[user].topRows(prefix_len_[user]); }

  /// Rows [0, n) of decode row `row`'s generated K / V, [n, kv_dim].
  auto gen_k(int row, int n) const { return gen_k_.middleRows(Index{row} * max_new_, n); }
  auto gen_v(int row, int n) const { return gen_v_.middleRows(Index{row} * max_new_, n); }
  auto gen_k_row(int row, int step) { return gen_k_.row(Index{row} * max_new_ + step); }
  auto gen_v_row(int row, int step) { return gen_v_.row(Index{row} * max_new_ + step); }

  /// New row i continues old row parent[i]: copy its first `gen_len` generated rows.
  void reorder(std::span<const int> parent, int gen_len) {
    if (gen_len == 0) return;
    // Through a copy of the generated blocks (a parent may be read after its row was overwritten), kept between
    // steps at its largest size rather than allocated on every step of every layer.
    if (reorder_k_.rows() < gen_k_.rows()) {
      reorder_k_.resize(gen_k_.rows(), kv_dim_);
      reorder_v_.resize(gen_v_.rows(), kv_dim_);
    }
    for (std::size_t i = 0; i < parent.size(); ++i) {
      reorder_k_.middleRows(Index(i) * gen_len, gen_len) = gen_k(parent[i], gen_len);
      reorder_v_.middleRows(Index(i) * gen_len, gen_len) = gen_v(parent[i], gen_len);
    }
    for (std::size_t i = 0; i < parent.size(); ++i) {
      gen_k_.middleRows(Index(i) * max_new_, gen_len) = reorder_k_.middleRows(Index(i) * gen_len, gen_len);
      gen_v_.middleRows(Index(i) * max_new_, gen_len) = reorder_v_.middleRows(Index(i) * gen_len, gen_len);
    }
  }

  /// Floats reserved by this layer (prefix blocks of every user + generated blocks), K and V.
  Index capacity_floats() const {
    return 2 * (prefix_capacity_ * Index(prefix_k_.size()) + Index{max_rows_} * max_new_) * kv_dim_;
  }

 private:
  Index prefix_capacity_ = 0;
  int max_rows_ = 0, max_new_ = 0, kv_dim_ = 0;
  std::vector<Matrix> prefix_k_, prefix_v_;  // per user: [prefix_capacity, kv_dim]
  std::vector<std::vector<int>> prefix_pos_;  // per user: position of each prefix row
  std::vector<std::vector<int>> prefix_head_pos_;  // per user: [rows * kv heads] positions of a pressed layer
  std::vector<std::vector<double>> prefix_score_;  // per user: [rows * kv heads] scores of an evicting layer
  std::vector<kv::PressRule> rule_;                 // per user: the press rule of an evicting layer
  std::vector<int> prefix_len_;               // per user: rows written
  Matrix gen_k_, gen_v_;                      // [max_rows * max_new, kv_dim], row r's step g at r*max_new + g
  Matrix reorder_k_, reorder_v_;              // reorder's copy, allocated by the first reorder
};

}  // namespace earn::kv
