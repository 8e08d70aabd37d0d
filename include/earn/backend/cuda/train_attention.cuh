// earn/backend/cuda/train_attention.cuh - attention of a training step on the GPU, forward (saving each row's
// log-sum-exp) and backward (recomputing the probabilities from it, as FlashAttention-2), over the packed rows of
// one layer: every sequence is a segment of consecutive rows whose queries see its own keys where the layer's
// attention::LayerMask holds at the query's head (positions, and kinds for a policy with a kind rule: Gist). q, k, v live in the
// fused [rows, qd + 2 kvd] rows of the QKV GEMM (after bias and RoPE); the backward pass writes dq, dk, dv into the
// same layout, so one GEMM takes them back.
//
// Two implementations of the same arithmetic:
//   tensor cores   (bf16 / fp16, segments of at most 128 rows, head size 32 / 64 / 128 where shared memory holds
//                  it): one block per (segment, head) forward and per (segment, kv head) backward, the whole
//                  segment in shared memory, S = Q K^T, P V, dP = dO V^T, dV += P^T dO, dK += dS^T Q, dQ = dS K on
//                  WMMA 16x16x16 with fp32 accumulation, dK and dV held in accumulator fragments over the GQA group
//   CUDA cores     (any storage type, any segment length; the reference the tensor-core path is tested against,
//                  and the fp32 path): a warp per query row (forward, dQ) or per key row (dK, dV), fp32 dots
// Both: P = exp(scale q.k - lse) on visible pairs, 0 elsewhere; a row that sees nothing gets lse = -inf, output 0
// and no gradient; D_i = sum_j P_ij dP_ij; dS = P (dP - D) scale. No atomics: every output element has one writer.
#pragma once

#include <mma.h>

#include <algorithm>
#include <cmath>

#include "earn/attention/policy.hpp"
#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"

namespace earn::cuda {

/// One sequence's rows [off, off + n) of the layer's packed rows.
struct TrainSegment {
  int off = 0;
  int n = 0;
};

/// Operands of one layer's training attention (device pointers).
template <class T>
struct TrainAttentionArgs {
  const T* qkv = nullptr;            ///< [rows, width] q | k | v after bias and RoPE
  /// [rows] positions; for a policy with a kind rule, attention::pack_row(position, kind) (train_visible)
  const int* pos = nullptr;
  const TrainSegment* segs = nullptr;  ///< [nseg]
  int nseg = 0, max_n = 0;           ///< segments, the longest one's rows
  /// Optional: launch over a subset, bucket[0] segments with indices bucket[1..] (blocks past the count exit); the
  /// tensor-core kernels run once per bucket of segment lengths, each with the shared memory its longest needs.
  const int* bucket = nullptr;
  int nh = 0, nkv = 0, hd = 0;
  T* out = nullptr;                  ///< forward: [rows, nh * hd]
  float* lse = nullptr;              ///< [rows, nh] log-sum-exp of each row's scaled scores (-inf: sees nothing)
  const T* dout = nullptr;           ///< backward: [rows, nh * hd]
  T* dqkv = nullptr;                 ///< backward: [rows, width]
  float* dsum = nullptr;             ///< backward scratch (CUDA-core path): [rows, nh] D_i
  __host__ __device__ int width() const { return (nh + 2 * nkv) * hd; }
};

namespace kernel {

// Whether query row q sees key row k at query head h, given as TrainAttentionArgs::pos values.
template <class Policy>
__device__ __forceinline__ bool train_visible(const attention::LayerMask<Policy>& m, int h, int q, int k) {
  if constexpr (attention::has_kind_rule<Policy>())
    return m.packed(h, q, k);
  else
    return m(h, q, k);
}

constexpr int kTrainAttnWarps = 8;
constexpr int kTrainAttnMaxRows = 128;  // tensor-core path: a segment fits shared memory whole

// ---- CUDA cores ----------------------------------------------------------------------------------------------

// Forward: block (segment, head), a warp per query row; scores of the row in shared memory [warps][max_n].
template <class Policy, class T>
__global__ void train_attn_fwd_simple(TrainAttentionArgs<T> a, const attention::LayerMask<Policy> mask) {
  extern __shared__ float sm[];
  if (a.bucket && static_cast<int>(blockIdx.x) >= a.bucket[0]) return;
  const TrainSegment sg = a.segs[a.bucket ? a.bucket[1 + blockIdx.x] : static_cast<int>(blockIdx.x)];
  const int h = blockIdx.y, kvh = h / (a.nh / a.nkv), hd = a.hd, W = a.width(), qd = a.nh * hd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  float* s = sm + warp * a.max_n;
  const float scale = rsqrtf(static_cast<float>(hd));
  for (int i = warp; i < sg.n; i += warps) {
    const long long qi = static_cast<long long>(sg.off + i);
    const T* q = a.qkv + qi * W + h * hd;
    const int pq = a.pos[qi];
    float m = -INFINITY;
    for (int j = lane; j < sg.n; j += 32) {
      const long long kj = static_cast<long long>(sg.off + j);
      float v = -INFINITY;
      if (train_visible(mask, h, pq, a.pos[kj])) {
        const T* k = a.qkv + kj * W + qd + kvh * hd;
        float d = 0.0f;
        for (int e = 0; e < hd; ++e) d += to_float(q[e]) * to_float(k[e]);
        v = d * scale;
      }
      s[j] = v;
      m = fmaxf(m, v);
    }
    m = warp_max(m);
    float sum = 0.0f;
    if (m != -INFINITY)
      for (int j = lane; j < sg.n; j += 32) sum += s[j] == -INFINITY ? 0.0f : expf(s[j] - m);
    sum = warp_sum(sum);
    __syncwarp();
    const float lse = m == -INFINITY ? -INFINITY : m + logf(sum);
    if (lane == 0) a.lse[qi * a.nh + h] = lse;
    for (int e = lane; e < hd; e += 32) {
      float o = 0.0f;
      if (lse != -INFINITY)
        for (int j = 0; j < sg.n; ++j)
          if (s[j] != -INFINITY)
            o += expf(s[j] - lse) * to_float(a.qkv[static_cast<long long>(sg.off + j) * W + qd + a.nkv * hd + kvh * hd + e]);
      a.out[qi * qd + h * hd + e] = from_float<T>(o);
    }
    __syncwarp();
  }
}

// Backward, queries: block (segment, head), a warp per query row: P and dP of the row, D = sum P dP (kept for the
// key pass), dQ = sum_j dS_j k_j. Shared memory: [warps][2][max_n].
template <class Policy, class T>
__global__ void train_attn_bwd_q_simple(TrainAttentionArgs<T> a, const attention::LayerMask<Policy> mask) {
  extern __shared__ float sm[];
  if (a.bucket && static_cast<int>(blockIdx.x) >= a.bucket[0]) return;
  const TrainSegment sg = a.segs[a.bucket ? a.bucket[1 + blockIdx.x] : static_cast<int>(blockIdx.x)];
  const int h = blockIdx.y, kvh = h / (a.nh / a.nkv), hd = a.hd, W = a.width(), qd = a.nh * hd, kvd = a.nkv * hd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  float* p = sm + warp * 2 * a.max_n;
  float* dp = p + a.max_n;
  const float scale = rsqrtf(static_cast<float>(hd));
  for (int i = warp; i < sg.n; i += warps) {
    const long long qi = static_cast<long long>(sg.off + i);
    const T* q = a.qkv + qi * W + h * hd;
    const T* dO = a.dout + qi * qd + h * hd;
    const float lse = a.lse[qi * a.nh + h];
    const int pq = a.pos[qi];
    float dsum = 0.0f;
    for (int j = lane; j < sg.n; j += 32) {
      const long long kj = static_cast<long long>(sg.off + j);
      float pj = 0.0f, dpj = 0.0f;
      if (lse != -INFINITY && train_visible(mask, h, pq, a.pos[kj])) {
        const T* k = a.qkv + kj * W + qd + kvh * hd;
        const T* v = a.qkv + kj * W + qd + kvd + kvh * hd;
        float d = 0.0f, e2 = 0.0f;
        for (int e = 0; e < hd; ++e) {
          d += to_float(q[e]) * to_float(k[e]);
          e2 += to_float(dO[e]) * to_float(v[e]);
        }
        pj = expf(d * scale - lse);
        dpj = e2;
      }
      p[j] = pj;
      dp[j] = dpj;
      dsum += pj * dpj;
    }
    dsum = warp_sum(dsum);
    __syncwarp();
    if (lane == 0) a.dsum[qi * a.nh + h] = dsum;
    for (int e = lane; e < hd; e += 32) {
      float g = 0.0f;
      for (int j = 0; j < sg.n; ++j)
        if (p[j] != 0.0f)
          g += p[j] * (dp[j] - dsum) * scale * to_float(a.qkv[static_cast<long long>(sg.off + j) * W + qd + kvh * hd + e]);
      a.dqkv[qi * W + h * hd + e] = from_float<T>(g);
    }
    __syncwarp();
  }
}

// Backward, keys: block (segment, kv head), a warp per key row j: over the group's heads and every query row,
// dS_ij and P_ij (recomputed) give dK_j = sum dS_ij q_i and dV_j = sum P_ij dO_i. Lanes hold pieces of the head.
template <class Policy, class T>
__global__ void train_attn_bwd_kv_simple(TrainAttentionArgs<T> a, const attention::LayerMask<Policy> mask) {
  if (a.bucket && static_cast<int>(blockIdx.x) >= a.bucket[0]) return;
  const TrainSegment sg = a.segs[a.bucket ? a.bucket[1 + blockIdx.x] : static_cast<int>(blockIdx.x)];
  const int kvh = blockIdx.y, group = a.nh / a.nkv, hd = a.hd, W = a.width(), qd = a.nh * hd, kvd = a.nkv * hd;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const float scale = rsqrtf(static_cast<float>(hd));
  constexpr int kMaxPer = 8;  // hd <= 256
  for (int j = warp; j < sg.n; j += warps) {
    const long long kj = static_cast<long long>(sg.off + j);
    const T* k = a.qkv + kj * W + qd + kvh * hd;
    const T* v = a.qkv + kj * W + qd + kvd + kvh * hd;
    const int pk = a.pos[kj];
    float dk[kMaxPer] = {}, dv[kMaxPer] = {};
    for (int g = 0; g < group; ++g) {
      const int h = kvh * group + g;
      for (int i = 0; i < sg.n; ++i) {
        const long long qi = static_cast<long long>(sg.off + i);
        const float lse = a.lse[qi * a.nh + h];
        if (lse == -INFINITY || !train_visible(mask, h, a.pos[qi], pk)) continue;
        const T* q = a.qkv + qi * W + h * hd;
        const T* dO = a.dout + qi * qd + h * hd;
        float d = 0.0f, e2 = 0.0f;
        for (int c = 0, e = lane; e < hd; ++c, e += 32) {
          d += to_float(q[e]) * to_float(k[e]);
          e2 += to_float(dO[e]) * to_float(v[e]);
        }
        d = warp_sum(d);
        e2 = warp_sum(e2);
        const float pij = expf(d * scale - lse);
        const float ds = pij * (e2 - a.dsum[qi * a.nh + h]) * scale;
        for (int c = 0, e = lane; e < hd; ++c, e += 32) {
          dk[c] += ds * to_float(q[e]);
          dv[c] += pij * to_float(dO[e]);
        }
      }
    }
    for (int c = 0, e = lane; e < hd; ++c, e += 32) {
      a.dqkv[kj * W + qd + kvh * hd + e] = from_float<T>(dk[c]);
      a.dqkv[kj * W + qd + kvd + kvh * hd + e] = from_float<T>(dv[c]);
    }
  }
}

// ---- tensor cores (WMMA) -------------------------------------------------------------------------------------

template <int HD>
constexpr int tc_ld() {
  return HD + 8;  // T rows: 16-byte padding keeps fragment pointers 32-byte aligned and spreads banks
}
// Shared memory of the tensor-core kernels for segments of up to N (multiple of 16) rows.
// The fp32 staging rows hold scores [N] and output rows [HD]: the wider of the two, padded.
template <int HD>
__host__ __device__ constexpr int tc_lds(int N) {
  return (N > HD ? N : HD) + 4;
}
template <class T, int HD>
constexpr std::size_t tc_fwd_smem(int N) {
  return std::size_t(3) * N * tc_ld<HD>() * sizeof(T) + std::size_t(N) * tc_lds<HD>(N) * 4 +
         std::size_t(N) * (N + 8) * sizeof(T) + std::size_t(N) * 4;
}
template <class T, int HD>
constexpr std::size_t tc_bwd_smem(int N) {
  return std::size_t(4) * N * tc_ld<HD>() * sizeof(T) + std::size_t(N) * tc_lds<HD>(N) * 4 +
         std::size_t(2) * N * (N + 8) * sizeof(T) + std::size_t(3) * N * 4;
}

// rows [0, n) of `cols` elements from global (row stride ld_src) into shared (row stride ld), rows [n, N) zero.
template <class T>
__device__ inline void tc_load(T* dst, int ld, const T* src, long long ld_src, int n, int N, int cols) {
  for (int t = threadIdx.x; t < N * cols; t += blockDim.x) {
    const int r = t / cols, c = t % cols;
    dst[r * ld + c] = r < n ? src[r * ld_src + c] : from_float<T>(0.0f);
  }
}

// out [N, N] (fp32, row stride ldo) = a b^T for a, b [N, HD] in shared memory (row stride tc_ld<HD>), 16 x 16 tiles
// spread over the block's warps: S = Q K^T and dP = dO V^T.
template <class T, int HD>
__device__ inline void tc_abt(float* out, int ldo, const T* a, const T* b, int N) {
  using namespace nvcuda;
  constexpr int ld = tc_ld<HD>();
  const int T16 = N / 16, warp = threadIdx.x >> 5;
  for (int t = warp; t < T16 * T16; t += kTrainAttnWarps) {
    const int i0 = (t / T16) * 16, j0 = (t % T16) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
#pragma unroll
    for (int kk = 0; kk < HD; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb;
      wmma::load_matrix_sync(fa, a + i0 * ld + kk, ld);
      wmma::load_matrix_sync(fb, b + j0 * ld + kk, ld);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(out + i0 * ldo + j0, c, ldo, wmma::mem_row_major);
  }
}

// out [N, HD] (fp32, row stride ldo) = p v for p [N, N] (row stride ldp) and v [N, HD] (row stride tc_ld<HD>) in
// shared memory: O = P V and dQ = dS K.
template <class T, int HD>
__device__ inline void tc_ab(float* out, int ldo, const T* p, int ldp, const T* v, int N) {
  using namespace nvcuda;
  constexpr int ld = tc_ld<HD>(), D16 = HD / 16;
  const int T16 = N / 16, warp = threadIdx.x >> 5;
  for (int t = warp; t < T16 * D16; t += kTrainAttnWarps) {
    const int i0 = (t / D16) * 16, d0 = (t % D16) * 16;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> c;
    wmma::fill_fragment(c, 0.0f);
    for (int kk = 0; kk < N; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
      wmma::load_matrix_sync(fa, p + i0 * ldp + kk, ldp);
      wmma::load_matrix_sync(fb, v + kk * ld + d0, ld);
      wmma::mma_sync(c, fa, fb, c);
    }
    wmma::store_matrix_sync(out + i0 * ldo + d0, c, ldo, wmma::mem_row_major);
  }
}

template <class Policy, class T, int HD>
__global__ void __launch_bounds__(kTrainAttnWarps * 32) train_attn_fwd_tc(TrainAttentionArgs<T> a,
                                                                   const attention::LayerMask<Policy> mask) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smraw[];
  if (a.bucket && static_cast<int>(blockIdx.x) >= a.bucket[0]) return;
  const TrainSegment sg = a.segs[a.bucket ? a.bucket[1 + blockIdx.x] : static_cast<int>(blockIdx.x)];
  const int n = sg.n, N = (n + 15) / 16 * 16, h = blockIdx.y, kvh = h / (a.nh / a.nkv);
  const int W = a.width(), qd = a.nh * HD, kvd = a.nkv * HD, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int ld = tc_ld<HD>();
  const int lds = tc_lds<HD>(N), ldp = N + 8;
  T* Qs = reinterpret_cast<T*>(smraw);
  T* Ks = Qs + N * ld;
  T* Vs = Ks + N * ld;
  float* S = reinterpret_cast<float*>(Vs + N * ld);
  T* P = reinterpret_cast<T*>(S + N * lds);
  int* pos = reinterpret_cast<int*>(P + N * ldp);
  const T* base = a.qkv + static_cast<long long>(sg.off) * W;
  tc_load(Qs, ld, base + h * HD, W, n, N, HD);
  tc_load(Ks, ld, base + qd + kvh * HD, W, n, N, HD);
  tc_load(Vs, ld, base + qd + kvd + kvh * HD, W, n, N, HD);
  for (int i = threadIdx.x; i < N; i += blockDim.x) pos[i] = i < n ? a.pos[sg.off + i] : 0;
  __syncthreads();
  tc_abt<T, HD>(S, lds, Qs, Ks, N);  // S = Q K^T
  __syncthreads();
  const float scale = rsqrtf(static_cast<float>(HD));
  for (int i = warp; i < N; i += kTrainAttnWarps) {  // masked softmax, a warp per row
    float mx = -INFINITY;
    for (int j = lane; j < n; j += 32)
      if (i < n && train_visible(mask, h, pos[i], pos[j])) mx = fmaxf(mx, S[i * lds + j] * scale);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j < n; j += 32)
      if (mx != -INFINITY && train_visible(mask, h, pos[i], pos[j])) sum += expf(S[i * lds + j] * scale - mx);
    sum = warp_sum(sum);
    const float lse = mx == -INFINITY ? -INFINITY : mx + logf(sum);
    for (int j = lane; j < N; j += 32) {
      const bool vis = i < n && j < n && lse != -INFINITY && train_visible(mask, h, pos[i], pos[j]);
      P[i * ldp + j] = from_float<T>(vis ? expf(S[i * lds + j] * scale - lse) : 0.0f);
    }
    if (lane == 0 && i < n) a.lse[static_cast<long long>(sg.off + i) * a.nh + h] = lse;
  }
  __syncthreads();
  tc_ab<T, HD>(S, lds, P, ldp, Vs, N);  // O = P V, staged through S
  __syncthreads();
  T* out = a.out + static_cast<long long>(sg.off) * qd + h * HD;
  for (int t = threadIdx.x; t < n * HD; t += blockDim.x) {
    const int r = t / HD, c = t % HD;
    out[static_cast<long long>(r) * qd + c] = from_float<T>(S[r * lds + c]);
  }
}

template <class Policy, class T, int HD>
__global__ void __launch_bounds__(kTrainAttnWarps * 32) train_attn_bwd_tc(TrainAttentionArgs<T> a,
                                                                   const attention::LayerMask<Policy> mask) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smraw[];
  if (a.bucket && static_cast<int>(blockIdx.x) >= a.bucket[0]) return;
  const TrainSegment sg = a.segs[a.bucket ? a.bucket[1 + blockIdx.x] : static_cast<int>(blockIdx.x)];
  const int n = sg.n, N = (n + 15) / 16 * 16, kvh = blockIdx.y, group = a.nh / a.nkv;
  const int W = a.width(), qd = a.nh * HD, kvd = a.nkv * HD, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  constexpr int ld = tc_ld<HD>();
  const int lda = tc_lds<HD>(N), ldp = N + 8;
  T* Ks = reinterpret_cast<T*>(smraw);
  T* Vs = Ks + N * ld;
  T* Qs = Vs + N * ld;
  T* dOs = Qs + N * ld;
  float* A = reinterpret_cast<float*>(dOs + N * ld);
  T* P = reinterpret_cast<T*>(A + N * lda);
  T* dS = P + N * ldp;
  float* lse = reinterpret_cast<float*>(dS + N * ldp);
  float* D = lse + N;
  int* pos = reinterpret_cast<int*>(D + N);
  const T* base = a.qkv + static_cast<long long>(sg.off) * W;
  tc_load(Ks, ld, base + qd + kvh * HD, W, n, N, HD);
  tc_load(Vs, ld, base + qd + kvd + kvh * HD, W, n, N, HD);
  for (int i = threadIdx.x; i < N; i += blockDim.x) pos[i] = i < n ? a.pos[sg.off + i] : 0;
  const int T16 = N / 16;
  constexpr int D16 = HD / 16;
  constexpr int kMaxTiles = (kTrainAttnMaxRows / 16) * D16 / kTrainAttnWarps;  // dK (and dV) tiles per warp
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> dk[kMaxTiles], dv[kMaxTiles];
#pragma unroll
  for (int u = 0; u < kMaxTiles; ++u) {
    wmma::fill_fragment(dk[u], 0.0f);
    wmma::fill_fragment(dv[u], 0.0f);
  }
  const float scale = rsqrtf(static_cast<float>(HD));
  for (int g = 0; g < group; ++g) {
    const int h = kvh * group + g;
    __syncthreads();  // the previous head's Q, dO, P, dS are consumed
    tc_load(Qs, ld, base + h * HD, W, n, N, HD);
    tc_load(dOs, ld, a.dout + static_cast<long long>(sg.off) * qd + h * HD, qd, n, N, HD);
    for (int i = threadIdx.x; i < N; i += blockDim.x)
      lse[i] = i < n ? a.lse[static_cast<long long>(sg.off + i) * a.nh + h] : -INFINITY;
    __syncthreads();
    tc_abt<T, HD>(A, lda, Qs, Ks, N);  // S = Q K^T
    __syncthreads();
    for (int t = threadIdx.x; t < N * N; t += blockDim.x) {  // P from the saved log-sum-exp
      const int i = t / N, j = t % N;
      const bool vis = i < n && j < n && lse[i] != -INFINITY && train_visible(mask, h, pos[i], pos[j]);
      P[i * ldp + j] = from_float<T>(vis ? expf(A[i * lda + j] * scale - lse[i]) : 0.0f);
    }
    __syncthreads();
    tc_abt<T, HD>(A, lda, dOs, Vs, N);  // dP = dO V^T
    __syncthreads();
    for (int i = warp; i < N; i += kTrainAttnWarps) {  // D_i = sum_j P_ij dP_ij, a warp per row
      float s = 0.0f;
      for (int j = lane; j < N; j += 32) s += to_float(P[i * ldp + j]) * A[i * lda + j];
      s = warp_sum(s);
      if (lane == 0) D[i] = s;
    }
    __syncthreads();
    for (int t = threadIdx.x; t < N * N; t += blockDim.x) {
      const int i = t / N, j = t % N;
      dS[i * ldp + j] = from_float<T>(to_float(P[i * ldp + j]) * (A[i * lda + j] - D[i]) * scale);
    }
    __syncthreads();
    // dV += P^T dO and dK += dS^T Q into the warp's accumulator tiles (tile u of warp w is w + u * warps).
#pragma unroll
    for (int u = 0; u < kMaxTiles; ++u) {
      const int t = warp + u * kTrainAttnWarps;
      if (t >= T16 * D16) break;
      const int j0 = (t / D16) * 16, d0 = (t % D16) * 16;
      for (int kk = 0; kk < N; kk += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::col_major> fp, fs;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fo, fq;
        wmma::load_matrix_sync(fp, P + kk * ldp + j0, ldp);  // (P^T)[j0.., kk..] read column-major from P
        wmma::load_matrix_sync(fo, dOs + kk * ld + d0, ld);
        wmma::mma_sync(dv[u], fp, fo, dv[u]);
        wmma::load_matrix_sync(fs, dS + kk * ldp + j0, ldp);
        wmma::load_matrix_sync(fq, Qs + kk * ld + d0, ld);
        wmma::mma_sync(dk[u], fs, fq, dk[u]);
      }
    }
    tc_ab<T, HD>(A, lda, dS, ldp, Ks, N);  // dQ = dS K, staged through A (dS and D hold what was needed of it)
    __syncthreads();
    T* dq = a.dqkv + static_cast<long long>(sg.off) * W + h * HD;
    for (int t = threadIdx.x; t < n * HD; t += blockDim.x) {
      const int r = t / HD, c = t % HD;
      dq[static_cast<long long>(r) * W + c] = from_float<T>(A[r * lda + c]);
    }
  }
  __syncthreads();
  // dK, dV: the accumulator tiles through A, then the rows of the segment.
#pragma unroll
  for (int pass = 0; pass < 2; ++pass) {
#pragma unroll
    for (int u = 0; u < kMaxTiles; ++u) {
      const int t = warp + u * kTrainAttnWarps;
      if (t >= T16 * D16) break;
      const int j0 = (t / D16) * 16, d0 = (t % D16) * 16;
      wmma::store_matrix_sync(A + j0 * lda + d0, pass == 0 ? dk[u] : dv[u], lda, wmma::mem_row_major);
    }
    __syncthreads();
    T* dst = a.dqkv + static_cast<long long>(sg.off) * W + qd + (pass == 0 ? 0 : kvd) + kvh * HD;
    for (int t = threadIdx.x; t < n * HD; t += blockDim.x) {
      const int r = t / HD, c = t % HD;
      dst[static_cast<long long>(r) * W + c] = from_float<T>(A[r * lda + c]);
    }
    __syncthreads();
  }
}

}  // namespace kernel

/// Whether the tensor-core kernels take this call (else the CUDA-core ones): 16-bit storage, head size 32, 64 or
/// 128, segments of at most 128 rows, and shared memory for the longest one on this device (`smem_limit`).
template <class T>
inline bool train_attention_tc(int hd, int max_n, std::size_t smem_limit) {
  if constexpr (sizeof(T) != 2) {
    return false;
  } else {
    if (max_n > kernel::kTrainAttnMaxRows || max_n < 1) return false;
    const int N = (max_n + 15) / 16 * 16;
    std::size_t need = 0;
    if (hd == 32) need = std::max(kernel::tc_fwd_smem<T, 32>(N), kernel::tc_bwd_smem<T, 32>(N));
    else if (hd == 64) need = std::max(kernel::tc_fwd_smem<T, 64>(N), kernel::tc_bwd_smem<T, 64>(N));
    else if (hd == 128) need = std::max(kernel::tc_fwd_smem<T, 128>(N), kernel::tc_bwd_smem<T, 128>(N));
    else return false;
    return need <= smem_limit;
  }
}

/// Raises the shared-memory limit of the tensor-core kernels of `Policy` for head size `hd` to what segments of
/// kTrainAttnMaxRows need (once, before any launch: a graph capture must not change function attributes).
template <class Policy, class T>
void prepare_train_attention(int hd) {
  if constexpr (sizeof(T) == 2) {
    constexpr int N = kernel::kTrainAttnMaxRows;
    auto set = [](auto k, std::size_t smem) {
      EARN_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
    };
    int dev = 0, limit = 0;
    EARN_CUDA_CHECK(cudaGetDevice(&dev));
    EARN_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    auto cap = [&](std::size_t v) { return std::min<std::size_t>(v, static_cast<std::size_t>(limit)); };
    if (hd == 32) {
      set(kernel::train_attn_fwd_tc<Policy, T, 32>, cap(kernel::tc_fwd_smem<T, 32>(N)));
      set(kernel::train_attn_bwd_tc<Policy, T, 32>, cap(kernel::tc_bwd_smem<T, 32>(N)));
    } else if (hd == 64) {
      set(kernel::train_attn_fwd_tc<Policy, T, 64>, cap(kernel::tc_fwd_smem<T, 64>(N)));
      set(kernel::train_attn_bwd_tc<Policy, T, 64>, cap(kernel::tc_bwd_smem<T, 64>(N)));
    } else if (hd == 128) {
      set(kernel::train_attn_fwd_tc<Policy, T, 128>, cap(kernel::tc_fwd_smem<T, 128>(N)));
      set(kernel::train_attn_bwd_tc<Policy, T, 128>, cap(kernel::tc_bwd_smem<T, 128>(N)));
    }
  }
}

/// Forward: out and lse of every row of every segment (of a.bucket's segments, when given, which are at most
/// a.max_n rows long: the tensor-core kernels' shared memory follows a.max_n). `tensor_cores` = train_attention_tc(...) (or false to force
/// the CUDA-core kernels).
template <class Policy, class T>
void train_attention_forward(cudaStream_t s, const TrainAttentionArgs<T>& a, bool tensor_cores,
                             const attention::LayerMask<Policy>& mask = {}) {
  if (a.nseg == 0) return;
  const dim3 grid(a.nseg, a.nh);
  if constexpr (sizeof(T) == 2) {
    if (tensor_cores) {
      const int N = (a.max_n + 15) / 16 * 16;
      auto launch = [&]<int HD>() {  // prepare_train_attention raised the kernel's shared-memory limit
        kernel::train_attn_fwd_tc<Policy, T, HD><<<grid, kernel::kTrainAttnWarps * 32, kernel::tc_fwd_smem<T, HD>(N), s>>>(a, mask);
      };
      if (a.hd == 32) launch.template operator()<32>();
      else if (a.hd == 64) launch.template operator()<64>();
      else launch.template operator()<128>();
      EARN_CUDA_CHECK_LAUNCH();
      return;
    }
  }
  const int threads = 128;
  const std::size_t smem = std::size_t(threads / 32) * a.max_n * sizeof(float);
  auto k = kernel::train_attn_fwd_simple<Policy, T>;
  if (smem > 48 * 1024)
    EARN_CUDA_CHECK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  k<<<grid, threads, smem, s>>>(a, mask);
  EARN_CUDA_CHECK_LAUNCH();
}

/// Backward: dq, dk, dv of every row into a.dqkv (every element written).
template <class Policy, class T>
void train_attention_backward(cudaStream_t s, const TrainAttentionArgs<T>& a, bool tensor_cores,
                              const attention::LayerMask<Policy>& mask = {}) {
  if (a.nseg == 0) return;
  if constexpr (sizeof(T) == 2) {
    if (tensor_cores) {
      const int N = (a.max_n + 15) / 16 * 16;
      auto launch = [&]<int HD>() {  // prepare_train_attention raised the kernel's shared-memory limit
        kernel::train_attn_bwd_tc<Policy, T, HD><<<dim3(a.nseg, a.nkv), kernel::kTrainAttnWarps * 32,
                                                   kernel::tc_bwd_smem<T, HD>(N), s>>>(a, mask);
      };
      if (a.hd == 32) launch.template operator()<32>();
      else if (a.hd == 64) launch.template operator()<64>();
      else launch.template operator()<128>();
      EARN_CUDA_CHECK_LAUNCH();
      return;
    }
  }
  if (a.hd > 256) throw ConfigError("train attention: head size " + std::to_string(a.hd) + " > 256");
  const int threads = 128;
  const std::size_t smem = std::size_t(threads / 32) * 2 * a.max_n * sizeof(float);
  auto kq = kernel::train_attn_bwd_q_simple<Policy, T>;
  if (smem > 48 * 1024)
    EARN_CUDA_CHECK(cudaFuncSetAttribute(kq, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  kq<<<dim3(a.nseg, a.nh), threads, smem, s>>>(a, mask);
  EARN_CUDA_CHECK_LAUNCH();
  kernel::train_attn_bwd_kv_simple<Policy, T><<<dim3(a.nseg, a.nkv), threads, 0, s>>>(a, mask);
  EARN_CUDA_CHECK_LAUNCH();
}

}  // namespace earn::cuda
