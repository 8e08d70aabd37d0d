// earn/attention/observer.hpp - what attention does, per layer and head: whole probability rows of chosen query
// rows, and reduced statistics (head / tail mass, density, entropy) that measure EARN's two findings.
//
// Backend-independent. A backend that runs a prefill with an observer attached tells it, per layer and sequence,
// which rows exist (an ObservedSegment: positions, kinds, the layer policy's visibility) and hands it each head's
// probabilities [queries, keys]; the CPU engine does so through `CpuState::observe(&observer)`. A backend that
// cannot materialise scores (CUDA flash attention) fills the same HeadStats cells through `accumulate`.
//
// Definitions (EARN.md, "Measuring them"; every sum runs over the keys the query can see at that layer: in EARN's
// late layers only registers and generated rows exist, so "first" and "last" keys are registers there):
//   head mass   sum of p over the T_h visible keys of smallest position   (head_keys; the first-token sink)
//   tail mass   sum of p over the T_t visible keys of largest position    (tail_keys; for a causal prompt row
//               these end at the query itself). A query seeing fewer than T_h + T_t keys counts a key in both.
//   density     fraction of visible keys with p > eps (DensityRule::kAbsolute, the paper's reading), or with
//               p > 1 / visible (kAboveUniform: above what uniform attention would give); strict inequality
//   entropy     -sum p ln p over visible keys, in nats (0 * ln 0 = 0)
// Averaging: within one sample (one prompt prefilled once) the selected query rows of a (layer, head) are averaged
// with equal weight; the samples' means are then summed in double, so mean() weighs every sample equally whatever
// its prompt length. Sums are exact up to double rounding of float probabilities (each p is widened exactly).
//
// \code
//   earn::attention::Observer obs({.reduce = {.kinds = earn::attention::kAllKinds},
//                                  .record = {.readout = true}, .head_keys = 4, .tail_keys = 4});
//   auto st = engine.make_state({.max_users = 1, .max_prompt = 512});
//   st.observe(&obs);                    // nullptr detaches; nothing is observed or paid for without one
//   engine.prefill(st, 0, prompt);
//   obs.stats(layer, head).mean().density;   // and obs.recorded(): whole rows of the readout row, every layer
// \endcode
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <span>
#include <string>
#include <tuple>
#include <vector>

#include "earn/attention/row_kind.hpp"
#include "earn/core/error.hpp"

namespace earn::attention {

/// Bit of one row kind in a RowQuery's `kinds` mask.
constexpr std::uint8_t kind_bit(RowKind k) { return static_cast<std::uint8_t>(1u << static_cast<unsigned>(k)); }
/// Every row kind.
constexpr std::uint8_t kAllKinds = 0xF;
/// No row: a RowQuery that selects nothing (the default of ObserverOptions::record).
constexpr std::uint8_t kNoRows = 0;

/// Which query rows of a sequence, at which layers, an observer looks at. A row is selected when its kind is in
/// `kinds`, its position is in `positions` (when given) and it is the readout row (when `readout`); of those, the
/// last `last` of the sequence at that layer when last > 0.
struct RowQuery {
  std::uint8_t kinds = kAllKinds;  ///< mask of kind_bit(RowKind)
  bool readout = false;            ///< only the row that predicts the first generated token
  int last = 0;                    ///< 0: every selected row; n > 0: the last n of them per sequence and layer
  std::vector<int> positions = {}; ///< [any] position ids; empty: any position
  std::vector<int> layers = {};    ///< [any] layers; empty: every layer
};

/// How density counts a key as attended.
enum class DensityRule : std::uint8_t {
  kAbsolute,      ///< p > threshold (eps)
  kAboveUniform,  ///< p > 1 / (keys the query sees)
};

/// What an Observer keeps. Checked when the observer is built (ConfigError / RangeError).
struct ObserverOptions {
  RowQuery reduce = {};                   ///< rows whose statistics are reduced (default: all rows, all layers)
  RowQuery record = {.kinds = kNoRows};   ///< rows whose whole probability rows are kept (default: none)
  int record_samples = 0;                 ///< keep rows of the first N samples only (0: all samples)
  int head_keys = 1;                      ///< T_h >= 1
  int tail_keys = 1;                      ///< T_t >= 1
  double threshold = 0.01;                ///< eps in (0, 1), for DensityRule::kAbsolute
  DensityRule density = DensityRule::kAbsolute;
};

/// Reduced statistics of one query row (or sums of them).
struct RowStats {
  double head_mass = 0, tail_mass = 0, density = 0, entropy = 0;
  RowStats& operator+=(const RowStats& o) {
    head_mass += o.head_mass;
    tail_mass += o.tail_mass;
    density += o.density;
    entropy += o.entropy;
    return *this;
  }
  RowStats scaled(double f) const { return {head_mass * f, tail_mass * f, density * f, entropy * f}; }
};

/// Statistics of one (layer, head) accumulated over samples: plain data, so a GPU reduction can fill it too.
struct HeadStats {
  RowStats sum;             ///< sum over samples of each sample's mean over its selected rows
  RowStats sum_sq;          ///< sum over samples of the squares of those means (for the sd over samples)
  std::int64_t samples = 0; ///< samples with at least one selected row here
  std::int64_t rows = 0;    ///< selected query rows over all samples
  /// Mean over samples (all zero when no sample contributed).
  RowStats mean() const { return samples ? sum.scaled(1.0 / double(samples)) : RowStats{}; }
};

/// One whole probability row: query row `q_pos` of sample `sample` at (layer, head), over the keys it sees.
struct RecordedRow {
  int sample = 0, user = 0, layer = 0, head = 0;
  int q_pos = 0;
  RowKind q_kind = RowKind::kPrompt;
  std::vector<int> k_pos;        ///< [visible keys] positions, ascending as the cache holds them
  std::vector<RowKind> k_kind;   ///< [visible keys]
  std::vector<double> p;         ///< [visible keys] probabilities (sum 1)
};

/// What a backend tells the observer about one sequence at one layer of a prefill: its query rows and keys.
struct ObservedSegment {
  int layer = 0;
  int sample = 0;       ///< the observer's id of this prompt (from begin_pass)
  int user = 0;         ///< the state's user slot
  int readout_pos = 0;  ///< position of the row that predicts the first generated token
  std::span<const int> q_pos;       ///< [T] positions of the query rows
  std::span<const RowKind> q_kind;  ///< [T]
  std::span<const int> k_pos;       ///< [S] positions of the keys
  std::span<const RowKind> k_kind;  ///< [S]
  /// The layer policy's visibility of a row pair at a query head (its attention::LayerMask).
  std::function<bool(int head, int q_pos, int k_pos, RowKind q_kind, RowKind k_kind)> visible;
  /// Whether query row i sees key j at query head `head`.
  bool sees(int head, std::size_t i, std::size_t j) const {
    return visible(head, q_pos[i], k_pos[j], q_kind[i], k_kind[j]);
  }
};

/// Records attention probabilities and reduces them; see the file comment for the definitions.
class Observer {
 public:
  explicit Observer(ObserverOptions o = {}) : o_(std::move(o)) {
    if (o_.head_keys < 1 || o_.tail_keys < 1)
      throw ConfigError("observer: head_keys (T_h) and tail_keys (T_t) must be >= 1, got " +
                        std::to_string(o_.head_keys) + " and " + std::to_string(o_.tail_keys));
    if (!(o_.threshold > 0.0 && o_.threshold < 1.0))  // also refuses NaN
      throw ConfigError("observer: density threshold eps must lie in (0, 1), got " + std::to_string(o_.threshold));
    if (o_.record_samples < 0) throw ConfigError("observer: record_samples must be >= 0");
    for (const RowQuery* q : {&o_.reduce, &o_.record}) {
      const char* what = q == &o_.reduce ? "reduce" : "record";
      if (q->last < 0) throw RangeError(std::string("observer: ") + what + ".last must be >= 0, got " +
                                        std::to_string(q->last));
      for (int l : q->layers)
        if (l < 0) throw RangeError(std::string("observer: ") + what + " asks for layer " + std::to_string(l));
      for (int p : q->positions)
        if (p < 0) throw RangeError(std::string("observer: ") + what + " asks for row position " + std::to_string(p));
    }
  }

  const ObserverOptions& options() const { return o_; }
  int n_layers() const { return n_layers_; }
  int n_heads() const { return n_heads_; }
  int samples() const { return samples_; }

  /// Statistics of (layer, head) so far. RangeError outside the model seen by the first pass.
  const HeadStats& stats(int layer, int head) const {
    if (layer < 0 || layer >= n_layers_ || head < 0 || head >= n_heads_)
      throw RangeError("observer: stats(" + std::to_string(layer) + ", " + std::to_string(head) + ") outside " +
                       std::to_string(n_layers_) + " layers x " + std::to_string(n_heads_) + " heads");
    return stats_[std::size_t(layer) * n_heads_ + head];
  }
  /// Every recorded row, ordered by (sample, layer, query position, head).
  std::vector<RecordedRow> recorded() const {
    std::vector<RecordedRow> out;
    for (const auto& v : recorded_) out.insert(out.end(), v.begin(), v.end());
    std::sort(out.begin(), out.end(), [](const RecordedRow& a, const RecordedRow& b) {
      return std::tie(a.sample, a.layer, a.q_pos, a.head) < std::tie(b.sample, b.layer, b.q_pos, b.head);
    });
    return out;
  }
  /// Forgets every statistic and row (the options stay).
  void clear() {
    stats_.assign(stats_.size(), HeadStats{});
    for (auto& v : recorded_) v.clear();
    samples_ = 0;
  }

  // ---- backend side ----

  /// A prefill of `input_len.size()` sequences (input rows each, registers included) starts on a model of
  /// `n_layers` x `n_heads`. Checks every request against it (RangeError) before anything runs; returns the
  /// sample id of the first sequence (the others follow).
  int begin_pass(int n_layers, int n_heads, std::span<const int> input_len) {
    if (n_layers_ && (n_layers != n_layers_ || n_heads != n_heads_))
      throw ConfigError("observer: it holds statistics of a " + std::to_string(n_layers_) + " x " +
                        std::to_string(n_heads_) + " model; clear() it or use another for a " +
                        std::to_string(n_layers) + " x " + std::to_string(n_heads) + " model");
    for (const RowQuery* q : {&o_.reduce, &o_.record}) {
      for (int l : q->layers)
        if (l >= n_layers)
          throw RangeError("observer: layer " + std::to_string(l) + " requested, the model has " +
                           std::to_string(n_layers) + " layers (0.." + std::to_string(n_layers - 1) + ")");
      for (int p : q->positions)
        for (std::size_t s = 0; s < input_len.size(); ++s)
          if (p >= input_len[s])
            throw RangeError("observer: row position " + std::to_string(p) + " requested, sequence " +
                             std::to_string(s) + " has " + std::to_string(input_len[s]) + " input rows");
    }
    if (!n_layers_) {
      n_layers_ = n_layers;
      n_heads_ = n_heads;
      stats_.assign(std::size_t(n_layers) * n_heads, HeadStats{});
      recorded_.assign(n_heads, {});
    }
    const int first = samples_;
    samples_ += static_cast<int>(input_len.size());
    return first;
  }

  /// Whether anything is observed at layer l (a backend may skip building segments otherwise).
  bool wants_layer(int l) const { return in_layers(o_.reduce, l) || in_layers(o_.record, l); }

  /// Head `head`'s probabilities p [T, S] (rows: seg.q_pos, columns: seg.k_pos) at seg.layer. Thread-safe across
  /// distinct heads of one segment (each head owns its cells), so backends may call it from the head's thread.
  template <class M>
  void observe(const ObservedSegment& seg, int head, const M& p) {
    const std::vector<int> reduce = select(o_.reduce, seg);
    if (!reduce.empty()) {
      RowStats s;
      for (int i : reduce) s += row_stats(seg, head, i, p);
      const RowStats mean = s.scaled(1.0 / double(reduce.size()));
      accumulate(seg.layer, head, mean, static_cast<int>(reduce.size()));
    }
    if (o_.record_samples && seg.sample >= o_.record_samples) return;
    for (int i : select(o_.record, seg)) {
      RecordedRow r{seg.sample, seg.user, seg.layer, head, seg.q_pos[i], seg.q_kind[i], {}, {}, {}};
      for (std::size_t j = 0; j < seg.k_pos.size(); ++j)
        if (seg.sees(head, std::size_t(i), j)) {
          r.k_pos.push_back(seg.k_pos[j]);
          r.k_kind.push_back(seg.k_kind[j]);
          r.p.push_back(double(p(Index(i), Index(j))));
        }
      recorded_[head].push_back(std::move(r));
    }
  }

  /// Adds one sample's mean statistics over `rows` selected rows to (layer, head): the entry point of a backend
  /// that reduces on its own (a GPU kernel), and of observe.
  void accumulate(int layer, int head, const RowStats& sample_mean, int rows) {
    HeadStats& h = stats_[std::size_t(layer) * n_heads_ + head];
    h.sum += sample_mean;
    h.sum_sq += RowStats{sample_mean.head_mass * sample_mean.head_mass, sample_mean.tail_mass * sample_mean.tail_mass,
                         sample_mean.density * sample_mean.density, sample_mean.entropy * sample_mean.entropy};
    ++h.samples;
    h.rows += rows;
  }

  /// Indices into seg.q_pos of the rows `q` selects at seg.layer.
  static std::vector<int> select(const RowQuery& q, const ObservedSegment& seg) {
    std::vector<int> rows;
    if (!in_layers(q, seg.layer) || q.kinds == kNoRows) return rows;
    for (std::size_t i = 0; i < seg.q_pos.size(); ++i) {
      const int pos = seg.q_pos[i];
      if (!(q.kinds & kind_bit(seg.q_kind[i]))) continue;
      if (q.readout && pos != seg.readout_pos) continue;
      if (!q.positions.empty() && std::find(q.positions.begin(), q.positions.end(), pos) == q.positions.end())
        continue;
      rows.push_back(static_cast<int>(i));
    }
    if (q.last > 0 && static_cast<int>(rows.size()) > q.last) rows.erase(rows.begin(), rows.end() - q.last);
    return rows;
  }

 private:
  using Index = std::ptrdiff_t;

  static bool in_layers(const RowQuery& q, int l) {
    return q.kinds != kNoRows && (q.layers.empty() || std::find(q.layers.begin(), q.layers.end(), l) != q.layers.end());
  }

  // The statistics of query row i over the keys it sees (the keys arrive in ascending position, as caches hold them).
  template <class M>
  RowStats row_stats(const ObservedSegment& seg, int head, int i, const M& p) const {
    int n = 0;
    for (std::size_t j = 0; j < seg.k_pos.size(); ++j) n += seg.sees(head, std::size_t(i), j);
    RowStats r;
    const double eps = o_.density == DensityRule::kAbsolute ? o_.threshold : 1.0 / double(n);
    int seen = 0;
    for (std::size_t j = 0; j < seg.k_pos.size(); ++j) {
      if (!seg.sees(head, std::size_t(i), j)) continue;
      const double pj = double(p(Index(i), Index(j)));
      if (seen < o_.head_keys) r.head_mass += pj;
      if (seen >= n - o_.tail_keys) r.tail_mass += pj;
      if (pj > eps) r.density += 1.0;
      if (pj > 0) r.entropy -= pj * std::log(pj);
      ++seen;
    }
    if (n > 0) r.density /= double(n);
    return r;
  }

  ObserverOptions o_;
  int n_layers_ = 0, n_heads_ = 0, samples_ = 0;
  std::vector<HeadStats> stats_;                    // [n_layers * n_heads]
  std::vector<std::vector<RecordedRow>> recorded_;  // [n_heads]: each head's thread appends to its own
};

}  // namespace earn::attention
