// earn/backend/cuda/beam_search.cuh - trie-constrained beam search with each step's selection on the device: the
// logits never leave the GPU. Per step: one block per row takes log-sum-exp of its logits; one block per row
// scores only the trie's allowed children of the row's node (the mask, without writing it): beam score + logit -
// lse, in double as the host search; CUB's stable segmented sort orders every user's candidates (ties keep
// candidate order: earlier row first, then smaller token id, as rec::BeamSearch); the best `beam` per user come
// back to the host (a few hundred numbers), which keeps the beams' tokens and drives set_rows / reorder.
// Same results as rec::BeamSearch over the same engine (tests/cuda/test_cuda_engine.cu). Not in earn/cuda.cuh:
// CUB brings the global namespace ::cuda (libcu++), which makes `cuda::` ambiguous after `using namespace earn`;
// code that includes this header writes earn::cuda.
#pragma once

#include <cub/device/device_segmented_sort.cuh>

#include <algorithm>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/engine.cuh"
#include "earn/backend/cuda/kernels.cuh"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/rec/beam_search.hpp"
#include "earn/rec/trie.hpp"

namespace earn::cuda {

namespace kernel {

/// lse[r] = log(sum(exp(logits[r]))), max and sum in float, the log in double (as the host search). bad = 1 when a
/// row holds NaN or its maximum is not finite. One block per row.
template <class F>
__global__ void row_lse(const F* logits, int vocab, double* lse, int* bad) {
  __shared__ float red[32];
  const F* x = logits + static_cast<long long>(blockIdx.x) * vocab;
  float m = -INFINITY;
  int nan = 0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const float v = x[i];
    nan |= isnan(v);
    m = fmaxf(m, v);
  }
  nan = __syncthreads_or(nan);
  m = block_reduce<true>(m, red);
  float s = 0.0f;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += expf(x[i] - m);
  s = block_reduce<false>(s, red);
  if (threadIdx.x == 0) {
    lse[blockIdx.x] = static_cast<double>(m) + log(static_cast<double>(s));
    if (nan || !isfinite(m)) atomicOr(bad, 1);
  }
}

/// Candidate c = off[r] + j (child j of row r's node): key = score[r] + logit[r, token] - lse[r], value = c.
/// tokens: the trie level's token of every child node; first[r]: the row's first child. One block per row.
template <class F>
__global__ void score_children(const F* logits, int vocab, const double* lse, const double* score,
                                      const int* first, const int* count, const int* off, const int* tokens,
                                      double* keys, int* vals) {
  const int r = blockIdx.x;
  const F* x = logits + static_cast<long long>(r) * vocab;
  for (int j = threadIdx.x; j < count[r]; j += blockDim.x) {
    const int c = off[r] + j;
    keys[c] = score[r] + (static_cast<double>(x[tokens[first[r] + j]]) - lse[r]);
    vals[c] = c;
  }
}

/// The first min(width, segment size) sorted candidates of each segment into [segments, width] (value -1 after).
template <class K>
__global__ void take_top(const K* keys, const int* vals, const int* seg_off, int segments, int width, K* top_keys,
                         int* top_vals) {
  const long long n = static_cast<long long>(segments) * width;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int s = static_cast<int>(t / width), i = static_cast<int>(t % width);
    const int c = seg_off[s] + i;
    const bool ok = c < seg_off[s + 1];
    top_keys[t] = ok ? keys[c] : K(0);
    top_vals[t] = ok ? vals[c] : -1;
  }
}

}  // namespace kernel

/// The selection of rec::BasicBeamSearch on the device (the logits never leave the GPU): log-sum-exp per row, the
/// trie's children scored, CUB's stable segmented sort per user, the best `width` per user back to the host. Needs a
/// CUDA engine (decode_device / prefill_batch_device).
template <class EngineT>
class DeviceSelect {
 public:
  using State = typename EngineT::State;
  using Logits = DeviceLogits;

  /// batched_prefill: prefill all prompts in one pass (their rows share every GEMM: at B = 32, P = 512 about 3x
  /// faster than one by one). Its logits differ from one-user prefills by rounding (GEMM shapes differ), so
  /// near-tied items may order differently from rec::BeamSearch; off, the two agree item for item.
  DeviceSelect(const EngineT& engine, const rec::CodeTrie& trie, bool batched_prefill = false)
      : engine_(engine), trie_(trie), batched_prefill_(batched_prefill) {
    // Each level's child tokens, in node order (children(d, n).tokens are slices of one array per level).
    for (int d = 0; d < rec::kCodeLevels; ++d) {
      std::vector<int> tok;
      for (int n = 0; n < trie.nodes(d); ++n) {
        const rec::TrieChildren ch = trie.children(d, n);
        tok.insert(tok.end(), ch.tokens.begin(), ch.tokens.end());
      }
      tokens_[d].reserve(std::max<std::size_t>(tok.size(), 1));
      if (!tok.empty())
        EARN_CUDA_CHECK(cudaMemcpy(tokens_[d].data(), tok.data(), tok.size() * sizeof(int), cudaMemcpyHostToDevice));
    }
  }
  bool batched_prefill() const { return batched_prefill_; }

  /// Each user's prompt once, first-token logits [users, vocab] on the device.
  Logits prefill(State& st, std::span<const std::vector<int>> prompts) {
    const int n_users = static_cast<int>(prompts.size()), vocab = engine_.config().vocab_size;
    s_ = st.stream();
    if (batched_prefill_) {
      std::vector<int> users(n_users);
      for (int u = 0; u < n_users; ++u) users[u] = u;
      return engine_.prefill_batch_device(st, users, prompts);  // valid until the next call on the state
    }
    first_logits_.reserve(std::size_t(n_users) * vocab);
    for (int u = 0; u < n_users; ++u) {
      const int user[1] = {u};
      const auto d = engine_.prefill_batch_device(st, user, prompts.subspan(u, 1));
      EARN_CUDA_CHECK(cudaMemcpyAsync(first_logits_.data() + std::size_t(u) * vocab, d.data,
                                      std::size_t(vocab) * sizeof(float), cudaMemcpyDeviceToDevice, s_));
    }
    return {first_logits_.data(), n_users, vocab};
  }
  Logits decode(State& st, std::span<const int> tokens) { return engine_.decode_device(st, tokens); }

  std::vector<rec::Beam> select(const Logits& d, const std::vector<rec::Beam>& rows, int depth, int width) {
    return select(d.data, rows, depth, width);
  }

 private:
  // One step on the device: rows = `rows` (grouped by user, users ascending) with logits [rows, vocab]; returns
  // the best `width` children per user as beams that chose token number `depth`, parent = the row.
  std::vector<rec::Beam> select(const float* logits, const std::vector<rec::Beam>& rows, int depth, int width) {
    const int n = static_cast<int>(rows.size()), vocab = engine_.config().vocab_size;
    const cudaStream_t s = s_;
    // Host: each row's children range and candidate offset; users' segments over the candidates.
    std::vector<int> ints(3 * std::size_t(n)), seg_off{0}, seg_user;
    std::vector<double> score(n);
    int total = 0;
    for (int r = 0; r < n; ++r) {
      const rec::TrieChildren ch = trie_.children(depth, rows[r].node);
      ints[r] = ch.first_child;
      ints[n + r] = static_cast<int>(ch.size());
      ints[2 * n + r] = total;
      total += static_cast<int>(ch.size());
      score[r] = rows[r].score;
      if (r == 0 || rows[r].user != rows[r - 1].user) {
        if (r > 0) seg_off.push_back(ints[2 * n + r]);
        seg_user.push_back(rows[r].user);
      }
    }
    seg_off.push_back(total);
    const int segs = static_cast<int>(seg_user.size());
    ints.insert(ints.end(), seg_off.begin(), seg_off.end());
    ints_.reserve(ints.size());
    score_.reserve(n);
    lse_.reserve(n);
    bad_.reserve(1);
    const std::size_t cand = std::max(total, 1);
    keys_.reserve(2 * cand);
    vals_.reserve(2 * cand);
    top_keys_.reserve(std::size_t(segs) * width);
    top_vals_.reserve(std::size_t(segs) * width);
    EARN_CUDA_CHECK(cudaMemcpyAsync(ints_.data(), ints.data(), ints.size() * sizeof(int), cudaMemcpyHostToDevice, s));
    EARN_CUDA_CHECK(cudaMemcpyAsync(score_.data(), score.data(), n * sizeof(double), cudaMemcpyHostToDevice, s));
    EARN_CUDA_CHECK(cudaMemsetAsync(bad_.data(), 0, sizeof(int), s));
    const int* first = ints_.data();
    const int* count = first + n;
    const int* off = first + 2 * n;
    const int* dseg = first + 3 * n;

    kernel::row_lse<float><<<n, kernel::kThreads, 0, s>>>(logits, vocab, lse_.data(), bad_.data());
    EARN_CUDA_CHECK_LAUNCH();
    if (total > 0) {
      kernel::score_children<float><<<n, 128, 0, s>>>(logits, vocab, lse_.data(), score_.data(), first, count, off,
                                               tokens_[depth].data(), keys_.data(), vals_.data());
      EARN_CUDA_CHECK_LAUNCH();
      double* keys_out = keys_.data() + cand;
      int* vals_out = vals_.data() + cand;
      std::size_t temp = 0;
      EARN_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairsDescending(
          nullptr, temp, keys_.data(), keys_out, vals_.data(), vals_out, total, segs, dseg, dseg + 1, s));
      temp_.reserve(std::max<std::size_t>(temp, 1));
      EARN_CUDA_CHECK(cub::DeviceSegmentedSort::StableSortPairsDescending(
          temp_.data(), temp, keys_.data(), keys_out, vals_.data(), vals_out, total, segs, dseg, dseg + 1, s));
      kernel::take_top<double><<<kernel::grid_for(Index{segs} * width), kernel::kThreads, 0, s>>>(
          keys_out, vals_out, dseg, segs, width, top_keys_.data(), top_vals_.data());
      EARN_CUDA_CHECK_LAUNCH();
    }
    std::vector<double> tk(std::size_t(segs) * width);
    std::vector<int> tv(std::size_t(segs) * width, -1);
    int bad = 0;
    EARN_CUDA_CHECK(cudaMemcpyAsync(&bad, bad_.data(), sizeof(int), cudaMemcpyDeviceToHost, s));
    if (total > 0) {
      EARN_CUDA_CHECK(cudaMemcpyAsync(tk.data(), top_keys_.data(), tk.size() * sizeof(double), cudaMemcpyDeviceToHost, s));
      EARN_CUDA_CHECK(cudaMemcpyAsync(tv.data(), top_vals_.data(), tv.size() * sizeof(int), cudaMemcpyDeviceToHost, s));
    }
    EARN_CUDA_CHECK(cudaStreamSynchronize(s));
    if (bad) throw Error("beam search: the model produced a NaN logit, or logits that are all -inf or include +inf");

    std::vector<rec::Beam> next;
    for (int g = 0; g < segs; ++g)
      for (int i = 0; i < width; ++i) {
        const int c = tv[std::size_t(g) * width + i];
        if (c < 0) break;
        // The row whose children hold candidate c: the last row with offset <= c (a childless row shares its
        // offset with the next row, so it is never the last one).
        const int r = static_cast<int>(std::upper_bound(ints.begin() + 2 * n, ints.begin() + 3 * n, c) -
                                       (ints.begin() + 2 * n)) - 1;
        const int j = c - ints[2 * n + r];
        const rec::TrieChildren ch = trie_.children(depth, rows[r].node);
        rec::Beam b{tk[std::size_t(g) * width + i], ch.first_child + j, seg_user[g], depth == 0 ? -1 : r, rows[r].tokens};
        b.tokens[depth] = ch.tokens[j];
        next.push_back(b);
      }
    return next;
  }

  const EngineT& engine_;
  const rec::CodeTrie& trie_;
  bool batched_prefill_;
  cudaStream_t s_ = nullptr;  // the searcher's state's stream (set by prefill)
  DeviceBuffer<int> tokens_[rec::kCodeLevels];  // per level: child tokens in node order
  DeviceBuffer<float> first_logits_;
  DeviceBuffer<int> ints_, bad_, vals_, top_vals_;
  DeviceBuffer<double> score_, lse_, keys_, top_keys_;
  DeviceBuffer<char> temp_;
};

/// rec::BeamSearch's search (the one beam loop, rec::BasicBeamSearch) with the per-step scoring, trie masking and
/// top-B selection on the device.
/// \code
///   earn::cuda::DeviceBeamSearch search(gpu_engine, trie, {.beam = 20}, /*max_users=*/32, max_prompt);
///   auto recs = search.run(prompts);   // as rec::BeamSearch::run
/// \endcode
template <class EngineT>
class DeviceBeamSearch : public rec::BasicBeamSearch<EngineT, DeviceSelect<EngineT>> {
  using Base = rec::BasicBeamSearch<EngineT, DeviceSelect<EngineT>>;

 public:
  /// batched_prefill: see DeviceSelect.
  DeviceBeamSearch(const EngineT& engine, const rec::CodeTrie& trie, rec::BeamOptions opt, int max_users,
                   int max_prompt, bool batched_prefill = false)
      : Base(engine, trie, opt, max_users, max_prompt, batched_prefill) {}

  /// Engine::tune_gemms for the products this search runs with `users` prompts a run(): the decode rows (users x
  /// beam), the late layers' register rows and the prefill's logits rows (users x registers and users with the
  /// batched prefill, registers and 1 without). Overwrites the state's scratch, so call it before the first run();
  /// the results then differ from an untuned search's by rounding (near-tied items may swap, as with the batched
  /// prefill). Not timed by run().
  std::vector<typename EngineT::GemmTuning> tune_gemms(int users, typename EngineT::TuneOptions opt = {}) {
    if (users < 1 || users > this->max_users())
      throw RangeError("beam search: tune_gemms for " + std::to_string(users) + " users, the searcher holds 1.." +
                       std::to_string(this->max_users()));
    const int reg = this->engine().registers(), per = this->selector().batched_prefill() ? users : 1;
    std::vector<int> rows = {users * this->options().beam, per};
    if (reg > 0) rows.push_back(per * reg);
    std::sort(rows.begin(), rows.end());
    rows.erase(std::unique(rows.begin(), rows.end()), rows.end());
    return this->engine().tune_gemms(this->mutable_state(), rows, opt);
  }
};

}  // namespace earn::cuda
