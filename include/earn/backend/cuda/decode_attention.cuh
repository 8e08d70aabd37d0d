// earn/backend/cuda/decode_attention.cuh - fused decode attention for bf16 / fp16 (flash-decoding): the beams of a
// user read its prompt K/V once per step, through tensor cores, with no score matrix in device memory.
//
// Pass 1 (decode_split): one block per (128-key chunk of a user's prefix, head, user segment). It loads the
// segment's queries (up to 32 at a time) and the chunk's keys into shared memory, S = Q K^T by WMMA, masks by
// Policy::visible, takes the chunk-local softmax (max m, sum l, P = exp(scale s - m)), then P V by WMMA, and writes
// per (row, head, chunk) the unnormalised output and (m, l) to a float workspace. Pass 2 (decode_combine): one
// warp per (row, head) scores the row's own generated keys, merges them with every chunk by the usual rescaling
// (out = sum_i e^{m_i - M} O_i / sum_i e^{m_i - M} l_i) and writes the attention output in T.
// Measured against the cuBLAS path (attention.cuh) by bench/cuda/bench_cuda_attention.cu.
#pragma once

#include <mma.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"
#include "earn/core/tensor.hpp"

namespace earn::cuda {

namespace kernel {

constexpr int kDecKeys = 128;   // keys per chunk (block)
constexpr int kDecQ = 32;       // queries per pass inside a block
constexpr int kDecMaxHd = 128;  // largest head size the fused path takes
constexpr int kDecPad = 8;      // bf16 row padding: 16-byte rows shift banks, conflict-free 16-byte loads
constexpr int kDecLd = kDecMaxHd + kDecPad;     // K / V / Q rows in shared memory (elements)
constexpr int kDecSLd = kDecKeys + 4;           // fp32 score / output rows in shared memory
constexpr int kDecPLd = kDecKeys + kDecPad;     // P rows (T)
constexpr int kDecThreads = 128;

template <class T>
constexpr std::size_t decode_split_smem() {
  return std::size_t(kDecKeys) * kDecLd * sizeof(T)      // K, then V, of the chunk
         + std::size_t(kDecQ) * kDecLd * sizeof(T)       // queries
         + std::size_t(kDecQ) * kDecSLd * sizeof(float)  // scores, then the P V output
         + std::size_t(kDecQ) * kDecPLd * sizeof(T);     // probabilities
}

// Rows [0, n) of `hd` elements from src (row stride ld_src elements) into shared dst (row stride kDecLd); rows
// [n, rows_to) are zeroed so the tensor cores never read garbage. 16-byte accesses (hd % 8 == 0).
template <class T>
__device__ inline void load_rows(T* dst, const T* src, long long ld_src, int n, int rows_to, int hd) {
  const int vec = hd / 8;  // uint4 per row
  for (int i = threadIdx.x; i < rows_to * vec; i += blockDim.x) {
    const int r = i / vec, c = (i % vec) * 8;
    uint4 v = make_uint4(0, 0, 0, 0);
    if (r < n) v = *reinterpret_cast<const uint4*>(src + r * ld_src + c);
    *reinterpret_cast<uint4*>(dst + r * kDecLd + c) = v;
  }
}

/// Pass 1, see the file comment. Grid (chunks, heads, segments); ws_o [rows, nh, chunks, hd], ws_ml [.., 2].
template <class Policy, class T>
__global__ void __launch_bounds__(kDecThreads) decode_split(const T* q, const Segment* segs, const int* pos, int nh,
                                                             int nkv, int hd, float scale, int chunks, float* ws_o,
                                                             float* ws_ml) {
  using namespace nvcuda;
  extern __shared__ __align__(16) unsigned char smem[];
  T* kv = reinterpret_cast<T*>(smem);
  T* qs = kv + kDecKeys * kDecLd;
  float* sc = reinterpret_cast<float*>(qs + kDecQ * kDecLd);
  T* ps = reinterpret_cast<T*>(sc + kDecQ * kDecSLd);

  const int chunk = blockIdx.x, h = blockIdx.y;
  const Segment sg = segs[blockIdx.z];
  const int kvh = h / (nh / nkv), qd = nh * hd, kvd = nkv * hd;
  const int k0 = chunk * kDecKeys, kn = min(kDecKeys, sg.S - k0);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  auto ml_at = [&](int row) { return ws_ml + ((static_cast<long long>(row) * nh + h) * chunks + chunk) * 2; };
  if (kn <= 0) {  // this segment has fewer chunks: an empty share (l = 0) the combine skips
    for (int i = threadIdx.x; i < sg.nq; i += blockDim.x) {
      ml_at(sg.q_off + i)[0] = -INFINITY;
      ml_at(sg.q_off + i)[1] = 0.0f;
    }
    return;
  }
  const int kpad = (kn + 15) / 16 * 16, ksteps = hd / 16;
  const T* pk = static_cast<const T*>(sg.pk) + static_cast<long long>(k0) * kvd + kvh * hd;
  const T* pv = static_cast<const T*>(sg.pv) + static_cast<long long>(k0) * kvd + kvh * hd;

  for (int q0 = 0; q0 < sg.nq; q0 += kDecQ) {
    const int qn = min(kDecQ, sg.nq - q0), qpad = (qn + 15) / 16 * 16;
    __syncthreads();  // the previous pass is done with kv, qs, sc, ps
    load_rows(kv, pk, kvd, kn, kpad, hd);
    load_rows(qs, q + static_cast<long long>(sg.q_off + q0) * qd + h * hd, qd, qn, qpad, hd);
    __syncthreads();
    // S [qpad, kpad] = Q K^T: B = K^T is K row-major read as column-major.
    for (int t = warp; t < (qpad / 16) * (kpad / 16); t += kDecThreads / 32) {
      const int qi = t / (kpad / 16), kj = t % (kpad / 16);
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int s = 0; s < ksteps; ++s) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> b;
        wmma::load_matrix_sync(a, qs + qi * 16 * kDecLd + s * 16, kDecLd);
        wmma::load_matrix_sync(b, kv + kj * 16 * kDecLd + s * 16, kDecLd);
        wmma::mma_sync(acc, a, b, acc);
      }
      wmma::store_matrix_sync(sc + qi * 16 * kDecSLd + kj * 16, acc, kDecSLd, wmma::mem_row_major);
    }
    __syncthreads();
    // V replaces K (K is no longer needed) while the warps take the chunk-local softmax of their rows.
    load_rows(kv, pv, kvd, kn, kpad, hd);
    for (int r = warp; r < qpad; r += kDecThreads / 32) {
      const int row = sg.q_off + q0 + r;
      const int qpos = r < qn ? pos[row] : 0;
      float m = -INFINITY;
      for (int j = lane; j < kpad; j += 32) {
        const bool vis = r < qn && j < kn && Policy::visible(qpos, sg.kpos[k0 + j]);
        const float s = vis ? sc[r * kDecSLd + j] * scale : -INFINITY;
        sc[r * kDecSLd + j] = s;
        m = fmaxf(m, s);
      }
      m = warp_max(m);
      float l = 0.0f;
      for (int j = lane; j < kpad; j += 32) {
        const float s = sc[r * kDecSLd + j];
        const float p = s == -INFINITY ? 0.0f : __expf(s - m);
        l += p;
        ps[r * kDecPLd + j] = from_float<T>(p);
      }
      l = warp_sum(l);
      if (lane == 0 && r < qn) {
        ml_at(row)[0] = m;
        ml_at(row)[1] = l;
      }
    }
    __syncthreads();
    // O [qpad, hd] = P V, staged through sc (the scores are consumed), then the valid rows go out.
    for (int t = warp; t < (qpad / 16) * ksteps; t += kDecThreads / 32) {
      const int qi = t / ksteps, dj = t % ksteps;
      wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
      wmma::fill_fragment(acc, 0.0f);
      for (int s = 0; s < kpad / 16; ++s) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b;
        wmma::load_matrix_sync(a, ps + qi * 16 * kDecPLd + s * 16, kDecPLd);
        wmma::load_matrix_sync(b, kv + s * 16 * kDecLd + dj * 16, kDecLd);
        wmma::mma_sync(acc, a, b, acc);
      }
      // Barrier-free reuse of sc: each warp's tile rows qi*16.. were read only in the softmax above, which ended
      // at the barrier; tiles of different warps do not overlap.
      wmma::store_matrix_sync(sc + qi * 16 * kDecSLd + dj * 16, acc, kDecSLd, wmma::mem_row_major);
    }
    __syncthreads();
    for (int i = threadIdx.x; i < qn * hd; i += blockDim.x) {
      const int r = i / hd, d = i % hd;
      ws_o[((static_cast<long long>(sg.q_off + q0 + r) * nh + h) * chunks + chunk) * hd + d] = sc[r * kDecSLd + d];
    }
  }
}

/// Pass 2, see the file comment. One warp per (row, head); G generated keys per row (each row's own block).
template <class Policy, class T>
__global__ void decode_combine(const T* q, const T* gen_k, const T* gen_v, const int* row_src, const int* row_seg,
                               const Segment* segs, const int* pos, int rows, int nh, int nkv, int hd, int G,
                               int max_new, float scale, int chunks, const float* ws_o, const float* ws_ml, T* out) {
  const long long warps = static_cast<long long>(rows) * nh;
  const int lane = threadIdx.x & 31, qd = nh * hd, kvd = nkv * hd;
  constexpr int kPer = kDecMaxHd / 32;  // output elements per lane
  for (long long w = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) >> 5; w < warps;
       w += (static_cast<long long>(gridDim.x) * blockDim.x) >> 5) {
    const int r = static_cast<int>(w / nh), h = static_cast<int>(w % nh), kvh = h / (nh / nkv);
    const Segment& sg = segs[row_seg[r]];
    const int qpos = pos[r];
    const T* qv = q + static_cast<long long>(r) * qd + h * hd;
    const T* gk = gen_k + static_cast<long long>(row_src[r]) * max_new * kvd + kvh * hd;
    const T* gv = gen_v + static_cast<long long>(row_src[r]) * max_new * kvd + kvh * hd;
    const float* ml = ws_ml + (static_cast<long long>(r) * nh + h) * chunks * 2;
    // The largest logit over the chunks and the generated keys.
    float M = -INFINITY;
    const int nchunks = (sg.S + kDecKeys - 1) / kDecKeys;
    for (int c = 0; c < nchunks; ++c)
      if (ml[2 * c + 1] > 0.0f) M = fmaxf(M, ml[2 * c]);
    float gs[8];  // max_new <= 8 on this path (checked by the caller)
    for (int j = 0; j < G; ++j) {
      float acc = 0.0f;
      for (int d = lane; d < hd; d += 32) acc += to_float(qv[d]) * to_float(gk[static_cast<long long>(j) * kvd + d]);
      acc = warp_sum(acc) * scale;
      gs[j] = Policy::visible(qpos, sg.gen_pos0 + j) ? acc : -INFINITY;
      M = fmaxf(M, gs[j]);
    }
    float o[kPer];
    for (int i = 0; i < kPer; ++i) o[i] = 0.0f;
    float L = 0.0f;
    if (M != -INFINITY) {
      const float* wo = ws_o + (static_cast<long long>(r) * nh + h) * chunks * hd;
      for (int c = 0; c < nchunks; ++c) {
        if (!(ml[2 * c + 1] > 0.0f)) continue;  // no visible key there; its output was never written
        const float f = __expf(ml[2 * c] - M);
        L += f * ml[2 * c + 1];
        for (int i = 0; i < kPer; ++i)
          if (lane + 32 * i < hd) o[i] += f * wo[static_cast<long long>(c) * hd + lane + 32 * i];
      }
      for (int j = 0; j < G; ++j) {
        if (gs[j] == -INFINITY) continue;
        const float f = __expf(gs[j] - M);
        L += f;
        for (int i = 0; i < kPer; ++i)
          if (lane + 32 * i < hd) o[i] += f * to_float(gv[static_cast<long long>(j) * kvd + lane + 32 * i]);
      }
    }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;  // a row that sees no key gets 0, as the CPU backend
    T* dst = out + static_cast<long long>(r) * qd + h * hd;
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < hd) dst[lane + 32 * i] = from_float<T>(o[i] * inv);
  }
}

}  // namespace kernel

/// Whether decode_attention takes this shape: 16-bit storage, head size a multiple of 16 up to 128, at most 8
/// generated keys per row.
template <class T>
constexpr bool decode_fused_supported(int hd, int max_new) {
  return !std::is_same_v<T, float> && hd % 16 == 0 && hd <= kernel::kDecMaxHd && max_new <= 8;
}

/// Key chunks of the longest prefix among a call's segments.
inline int decode_chunks(int max_prefix) { return std::max(1, (max_prefix + kernel::kDecKeys - 1) / kernel::kDecKeys); }

/// Workspace floats decode_attention needs for `rows` rows.
inline std::size_t decode_workspace(int rows, int nh, int hd, int chunks) {
  return std::size_t(rows) * nh * chunks * (hd + 2);
}

/// Fused decode attention over `nseg` segments (each with pk / pv set) into out [rows, nh * hd]; ws holds
/// decode_workspace(rows, nh, hd, chunks) floats.
template <class Policy, class T>
void decode_attention(cudaStream_t s, const T* q, const T* gen_k, const T* gen_v, const int* row_src,
                      const int* row_seg, const Segment* segs, int nseg, const int* pos, int rows, int nh, int nkv,
                      int hd, int G, int max_new, int chunks, float* ws, T* out) {
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  constexpr std::size_t smem = kernel::decode_split_smem<T>();
  static bool configured = false;  // per instantiation: allow more than 48 KB of dynamic shared memory
  if (!configured) {
    EARN_CUDA_CHECK(cudaFuncSetAttribute(kernel::decode_split<Policy, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem)));
    configured = true;
  }
  float* ws_o = ws;
  float* ws_ml = ws + std::size_t(rows) * nh * chunks * hd;
  kernel::decode_split<Policy, T><<<dim3(chunks, nh, nseg), kernel::kDecThreads, smem, s>>>(
      q, segs, pos, nh, nkv, hd, scale, chunks, ws_o, ws_ml);
  EARN_CUDA_CHECK_LAUNCH();
  kernel::decode_combine<Policy, T><<<kernel::grid_for(Index{rows} * nh * 32), kernel::kThreads, 0, s>>>(
      q, gen_k, gen_v, row_src, row_seg, segs, pos, rows, nh, nkv, hd, G, max_new, scale, chunks, ws_o, ws_ml, out);
  EARN_CUDA_CHECK_LAUNCH();
}

}  // namespace earn::cuda
