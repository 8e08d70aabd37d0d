// earn/backend/cuda/decode_attention.cuh - fused decode attention for bf16 / fp16 (flash-decoding): the beams of a
// user read its prompt K/V once per step, through tensor cores, with no score matrix in device memory.
//
// Pass 1: flash_attention in partial mode (flash_attention.cuh): one block per (key chunk of a user's prefix,
// head, user segment) takes all of the segment's query rows (the user's beams), masks by Policy::visible and
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

/// Pass 2, see the file comment. One warp per (row, head); G generated keys per row (each row's own block); chunk
/// c of a segment covers its prefix keys [c chunk_keys, (c + 1) chunk_keys). chunks = 0 (direct): there was no
/// first pass; the warp scores the segment's prefix keys itself (at most kDecDirectKeys of them: EARN's
/// register-only late layers; a longer prefix writes NaN, so a wrong split cannot pass unseen).
template <class Policy, class T>
__global__ void decode_combine(const T* q, const T* gen_k, const T* gen_v, const int* row_src, const int* row_seg,
                               const Segment* segs, const int* pos, int rows, int nh, int nkv, int hd, int G,
                               int max_new, float scale, int chunks, int chunk_keys, const float* ws_o, const float* ws_ml, T* out) {
  pdl_trigger();  // the output projection after this kernel may start streaming its weights (bulk_gemm)
  pdl_wait();     // the flash pass's partials and the step's generated keys come from the kernels before
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
    T* dst = out + static_cast<long long>(r) * qd + h * hd;
    const bool direct = chunks == 0;
    if (direct && sg.S > kDecDirectKeys) {
      for (int d = lane; d < hd; d += 32) dst[d] = from_float<T>(NAN);
      continue;
    }
    // The largest logit over the chunks (or the prefix keys) and the generated keys.
    float M = -INFINITY;
    const int nchunks = direct ? 0 : min(chunks, (sg.S + chunk_keys - 1) / chunk_keys);
    for (int c = 0; c < nchunks; ++c)
      if (ml[2 * c + 1] > 0.0f) M = fmaxf(M, ml[2 * c]);
    const T* pk = direct ? static_cast<const T*>(sg.pk) + kvh * hd : nullptr;
    const T* pv = direct ? static_cast<const T*>(sg.pv) + kvh * hd : nullptr;
    float ps[kDecDirectKeys];
#pragma unroll
    for (int i = 0; i < kDecDirectKeys; ++i) {
      ps[i] = -INFINITY;
      if (direct && i < sg.S) {  // the same for the whole warp (one row)
        float acc = 0.0f;
        for (int d = lane; d < hd; d += 32) acc += to_float(qv[d]) * to_float(pk[static_cast<long long>(i) * kvd + d]);
        acc = warp_sum(acc) * scale;
        if (Policy::visible(qpos, sg.kpos[i])) ps[i] = acc;
        M = fmaxf(M, ps[i]);
      }
    }
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
      auto add_key = [&](float logit, const T* vrow) {  // one key of logit > -inf, value row vrow
        const float f = __expf(logit - M);
        L += f;
        for (int e = 0; e < kPer; ++e)
          if (lane + 32 * e < hd) o[e] += f * to_float(vrow[lane + 32 * e]);
      };
#pragma unroll
      for (int i = 0; i < kDecDirectKeys; ++i)
        if (ps[i] != -INFINITY) add_key(ps[i], pv + static_cast<long long>(i) * kvd);
      for (int j = 0; j < G; ++j)
        if (gs[j] != -INFINITY) add_key(gs[j], gv + static_cast<long long>(j) * kvd);
    }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;  // a row that sees no key gets 0, as the CPU backend
    for (int i = 0; i < kPer; ++i)
      if (lane + 32 * i < hd) dst[lane + 32 * i] = from_float<T>(o[i] * inv);
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
/// layers: 2 keys a user), flash_split's chunks above.
inline FlashSplit decode_split(int max_prefix, int heads, int segments, int sms) {
  if (max_prefix <= kernel::kDecDirectKeys) return {0, 0};
  return flash_split(max_prefix, heads, segments, sms);
}

/// Fused decode attention over `nseg` segments (each with pk / pv / kpos set) into out [rows, nh * hd]; the
/// prefixes are split as `split` says (decode_split or flash_split; chunks = 0 only when no prefix has more than
/// kernel::kDecDirectKeys keys); ws holds decode_workspace(rows, nh, hd, split.chunks) floats.
/// pdl: both passes launched as programmatic dependents (each waits for the kernel before it on the device).
template <class Policy, class T>
void decode_attention(cudaStream_t s, const T* q, const T* gen_k, const T* gen_v, const int* row_src,
                      const int* row_seg, const Segment* segs, int nseg, int max_nq, const int* pos, int rows, int nh,
                      int nkv, int hd, int G, int max_new, FlashSplit split, float* ws, T* out, bool pdl = false) {
  if (!decode_fused_supported<T>(hd, max_new))
    throw ConfigError("decode_attention: head size " + std::to_string(hd) + " / " + std::to_string(max_new) +
                      " new tokens not taken by the fused kernels");
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
  if (split.chunks > 0) flash_attention<Policy, true>(s, fa);
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  launch(pdl, kernel::decode_combine<Policy, T>, kernel::grid_for(Index{rows} * nh * 32), kernel::kThreads, 0, s, q,
         gen_k, gen_v, row_src, row_seg, segs, pos, rows, nh, nkv, hd, G, max_new, scale, split.chunks,
         split.chunk_keys, static_cast<const float*>(fa.ws_o), static_cast<const float*>(fa.ws_ml), out);
}

}  // namespace earn::cuda
