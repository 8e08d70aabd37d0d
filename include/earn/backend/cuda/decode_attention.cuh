// earn/backend/cuda/decode_attention.cuh - fused decode attention for bf16 / fp16 (flash-decoding): the beams of a
// user read its prompt K/V once per step, through tensor cores, with no score matrix in device memory.
//
// Pass 1: flash_attention in partial mode (flash_attention.cuh): one block per (key chunk of a user's prefix,
// head, user segment) takes all of the segment's query rows (the user's beams), masks by the layer's mask and
// writes per (row, head, chunk) the unnormalised output and (max, sum) to a float workspace. Pass 2
// (decode_combine): one warp per (row, head) scores the row's own generated keys, merges them with every chunk by
// the usual rescaling (out = sum_i e^{m_i - M} O_i / sum_i e^{m_i - M} l_i) and writes the attention output in T.
// Prefixes of at most 16 keys (EARN's late layers: the registers) skip pass 1: the combine pass scores them too.
// Measured against the cuBLAS path (attention.cuh) by bench/cuda/bench_cuda_attention.cu.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/flash_attention.cuh"
#include "earn/backend/cuda/kernels.cuh"
#include "earn/core/tensor.hpp"

namespace earn::cuda {

namespace kernel {

constexpr int kDecMaxHd = 128;  // largest head size of the combine pass (4 output elements per lane)
constexpr int kDecDirectKeys = 16;  // prefixes the combine pass scores itself (chunks = 0: no flash pass)

/// E 16-bit elements of one lane as a single load / store (E = 1, 2, 4: 2, 4, 8 bytes).
template <int E>
struct LaneVec;
template <>
struct LaneVec<1> {
  using type = unsigned short;
};
template <>
struct LaneVec<2> {
  using type = unsigned;
};
template <>
struct LaneVec<4> {
  using type = uint2;
};

/// Pass 2, see the file comment. One warp per (row, head); lane l holds elements [l E, l E + E) of the head (E =
/// HD / 32, one lane per element for HD = 16 with half the lanes idle). G generated keys per row (each row's own
/// block); chunk c of a segment covers its prefix keys [c chunk_keys, (c + 1) chunk_keys). chunks = 0 (direct,
/// kP > 0): there was no first pass; the warp scores the segment's prefix keys itself (at most kP <=
/// kDecDirectKeys of them: EARN's register-only late layers; a longer prefix writes NaN, so a wrong split cannot
/// pass unseen). kP = 0: the chunked form (the registers for direct keys are not allocated). kGen: the most
/// generated keys a row has (4 or 8, from max_new; fewer registers for 4 keep more warps resident at many rows).
/// Every key's K and V row and every chunk's (max, sum) are requested before the first is used (fixed-size
/// unrolled loops, uniform predicates) and the key scores are reduced across the warp together: a decode step's
/// warp waits for memory about once instead of once per key, which is what bounds this pass at a few rows.
template <class Policy, class T, int HD, int kP, int kGen>
__global__ void __launch_bounds__(256) decode_combine(const T* q, const T* gen_k, const T* gen_v, const int* row_src,
                                                      const int* row_seg, const Segment* segs, const int* pos,
                                                      int rows, int nh, int nkv, int G, int max_new, float scale,
                                                      int chunks, int chunk_keys, const float* ws_o,
                                                      const float* ws_ml, T* out,
                                                      const attention::LayerMask<Policy> mask) {
  static_assert(sizeof(T) == 2 && (HD == 16 || HD == 32 || HD == 64 || HD == 128), "16-bit T, HD in 16..128");
  static_assert(kP >= 0 && kP <= kDecDirectKeys);
  static_assert(kGen == 4 || kGen == 8, "generated keys per row: G <= max_new <= kGen (chosen by the launch)");
  constexpr int E = HD >= 32 ? HD / 32 : 1;  // elements per lane
  constexpr int kPn = kP > 0 ? kP : 1;  // array sizes (kP = 0: unused)
  using V = typename LaneVec<E>::type;
  pdl_trigger();  // the output projection after this kernel may start streaming its weights (bulk_gemm)
  pdl_wait();     // the flash pass's partials and the step's generated keys come from the kernels before
  const long long warps = static_cast<long long>(rows) * nh;
  const int lane = threadIdx.x & 31, qd = nh * HD, kvd = nkv * HD, e0 = lane * E;
  const bool active = e0 < HD;
  auto load = [&](const T* row) -> V { return active ? *reinterpret_cast<const V*>(row + e0) : V{}; };
  auto dot = [&](V a, V b) {
    const T* x = reinterpret_cast<const T*>(&a);
    const T* y = reinterpret_cast<const T*>(&b);
    float acc = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) acc += to_float(x[e]) * to_float(y[e]);
    return acc;
  };
  for (long long w = (blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x) >> 5; w < warps;
       w += (static_cast<long long>(gridDim.x) * blockDim.x) >> 5) {
    const int r = static_cast<int>(w / nh), h = static_cast<int>(w % nh), kvh = h / (nh / nkv);
    const Segment& sg = segs[row_seg[r]];
    const int qpos = pos[r], S = sg.S;
    T* dst = out + static_cast<long long>(r) * qd + h * HD;
    constexpr bool direct = kP > 0;  // the launch takes kP = 0 exactly when chunks > 0
    if (direct && S > kP) {
      if (active)
        for (int e = 0; e < E; ++e) dst[e0 + e] = from_float<T>(NAN);
      continue;
    }
    const int np = direct ? S : 0;  // prefix keys scored here
    const int nchunks = direct ? 0 : min(chunks, (S + chunk_keys - 1) / chunk_keys);
    const long long gen0 = static_cast<long long>(row_src[r]) * max_new * kvd + kvh * HD;
    const T* pk = direct ? static_cast<const T*>(sg.pk) + kvh * HD : nullptr;
    const T* pv = direct ? static_cast<const T*>(sg.pv) + kvh * HD : nullptr;
    // Every load of the row's keys at once: q, the prefix (direct) and generated K and V rows, the key positions.
    const V qv = load(q + static_cast<long long>(r) * qd + h * HD);
    V kp[kPn], vp[kPn], kg[kGen], vg[kGen];
#pragma unroll
    for (int i = 0; i < kP; ++i)
      if (i < np) {
        kp[i] = load(pk + static_cast<long long>(i) * kvd);
        vp[i] = load(pv + static_cast<long long>(i) * kvd);
      }
#pragma unroll
    for (int j = 0; j < kGen; ++j)
      if (j < G) {
        kg[j] = load(gen_k + gen0 + static_cast<long long>(j) * kvd);
        vg[j] = load(gen_v + gen0 + static_cast<long long>(j) * kvd);
      }
    const int my_kpos = lane < np ? sg.kpos[lane] : 0;
    float ps[kPn], gs[kGen];
#pragma unroll
    for (int i = 0; i < kP; ++i) ps[i] = i < np ? dot(qv, kp[i]) : 0.0f;
#pragma unroll
    for (int j = 0; j < kGen; ++j) gs[j] = j < G ? dot(qv, kg[j]) : 0.0f;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {  // all the keys' warp sums side by side
#pragma unroll
      for (int i = 0; i < kP; ++i)
        if (i < np) ps[i] += __shfl_xor_sync(0xffffffffu, ps[i], o);
#pragma unroll
      for (int j = 0; j < kGen; ++j)
        if (j < G) gs[j] += __shfl_xor_sync(0xffffffffu, gs[j], o);
    }
    float M = -INFINITY;
#pragma unroll
    for (int i = 0; i < kP; ++i) {
      const int kp_i = __shfl_sync(0xffffffffu, my_kpos, i);
      ps[i] = i < np && mask(h, qpos, kp_i) ? ps[i] * scale : -INFINITY;
      M = fmaxf(M, ps[i]);
    }
#pragma unroll
    for (int j = 0; j < kGen; ++j) {
      gs[j] = j < G && mask(h, qpos, sg.gen_pos0 + j) ? gs[j] * scale : -INFINITY;
      M = fmaxf(M, gs[j]);
    }
    // The chunks' (max, sum): lane c holds chunk c of each group of 32 (a chunk with no visible key has sum 0
    // and its output was never written).
    const float* ml = ws_ml + (static_cast<long long>(r) * nh + h) * chunks * 2;
    for (int c0 = 0; c0 < nchunks; c0 += 32) {
      const int c = c0 + lane;
      const float m = c < nchunks && ml[2 * c + 1] > 0.0f ? ml[2 * c] : -INFINITY;
      M = fmaxf(M, warp_max(m));
    }
    float o[E], L = 0.0f;
#pragma unroll
    for (int e = 0; e < E; ++e) o[e] = 0.0f;
    if (M != -INFINITY) {
      auto add_key = [&](float logit, V vrow) {  // one key of logit > -inf, value vrow
        const float f = __expf(logit - M);
        const T* v = reinterpret_cast<const T*>(&vrow);
        L += f;
#pragma unroll
        for (int e = 0; e < E; ++e) o[e] += f * to_float(v[e]);
      };
#pragma unroll
      for (int i = 0; i < kP; ++i)
        if (ps[i] != -INFINITY) add_key(ps[i], vp[i]);
#pragma unroll
      for (int j = 0; j < kGen; ++j)
        if (gs[j] != -INFINITY) add_key(gs[j], vg[j]);
      const float* wo = ws_o + (static_cast<long long>(r) * nh + h) * chunks * HD + e0;
#pragma unroll 4
      for (int c = 0; c < nchunks; ++c) {
        const float l = ml[2 * c + 1];
        if (!(l > 0.0f)) continue;
        const float f = __expf(ml[2 * c] - M);
        L += f * l;
        if (active)
#pragma unroll
          for (int e = 0; e < E; ++e) o[e] += f * wo[static_cast<long long>(c) * HD + e];
      }
    }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;  // a row that sees no key gets 0, as the CPU backend
    if (active) {
      V res;
      T* rv = reinterpret_cast<T*>(&res);
#pragma unroll
      for (int e = 0; e < E; ++e) rv[e] = from_float<T>(o[e] * inv);
      *reinterpret_cast<V*>(dst + e0) = res;
    }
  }
}

}  // namespace kernel

/// Whether decode_attention takes this shape: what flash_attention takes, at most 8 generated keys per row.
template <class T>
constexpr bool decode_fused_supported(int hd, int max_new) {
  return flash_supported<T>(hd) && hd <= kernel::kDecMaxHd && max_new <= 8;
}

/// Workspace floats decode_attention needs for `rows` rows.
inline std::size_t decode_workspace(int rows, int nh, int hd, int chunks) {
  return std::size_t(rows) * nh * chunks * (hd + 2);
}

/// The split decode_attention uses for prefixes of at most max_prefix keys: none (chunks = 0: the combine pass
/// scores the keys itself, one launch instead of two) up to kDecDirectKeys keys (EARN's register-only late
/// layers: 2 keys a user), flash_split's chunks above. With chunks = 0, chunk_keys is the most prefix keys the
/// combine pass takes (4 or kDecDirectKeys; a form with fewer registers for <= 4), a longer prefix gets NaN.
inline FlashSplit decode_split(int max_prefix, int heads, int segments, int sms) {
  if (max_prefix <= 4) return {0, 4};
  if (max_prefix <= kernel::kDecDirectKeys) return {0, kernel::kDecDirectKeys};
  return flash_split(max_prefix, heads, segments, sms);
}

/// Fused decode attention over `nseg` segments (each with pk / pv / kpos set) into out [rows, nh * hd]; the
/// prefixes are split as `split` says (decode_split or flash_split; chunks = 0 only when no prefix has more than
/// kernel::kDecDirectKeys keys); ws holds decode_workspace(rows, nh, hd, split.chunks) floats.
/// pdl: both passes launched as programmatic dependents (each waits for the kernel before it on the device).
template <class Policy, class T>
void decode_attention(cudaStream_t s, const T* q, const T* gen_k, const T* gen_v, const int* row_src,
                      const int* row_seg, const Segment* segs, int nseg, int max_nq, const int* pos, int rows, int nh,
                      int nkv, int hd, int G, int max_new, FlashSplit split, float* ws, T* out, bool pdl = false,
                      const attention::LayerMask<Policy>& mask = {}) {
  if (!decode_fused_supported<T>(hd, max_new))
    throw ConfigError("decode_attention: head size " + std::to_string(hd) + " / " + std::to_string(max_new) +
                      " new tokens not taken by the fused kernels");
  if (G < 0 || G > max_new)  // the combine pass holds at most max_new generated keys a row in registers
    throw ConfigError("decode_attention: " + std::to_string(G) + " generated keys a row, the cache holds " +
                      std::to_string(max_new));
  FlashArgs<T> fa;
  fa.q = q;
  fa.segs = segs;
  fa.nseg = nseg;
  fa.pos = pos;
  fa.ws_o = ws;
  fa.ws_ml = ws + std::size_t(rows) * nh * split.chunks * hd;
  fa.nh = nh;
  fa.nkv = nkv;
  fa.hd = hd;
  fa.max_nq = max_nq;
  fa.chunks = split.chunks;
  fa.chunk_keys = split.chunk_keys;
  fa.pdl = pdl;
  if (split.chunks > 0) flash_attention<Policy, true>(s, fa, mask);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  auto combine = [&](auto kern) {
    launch(pdl, kern, kernel::grid_for(Index{rows} * nh * 32), kernel::kThreads, 0, s, q, gen_k, gen_v, row_src,
           row_seg, segs, pos, rows, nh, nkv, G, max_new, scale, split.chunks, split.chunk_keys,
           static_cast<const float*>(fa.ws_o), static_cast<const float*>(fa.ws_ml), out, mask);
  };
  // (kP, kGen): chunked with <= 4 or 8 generated keys; direct over <= 4 prefix keys (EARN's 1 + 1 registers)
  // and <= 4 generated keys; anything else direct: <= 16 and 8.
  const bool few_new = max_new <= 4;
  auto by_keys = [&]<int HD>() {
    if (split.chunks > 0) {
      if (few_new) combine(kernel::decode_combine<Policy, T, HD, 0, 4>);
      else combine(kernel::decode_combine<Policy, T, HD, 0, 8>);
    } else if (few_new && split.chunk_keys > 0 && split.chunk_keys <= 4) {
      combine(kernel::decode_combine<Policy, T, HD, 4, 4>);
    } else {
      combine(kernel::decode_combine<Policy, T, HD, kernel::kDecDirectKeys, 8>);
    }
  };
  if constexpr (sizeof(T) == 2) {  // decode_fused_supported: 16-bit T only
    switch (hd) {                  // flash_supported: 16, 32, 64 or 128
      case 16: by_keys.template operator()<16>(); break;
      case 32: by_keys.template operator()<32>(); break;
      case 64: by_keys.template operator()<64>(); break;
      default: by_keys.template operator()<128>(); break;
    }
  }
}

}  // namespace earn::cuda
