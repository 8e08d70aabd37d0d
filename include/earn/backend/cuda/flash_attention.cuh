// earn/backend/cuda/flash_attention.cuh - tensor-core flash attention (FlashAttention-2 style) for bf16 / fp16
// storage, over the per-user segments every attention call of the CUDA backend is made of.
//
// One block of 4 warps takes 64 query rows of one segment and one head (16 rows per warp) and walks the segment's
// prefix keys in tiles of 64: S = Q K^T on mma.sync m16n8k16 (fp32 accumulation, operands through ldmatrix),
// the layer's attention::LayerMask masks by position (and head), the online softmax keeps a running max and sum per
// row in registers, and O += P V reuses the score registers as the A operand. K and V tiles stream through shared memory by cp.async,
// double-buffered: the next visible tile's K and V load while this tile is multiplied. A tile no row of the block can
// see (the upper triangle of a causal prefill) is never loaded: visibility is asked of the policy per (query
// position, key position), so any policy works, and the block decides together (__syncthreads_or); a policy
// that promises causality (attention::is_causal) is answered from the block's smallest and largest query
// positions instead, by every warp on its own (no barrier, the same answer in each).
//
// Two outputs:
//   final    (prefill)  out = softmax(scale Q K^T) V in T, rows that see no key get 0 (as the CPU backend);
//   partial  (decode)   the keys are split into `chunks` ranges of `chunk_keys`; per (row, head, chunk) the
//                       unnormalised output and (max, sum) go to a float workspace in the layout decode_combine
//                       (decode_attention.cuh) merges with the rows' own generated keys.
// GQA: query head h reads KV head h / (nh / nkv). The fp32 backend keeps the cuBLAS path (attention.cuh), which
// is also the reference these kernels are tested against beside the CPU engine.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "earn/attention/policy.hpp"
#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"
#include "earn/backend/cuda/mma.cuh"

namespace earn::cuda {

/// Operands of one flash attention call (device pointers; segments with pk / pv / kpos set).
template <class T>
struct FlashArgs {
  const T* q = nullptr;          ///< [rows, nh * hd] rotated queries
  const Segment* segs = nullptr;  ///< nseg segments: q_off, nq, S, kpos, pk, pv
  int nseg = 0;
  const int* pos = nullptr;      ///< [rows] query positions
  T* out = nullptr;              ///< final mode: [rows, nh * hd]
  float* ws_o = nullptr;         ///< partial mode: [rows, nh, chunks, hd]
  float* ws_ml = nullptr;        ///< partial mode: [rows, nh, chunks, 2] (max in natural-log units, sum)
  int nh = 0, nkv = 0, hd = 0;
  int max_nq = 0;                ///< the largest segment's query rows
  int chunks = 1, chunk_keys = 0;  ///< partial mode: key ranges per (segment, head); chunk_keys % 64 == 0
  bool pdl = false;  ///< launch as a programmatic dependent of the kernel before (it waits for it before any read)
};

namespace kernel {

constexpr int kFlashM = 64;        // query rows per block
constexpr int kFlashN = 64;        // keys per tile
constexpr int kFlashThreads = 128;  // 4 warps, 16 query rows each
constexpr int kFlashPad = 8;       // row padding (elements): rows 16 bytes apart in banks, conflict-free ldmatrix

template <int HD>
constexpr int flash_ld() {
  return HD + kFlashPad;
}

template <class T, int HD>
constexpr std::size_t flash_smem() {
  // Q, two K and two V tiles (double-buffered), query positions
  return std::size_t(5) * kFlashM * flash_ld<HD>() * sizeof(T) + kFlashM * sizeof(int);
}

// `rows` rows of HD elements from src (row stride ld_src) into shared dst (row stride flash_ld<HD>), rows
// [n, rows) zero-filled so padded keys never put garbage (or NaN) under a zero probability.
template <class T, int HD>
__device__ inline void flash_load_tile(T* dst, const T* src, long long ld_src, int n) {
  constexpr int kVec = HD / 8;  // 16-byte pieces per row
  for (int i = threadIdx.x; i < kFlashM * kVec; i += kFlashThreads) {
    const int r = i / kVec, c = (i % kVec) * 8;
    const bool in = r < n;
    cp_async16(dst + r * flash_ld<HD>() + c, in ? src + r * ld_src + c : src, in ? 16 : 0);
  }
}

/// See the file comment. Grid (q_tiles * chunks, nh, nseg); kPartial selects the output.
template <class Policy, class T, int HD, bool kPartial>
__global__ void __launch_bounds__(kFlashThreads) flash_attention(const FlashArgs<T> a, float scale_log2,
                                                                  const attention::LayerMask<Policy> mask) {
  static_assert(HD % 16 == 0 && HD <= 128, "head size: a multiple of 16 up to 128");
  constexpr int LD = flash_ld<HD>(), KS = HD / 16, NT = kFlashN / 8, DT = HD / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* qs = reinterpret_cast<T*>(smem);
  auto kbuf = [&](int b) { return qs + (1 + b) * kFlashM * LD; };  // K tiles 0, 1, then V tiles 0, 1
  auto vbuf = [&](int b) { return qs + (3 + b) * kFlashM * LD; };
  int* qpos = reinterpret_cast<int*>(qs + 5 * kFlashM * LD);
  pdl_trigger();  // the kernel after this one (decode_combine) may be placed now; it waits for this grid
  pdl_wait();     // q (and in decode the segments) come from the kernels before

  const int q_tiles = (a.max_nq + kFlashM - 1) / kFlashM;
  const int qt = blockIdx.x % q_tiles, chunk = blockIdx.x / q_tiles, h = blockIdx.y;
  const Segment sg = a.segs[blockIdx.z];
  const int q0 = qt * kFlashM, qn = min(kFlashM, sg.nq - q0);
  if (qn <= 0) return;  // this segment has fewer query tiles
  const int kvh = h / (a.nh / a.nkv), qd = a.nh * HD, kvd = a.nkv * HD;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gid = lane / 4, tig = lane % 4;
  const int tiles = (sg.S + kFlashN - 1) / kFlashN;
  int t_begin = 0, t_end = tiles;
  if constexpr (kPartial) {
    const int per = a.chunk_keys / kFlashN;
    t_begin = min(tiles, chunk * per);
    t_end = min(tiles, t_begin + per);
  }
  const T* pk = static_cast<const T*>(sg.pk) + kvh * HD;
  const T* pv = static_cast<const T*>(sg.pv) + kvh * HD;

  for (int i = threadIdx.x; i < kFlashM; i += kFlashThreads) qpos[i] = i < qn ? a.pos[sg.q_off + q0 + i] : 0;
  flash_load_tile<T, HD>(qs, a.q + static_cast<long long>(sg.q_off + q0) * qd + h * HD, qd, qn);
  __syncthreads();  // qpos

  // A causal policy (attention::is_causal) needs only the block's smallest and largest query positions.
  constexpr bool kCausal = attention::is_causal<Policy>();
  int qmin = 0, qmax = 0;
  if constexpr (kCausal) {
    qmin = qpos[0];
    qmax = qpos[0];
    for (int r = 1; r < qn; ++r) qmin = min(qmin, qpos[r]), qmax = max(qmax, qpos[r]);
  }
  // Whether any (row, key) pair of tile t is visible / every pair of it is; the answer must be the same in every
  // warp. A causal policy: some row sees a key iff it is at or before the largest query position, all rows iff
  // at or before the smallest, so each warp checks the tile's 64 keys (2 a lane) itself and reaches the same
  // answer as the others without a barrier. Otherwise thread i checks key i % 64 against rows i / 64, i / 64 + 2,
  // ..., and the block votes.
  auto classify = [&](int t, bool& any, bool& all) {
    if constexpr (kCausal) {
      bool any_t = false, all_t = true;
      for (int j = threadIdx.x % 32; j < kFlashN; j += 32) {
        const int key = t * kFlashN + j;
        const int kp = key < sg.S ? sg.kpos[key] : 0;
        any_t |= key < sg.S && kp <= qmax;
        all_t &= key < sg.S && kp <= qmin;
      }
      any = __any_sync(0xffffffffu, any_t) != 0;
      all = __all_sync(0xffffffffu, all_t) != 0;
    } else {
      const int j = threadIdx.x % kFlashN, key = t * kFlashN + j;
      bool any_t = false, all_t = true;
      if (key < sg.S) {
        const int kp = sg.kpos[key];
        for (int r = threadIdx.x / kFlashN; r < qn; r += kFlashThreads / kFlashN) {
          const bool v = mask(h, qpos[r], kp);
          any_t |= v;
          all_t &= v;
        }
      } else {
        all_t = false;
      }
      any = __syncthreads_or(any_t) != 0;
      all = __syncthreads_and(all_t) != 0;
    }
  };
  auto next_visible = [&](int t, bool& all) {
    for (; t < t_end; ++t) {
      bool any;
      classify(t, any, all);
      if (any) break;
    }
    return t;
  };

  // Tile t's K and V into buffer b (cp.async; the caller commits).
  auto load_kv = [&](int tile, int b) {
    const int k0 = tile * kFlashN, kn = min(kFlashN, sg.S - k0);
    flash_load_tile<T, HD>(kbuf(b), pk + static_cast<long long>(k0) * kvd, kvd, kn);
    flash_load_tile<T, HD>(vbuf(b), pv + static_cast<long long>(k0) * kvd, kvd, kn);
  };
  bool full = false;
  int t = next_visible(t_begin, full);
  if (t < t_end) load_kv(t, 0);
  cp_async_commit();
  cp_async_wait_all();
  __syncthreads();

  // This warp's 16 query rows as A fragments, one per 16 columns of the head.
  std::uint32_t qf[KS][4];
  for (int s = 0; s < KS; ++s) ldmatrix_x4(qf[s], qs + (warp * 16 + lane % 16) * LD + s * 16 + (lane / 16) * 8);

  float o[DT][4];
  for (int d = 0; d < DT; ++d) o[d][0] = o[d][1] = o[d][2] = o[d][3] = 0.0f;
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};  // rows gid and gid + 8 of the warp
  const int r_lo = warp * 16 + gid, r_hi = r_lo + 8;           // rows within the block

  // The tiles are double-buffered: while tile t (buffer b) is multiplied, the next visible tile's K and V load
  // into the other buffer, a whole tile ahead.
  bool full1 = false;
  int t1 = t < t_end ? next_visible(t + 1, full1) : t_end;
  int buf = 0;
  while (t < t_end) {
    const int k0 = t * kFlashN, kn = min(kFlashN, sg.S - k0);
    if (t1 < t_end) load_kv(t1, buf ^ 1);  // its last readers (tile t - 1) passed the barrier at the loop's end
    cp_async_commit();
    const T* ks = kbuf(buf);
    const T* vs = vbuf(buf);

    float s[NT][4];
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
    for (int kk = 0; kk < KS; ++kk)
      for (int np = 0; np < NT / 2; ++np) {
        std::uint32_t b[4];
        ldmatrix_x4(b, ks + (np * 16 + lane % 8 + (lane / 16) * 8) * LD + kk * 16 + ((lane / 8) % 2) * 8);
        mma16816<T>(s[2 * np], qf[kk], b[0], b[1]);
        mma16816<T>(s[2 * np + 1], qf[kk], b[2], b[3]);
      }
    // Scale into log2 units, mask, and the online softmax of rows r_lo (elements 0, 1) and r_hi (2, 3).
    float mx[2] = {m[0], m[1]};
    for (int n = 0; n < NT; ++n)
      for (int e = 0; e < 4; ++e) {
        float v = s[n][e] * scale_log2;
        if (!full) {
          const int j = n * 8 + tig * 2 + (e & 1), r = e < 2 ? r_lo : r_hi;
          if (!(j < kn && r < qn && mask(h, qpos[r], sg.kpos[k0 + j]))) v = -INFINITY;
        }
        s[n][e] = v;
        mx[e / 2] = fmaxf(mx[e / 2], v);
      }
    for (int i = 0; i < 2; ++i) {
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 1));
      mx[i] = fmaxf(mx[i], __shfl_xor_sync(0xffffffffu, mx[i], 2));
      const float base = mx[i] == -INFINITY ? 0.0f : mx[i];  // a row with nothing visible yet stays at 0
      const float alpha = fast_exp2(m[i] - base);
      m[i] = mx[i];
      l[i] *= alpha;
      for (int d = 0; d < DT; ++d) o[d][2 * i] *= alpha, o[d][2 * i + 1] *= alpha;
      for (int n = 0; n < NT; ++n) {
        s[n][2 * i] = fast_exp2(s[n][2 * i] - base);
        s[n][2 * i + 1] = fast_exp2(s[n][2 * i + 1] - base);
        l[i] += s[n][2 * i] + s[n][2 * i + 1];
      }
    }

    for (int kk = 0; kk < NT / 2; ++kk) {  // 16 keys per step: the score registers of n-tiles 2kk, 2kk + 1
      const std::uint32_t p[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                  pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      for (int dp = 0; dp < DT / 2; ++dp) {
        std::uint32_t b[4];
        ldmatrix_x4_trans(b, vs + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * LD + dp * 16 + (lane / 16) * 8);
        mma16816<T>(o[2 * dp], p, b[0], b[1]);
        mma16816<T>(o[2 * dp + 1], p, b[2], b[3]);
      }
    }
    bool full2 = false;
    const int t2 = t1 < t_end ? next_visible(t1 + 1, full2) : t_end;
    cp_async_wait_all();
    __syncthreads();  // tile t1 is in; every warp is done with buffer `buf` (tile t)
    t = t1, full = full1, t1 = t2, full1 = full2, buf ^= 1;
  }
  cp_async_wait_all();

  for (int i = 0; i < 2; ++i) {  // the row sums: each of the 4 lanes of a row holds a quarter of the keys
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 1);
    l[i] += __shfl_xor_sync(0xffffffffu, l[i], 2);
  }
  for (int i = 0; i < 2; ++i) {
    const int r = i == 0 ? r_lo : r_hi;
    if (r >= qn) continue;
    const long long row = sg.q_off + q0 + r;
    if constexpr (kPartial) {
      const long long slot = (row * a.nh + h) * a.chunks + chunk;
      float* dst = a.ws_o + slot * HD;
      for (int d = 0; d < DT; ++d)
        *reinterpret_cast<float2*>(dst + d * 8 + tig * 2) = make_float2(o[d][2 * i], o[d][2 * i + 1]);
      if (tig == 0) {
        a.ws_ml[slot * 2] = l[i] > 0.0f ? m[i] * 0.69314718f : -INFINITY;  // log2 units -> natural
        a.ws_ml[slot * 2 + 1] = l[i];
      }
    } else {
      const float inv = l[i] > 0.0f ? 1.0f / l[i] : 0.0f;
      T* dst = a.out + row * qd + h * HD;
      for (int d = 0; d < DT; ++d)
        *reinterpret_cast<std::uint32_t*>(dst + d * 8 + tig * 2) = pack2<T>(o[d][2 * i] * inv, o[d][2 * i + 1] * inv);
    }
  }
}

template <class Policy, class T, int HD, bool kPartial>
void launch_flash(cudaStream_t s, const FlashArgs<T>& a, const attention::LayerMask<Policy>& mask) {
  constexpr std::size_t smem = flash_smem<T, HD>();
  auto* fn = flash_attention<Policy, T, HD, kPartial>;
  allow_dynamic_smem<flash_attention<Policy, T, HD, kPartial>>(smem);
  const int q_tiles = (a.max_nq + kFlashM - 1) / kFlashM;
  const float scale_log2 = 1.4426950408889634f / std::sqrt(static_cast<float>(a.hd));
  launch(a.pdl, fn, dim3(q_tiles * (kPartial ? a.chunks : 1), a.nh, a.nseg), kFlashThreads, smem, s, a, scale_log2,
         mask);
}

}  // namespace kernel

/// Whether the flash kernels take this shape: 16-bit storage and a head size of 16, 32, 64 or 128.
template <class T>
constexpr bool flash_supported(int hd) {
  return !std::is_same_v<T, float> && (hd == 16 || hd == 32 || hd == 64 || hd == 128);
}

/// Runs flash attention on `stream` under the layer's `mask`; kPartial: the split-key partials for decode_combine,
/// else the final output.
template <class Policy, bool kPartial, class T>
void flash_attention(cudaStream_t s, const FlashArgs<T>& a, const attention::LayerMask<Policy>& mask = {}) {
  if constexpr (std::is_same_v<T, float>) {
    throw ConfigError("flash attention: 16-bit storage only (fp32 takes the cuBLAS path)");
  } else {
    if (a.nseg == 0 || a.max_nq == 0) return;
    if (a.nkv <= 0 || a.nh % a.nkv != 0) throw ConfigError("flash attention: heads not a multiple of KV heads");
    if (kPartial && (a.chunk_keys <= 0 || a.chunk_keys % kernel::kFlashN != 0 || a.chunks <= 0))
      throw ConfigError("flash attention: chunk_keys must be a positive multiple of 64");
    switch (a.hd) {
      case 16: return kernel::launch_flash<Policy, T, 16, kPartial>(s, a, mask);
      case 32: return kernel::launch_flash<Policy, T, 32, kPartial>(s, a, mask);
      case 64: return kernel::launch_flash<Policy, T, 64, kPartial>(s, a, mask);
      case 128: return kernel::launch_flash<Policy, T, 128, kPartial>(s, a, mask);
      default: throw ConfigError("flash attention: head size " + std::to_string(a.hd) + " not in {16, 32, 64, 128}");
    }
  }
}

/// How a decode call splits each segment's prefix: `chunks` ranges of `chunk_keys` keys, enough blocks
/// (chunks x heads x segments) for `depth` blocks per multiprocessor of `sms`. Measured (H200, B = 32, P = 512,
/// bench_cuda_attention): depth 4 (one chunk there) 164 us, 8: 179 us, 16: 191 us, 32: 214 us per layer: more
/// chunks mean more partials to write and combine than the extra parallelism pays for.
struct FlashSplit {
  int chunks = 1, chunk_keys = kernel::kFlashN;
};
inline FlashSplit flash_split(int max_prefix, int heads, int segments, int sms, int depth = 4) {
  const int tiles = std::max(1, (max_prefix + kernel::kFlashN - 1) / kernel::kFlashN);
  const long long pairs = std::max(1LL, static_cast<long long>(heads) * segments);
  const long long target = static_cast<long long>(std::max(1, depth)) * sms;
  const int want = static_cast<int>(std::min<long long>(tiles, std::max(1LL, (target + pairs - 1) / pairs)));
  const int per = (tiles + want - 1) / want;
  return {(tiles + per - 1) / per, per * kernel::kFlashN};
}

}  // namespace earn::cuda
