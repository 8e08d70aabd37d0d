// earn/backend/cuda/kernels.cuh - the CUDA backend's element-wise and row kernels: embeddings, RMSNorm, the fused
// bias + RoPE + KV-store step after the QKV GEMM, SwiGLU, row gathers, and the attention pieces around cuBLAS
// (generated-key scores, the policy-masked softmax, generated-value accumulation). GEMMs live in blas.cuh.
//
// Numerics: the residual stream, attention scores and logits are fp32; storage type T (float, bf16, fp16) holds
// weights, KV cache, GEMM inputs and the q/k/v and gate/up GEMM outputs (halving their traffic; the math on them,
// RoPE and SwiGLU, runs in fp32 registers).
#pragma once

#include <algorithm>
#include <cstdint>

#include "earn/attention/policy.hpp"
#include "earn/backend/cuda/common.cuh"

namespace earn::cuda {

/// One user's slice of an attention call (plain data, copied to the device). Queries are rows
/// [q_off, q_off + nq) of Q; keys are the user's S cached prefix rows, then G generated rows of each query row.
struct Segment {
  int q_off = 0;          ///< first query row
  int nq = 0;             ///< query rows
  int S = 0;              ///< prefix keys
  int G = 0;              ///< generated keys per query row (0 in prefill)
  int ld = 0;             ///< stride of a score row, >= S + G (rounded up for aligned GEMM operands)
  int slot0 = 0;          ///< prefill: KV slot of this segment's first row in the layer's prefix store
  int gen_pos0 = 0;       ///< position of generated key 0: the user's input length
  long long score_off = 0;  ///< first score of this segment; scores are [n_heads][nq][ld]
  const int* kpos = nullptr;  ///< [S] positions of the prefix keys
  const void* pk = nullptr;   ///< decode: the user's prefix K block [S, kvd] (fused decode attention)
  const void* pv = nullptr;   ///< decode: its prefix V block
};

namespace kernel {

constexpr int kThreads = 256;

inline unsigned grid_for(long long n, int threads = kThreads) {
  const long long b = (n + threads - 1) / threads;
  return static_cast<unsigned>(b < 1 ? 1 : (b > 65535LL * 8 ? 65535LL * 8 : b));  // grid-stride loops cover the rest
}

__device__ inline float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
__device__ inline float warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}
/// Sum (or max) over the block; every thread gets the result. Ends with a barrier so `red` can be reused.
template <bool kMax>
__device__ inline float block_reduce(float v, float* red) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  v = kMax ? warp_max(v) : warp_sum(v);
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float r = lane < warps ? red[lane] : (kMax ? -INFINITY : 0.0f);
  r = kMax ? warp_max(r) : warp_sum(r);
  __syncthreads();
  return r;
}

/// A key of row_probs_by: its K row at the head, and its position.
template <class T>
struct KeyRow {
  const T* k;
  int pos;
};

/// Block-wide, fp32: the attention probabilities of one query row (its rotated query qrow [hd], head of KV head g) over
/// n keys (rows of k, stride kvd; positions kpos), scaled by 1 / sqrt(hd) and masked by `mask` at query head h: p[j] the
/// probability, or -1 for a key the row does not see. qv [hd] and p [n] are shared memory, red the reductions'.
/// Returns the number of visible keys (every thread gets it). The eviction and observer kernels recompute rows
/// with it where the flash kernels never form them. row_probs_by takes the keys from key(j) = {K row of the head,
/// position} (keys in more than one block: a decode row's prefix and generated keys); row_probs from one block.
template <class Policy, class T, class Key>
__device__ inline int row_probs_by(const attention::LayerMask<Policy>& mask, int h, const T* qrow, int qpos, int hd,
                                   Key key, int n, float* qv, float* p, float* red) {
  for (int d = threadIdx.x; d < hd; d += blockDim.x) qv[d] = to_float(qrow[d]);
  __syncthreads();
  const float scale = rsqrtf(static_cast<float>(hd));
  float m = -INFINITY;
  for (int j = threadIdx.x; j < n; j += blockDim.x) {
    const auto [kr, kp] = key(j);
    float v = -INFINITY;
    if (mask(h, qpos, kp)) {
      float dot = 0.0f;
      for (int d = 0; d < hd; ++d) dot += qv[d] * to_float(kr[d]);
      v = dot * scale;
    }
    p[j] = v;
    m = fmaxf(m, v);
  }
  m = block_reduce<true>(m, red);
  float z = 0.0f, seen = 0.0f;
  for (int j = threadIdx.x; j < n; j += blockDim.x)
    if (p[j] != -INFINITY) z += expf(p[j] - m), seen += 1.0f;
  z = block_reduce<false>(z, red);
  seen = block_reduce<false>(seen, red);
  for (int j = threadIdx.x; j < n; j += blockDim.x) p[j] = p[j] == -INFINITY ? -1.0f : expf(p[j] - m) / z;
  __syncthreads();
  return static_cast<int>(seen);
}

template <class Policy, class T>
__device__ inline int row_probs(const attention::LayerMask<Policy>& mask, int h, const T* qrow, int qpos, const T* k,
                                long long kvd, int g, int hd, const int* kpos, int n, float* qv, float* p, float* red) {
  const auto key = [&](int j) { return KeyRow<T>{k + j * kvd + static_cast<long long>(g) * hd, kpos[j]}; };
  return row_probs_by(mask, h, qrow, qpos, hd, key, n, qv, p, red);
}

/// x[r] = row codes[r] of the token embedding (code >= 0) or register -code-1 (code < 0), widened to fp32.
template <class T>
__global__ void embed(const int* codes, const T* emb, const T* reg, int rows, int dim, float* x) {
  const long long n = static_cast<long long>(rows) * dim;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = t / dim, d = t % dim;
    const int code = codes[r];
    x[t] = to_float(code >= 0 ? emb[code * static_cast<long long>(dim) + d] : reg[(-code - 1) * static_cast<long long>(dim) + d]);
  }
}

/// dst[i] = src[idx[i]] for rows of `dim` elements.
template <class T>
__global__ void gather_rows(const T* src, const int* idx, int rows, int dim, T* dst) {
  const long long n = static_cast<long long>(rows) * dim;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = t / dim, d = t % dim;
    dst[t] = src[idx[r] * static_cast<long long>(dim) + d];
  }
}

/// out[r] = x[r] / sqrt(mean(x[r]^2) + eps) * g, one block per row (scale then gain, as the CPU backend).
template <class T>
__global__ void rmsnorm(const float* x, const float* g, float eps, int dim, T* out) {
  __shared__ float red[32];
  pdl_trigger();  // the GEMM after this kernel may start streaming its weights (bulk_gemm)
  pdl_wait();
  const float* xr = x + static_cast<long long>(blockIdx.x) * dim;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_reduce<false>(ss, red);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  T* o = out + static_cast<long long>(blockIdx.x) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = from_float<T>(xr[i] * inv * g[i]);
}

/// rmsnorm with 16-byte loads and the row held in registers (one read of x): dim % 4 == 0 and dim <= 4 * kNormVec *
/// blockDim. The same arithmetic per element as rmsnorm (sum of squares in a different order only).
constexpr int kNormVec = 8;  // float4 per thread

template <class T>
__global__ void rmsnorm_vec4(const float* x, const float* g, float eps, int dim, T* out) {
  __shared__ float red[32];
  pdl_trigger();  // the GEMM after this kernel may start streaming its weights (bulk_gemm)
  pdl_wait();
  const int n4 = dim / 4;
  const float4* xr = reinterpret_cast<const float4*>(x + static_cast<long long>(blockIdx.x) * dim);
  const float4* g4 = reinterpret_cast<const float4*>(g);
  float4 v[kNormVec], gv[kNormVec];  // the gains are read with x, not after the reduction (one wait, not two)
  float ss = 0.0f;
#pragma unroll
  for (int j = 0; j < kNormVec; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    v[j] = i < n4 ? xr[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    gv[j] = i < n4 ? g4[i] : make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    ss += v[j].x * v[j].x + v[j].y * v[j].y + v[j].z * v[j].z + v[j].w * v[j].w;
  }
  ss = block_reduce<false>(ss, red);
  const float inv = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  T* o = out + static_cast<long long>(blockIdx.x) * dim;
#pragma unroll
  for (int j = 0; j < kNormVec; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i >= n4) break;
    const float4 gg = gv[j];
    const T r[4] = {from_float<T>(v[j].x * inv * gg.x), from_float<T>(v[j].y * inv * gg.y),
                    from_float<T>(v[j].z * inv * gg.z), from_float<T>(v[j].w * inv * gg.w)};
    if constexpr (sizeof(T) == 2) {
      *reinterpret_cast<uint2*>(o + 4 * i) = *reinterpret_cast<const uint2*>(r);
    } else {
      *reinterpret_cast<float4*>(o + 4 * i) = *reinterpret_cast<const float4*>(r);
    }
  }
}

/// Threads per row of rmsnorm_vec4 for `dim`, or 0 when it does not take the shape.
inline int rmsnorm_vec4_threads(int dim) {
  if (dim % 4 != 0) return 0;
  const int t = std::max(32, (dim / 4 + kNormVec - 1) / kNormVec + 31) / 32 * 32;
  return t <= 1024 ? t : 0;
}

/// After the fused QKV GEMM (qkv [rows, qd + 2 kvd], in T): add biases, rotate q and k by each row's position,
/// store q into q_out [rows, qd] and k, v into KV slots. A row's slot is row_src[r] * max_new + gen_step when
/// row_src is given (decode: the row's generated block), else its segment's slot0 + its index in the segment
/// (prefill: the user's prefix block), where the key's position also goes to kpos_out.
/// One thread per (row, group of kQkvHeads heads, rotation pair i) computes the pair's angle once and rotates it in
/// each q / k head of its group (the transcendental functions were the kernel's cost when every head recomputed
/// them; groups keep enough threads for decode's few rows), then copies a share of v.
constexpr int kQkvHeads = 8;  // q / k heads one qkv_post thread rotates

/// cos / sin of rotation pair i of a head of size hd at position pos: float throughout, as the CPU backend
/// (inv_freq = 1 / theta^(2i/d), angle = pos * inv_freq).
__device__ inline void rope_cos_sin(float theta, int i, int hd, int pos, float& c, float& s) {
  const float inv_freq = 1.0f / powf(theta, static_cast<float>(2 * i) / static_cast<float>(hd));
  const float angle = static_cast<float>(pos) * inv_freq;
  c = cosf(angle);
  s = sinf(angle);
}

/// The KV slot of row r: its generated block's step gen_step (decode, row_src given), else its segment's slot0 + its
/// index in the segment (prefill: the user's prefix block).
__device__ inline long long kv_slot(int r, const int* row_seg, const Segment* segs, const int* row_src, int gen_step,
                                    int max_new) {
  if (row_src) return static_cast<long long>(row_src[r]) * max_new + gen_step;
  const Segment& sg = segs[row_seg[r]];
  return sg.slot0 + (r - sg.q_off);
}

template <class T>
__global__ void qkv_post(const T* qkv, const float* bias, const int* pos, const int* row_seg, const Segment* segs,
                         const int* row_src, int gen_step, int max_new, int rows, int nh, int nkv, int hd, float theta,
                         int interleaved, T* q_out, T* k_out, T* v_out, int* kpos_out) {
  const int half = hd / 2, qd = nh * hd, kvd = nkv * hd, width = qd + 2 * kvd;
  const int groups = (nh + nkv + kQkvHeads - 1) / kQkvHeads;
  const long long n = static_cast<long long>(rows) * groups * half;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(t / (static_cast<long long>(groups) * half));
    const int grp = static_cast<int>((t / half) % groups), i = static_cast<int>(t % half);
    const T* src = qkv + static_cast<long long>(r) * width;
    const long long slot = kv_slot(r, row_seg, segs, row_src, gen_step, max_new);
    float c, s;
    rope_cos_sin(theta, i, hd, pos[r], c, s);
    // Interleaved pairs (2i, 2i+1) for llama2.c; halves (i, i+d/2) for Hugging Face's rotate_half.
    const int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    const int head_end = min(nh + nkv, (grp + 1) * kQkvHeads);
    for (int head = grp * kQkvHeads; head < head_end; ++head) {
      const int base = head < nh ? head * hd : qd + (head - nh) * hd;
      float a = to_float(src[base + ia]), b = to_float(src[base + ib]);
      if (bias) {
        a += bias[base + ia];
        b += bias[base + ib];
      }
      T* dst = head < nh ? q_out + static_cast<long long>(r) * qd + head * hd : k_out + slot * kvd + (head - nh) * hd;
      dst[ia] = from_float<T>(a * c - b * s);
      dst[ib] = from_float<T>(a * s + b * c);
    }
    if (i == 0 && grp == 0 && kpos_out) kpos_out[slot] = pos[r];
    // v: this thread's elements i + half * (grp + groups * m) of the row's kvd values.
    for (int j = i + half * grp; j < kvd; j += half * groups) {
      const float v = to_float(src[qd + kvd + j]) + (bias ? bias[qd + kvd + j] : 0.0f);
      v_out[slot * kvd + j] = from_float<T>(v);
    }
  }
}

/// qkv_post with blocks per row: block (r, part) of a grid [rows, parts] computes row r's cos / sin of every
/// rotation pair into shared memory (the same float formula as qkv_post and the CPU backend), then moves its share
/// of the q / k heads in 16-byte pieces (8 pairs: 8 elements of each half for rotate_half, 4 adjacent pairs for
/// interleaved) and copies its share of v in 16-byte pieces. qkv_post_parts picks the parts so each thread has
/// about one piece, not a chain of dependent loads (4 for Llama-7B's 64 q / k heads of 128, more at a few rows).
/// 16-bit T; hd % 16 == 0 and hd <= 256.
template <class T>
__global__ void __launch_bounds__(128) qkv_post_row(const T* qkv, const float* bias, const int* pos, const int* row_seg, const Segment* segs,
                             const int* row_src, int gen_step, int max_new, int nh, int nkv, int hd, float theta,
                             int interleaved, T* q_out, T* k_out, T* v_out, int* kpos_out) {
  __shared__ float cs[128], sn[128];
  pdl_trigger();  // the attention kernel after this one may be placed now (it waits for this grid)
  pdl_wait();
  const int r = blockIdx.x, half = hd / 2, qd = nh * hd, kvd = nkv * hd, width = qd + 2 * kvd;
  const T* src = qkv + static_cast<long long>(r) * width;
  const long long slot = kv_slot(r, row_seg, segs, row_src, gen_step, max_new);
  const int p = pos[r];
  for (int i = threadIdx.x; i < half; i += blockDim.x) rope_cos_sin(theta, i, hd, p, cs[i], sn[i]);
  if (threadIdx.x == 0 && blockIdx.y == 0 && kpos_out) kpos_out[slot] = p;
  __syncthreads();
  auto load8 = [&](int col, float (&f)[8]) {
    const uint4 u = *reinterpret_cast<const uint4*>(src + col);
    const T* e = reinterpret_cast<const T*>(&u);
    for (int j = 0; j < 8; ++j) f[j] = to_float(e[j]) + (bias ? bias[col + j] : 0.0f);
  };
  auto store8 = [](T* dst, const float (&f)[8]) {
    uint4 u;
    T* e = reinterpret_cast<T*>(&u);
    for (int j = 0; j < 8; ++j) e[j] = from_float<T>(f[j]);
    *reinterpret_cast<uint4*>(dst) = u;
  };
  // This block's `heads` q / k heads from h0 (of nh + nkv; none for a trailing part) and 16-byte pieces [v0, v1) of v.
  const int per = (nh + nkv + gridDim.y - 1) / gridDim.y, vper = (kvd / 8 + gridDim.y - 1) / gridDim.y;
  const int h0 = blockIdx.y * per, heads = min(nh + nkv - h0, per);
  const int v0 = blockIdx.y * vper, v1 = min(kvd / 8, v0 + vper);
  // q / k head `head` of the row: its first column in qkv, and where its rotated values go.
  auto src_col = [&](int head) { return head < nh ? head * hd : qd + (head - nh) * hd; };
  auto dst_of = [&](int head) {
    return head < nh ? q_out + static_cast<long long>(r) * qd + head * hd : k_out + slot * kvd + (head - nh) * hd;
  };
  if (interleaved) {  // pairs (2i, 2i + 1): a piece of 8 holds pairs i0 .. i0 + 3
    const int pieces = hd / 8;
    for (int t = threadIdx.x; t < heads * pieces; t += blockDim.x) {
      const int head = h0 + t / pieces, c = (t % pieces) * 8;
      float a[8], o[8];
      load8(src_col(head) + c, a);
      for (int j = 0; j < 4; ++j) {
        const int i = c / 2 + j;
        o[2 * j] = a[2 * j] * cs[i] - a[2 * j + 1] * sn[i];
        o[2 * j + 1] = a[2 * j] * sn[i] + a[2 * j + 1] * cs[i];
      }
      store8(dst_of(head) + c, o);
    }
  } else {  // pairs (i, i + hd / 2): a piece of 8 from each half
    const int pieces = half / 8;
    for (int t = threadIdx.x; t < heads * pieces; t += blockDim.x) {
      const int head = h0 + t / pieces, c = (t % pieces) * 8, base = src_col(head);
      float a[8], b[8], oa[8], ob[8];
      load8(base + c, a);
      load8(base + half + c, b);
      for (int j = 0; j < 8; ++j) {
        oa[j] = a[j] * cs[c + j] - b[j] * sn[c + j];
        ob[j] = a[j] * sn[c + j] + b[j] * cs[c + j];
      }
      T* dst = dst_of(head);
      store8(dst + c, oa);
      store8(dst + half + c, ob);
    }
  }
  for (int c = (v0 + threadIdx.x) * 8; c < v1 * 8; c += blockDim.x * 8) {
    float v[8];
    load8(qd + kvd + c, v);
    store8(v_out + slot * kvd + c, v);
  }
}

/// Whether qkv_post_row takes the shape.
template <class T>
constexpr bool qkv_post_row_supported(int hd) {
  return sizeof(T) == 2 && hd % 16 == 0 && hd <= 256;
}

/// Blocks per row for qkv_post_row (128 threads each): enough that each thread moves about one 16-byte piece of the
/// q / k heads (so its loads are in flight together, not a chain: 4 parts for Llama-7B's 64 heads of 128), more at
/// a few rows so there are about two blocks per multiprocessor in all; at most one per q / k head.
inline int qkv_post_parts(int rows, int heads, int hd, int sms) {
  const int pieces = std::max(1, heads * (hd / 16) / 128);
  const int fill = (2 * sms + rows - 1) / std::max(rows, 1);
  return std::clamp(std::max(pieces, fill), 1, std::max(heads, 1));
}

/// a[r, i] = silu(gu[r, i]) * gu[r, H + i]: the gate and up halves of the fused w1|w3 GEMM.
template <class T>
__global__ void swiglu(const T* gu, int rows, int H, T* a) {
  const long long n = static_cast<long long>(rows) * H;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = t / H, i = t % H;
    const float g = to_float(gu[r * 2 * H + i]), u = to_float(gu[r * 2 * H + H + i]);
    a[t] = from_float<T>(g / (1.0f + expf(-g)) * u);
  }
}

/// swiglu for 16-bit T with H % 8 == 0: 8 elements per thread through 16-byte loads and stores.
template <class T>
__global__ void swiglu_vec8(const T* gu, int rows, int H, T* a) {
  pdl_trigger();  // the GEMM after this kernel may start streaming its weights (bulk_gemm)
  pdl_wait();
  const int h8 = H / 8;
  const long long n = static_cast<long long>(rows) * h8;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = t / h8, i = (t % h8) * 8;
    const uint4 gv = *reinterpret_cast<const uint4*>(gu + r * 2 * H + i);
    const uint4 uv = *reinterpret_cast<const uint4*>(gu + r * 2 * H + H + i);
    const T* g = reinterpret_cast<const T*>(&gv);
    const T* u = reinterpret_cast<const T*>(&uv);
    uint4 ov;
    T* o = reinterpret_cast<T*>(&ov);
#pragma unroll
    for (int j = 0; j < 8; ++j) {
      const float x = to_float(g[j]);
      o[j] = from_float<T>(x / (1.0f + expf(-x)) * to_float(u[j]));
    }
    *reinterpret_cast<uint4*>(a + r * H + i) = ov;
  }
}

/// Scores of each query row against its own generated keys: scores[.., S + j] = scale * q . k_gen[j].
/// One warp per (row, head, j); every segment has the same G (one decode step).
template <class T>
__global__ void gen_scores(const T* q, const T* gen_k, const int* row_src, const int* row_seg, const Segment* segs,
                           int rows, int nh, int nkv, int hd, int G, int max_new, float scale, float* scores) {
  const long long warps = static_cast<long long>(rows) * nh * G;
  const int lane = threadIdx.x & 31, qd = nh * hd, kvd = nkv * hd;
  for (long long w = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) >> 5; w < warps;
       w += (static_cast<long long>(gridDim.x) * blockDim.x) >> 5) {
    const int r = static_cast<int>(w / (static_cast<long long>(nh) * G)), h = static_cast<int>((w / G) % nh),
              j = static_cast<int>(w % G);
    const int kvh = h / (nh / nkv);
    const T* qv = q + static_cast<long long>(r) * qd + h * hd;
    const T* kv = gen_k + (static_cast<long long>(row_src[r]) * max_new + j) * kvd + kvh * hd;
    float acc = 0.0f;
    for (int d = lane; d < hd; d += 32) acc += to_float(qv[d]) * to_float(kv[d]);
    acc = warp_sum(acc);
    if (lane == 0) {
      const Segment& sg = segs[row_seg[r]];
      scores[sg.score_off + (static_cast<long long>(h) * sg.nq + (r - sg.q_off)) * sg.ld + sg.S + j] = acc * scale;
    }
  }
}

/// Softmax of one (row, head) score row over its S + G keys, masked by the layer's `mask` on positions; writes the
/// probabilities in T at the same offsets (in place when T is float). A row that sees no key gets all zeros
/// (attention output 0), as the CPU backend. Grid: (rows, heads).
template <class Policy, class T>
__global__ void softmax_rows(float* scores, T* probs, const int* pos, const int* row_seg, const Segment* segs,
                             const attention::LayerMask<Policy> mask) {
  __shared__ float red[32];
  const int r = blockIdx.x, h = blockIdx.y;
  const Segment sg = segs[row_seg[r]];
  const int len = sg.S + sg.G, qpos = pos[r];
  const long long off = sg.score_off + (static_cast<long long>(h) * sg.nq + (r - sg.q_off)) * sg.ld;
  float* s = scores + off;
  T* p = probs + off;
  auto visible = [&](int j) {
    const int kp = j < sg.S ? sg.kpos[j] : sg.gen_pos0 + (j - sg.S);
    return mask(h, qpos, kp);
  };
  float m = -INFINITY;
  for (int j = threadIdx.x; j < len; j += blockDim.x)
    if (visible(j)) m = fmaxf(m, s[j]);
  m = block_reduce<true>(m, red);
  if (m == -INFINITY) {  // uniform across the block: every thread got the same reduction
    for (int j = threadIdx.x; j < len; j += blockDim.x) p[j] = from_float<T>(0.0f);
    return;
  }
  float z = 0.0f;
  for (int j = threadIdx.x; j < len; j += blockDim.x)
    if (visible(j)) z += expf(s[j] - m);
  z = block_reduce<false>(z, red);
  for (int j = threadIdx.x; j < len; j += blockDim.x)
    p[j] = from_float<T>(visible(j) ? expf(s[j] - m) / z : 0.0f);
}

/// out[r, head h] (+)= sum_j p[.., S + j] * v_gen[j]: the generated keys' share of the attention output, added to
/// what the prefix GEMM wrote (or written alone when the segment has no prefix). One warp per (row, head).
template <class T>
__global__ void gen_pv(const T* probs, const T* gen_v, const int* row_src, const int* row_seg, const Segment* segs,
                       int rows, int nh, int nkv, int hd, int G, int max_new, T* out) {
  const long long warps = static_cast<long long>(rows) * nh;
  const int lane = threadIdx.x & 31, qd = nh * hd, kvd = nkv * hd;
  for (long long w = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) >> 5; w < warps;
       w += (static_cast<long long>(gridDim.x) * blockDim.x) >> 5) {
    const int r = static_cast<int>(w / nh), h = static_cast<int>(w % nh), kvh = h / (nh / nkv);
    const Segment& sg = segs[row_seg[r]];
    const T* p = probs + sg.score_off + (static_cast<long long>(h) * sg.nq + (r - sg.q_off)) * sg.ld + sg.S;
    const T* v = gen_v + static_cast<long long>(row_src[r]) * max_new * kvd + kvh * hd;
    T* o = out + static_cast<long long>(r) * qd + h * hd;
    for (int d = lane; d < hd; d += 32) {
      float acc = sg.S > 0 ? to_float(o[d]) : 0.0f;
      for (int j = 0; j < G; ++j) acc += to_float(p[j]) * to_float(v[static_cast<long long>(j) * kvd + d]);
      o[d] = from_float<T>(acc);
    }
  }
}

/// scratch [nbufs, rows, gen_len, width] = the first gen_len generated rows of row parent[i] of each buffer
/// (bufs[b]: [*, max_new, width]).
template <class E>
__global__ void gather_generated(E* const* bufs, int nbufs, const int* parent, int rows, int gen_len, int max_new,
                                 int width, E* scratch) {
  const long long per_row = static_cast<long long>(gen_len) * width, per_buf = rows * per_row, n = nbufs * per_buf;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long b = t / per_buf, rest = t % per_buf, i = rest / per_row;
    scratch[t] = bufs[b][static_cast<long long>(parent[i]) * max_new * width + rest % per_row];
  }
}

/// The inverse layout move: bufs[b] rows i, steps < gen_len from scratch [nbufs, rows, gen_len, width].
template <class E>
__global__ void scatter_generated(const E* scratch, E* const* bufs, int nbufs, int rows, int gen_len, int max_new,
                                  int width) {
  const long long per_row = static_cast<long long>(gen_len) * width, per_buf = rows * per_row, n = nbufs * per_buf;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long b = t / per_buf, rest = t % per_buf, i = rest / per_row;
    bufs[b][i * max_new * width + rest % per_row] = scratch[t];
  }
}

/// dst[i] = T(src[i]).
template <class T>
__global__ void convert(const float* src, long long n, T* dst) {
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x)
    dst[t] = from_float<T>(src[t]);
}

/// dst[i] = center + U(-bound, bound), from a counter-based hash of (seed, i): the same values for any grid.
template <class T>
__global__ void fill_uniform(T* dst, long long n, unsigned long long seed, float center, float bound) {
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    unsigned long long z = seed + 0x9E3779B97F4A7C15ull * static_cast<unsigned long long>(t + 1);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    const float u = static_cast<float>(z >> 40) * (1.0f / 16777216.0f);
    dst[t] = from_float<T>(center + (2.0f * u - 1.0f) * bound);
  }
}

}  // namespace kernel
}  // namespace earn::cuda
