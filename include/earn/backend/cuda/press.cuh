// earn/backend/cuda/press.cuh - the CUDA twin of backend/cpu/press.hpp: a KV press (kv/press.hpp) after a layer's
// prefill attention, on the device, without a round trip to the host.
//
// The prefill writes a pressed layer's K / V / positions of every user into a per-state scratch (one layer's rows);
// attention reads them there. Then, per user segment:
//   press_scores   (Score::kWindow / kAll only) one block per (tile of 32 scored query rows, head): the rows'
//                  probabilities over the segment's keys, recomputed from the rotated Q and the scratch K in fp32
//                  (keys through shared memory, read once per tile), summed over the tile per key
//   press_reduce   the tiles' and the group's heads' sums in a fixed order, times the rule's scale (1 / (group x
//                  window rows), or 1 / group): each KV head's raw scores, the same bits on every run
//   press_select   one block per (segment, KV head): kv::select_rows on the device: average pooling of the scores of
//                  the keys before the recent ones, sinks, recent, then the `rest` best by a bitwise binary search for
//                  the rest-th largest score (scores are >= 0, so their float bits order as the values do) with
//                  ties to the lower index; writes the kept rows, ascending
//   press_gather   K / V row j of KV head g of the user's store block = head g's j-th kept row of the scratch;
//                  the row's position = the largest of the heads' (as the CPU engine)
#pragma once

#include <cstddef>
#include <cstdint>

#include "earn/attention/policy.hpp"
#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"

namespace earn::cuda {

/// One user's rows at a pressed layer of a prefill (plain data, copied to the device).
struct PressSeg {
  int row0 = 0;         ///< the user's first row of the layer (its queries; its rows of the scratch K / V / pos)
  int n = 0;            ///< rows
  int keep = 0, sinks = 0, recent = 0, pool = 1;  ///< the press's rule for n rows (kv::PressRule), keep <= n
  float scale = 0.0f;   ///< factor of each probability added to a KV head's score
  int first_scored = 0;  ///< first scored query row (the last n - first_scored rows are scored)
  int tiles = 0;        ///< tiles of kPressQueryTile scored rows
  long long part_off = 0;  ///< this segment's partial sums [tiles][nh][n] start here
  int score_off = 0;    ///< this segment's scores [nkv][n] start here
  int idx_off = 0;      ///< its kept rows [nkv][keep] start here
  int dst_slot = 0;     ///< the store's first prefix row of the user
  int evict = 0;        ///< the rule evicts during decode: the kept rows' head positions and scores go to the store
};

namespace kernel {

/// Query rows per block of press_scores, keys per shared-memory chunk.
inline constexpr int kPressQueryTile = 32, kPressKeyTile = 32;

/// Shared memory of press_scores for head size hd.
inline std::size_t press_scores_smem(int hd) {
  return sizeof(float) * (std::size_t(kPressQueryTile) * hd + std::size_t(kPressKeyTile) * (hd + 1) +
                          std::size_t(kPressQueryTile) * (kPressKeyTile + 1) + 2 * kPressQueryTile);
}

/// Writes each key's attention probabilities summed over a tile of query rows at head blockIdx.y to
/// partial[part_off + (tile * nh + head) * n + key] (keys no row of the tile sees are left as they are: zero). Grid:
/// (tiles, heads); tiles[b] = (segment, first row): rows [first, min(first + kPressQueryTile, n)) of the segment. Keys
/// go through shared memory a chunk at a time, shared by the tile's rows (so K is read once per tile, not per row):
/// pass 1 takes each row's max and sum (online softmax), pass 2 recomputes the scores and sums each key's
/// probabilities over the tile. A causal policy skips the chunks past the tile's last row. fp32 throughout, no
/// atomics: press_reduce adds the partial sums in a fixed order, so the scores repeat bit for bit. Block: 256 threads.
template <class Policy, class T>
__global__ void press_scores(const T* q, const T* k, const int* pos, const PressSeg* segs, const int2* tiles,
                             float* partial, int nh, int nkv, int hd, const attention::LayerMask<Policy> mask) {
  constexpr int QT = kPressQueryTile, KT = kPressKeyTile;
  extern __shared__ float sm[];
  const int2 tile = tiles[blockIdx.x];
  const PressSeg sg = segs[tile.x];
  const int h = blockIdx.y, g = h / (nh / nkv), r0 = tile.y, nq = min(QT, sg.n - r0);
  const long long qd = static_cast<long long>(nh) * hd, kvd = static_cast<long long>(nkv) * hd;
  float* qs = sm;                    // [QT][hd]
  float* ks = qs + QT * hd;          // [KT][hd + 1]
  float* lg = ks + KT * (hd + 1);    // [QT][KT + 1]
  float* mx = lg + QT * (KT + 1);    // [QT]
  float* sum = mx + QT;              // [QT]
  const int* kp = pos + sg.row0;
  for (int e = threadIdx.x; e < QT * hd; e += blockDim.x) {
    const int r = e / hd, d = e % hd;
    qs[e] = r < nq ? to_float(q[(sg.row0 + r0 + r) * qd + h * hd + d]) : 0.0f;
  }
  for (int r = threadIdx.x; r < QT; r += blockDim.x) mx[r] = -INFINITY, sum[r] = 0.0f;
  const float scale = rsqrtf(static_cast<float>(hd));
  // The last key any row of the tile may see (causal policies: its last row's own index).
  const int n_keys = attention::is_causal<Policy>() ? min(sg.n, r0 + nq) : sg.n;
  for (int pass = 0; pass < 2; ++pass) {
    for (int c0 = 0; c0 < n_keys; c0 += KT) {
      const int kn = min(KT, n_keys - c0);
      __syncthreads();
      for (int e = threadIdx.x; e < KT * hd; e += blockDim.x) {
        const int j = e / hd, d = e % hd;
        ks[j * (hd + 1) + d] = j < kn ? to_float(k[(sg.row0 + c0 + j) * kvd + g * hd + d]) : 0.0f;
      }
      __syncthreads();
      for (int e = threadIdx.x; e < QT * KT; e += blockDim.x) {
        const int r = e / KT, j = e % KT;
        float v = -INFINITY;
        if (r < nq && j < kn && mask(h, kp[r0 + r], kp[c0 + j])) {
          float dot = 0.0f;
          for (int d = 0; d < hd; ++d) dot += qs[r * hd + d] * ks[j * (hd + 1) + d];
          v = dot * scale;
        }
        lg[r * (KT + 1) + j] = v;
      }
      __syncthreads();
      if (pass == 0) {
        for (int r = threadIdx.x; r < nq; r += blockDim.x) {  // online max and sum of row r
          float m = mx[r], z = sum[r];
          for (int j = 0; j < kn; ++j) {
            const float v = lg[r * (KT + 1) + j];
            if (v == -INFINITY) continue;
            if (v > m) z = z * expf(m - v) + 1.0f, m = v;
            else z += expf(v - m);
          }
          mx[r] = m, sum[r] = z;
        }
      } else {
        const int t = (r0 - sg.first_scored) / QT;
        float* out = partial + sg.part_off + (static_cast<long long>(t) * nh + h) * sg.n + c0;
        for (int j = threadIdx.x; j < kn; j += blockDim.x) {  // key j's probabilities summed over the tile
          float col = 0.0f;
          for (int r = 0; r < nq; ++r) {
            const float v = lg[r * (KT + 1) + j];
            if (v != -INFINITY) col += expf(v - mx[r]) / sum[r];
          }
          out[j] = col;
        }
      }
    }
  }
}

/// scores[score_off + g * n + j] = scale x the sum, over the segment's tiles and then the query heads of KV head g
/// (blockIdx.y) in order, of press_scores' partial sums: the raw scores of segment blockIdx.x, in a fixed order.
__global__ void press_reduce(const PressSeg* segs, const float* partial, int nh, int nkv, float* scores) {
  const PressSeg sg = segs[blockIdx.x];
  const int g = blockIdx.y, group = nh / nkv;
  for (int j = threadIdx.x; j < sg.n; j += blockDim.x) {
    float acc = 0.0f;
    for (int t = 0; t < sg.tiles; ++t)
      for (int h = g * group; h < (g + 1) * group; ++h)
        acc += partial[sg.part_off + (static_cast<long long>(t) * nh + h) * sg.n + j];
    scores[sg.score_off + static_cast<long long>(g) * sg.n + j] = acc * sg.scale;
  }
}

// A score's order key: its float bits (scores are >= 0; -0 and anything below count as 0).
__device__ inline unsigned press_key(float x) { return x > 0.0f ? __float_as_uint(x) : 0u; }

/// kv::select_rows for (segment blockIdx.x, KV head blockIdx.y): kept rows, ascending, to idx (sg.keep < n, or all
/// n rows when sg.keep == n). Block size a multiple of 32. Dynamic shared memory: max n floats and max n bytes.
__global__ void press_select(const PressSeg* segs, const float* scores, int* idx) {
  extern __shared__ float pooled[];
  __shared__ unsigned red_u[32];
  __shared__ int count_sh;
  const PressSeg sg = segs[blockIdx.x];
  const int g = blockIdx.y, n = sg.n;
  char* kept = reinterpret_cast<char*>(pooled + n);
  int* out = idx + sg.idx_off + g * sg.keep;
  if (sg.keep == n) {
    for (int j = threadIdx.x; j < n; j += blockDim.x) out[j] = j;
    return;
  }
  const int keep = sg.keep, sinks = min(sg.sinks, keep), recent = min(sg.recent, keep - sinks);
  const int m = n - recent, rest = keep - sinks - recent, half = sg.pool / 2;
  const float* raw = scores + sg.score_off + static_cast<long long>(g) * n;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    kept[j] = j < sinks || j >= m;
    if (j < m) {
      float sum = 0.0f;
      for (int t = max(0, j - half); t <= min(m - 1, j + half); ++t) sum += raw[t];
      pooled[j] = sg.pool == 1 ? raw[j] : sum / static_cast<float>(sg.pool);
    }
  }
  __syncthreads();
  if (rest > 0) {
    // The largest threshold T (as float bits) with at least `rest` candidates >= T: the rest-th largest score.
    auto count_at_least = [&](unsigned t) {
      unsigned c = 0;
      for (int j = sinks + threadIdx.x; j < m; j += blockDim.x) c += press_key(pooled[j]) >= t;
      for (int o = 16; o > 0; o >>= 1) c += __shfl_xor_sync(0xffffffffu, c, o);
      if ((threadIdx.x & 31) == 0) red_u[threadIdx.x >> 5] = c;
      __syncthreads();
      if (threadIdx.x == 0) {
        unsigned total = 0;
        for (int w = 0; w < static_cast<int>(blockDim.x + 31) / 32; ++w) total += red_u[w];
        count_sh = static_cast<int>(total);
      }
      __syncthreads();
      const int total = count_sh;
      __syncthreads();
      return total;
    };
    unsigned lo = 0, hi = 0x7f800000u;  // [0, +inf]: T in [lo, hi]
    while (lo < hi) {
      const unsigned mid = lo + (hi - lo + 1) / 2;
      if (count_at_least(mid) >= rest) lo = mid;
      else hi = mid - 1;
    }
    if (threadIdx.x == 0) {  // above T all, at T the lowest indices up to `rest`
      int taken = 0;
      for (int j = sinks; j < m; ++j) taken += press_key(pooled[j]) > lo;
      for (int j = sinks; j < m; ++j) {
        const unsigned b = press_key(pooled[j]);
        if (b > lo || (b == lo && taken < rest)) {
          if (b == lo) ++taken;
          kept[j] = 1;
        }
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    int o = 0;
    for (int j = 0; j < n && o < keep; ++j)
      if (kept[j]) out[o++] = j;
  }
}

/// Store rows of segment blockIdx.x: row j (blockIdx.y) of KV head g = scratch row idx[g][j]; its position the
/// largest of the heads'.
/// An evicting segment (sg.evict) also writes row j's position and raw score at every KV head to dst_head_pos /
/// dst_score ([slot, nkv]), where evict.cuh goes on from.
template <class T>
__global__ void press_gather(const PressSeg* segs, const int* idx, const T* k, const T* v, const int* pos, int nkv,
                             int hd, T* dst_k, T* dst_v, int* dst_pos, const float* scores, int* dst_head_pos,
                             double* dst_score) {
  const PressSeg sg = segs[blockIdx.x];
  const int j = blockIdx.y, keep = sg.keep;
  if (j >= keep) return;
  const long long kvd = static_cast<long long>(nkv) * hd, dst = static_cast<long long>(sg.dst_slot) + j;
  for (int e = threadIdx.x; e < kvd; e += blockDim.x) {
    const int g = static_cast<int>(e / hd);
    const long long src = sg.row0 + idx[sg.idx_off + g * keep + j];
    dst_k[dst * kvd + e] = k[src * kvd + e];
    dst_v[dst * kvd + e] = v[src * kvd + e];
  }
  if (threadIdx.x == 0) {
    int p = 0;
    for (int g = 0; g < nkv; ++g) {
      const int r = idx[sg.idx_off + g * keep + j];
      p = max(p, pos[sg.row0 + r]);
      if (sg.evict) {
        dst_head_pos[dst * nkv + g] = pos[sg.row0 + r];
        dst_score[dst * nkv + g] = scores[sg.score_off + static_cast<long long>(g) * sg.n + r];
      }
    }
    dst_pos[dst] = p;
  }
}

}  // namespace kernel
}  // namespace earn::cuda
