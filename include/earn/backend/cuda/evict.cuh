// earn/backend/cuda/evict.cuh - the CUDA twin of cpu::evict_after_step (backend/cpu/press.hpp): step 4 of
// kv/press.hpp, a press that goes on evicting during decode (H2O), after one decode step's attention at a layer.
//
// The host decides which users drop a row this step and which rows may go (kv::evict_range: from counts alone), so
// it also knows every prefix length of the next step; the device decides which row:
//   evict_scores   one block per (evicting user, KV head): for each of the user's decode rows (beams) and each query
//                  head of the group, the row's probabilities over its prefix and generated keys (fp32, recomputed
//                  from the rotated Q and the cached K), summed over rows and heads in a fixed order, then added
//                  once, times 1 / (group x beams), to the prefix rows' accumulated scores (fp64, as the CPU's)
//   evict_drop     same grid: the candidate of least score (the oldest of equals) goes; the head's later K / V rows,
//                  positions and scores move up one
//   evict_positions  one block per user: each prefix row's position, the largest of its heads' (as press_gather)
// No atomics: the scores repeat bit for bit.
#pragma once

#include <cstddef>

#include "earn/attention/policy.hpp"
#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"

namespace earn::cuda {

/// One user evicting at a layer after a decode step (plain data, copied to the device).
struct EvictSeg {
  int seg = 0;         ///< the step's attention segment of the user (its decode rows)
  int slot = 0;        ///< the store's first prefix row of the user
  int lo = 0, hi = 0;  ///< candidates [lo, hi) of kv::evict_range (lo == hi: scores only, nothing dropped)
};

namespace kernel {

/// Shared memory of evict_scores: a row's logits over S + G keys, the user's sums [S], the query, the reductions.
inline std::size_t evict_scores_smem(int max_prefix, int max_new, int hd) {
  return sizeof(float) * (2 * std::size_t(max_prefix) + max_new + hd + 32);
}

/// Scores of evicting user blockIdx.x at KV head blockIdx.y (see the file comment). q [rows, nh * hd] rotated,
/// gen_k the layer's generated K (row_src[r]'s block of max_new rows), segs the step's segments, pos the rows'
/// positions. score / head_pos: the store's [users * capacity, nkv] arrays. Block: 128 threads.
template <class Policy, class T>
__global__ void evict_scores(const EvictSeg* ev, const Segment* segs, const T* q, const T* gen_k, const int* row_src,
                             const int* pos, int nh, int nkv, int hd, int max_new, double* score,
                             const attention::LayerMask<Policy> mask) {
  extern __shared__ float sm[];
  const EvictSeg e = ev[blockIdx.x];
  const Segment sg = segs[e.seg];
  const int g = blockIdx.y, group = nh / nkv, S = sg.S, G = sg.G;
  const long long kvd = static_cast<long long>(nkv) * hd;
  float* p = sm;              // [S + G]
  float* acc = p + S + G;     // [S]
  float* qv = acc + S;        // [hd]
  float* red = qv + hd;       // [32]
  const T* pk = static_cast<const T*>(sg.pk);
  for (int j = threadIdx.x; j < S; j += blockDim.x) acc[j] = 0.0f;
  for (int h = g * group; h < (g + 1) * group; ++h)
    for (int r = sg.q_off; r < sg.q_off + sg.nq; ++r) {
      const T* gk = gen_k + static_cast<long long>(row_src[r]) * max_new * kvd + static_cast<long long>(g) * hd;
      const auto key = [&](int j) {
        return j < S ? KeyRow<T>{pk + j * kvd + static_cast<long long>(g) * hd, sg.kpos[j]}
                     : KeyRow<T>{gk + (j - S) * kvd, sg.gen_pos0 + (j - S)};
      };
      row_probs_by(mask, h, q + static_cast<long long>(r) * nh * hd + h * hd, pos[r], hd, key, S + G, qv, p, red);
      for (int j = threadIdx.x; j < S; j += blockDim.x)
        if (p[j] > 0.0f) acc[j] += p[j];  // each thread owns its keys: a fixed order
      __syncthreads();  // p and qv are rewritten by the next row
    }
  __syncthreads();
  const double w = 1.0 / (double(group) * double(sg.nq));
  for (int j = threadIdx.x; j < S; j += blockDim.x) score[(static_cast<long long>(e.slot) + j) * nkv + g] += double(acc[j]) * w;
}

/// Drops KV head blockIdx.y's candidate of least score of evicting user blockIdx.x (the oldest of equals), moving
/// the head's later rows of K, V, head positions and scores up one. Block: 128 threads.
template <class T>
__global__ void evict_drop(const EvictSeg* ev, const Segment* segs, int nkv, int hd, T* k, T* v, int* head_pos,
                           double* score) {
  __shared__ double best_s[128];
  __shared__ int best_j[128];
  const EvictSeg e = ev[blockIdx.x];
  if (e.lo >= e.hi) return;
  const int S = segs[e.seg].S, g = blockIdx.y;
  const long long kvd = static_cast<long long>(nkv) * hd, base = e.slot;
  double bs = 0.0;
  int bj = -1;
  for (int j = e.lo + threadIdx.x; j < e.hi; j += blockDim.x) {
    const double s = score[(base + j) * nkv + g];
    if (bj < 0 || s < bs) bs = s, bj = j;  // ascending j per thread: the first of equals stays
  }
  best_s[threadIdx.x] = bs;
  best_j[threadIdx.x] = bj;
  __syncthreads();
  for (int w = blockDim.x / 2; w > 0; w >>= 1) {
    if (threadIdx.x < w) {
      const double os = best_s[threadIdx.x + w];
      const int oj = best_j[threadIdx.x + w];
      if (oj >= 0 && (best_j[threadIdx.x] < 0 || os < best_s[threadIdx.x] ||
                      (os == best_s[threadIdx.x] && oj < best_j[threadIdx.x]))) {
        best_s[threadIdx.x] = os;
        best_j[threadIdx.x] = oj;
      }
    }
    __syncthreads();
  }
  const int drop = best_j[0];
  for (int d = threadIdx.x; d < hd; d += blockDim.x)  // each thread moves its own column: no ordering hazard
    for (int j = drop; j + 1 < S; ++j) {
      k[(base + j) * kvd + g * hd + d] = k[(base + j + 1) * kvd + g * hd + d];
      v[(base + j) * kvd + g * hd + d] = v[(base + j + 1) * kvd + g * hd + d];
    }
  if (threadIdx.x == 0)
    for (int j = drop; j + 1 < S; ++j) {
      head_pos[(base + j) * nkv + g] = head_pos[(base + j + 1) * nkv + g];
      score[(base + j) * nkv + g] = score[(base + j + 1) * nkv + g];
    }
}

/// Positions of evicting user blockIdx.x's prefix rows after evict_drop: the largest of the heads'.
__global__ inline void evict_positions(const EvictSeg* ev, const Segment* segs, int nkv, const int* head_pos, int* pos) {
  const EvictSeg e = ev[blockIdx.x];
  if (e.lo >= e.hi) return;
  const int S = segs[e.seg].S - 1;
  for (int j = threadIdx.x; j < S; j += blockDim.x) {
    int p = 0;
    for (int g = 0; g < nkv; ++g) p = max(p, head_pos[(static_cast<long long>(e.slot) + j) * nkv + g]);
    pos[e.slot + j] = p;
  }
}

}  // namespace kernel
}  // namespace earn::cuda
