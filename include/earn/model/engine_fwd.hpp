// earn/model/engine_fwd.hpp - the primary template of earn::Engine and its options (no backend code).
#pragma once

#include <span>
#include <string>
#include <utility>
#include <vector>

#include "earn/attention/observer.hpp"
#include "earn/attention/policy.hpp"
#include "earn/backend/cpu/tag.hpp"
#include "earn/core/config.hpp"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/kv/layout.hpp"
#include "earn/kv/pressed.hpp"
#include "earn/plan/forward.hpp"
#include "earn/schedule/split.hpp"

namespace earn {

/// Sizes a decoding state reserves.
struct StateOptions {
  int max_users = 1;        ///< prompts prefilled side by side (a batch of users)
  int max_rows = 1;         ///< decode rows (beams) over all users
  int max_prompt = 0;       ///< prompt tokens per user, registers excluded; 0: the model's context less max_new_tokens
  int max_new_tokens = 16;  ///< generated tokens per row
};

namespace detail {

/// `o` checked against the model's context, with max_prompt = 0 resolved to all the context left. Every backend's
/// make_state starts here.
inline StateOptions resolve_state_options(StateOptions o, const ModelConfig& c, int registers) {
  if (o.max_users <= 0 || o.max_rows <= 0 || o.max_new_tokens < 0 || o.max_prompt < 0)
    throw ConfigError("state: max_users and max_rows must be positive, max_prompt and max_new_tokens >= 0");
  if (o.max_prompt == 0) o.max_prompt = c.max_seq_len - o.max_new_tokens - registers;
  if (o.max_prompt <= 0 || Index{o.max_prompt} + registers + o.max_new_tokens > c.max_seq_len)
    throw ConfigError("state: prompt " + std::to_string(o.max_prompt) + " + registers " + std::to_string(registers) +
                      " + new tokens " + std::to_string(o.max_new_tokens) + " exceed the context of " +
                      std::to_string(c.max_seq_len));
  return o;
}

/// RangeError for the first token id outside [0, vocab).
inline void check_token_ids(std::span<const int> tokens, int vocab) {
  for (int t : tokens)
    if (t < 0 || t >= vocab)
      throw RangeError("token id " + std::to_string(t) + " is outside the vocabulary [0, " + std::to_string(vocab) +
                       ")");
}

/// Prefix rows per user that layer `l`'s cache reserves, as its layout decides (registers only for kv::Register).
template <class Schedule>
Index layer_prefix_capacity(const Schedule& schedule, int l, int n_layers, const StateOptions& o, int registers) {
  const Index max_input = Index{o.max_prompt} + registers;
  return schedule.visit(l, [&]<class L>(const L& layer) {
    return Index{kv::prefix_capacity(layer.layout, max_input, registers, l, n_layers)};
  });
}

/// Checks every pressed layer's rule for every sequence of plan fp (kv::check_rule) before a prefill changes
/// anything; ConfigError names the press.
template <class Schedule>
void check_press_rules(const Schedule& schedule, const plan::ForwardPlan& fp) {
  for (int l = 0; l < fp.n_layers(); ++l)
    schedule.visit(l, [&]<class L>(const L& layer) {
      if constexpr (kv::is_pressed<typename L::cache>()) {
        const plan::RowSet& rows = fp.layer_rows(l);
        for (int s = 0; s < rows.segments(); ++s)
          kv::check_rule(kv::rule_of(layer.layout.press, l, fp.n_layers(), rows.seg_n[s], fp.prefix_registers,
                                     fp.suffix_registers),
                         rows.seg_n[s], L::cache::press_type::name);
      }
    });
}

/// Starts an observed prefill of plan fp on a model of n_layers x n_heads: checks the observer's requests (it
/// throws before anything changes) and returns the sample id of the plan's first sequence.
inline int begin_observing(attention::Observer& obs, const plan::ForwardPlan& fp, int n_layers, int n_heads) {
  std::vector<int> input_len(fp.input().segments());
  for (std::size_t s = 0; s < input_len.size(); ++s) input_len[s] = fp.input_len(static_cast<int>(s));
  return obs.begin_pass(n_layers, n_heads, input_len);
}

/// What an observer sees of sequence s at layer l of plan fp: its rows there are both the queries and the keys
/// (a prefill caches the rows it computes), under the layer policy's visibility `mask`.
template <class P>
attention::ObservedSegment observed_segment(const plan::ForwardPlan& fp, int l, int s, int sample, int user,
                                            const attention::LayerMask<P>& mask) {
  const plan::RowSet& rows = fp.layer_rows(l);
  const auto off = static_cast<std::size_t>(rows.seg_off[s]), n = static_cast<std::size_t>(rows.seg_n[s]);
  const std::span<const int> pos(rows.pos.data() + off, n);
  const std::span<const RowKind> kind(rows.kind.data() + off, n);
  return {l, sample, user, fp.top().pos[fp.readout[s]], pos, kind, pos, kind, mask};
}

/// Row bookkeeping every backend's decoding state shares: which users are prefilled (and how long their input
/// is), the decode rows (beams) and the user each belongs to, and how many tokens they have generated. Backends
/// derive from it and add their caches; the checks live here once so every backend rejects the same bad input.
class RowBook {
 public:
  int rows() const { return static_cast<int>(row_user_.size()); }
  int gen_len() const { return gen_len_; }
  std::span<const int> row_user() const { return row_user_; }
  /// Input rows (registers + prompt) prefilled for `user`; 0 before prefill.
  int input_len(int user) const { return input_len_.at(user); }
  const StateOptions& options() const { return opts_; }

 protected:
  // Sizes from resolved options; no user prefilled, no decode rows.
  void init_rows(const StateOptions& o) {
    opts_ = o;
    input_len_.assign(o.max_users, 0);
    row_user_.clear();
    gen_len_ = 0;
  }
  // prefill: a non-empty batch of distinct users in range, one non-empty prompt each within max_prompt, every id
  // in the vocabulary. Every backend's prefill starts here, so all refuse the same input the same way.
  void check_prefill(std::span<const int> users, std::span<const std::vector<int>> prompts, int vocab) const {
    if (users.empty() || users.size() != prompts.size())
      throw ConfigError("prefill: " + std::to_string(users.size()) + " users with " + std::to_string(prompts.size()) +
                        " prompts");
    std::vector<bool> seen(opts_.max_users, false);
    for (std::size_t i = 0; i < users.size(); ++i) {
      const int user = users[i];
      if (user < 0 || user >= opts_.max_users)
        throw RangeError("prefill: user " + std::to_string(user) + " outside the state's " +
                         std::to_string(opts_.max_users) + " users");
      if (seen[user]) throw ConfigError("prefill: user " + std::to_string(user) + " appears twice in one batch");
      seen[user] = true;
      if (prompts[i].empty()) throw ConfigError("prefill: the prompt is empty");
      if (static_cast<Index>(prompts[i].size()) > opts_.max_prompt)
        throw RangeError("prefill: prompt of " + std::to_string(prompts[i].size()) + " tokens exceeds the state's " +
                         std::to_string(opts_.max_prompt));
      check_token_ids(prompts[i], vocab);
    }
  }
  // The plan of prefilling `prompts` (after check_prefill): input rows and the rows each layer keeps.
  template <class Schedule>
  static plan::ForwardPlan prefill_plan(const Schedule& schedule, int n_layers, int rp, int rs,
                                        std::span<const std::vector<int>> prompts) {
    std::vector<plan::Sequence> seqs;
    seqs.reserve(prompts.size());
    for (const auto& p : prompts) seqs.push_back({p});
    return plan::plan_forward(schedule, n_layers, rp, rs, std::span<const plan::Sequence>(seqs));
  }
  // A planned prefill starts: each user's input length from the plan; decoding in progress ends.
  void begin_prefill(std::span<const int> users, const plan::ForwardPlan& fp) {
    for (std::size_t i = 0; i < users.size(); ++i) input_len_[users[i]] = fp.input_len(static_cast<int>(i));
    row_user_.clear();
    gen_len_ = 0;
  }
  // Position of decode row `row`'s next token: its user's input rows, then the tokens generated so far.
  int decode_position(int row) const { return input_len_[row_user_[row]] + gen_len_; }
  // decode: one token per decode row, room for one more generated token, every id in the vocabulary.
  void check_decode_step(std::span<const int> tokens, int vocab) const {
    if (static_cast<int>(tokens.size()) != rows())
      throw RangeError("decode: " + std::to_string(tokens.size()) + " tokens for " + std::to_string(rows()) +
                       " decode rows (call set_rows first)");
    if (gen_len_ >= opts_.max_new_tokens)
      throw RangeError("decode: the state holds " + std::to_string(opts_.max_new_tokens) + " generated tokens");
    check_token_ids(tokens, vocab);
  }
  // set_rows: check every row's user (in range, prefilled), then take them and reset the generated tokens.
  void assign_rows(std::span<const int> row_user) {
    if (row_user.empty() || static_cast<int>(row_user.size()) > opts_.max_rows)
      throw RangeError("state: " + std::to_string(row_user.size()) + " decode rows, the state holds 1.." +
                       std::to_string(opts_.max_rows));
    for (int u : row_user) {
      if (u < 0 || u >= opts_.max_users) throw RangeError("state: row user " + std::to_string(u) + " out of range");
      if (input_len_[u] == 0) throw RangeError("state: user " + std::to_string(u) + " has not been prefilled");
    }
    row_user_.assign(row_user.begin(), row_user.end());
    gen_len_ = 0;
  }
  // reorder: the users of new rows i = parent[i], after checking `parent` (the caller moves its KV, then commits
  // them with row_user_ = result, so a throw leaves the state as it was).
  std::vector<int> reordered_users(std::span<const int> parent) const {
    if (parent.empty() || static_cast<int>(parent.size()) > opts_.max_rows)
      throw RangeError("state: reorder to " + std::to_string(parent.size()) + " rows, the state holds 1.." +
                       std::to_string(opts_.max_rows));
    std::vector<int> users(parent.size());
    for (std::size_t i = 0; i < parent.size(); ++i) {
      if (parent[i] < 0 || parent[i] >= rows())
        throw RangeError("state: reorder parent " + std::to_string(parent[i]) + " is not a current row");
      users[i] = row_user_[parent[i]];
    }
    return users;
  }
  // KV rows held over `layers` (each with prefix_len(user)): every user's prefix plus every row's generated rows.
  template <class Layers>
  Index kv_rows_held(const Layers& layers) const {
    Index held = 0;
    for (const auto& layer : layers) {
      for (int u = 0; u < opts_.max_users; ++u) held += layer.prefix_len(u);
      held += Index{rows()} * gen_len_;
    }
    return held;
  }

  StateOptions opts_;
  std::vector<int> input_len_;  // per user
  std::vector<int> row_user_;   // per decode row
  int gen_len_ = 0;
};

}  // namespace detail

/// Runs a model's weights under layer schedule `Schedule` on `Backend`. Only specializations exist.
template <class Schedule, class Backend = Cpu>
class Engine {
  static_assert(sizeof(Backend) == 0,
                "earn: no engine for this backend; the CPU engine is in earn/model/engine.hpp, the CUDA engine "
                "needs nvcc and earn/cuda.cuh");
};

}  // namespace earn
