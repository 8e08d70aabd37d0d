// earn/backend/cuda/attention.cuh - one attention call of the CUDA backend over per-user segments: Q K^T over each
// user's cached prefix as batched cuBLAS GEMMs (one per group of equally shaped segments), the generated keys of
// each decode row by a small kernel, the policy-masked softmax, then P V the same two ways. The engine calls it
// for prefill (G = 0), decode over the contiguous cache and decode over the register cache (the prefix is then
// the registers only); bench/cuda/bench_cuda_attention.cu times it alone.
#pragma once

#include <cmath>
#include <cstddef>

#include "earn/backend/cuda/blas.cuh"
#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"
#include "earn/core/tensor.hpp"

namespace earn::cuda {

/// Segments of one shape (S prefix keys, nq queries) share one batched GEMM: entries [entry, entry + count) of the
/// call's pointer arrays, one entry per (segment, head).
struct AttentionGroup {
  int S = 0, nq = 0, count = 0, entry = 0;
};

/// Device operands of one attention call. Scores [n_heads][nq][ld] per segment at its score_off (fp32; probs in T
/// at the same offsets). `ptrs` holds six arrays of `entries` pointers each (A, B, C of Q K^T, then of P V), as
/// attention_ptrs writes them.
template <class T>
struct AttentionArgs {
  const T* q = nullptr;        ///< [rows, nh * hd] rotated queries
  const T* gen_k = nullptr;    ///< [*, max_new, kvd] generated keys (decode; unused when G == 0)
  const T* gen_v = nullptr;    ///< [*, max_new, kvd] generated values
  float* scores = nullptr;     ///< scratch, see above
  T* probs = nullptr;          ///< scratch; == scores when T is float (softmax in place)
  T* out = nullptr;            ///< [rows, nh * hd] attention output
  const int* pos = nullptr;    ///< [rows] query positions
  const int* row_seg = nullptr;  ///< [rows] segment of each row
  const int* row_src = nullptr;  ///< [rows] generated-KV block of each row (decode), null in prefill
  const Segment* segs = nullptr;  ///< the call's segments (device)
  void** ptrs = nullptr;       ///< [6 * entries] (device)
  int entries = 0;
  const AttentionGroup* groups = nullptr;  ///< host array of n_groups
  int n_groups = 0;
  int rows = 0, nh = 0, nkv = 0, hd = 0, G = 0, max_new = 0;
};

/// Score-row stride of a segment: S + G rounded up so every P V operand row starts 32-byte aligned.
inline int score_ld(int S, int G) { return (S + G + 7) / 8 * 8; }

/// Host side: the GEMM pointers of segment `sg` (prefix K / V blocks k, v of its user) for every head, written
/// at entries [e, e + nh) of the six arrays in `ptrs` (each `entries` long).
template <class T>
void attention_ptrs(void** ptrs, int entries, int e, const Segment& sg, const T* k, const T* v, const T* q,
                    float* scores, T* probs, T* out, int nh, int nkv, int hd) {
  const int group = nh / nkv;
  const std::size_t qd = std::size_t(nh) * hd;
  for (int h = 0; h < nh; ++h, ++e) {
    const std::size_t kv_col = std::size_t(h / group) * hd;
    const std::size_t score = std::size_t(sg.score_off) + std::size_t(h) * sg.nq * sg.ld;
    ptrs[e] = const_cast<T*>(k) + kv_col;
    ptrs[entries + e] = const_cast<T*>(q) + std::size_t(sg.q_off) * qd + std::size_t(h) * hd;
    ptrs[2 * entries + e] = scores + score;
    ptrs[3 * entries + e] = const_cast<T*>(v) + kv_col;
    ptrs[4 * entries + e] = probs + score;
    ptrs[5 * entries + e] = out + std::size_t(sg.q_off) * qd + std::size_t(h) * hd;
  }
}

/// Runs one attention call on `stream` (the cuBLAS handle must already be bound to it). The layer's `mask` masks
/// keys by position (and head); rows that see no key get 0.
template <class Policy, class T>
void attention(cublasHandle_t h, cudaStream_t s, const AttentionArgs<T>& a,
               const attention::LayerMask<Policy>& mask = {}) {
  namespace k = kernel;
  const int qd = a.nh * a.hd, kvd = a.nkv * a.hd, G = a.G;
  const float scale = 1.0f / std::sqrt(static_cast<float>(a.hd));
  const int E = a.entries;
  for (int i = 0; i < a.n_groups; ++i) {
    const AttentionGroup& g = a.groups[i];
    // scores^T [S, nq] = K [S, hd] . Q^T, column-major view of row-major scores [nq, ld].
    const BatchedGemm qk{CUBLAS_OP_T, CUBLAS_OP_N, g.S, g.nq, a.hd, blas_type<T>(), blas_type<T>(), CUDA_R_32F,
                         kvd, qd, score_ld(g.S, G), scale, 0.0f};
    gemm_batched(h, qk, a.ptrs + g.entry, a.ptrs + E + g.entry, a.ptrs + 2 * E + g.entry, g.count);
  }
  if (G > 0) {
    k::gen_scores<T><<<k::grid_for(Index{a.rows} * a.nh * G * 32), k::kThreads, 0, s>>>(
        a.q, a.gen_k, a.row_src, a.row_seg, a.segs, a.rows, a.nh, a.nkv, a.hd, G, a.max_new, scale, a.scores);
    EARN_CUDA_CHECK_LAUNCH();
  }
  k::softmax_rows<Policy, T><<<dim3(a.rows, a.nh), 128, 0, s>>>(a.scores, a.probs, a.pos, a.row_seg, a.segs, mask);
  EARN_CUDA_CHECK_LAUNCH();
  for (int i = 0; i < a.n_groups; ++i) {
    const AttentionGroup& g = a.groups[i];
    // att^T [hd, nq] = V^T [hd, S] . P^T [S, nq].
    const BatchedGemm pv{CUBLAS_OP_N, CUBLAS_OP_N, a.hd, g.nq, g.S, blas_type<T>(), blas_type<T>(), blas_type<T>(),
                         kvd, score_ld(g.S, G), qd, 1.0f, 0.0f};
    gemm_batched(h, pv, a.ptrs + 3 * E + g.entry, a.ptrs + 4 * E + g.entry, a.ptrs + 5 * E + g.entry, g.count);
  }
  if (G > 0) {
    k::gen_pv<T><<<k::grid_for(Index{a.rows} * a.nh * 32), k::kThreads, 0, s>>>(
        a.probs, a.gen_v, a.row_src, a.row_seg, a.segs, a.rows, a.nh, a.nkv, a.hd, G, a.max_new, a.out);
    EARN_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace earn::cuda
