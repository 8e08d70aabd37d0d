// earn/rec/beam_search.hpp - trie-constrained beam search of exactly 4 code tokens, for several users at once.
//
// Per user: prefill the prompt once; every beam of that user reads the same prompt KV and holds only its own
// generated tokens (the engine's State::set_rows / reorder). Scores are summed log-probabilities: at each step the
// row's logits go through log_softmax over the full vocabulary, then only the trie's allowed tokens are kept
// (the same as masking every other token to -inf, without writing the mask). Steps:
//   prefill -> logits of token 1 -> top B first tokens -> set_rows
//   decode tokens 1 -> logits of token 2 -> top B (beam, token) per user -> reorder(parents)
//   decode tokens 2 -> logits of token 3 -> top B -> reorder
//   decode tokens 3 -> logits of token 4 -> top K complete items (token 4 is never decoded)
// A user whose prefix has fewer than B continuations simply keeps fewer beams. Ties are broken by candidate
// order (earlier beam first, then smaller token id), so results are deterministic.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/model/engine_fwd.hpp"
#include "earn/rec/item_vocab.hpp"
#include "earn/rec/trie.hpp"

namespace earn::rec {

/// Width and output size of the search.
struct BeamOptions {
  int beam = 20;  ///< beams per user, 1..kMaxBeam
  int top_k = 0;  ///< recommendations returned per user, 1..beam; 0: beam
  static constexpr int kMaxBeam = 64;
};

/// `opt` with top_k = 0 resolved to the beam, after checking it against the batch size and the vocabularies.
/// Every beam searcher (host selection, earn/backend/cuda/beam_search.cuh) starts here.
inline BeamOptions checked_beam_options(BeamOptions opt, int max_users, int trie_vocab, int model_vocab) {
  if (opt.beam < 1 || opt.beam > BeamOptions::kMaxBeam)
    throw ConfigError("beam search: beam " + std::to_string(opt.beam) + " is outside [1, " +
                      std::to_string(BeamOptions::kMaxBeam) + "]");
  if (opt.top_k == 0) opt.top_k = opt.beam;
  if (opt.top_k < 1 || opt.top_k > opt.beam)
    throw ConfigError("beam search: top_k " + std::to_string(opt.top_k) + " is outside [1, beam = " +
                      std::to_string(opt.beam) + "]");
  if (max_users < 1 || max_users > std::numeric_limits<int>::max() / opt.beam)
    throw ConfigError("beam search: max_users " + std::to_string(max_users) + " is outside [1, INT_MAX / beam]");
  if (trie_vocab > model_vocab)
    throw ConfigError("beam search: the trie's code tokens need a vocabulary of " + std::to_string(trie_vocab) +
                      " ids, the model has " + std::to_string(model_vocab));
  return opt;
}

/// One recommended identifier with its summed log-probability.
struct Recommendation {
  int identifier = 0;
  double score = 0;   ///< sum over the 4 tokens of log p(token | prompt, earlier tokens)
  ItemTokens tokens{};
};

/// Time and memory of the searches run so far.
struct BeamStats {
  double prefill_s = 0;           ///< in engine.prefill
  double decode_s = 0;            ///< in engine.decode and state reorder
  double select_s = 0;            ///< log_softmax, trie lookups and top-B selection
  std::int64_t users = 0;         ///< users searched
  std::int64_t peak_kv_bytes = 0;  ///< largest KV footprint seen after a decode step
};

/// One beam: a partial identifier of one user. Rows of one user are contiguous, users ascending.
struct Beam {
  double score = 0;  ///< summed log-probabilities of the tokens chosen so far
  int node = 0;      ///< trie node at depth = tokens chosen so far
  int user = 0;
  int parent = -1;   ///< the decode row this beam continues (-1 for a user's root and at step 0)
  ItemTokens tokens{};
};

/// The beam loop, written once for every backend; `Select` supplies how logits are made and ranked:
///   typename Select::Logits                                   logits of one step's rows, where the backend keeps them
///   Logits Select::prefill(State&, prompts)                   [users, vocab] first-token logits of every prompt
///   Logits Select::decode(State&, std::span<const int>)       [rows, vocab] after feeding one token per decode row
///   std::vector<Beam> Select::select(const Logits&, rows, depth, width)
///                                                              each user's best `width` children of its rows' trie
///                                                              nodes (score + log_softmax(logits)[token]), best first,
///                                                              ties by candidate order (earlier row, smaller token)
/// HostSelect (below) ranks on the host; earn::cuda::DeviceSelect (earn/backend/cuda/beam_search.cuh) on the GPU.
/// Steps: prefill -> select from the users' roots -> set_rows; then 3 x (decode -> select -> reorder), the last
/// select keeping top_k complete items (token 4 is never decoded).
template <class EngineT, class Select>
class BasicBeamSearch {
 public:
  using State = typename EngineT::State;

  template <class... SelectArgs>
  BasicBeamSearch(const EngineT& engine, const CodeTrie& trie, BeamOptions opt, int max_users, int max_prompt,
                  SelectArgs&&... select_args)
      : engine_(engine), trie_(trie),
        opt_(checked_beam_options(opt, max_users, trie.vocab_size(), engine.config().vocab_size)),
        // Token 4 is chosen from the logits of decoding token 3, so 3 generated rows per beam suffice.
        state_(engine.make_state(StateOptions{max_users, max_users * opt_.beam, max_prompt, kCodeLevels - 1})),
        select_(engine, trie, std::forward<SelectArgs>(select_args)...) {}

  const BeamOptions& options() const { return opt_; }
  const State& state() const { return state_; }
  const BeamStats& stats() const { return stats_; }
  int max_users() const { return state_.options().max_users; }

  /// Top-K identifiers for each prompt (prompts.size() <= max_users), best first; fewer when the catalogue has
  /// fewer than K items.
  std::vector<std::vector<Recommendation>> run(std::span<const std::vector<int>> prompts) {
    using Clock = std::chrono::steady_clock;
    auto seconds = [](Clock::time_point a, Clock::time_point b) { return std::chrono::duration<double>(b - a).count(); };
    const int n_users = static_cast<int>(prompts.size());
    if (n_users > max_users())
      throw RangeError("beam search: " + std::to_string(n_users) + " prompts, the searcher holds " +
                       std::to_string(max_users()));
    std::vector<std::vector<Recommendation>> out(n_users);
    if (n_users == 0) return out;

    // Step 0: every user's prompt once, then its best first tokens from the root.
    auto t0 = Clock::now();
    const auto first = select_.prefill(state_, prompts);
    auto t1 = Clock::now();
    std::vector<Beam> beams(n_users);
    for (int u = 0; u < n_users; ++u) beams[u].user = u;
    beams = select_.select(first, beams, 0, opt_.beam);
    auto t2 = Clock::now();
    stats_.prefill_s += seconds(t0, t1);
    stats_.select_s += seconds(t1, t2);
    stats_.users += n_users;
    if (beams.empty()) return out;  // an empty catalogue: nothing to recommend

    std::vector<int> row_user(beams.size()), tokens, parent;
    for (std::size_t r = 0; r < beams.size(); ++r) row_user[r] = beams[r].user;
    state_.set_rows(row_user);
    for (int depth = 1; depth < kCodeLevels; ++depth) {
      tokens.resize(beams.size());
      for (std::size_t r = 0; r < beams.size(); ++r) tokens[r] = beams[r].tokens[depth - 1];
      t0 = Clock::now();
      const auto logits = select_.decode(state_, std::span<const int>(tokens));
      t1 = Clock::now();
      stats_.peak_kv_bytes = std::max<std::int64_t>(stats_.peak_kv_bytes, state_.kv_bytes());
      const bool last = depth == kCodeLevels - 1;
      std::vector<Beam> next = select_.select(logits, beams, depth, last ? opt_.top_k : opt_.beam);
      t2 = Clock::now();
      if (!last) {
        parent.resize(next.size());
        for (std::size_t i = 0; i < next.size(); ++i) parent[i] = next[i].parent;
        state_.reorder(parent);
      }
      stats_.decode_s += seconds(t0, t1) + seconds(t2, Clock::now());
      stats_.select_s += seconds(t1, t2);
      beams = std::move(next);
    }
    for (const Beam& b : beams) out[b.user].push_back({trie_.identifier(b.node), b.score, b.tokens});
    return out;
  }

 protected:
  State& mutable_state() { return state_; }
  Select& selector() { return select_; }
  const EngineT& engine() const { return engine_; }

 private:
  const EngineT& engine_;
  const CodeTrie& trie_;
  BeamOptions opt_;
  State state_;
  Select select_;
  BeamStats stats_;
};

/// The selection of BasicBeamSearch on the host: logits as Eigen matrices, log-sum-exp per row, the trie's
/// children as candidates (masking every other token without writing the mask), partial sort per user.
template <class EngineT>
class HostSelect {
 public:
  using State = typename EngineT::State;
  using Logits = Matrix;

  /// batched_prefill (the default): all prompts in one engine pass (rows share every GEMM; on the CPU a row's
  /// result does not depend on its batch, earn/backend/cpu/gemm.hpp); off: one prefill per user.
  HostSelect(const EngineT& engine, const CodeTrie& trie, bool batched_prefill = true)
      : engine_(engine), trie_(trie), batched_(batched_prefill) {}

  Logits prefill(State& st, std::span<const std::vector<int>> prompts) {
    const int n = static_cast<int>(prompts.size());
    if (batched_) {
      std::vector<int> users(n);
      std::iota(users.begin(), users.end(), 0);
      return engine_.prefill_batch(st, users, prompts);
    }
    Matrix first(n, engine_.config().vocab_size);
    for (int u = 0; u < n; ++u) first.row(u) = engine_.prefill(st, u, prompts[u]).transpose();
    return first;
  }
  Logits decode(State& st, std::span<const int> tokens) { return engine_.decode(st, tokens); }

  std::vector<Beam> select(const Logits& logits, const std::vector<Beam>& rows, int depth, int width) {
    // Every row's log-sum-exp first, rows in parallel (the full-vocabulary pass is most of the selection's time).
    const int n_rows = static_cast<int>(rows.size());
    lse_.resize(rows.size());
    [[maybe_unused]] const bool big = Index{n_rows} * logits.cols() >= (Index{1} << 16);
#pragma omp parallel for schedule(static) if (big)
    for (int r = 0; r < n_rows; ++r) lse_[r] = log_sum_exp(logits.row(r));
    for (int r = 0; r < n_rows; ++r) {
      if (std::isnan(lse_[r])) throw Error("beam search: the model produced a NaN logit");
      if (!std::isfinite(lse_[r])) throw Error("beam search: the model's logits are all -inf or include +inf");
    }
    std::vector<Beam> next;
    std::size_t r = 0;
    while (r < rows.size()) {
      const int u = rows[r].user;
      candidates_.clear();
      for (; r < rows.size() && rows[r].user == u; ++r) {
        const auto row = logits.row(static_cast<Index>(r));
        const double lse = lse_[r];
        const TrieChildren ch = trie_.children(depth, rows[r].node);
        for (std::size_t j = 0; j < ch.size(); ++j)
          candidates_.push_back(
              {rows[r].score + (double(row[ch.tokens[j]]) - lse), int(r), ch.tokens[j], ch.first_child + int(j)});
      }
      // The best `width` candidates (score descending, candidate order on ties) become beams of user u.
      order_.resize(candidates_.size());
      std::iota(order_.begin(), order_.end(), 0);
      const std::size_t n = std::min(order_.size(), std::size_t(width));
      std::partial_sort(order_.begin(), order_.begin() + n, order_.end(), [&](int a, int b) {
        return candidates_[a].score != candidates_[b].score ? candidates_[a].score > candidates_[b].score : a < b;
      });
      for (std::size_t i = 0; i < n; ++i) {
        const Candidate& c = candidates_[order_[i]];
        Beam b{c.score, c.node, u, depth == 0 ? -1 : c.row, rows[c.row].tokens};
        b.tokens[depth] = c.token;
        next.push_back(b);
      }
    }
    return next;
  }

 private:
  // log(sum(exp(x))) of one logits row (an Eigen vector or row); NaN when a logit is NaN, +inf when the maximum is
  // not finite (all -inf, or +inf): select refuses both, since their log-probs would be NaN, which has no place in a
  // ranking (and would break the sort's ordering). No throw here: it runs inside a parallel loop. The sum runs in
  // float with Eigen's vectorized exp (the full-vocabulary pass dominates selection); terms are <= 1, so a float sum
  // over 1e5 of them is still exact to about 1e-6 relative, far below the gaps that decide a ranking.
  template <class Row>
  static double log_sum_exp(const Row& x) {
    const auto a = x.array();
    if (a.isNaN().any()) return std::numeric_limits<double>::quiet_NaN();
    const float m = a.maxCoeff();
    if (!std::isfinite(m)) return std::numeric_limits<double>::infinity();
    return double(m) + std::log(double((a - m).exp().sum()));
  }

  struct Candidate {
    double score;
    int row;  // the row whose child this is
    int token;
    int node;
  };

  const EngineT& engine_;
  const CodeTrie& trie_;
  bool batched_;
  std::vector<Candidate> candidates_;
  std::vector<int> order_;
  std::vector<double> lse_;
};

/// Reusable beam searcher over one engine and one trie with the selection on the host; owns a decoding state sized
/// for `max_users` prompts. Works with every engine (CPU or CUDA); earn::cuda::DeviceBeamSearch keeps the
/// selection on the GPU.
/// \code
///   earn::rec::BeamSearch search(engine, trie, {.beam = 20}, /*max_users=*/8, /*max_prompt=*/pb.length(20));
///   auto recs = search.run(prompts);   // recs[u][j]: user u's j-th best identifier
/// \endcode
template <class EngineT>
class BeamSearch : public BasicBeamSearch<EngineT, HostSelect<EngineT>> {
 public:
  using BasicBeamSearch<EngineT, HostSelect<EngineT>>::BasicBeamSearch;
};
template <class EngineT>
BeamSearch(const EngineT&, const CodeTrie&, BeamOptions, int, int) -> BeamSearch<EngineT>;
template <class EngineT>
BeamSearch(const EngineT&, const CodeTrie&, BeamOptions, int, int, bool) -> BeamSearch<EngineT>;

}  // namespace earn::rec
