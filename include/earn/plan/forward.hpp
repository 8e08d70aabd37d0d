// earn/plan/forward.hpp - what a schedule means for the rows of one forward pass, decided once on the host.
//
// The one place where the rules of EARN (and of any schedule) are written; the CPU engine, the CUDA engine and the
// trainer only run what a ForwardPlan says (FlashInfer's plan / run split):
//   input rows      per sequence [R_prefix (r_p); prompt (P); R_suffix (r_s); fed (F)], segments in sequence order;
//                   `fed` are generated tokens given as input (teacher forcing in training; empty in prefill)
//   positions       every row keeps its original position 0 .. r_p+P+r_s+F-1; nothing is re-indexed
//   phases          the rows that exist at a layer: the layer's policy keeps(kind) decides, applied to the rows of
//                   the layer below (a row that left the residual stream never comes back); a new phase starts
//                   only where the set shrinks, with `keep` = the surviving rows of the phase below
//   what a layer caches   its phase's rows of the sequence (the KV cache of prefill), and later generated rows
//   readout         per sequence, the row that predicts the first generated token: the last non-fed row that
//                   reaches the top (the last suffix register; with r_s = 0 and k < L the last prefix register;
//                   dense: the last prompt token); fed row j predicts generated token j + 1
//   visibility      a query row sees the keys of its own sequence at its layer's phase for which the policy's
//                   visible(q_pos, k_pos) holds
#pragma once

#include <span>
#include <string>
#include <vector>

#include "earn/attention/policy.hpp"
#include "earn/attention/row_kind.hpp"
#include "earn/core/error.hpp"

namespace earn::plan {

/// One sequence of a forward pass: its prompt tokens and, for teacher forcing, generated tokens fed as input.
struct Sequence {
  std::span<const int> prompt;   ///< [P] token ids, P >= 1
  std::span<const int> fed = {};  ///< [F] generated tokens given as input rows after the suffix registers
};

/// The rows that exist at one stage of a forward pass, grouped into contiguous per-sequence segments.
struct RowSet {
  std::vector<int> pos;        ///< [rows] position id of each row
  std::vector<RowKind> kind;   ///< [rows]
  std::vector<int> seg;        ///< [rows] segment (sequence) of each row
  std::vector<int> seg_off;    ///< [segments] first row of each segment
  std::vector<int> seg_n;      ///< [segments] rows of each segment
  int size() const { return static_cast<int>(pos.size()); }
  int segments() const { return static_cast<int>(seg_off.size()); }
};

/// One set of rows and how it came from the one below.
struct Phase {
  RowSet rows;
  std::vector<int> keep;  ///< [rows] index of each row in the previous phase's rows; empty for the input phase
};

/// The whole forward pass of a batch of sequences under one schedule. Built by plan_forward.
struct ForwardPlan {
  int prefix_registers = 0, suffix_registers = 0;
  /// [input rows] what each input row embeds: a token id >= 0, or -(r + 1) for register r of [prefix; suffix].
  std::vector<int> source;
  std::vector<Phase> phases;     ///< phases[0] holds the input rows
  std::vector<int> layer_phase;  ///< [n_layers] the phase each layer runs over (non-decreasing)
  /// [segments] row of the top phase that predicts the first generated token of each sequence.
  std::vector<int> readout;
  std::vector<int> fed;  ///< [segments] fed (teacher-forced) rows F of each sequence

  int n_layers() const { return static_cast<int>(layer_phase.size()); }
  const RowSet& input() const { return phases.front().rows; }
  /// The rows the last layer computes (the final norm and classifier read them).
  const RowSet& top() const { return phases[layer_phase.empty() ? 0 : layer_phase.back()].rows; }
  const RowSet& layer_rows(int l) const { return phases[layer_phase.at(l)].rows; }
  /// Whether layer l starts a new phase (the residual stream is gathered to the kept rows before it).
  bool gathers_before(int l) const { return l == 0 ? layer_phase[0] != 0 : layer_phase[l] != layer_phase[l - 1]; }
  /// Input rows of sequence s (registers + prompt, fed rows excluded): the positions its decoding continues from.
  int input_len(int s) const { return input().seg_n.at(s) - fed.at(s); }
  /// Rows of the top phase whose logits predict sequence s's generated tokens 0..F: the readout, then its fed rows.
  std::vector<int> answer_rows(int s) const {
    std::vector<int> rows{readout.at(s)};
    const RowSet& t = top();
    for (int j = 0; j < t.seg_n[s]; ++j)
      if (t.kind[t.seg_off[s] + j] == RowKind::kGenerated) rows.push_back(t.seg_off[s] + j);
    return rows;
  }
  /// Every answer row of every sequence, sequence by sequence ([sum of (F + 1)]).
  std::vector<int> all_answer_rows() const {
    std::vector<int> rows;
    for (int s = 0; s < top().segments(); ++s) {
      const auto r = answer_rows(s);
      rows.insert(rows.end(), r.begin(), r.end());
    }
    return rows;
  }
};

namespace detail {

// Rows of `below` that policy P keeps, as indices.
template <class P>
std::vector<int> kept_rows(const RowSet& below) {
  std::vector<int> keep;
  keep.reserve(below.pos.size());
  for (int r = 0; r < below.size(); ++r)
    if (P::keeps(below.kind[r])) keep.push_back(r);
  return keep;
}

// `below` restricted to rows `keep` (in order); ConfigError when a segment loses every row at layer l.
inline RowSet gather_rows(const RowSet& below, const std::vector<int>& keep, int l) {
  RowSet out;
  const int segs = below.segments();
  out.seg_off.assign(segs, 0);
  out.seg_n.assign(segs, 0);
  out.pos.reserve(keep.size());
  out.kind.reserve(keep.size());
  out.seg.reserve(keep.size());
  for (std::size_t j = 0; j < keep.size(); ++j) {
    const int r = keep[j], s = below.seg[r];
    if (out.seg_n[s]++ == 0) out.seg_off[s] = static_cast<int>(j);
    out.pos.push_back(below.pos[r]);
    out.kind.push_back(below.kind[r]);
    out.seg.push_back(s);
  }
  for (int s = 0; s < segs; ++s)
    if (out.seg_n[s] == 0)
      throw ConfigError("plan: layer " + std::to_string(l) + "'s attention policy drops every row of sequence " +
                        std::to_string(s) + "; nothing would reach the top");
  return out;
}

}  // namespace detail

/// The input rows [R_p; prompt; R_s; fed] of `seqs` and, layer by layer, the rows `schedule` keeps. ConfigError for
/// an empty prompt or batch, or a layer that drops a whole sequence; token ids are checked by the caller (it knows
/// the vocabulary).
/// \code
///   const int p[] = {5, 9, 2};
///   const earn::plan::Sequence seq{p};
///   auto fp = earn::plan::plan_forward(earn::EarnSchedule{2}, /*n_layers=*/8, 1, 1, std::span(&seq, 1));
///   fp.layer_rows(5).size();   // 2: the two registers
/// \endcode
template <class Schedule>
ForwardPlan plan_forward(const Schedule& schedule, int n_layers, int prefix_registers, int suffix_registers,
                         std::span<const Sequence> seqs) {
  if (seqs.empty()) throw ConfigError("plan: no sequences");
  if (n_layers < 1) throw ConfigError("plan: a model needs at least one layer");
  if (prefix_registers < 0 || suffix_registers < 0) throw ConfigError("plan: negative register count");
  ForwardPlan fp;
  fp.prefix_registers = prefix_registers;
  fp.suffix_registers = suffix_registers;
  const int rp = prefix_registers, rs = suffix_registers;
  RowSet in;
  for (std::size_t s = 0; s < seqs.size(); ++s) {
    const Sequence& q = seqs[s];
    if (q.prompt.empty()) throw ConfigError("plan: the prompt of sequence " + std::to_string(s) + " is empty");
    const int P = static_cast<int>(q.prompt.size()), F = static_cast<int>(q.fed.size()), n = rp + P + rs + F;
    in.seg_off.push_back(in.size());
    in.seg_n.push_back(n);
    fp.fed.push_back(F);
    for (int j = 0; j < n; ++j) {
      in.pos.push_back(j);
      in.seg.push_back(static_cast<int>(s));
      if (j < rp) {
        fp.source.push_back(-(j + 1));
        in.kind.push_back(RowKind::kPrefixRegister);
      } else if (j < rp + P) {
        fp.source.push_back(q.prompt[j - rp]);
        in.kind.push_back(RowKind::kPrompt);
      } else if (j < rp + P + rs) {
        fp.source.push_back(-(rp + (j - rp - P) + 1));
        in.kind.push_back(RowKind::kSuffixRegister);
      } else {
        fp.source.push_back(q.fed[j - rp - P - rs]);
        in.kind.push_back(RowKind::kGenerated);
      }
    }
  }
  fp.phases.push_back(Phase{std::move(in), {}});
  fp.layer_phase.resize(n_layers);
  for (int l = 0; l < n_layers; ++l) {
    const RowSet& below = fp.phases.back().rows;
    std::vector<int> keep = schedule.visit(l, [&]<class L>(L) { return detail::kept_rows<typename L::policy>(below); });
    if (static_cast<int>(keep.size()) != below.size()) {
      RowSet kept = detail::gather_rows(below, keep, l);
      fp.phases.push_back(Phase{std::move(kept), std::move(keep)});
    }
    fp.layer_phase[l] = static_cast<int>(fp.phases.size()) - 1;
  }
  // Readout: the last row of each segment at the top that is not a fed (generated) row.
  const RowSet& top = fp.top();
  for (int s = 0; s < top.segments(); ++s) {
    int r = -1;
    for (int j = top.seg_n[s] - 1; j >= 0 && r < 0; --j)
      if (top.kind[top.seg_off[s] + j] != RowKind::kGenerated) r = top.seg_off[s] + j;
    if (r < 0)
      throw ConfigError("plan: no input row of sequence " + std::to_string(s) +
                        " reaches the top layer, so nothing predicts its first generated token");
    fp.readout.push_back(r);
  }
  return fp;
}

/// Rows of one user that `schedule` caches over all layers after prefilling `input_len` input rows (registers
/// included) of which `registers` are registers, and decoding `generated` tokens: the exact KV accounting.
/// Multiply by 2 * kv_dim * sizeof(element) for bytes.
template <class Schedule>
long long kv_rows_per_user(const Schedule& schedule, int n_layers, int prompt_len, int prefix_registers,
                           int suffix_registers, int generated) {
  std::vector<int> prompt(static_cast<std::size_t>(prompt_len), 0);
  const Sequence seq{prompt};
  const ForwardPlan fp = plan_forward(schedule, n_layers, prefix_registers, suffix_registers, std::span(&seq, 1));
  long long rows = 0;
  for (int l = 0; l < n_layers; ++l) rows += fp.layer_rows(l).size() + generated;
  return rows;
}

}  // namespace earn::plan
