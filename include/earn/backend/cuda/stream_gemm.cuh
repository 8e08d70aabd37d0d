// earn/backend/cuda/stream_gemm.cuh - y [rows, out] (+)= x [rows, in] w^T for few rows (1 <= rows <= 32) in bf16 /
// fp16 with fp32 accumulation: one decode step of a user's 20 beams, EARN's register-only late layers, the logits
// of a small prefill. At these shapes the product is a stream over the weights (20 rows: 20 FLOPs per weight byte)
// and its floor is the weight bytes over the memory bandwidth. On an H200 this kernel is level with cuBLAS (both
// ~2.8-3.3 TB/s against ~4.2; bench_cuda_gemm, bench/README.md), so the engine uses it only when asked
// (State::use_stream_gemm); cuda::linear (blas.cuh) stays the general path and the reference.
//
// The layout, chosen so the weights are read straight into tensor-core fragments with 16-byte loads:
// - w is the MMA's A operand (16 weight rows per m16n8k16 tile), x the B operand (8 x rows per n-tile, NT tiles).
//   The order of the k summation is free, so each lane loads 8 consecutive k of one weight row (16 bytes) and
//   the pairs of those 8 fill the k slots {2 tig, 2 tig + 1, 2 tig + 8, 2 tig + 9} of two consecutive MMAs; x is
//   read the same way (from shared memory), so both operands agree on which real k each slot holds.
// - A block of WARPS warps owns WARPS * 16 * R weight rows and one k range (split-K across blocks so every
//   multiprocessor streams: wo at Llama-7B has 4096 rows, 32 blocks of 128 before the split). Its x range is staged
//   in shared memory in double-buffered pieces of 512 k (zero past `rows` and past the range), the first while the
//   first weights are already in flight.
// - Each warp double-buffers U 32-k chunks of its 16 R rows in registers: loads of the next chunk group are issued
//   before the current one is multiplied.
// - The k splits of one row range are one thread-block cluster (at most 8 blocks, one per split): each block leaves
//   its fp32 partial sums in its shared memory and, after a cluster barrier, sums a share of the outputs over
//   the cluster's shared memories (DSMEM) in split order. No global workspace, no second kernel, and the result
//   does not depend on timing: runs and graph replays are bit-identical.
// - Or over a packed copy of the weights (StreamPackedWeights, StreamLayout): the same 16 bytes per lane, stored so
//   each 512 bytes a warp loads are contiguous. Chunk-major lifts the kernel 3-5 % in a chain of the decode shapes
//   (1.04x / 0.93x of cuBLAS at 2 / 20 rows without the L2 prefetch hint), short of the ~4.0 TB/s that any one
//   launch per product reaches on an H200 (bench/cuda/NOTES.md v33-v34); the engine does not use it.
// - Launched as a programmatic dependent (pdl), both register buffers of weights are requested before the wait.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/mma.cuh"
#include "earn/backend/cuda/split_k.cuh"

namespace earn::cuda {

/// Compile-time shape of the streaming kernel (bench_cuda_gemm compares a few; stream_gemm uses StreamGemmDefault).
template <int R_, int Warps_, int U_, bool Prefetch_ = true, int MinBlocks_ = 1>
struct StreamGemmConfig {
  static constexpr int R = R_;          // m16 tiles (16 weight rows each) per warp
  static constexpr int kWarps = Warps_;  // warps per block
  static constexpr int U = U_;          // 32-k chunks per register buffer (two buffers)
  static constexpr bool kPrefetch = Prefetch_;  // weight loads hint L2 to fetch 256 bytes (the row's next chunks)
  static constexpr int kRows = kWarps * 16 * R;  // weight rows per block
  static constexpr int kMinBlocks = MinBlocks_;  // __launch_bounds__: blocks per multiprocessor to fit registers for
};
// 8 warps of 16 rows, 4 chunks per buffer, registers capped for 2 blocks per multiprocessor (uncapped, the fp32
// output variants took 134 and fit one block: 0.78x cuBLAS instead of 0.99x at 20 rows; bench/cuda/NOTES.md).
using StreamGemmDefault = StreamGemmConfig<1, 8, 4, true, 2>;

inline constexpr int kStreamGemmMaxRows = 32;
inline constexpr int kStreamGemmMaxSplits = kMaxClusterSplits;

namespace kernel {

template <bool Prefetch>
__device__ inline uint4 ld_stream16(const void* p) {  // read once: keep it out of L1
  uint4 r;
  if constexpr (Prefetch)
    asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
  else
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
  return r;
}

}  // namespace kernel

/// How stream_gemm finds its weights. Row-major: w [out, in] as it is. The packed layouts cut the matrix into
/// pieces of 512 bytes, piece (tile, c, h) = rows 16 tile + 8 h .. + 8 at k 32 c .. + 32, stored as 32 lanes x 16
/// bytes with lane (gid, tig) holding row 16 tile + 8 h + gid, k 32 c + 8 tig .. + 8: the bytes a warp loads in
/// one instruction, contiguous. kTileMajor stores a tile's pieces together (each warp streams its own region);
/// kChunkMajor stores every tile's pieces of one 32-k chunk together (the warps of a grid, moving through k
/// side by side, read one compact window). Zeros past out and in (k rounded up to 32, rows to 16).
enum class StreamLayout { kRowMajor = 0, kTileMajor = 1, kChunkMajor = 2 };

namespace kernel {

__host__ __device__ constexpr int stream_packed_kp(int in) { return (in + 31) / 32 * 32; }

template <class T>
__global__ void pack_stream_weights(const T* __restrict__ w, T* __restrict__ packed, int out, int in, int layout) {
  const int kp = stream_packed_kp(in), tiles = (out + 15) / 16, chunks = kp / 32;
  const long long pieces = static_cast<long long>(tiles) * chunks * 64;  // 16-byte pieces
  for (long long p = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; p < pieces;
       p += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int lane = static_cast<int>(p % 32), h = static_cast<int>((p / 32) % 2);
    const long long q = p / 64;  // the 1 KB (tile, chunk) pair
    const int tile = layout == static_cast<int>(StreamLayout::kTileMajor) ? static_cast<int>(q / chunks)
                                                                           : static_cast<int>(q % tiles);
    const int c = layout == static_cast<int>(StreamLayout::kTileMajor) ? static_cast<int>(q % chunks)
                                                                        : static_cast<int>(q / tiles);
    const int n = 16 * tile + 8 * h + lane / 4, k = 32 * c + 8 * (lane % 4);
    uint4 v = make_uint4(0, 0, 0, 0);
    if (n < out && k < in) v = *reinterpret_cast<const uint4*>(w + static_cast<std::size_t>(n) * in + k);
    reinterpret_cast<uint4*>(packed)[p] = v;
  }
}

// x is staged in pieces of kXPiece k (two buffers: the next piece loads while this one is used); rows padded to
// 8 NT, row stride kXLd elements (= 32 mod 64: the 8 lanes of a 16-byte shared load phase, 2 rows x 4 pieces, fall
// in distinct bank groups).
inline constexpr int kXPiece = 512, kXLd = kXPiece + 32;

// layout: a StreamLayout (packed copies from pack_stream_weights: every 512 bytes a warp loads are contiguous).
template <class T, class TY, int NT, class Cfg>
__global__ void __launch_bounds__(Cfg::kWarps * 32, Cfg::kMinBlocks)
    stream_gemm(const T* __restrict__ x, const T* __restrict__ w, TY* __restrict__ y, int rows, int in, int out,
                int kchunk, float beta, int layout) {
  pdl_trigger();  // the next kernel may be placed now; it waits for this grid before it touches memory
  constexpr int R = Cfg::R, U = Cfg::U, BN = Cfg::kRows, XR = 8 * NT;
  static_assert(kXPiece % (64 * U) == 0, "a loop step must not straddle two x pieces");
  extern __shared__ __align__(16) unsigned char stream_smem[];
  T* xs = reinterpret_cast<T*>(stream_smem);  // [2][XR][kXLd]
  const int splits = gridDim.y, split = blockIdx.y;
  const int k0 = split * kchunk, k1 = min(in, k0 + kchunk);
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3, warp = threadIdx.x >> 5;
  const int n0 = blockIdx.x * BN + warp * 16 * R;

  // Row-major: lane (gid, tig) reads 16 bytes of weight row n at k + 8 tig. Packed: the same 16 bytes sit at
  // lane * 16 of the 512-byte piece (tile, k / 32, h); the element offset grows by kmul per k.
  const T* wp[R][2];
  const int tiles = (out + 15) >> 4;
  const std::size_t kmul = layout == static_cast<int>(StreamLayout::kRowMajor)    ? 1
                           : layout == static_cast<int>(StreamLayout::kTileMajor) ? 16
                                                                                  : std::size_t(16) * tiles;
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int tile = min((n0 >> 4) + i, tiles - 1);  // tiles past the end read the last, unused
      if (layout == static_cast<int>(StreamLayout::kTileMajor)) {
        wp[i][h] = w + static_cast<std::size_t>(tile) * stream_packed_kp(in) * 16 + h * 256 + lane * 8;
      } else if (layout == static_cast<int>(StreamLayout::kChunkMajor)) {
        wp[i][h] = w + static_cast<std::size_t>(tile) * 512 + h * 256 + lane * 8;
      } else {
        const int n = min(n0 + 16 * i + 8 * h + gid, out - 1);  // rows past the end read the last row, unused
        wp[i][h] = w + static_cast<std::size_t>(n) * in + 8 * tig;
      }
    }
  uint4 a[U][R][2], b[U][R][2];
  auto load = [&](uint4(&buf)[U][R][2], int kc) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool ok = kc + 32 * u + 8 * tig < k1;
#pragma unroll
      for (int i = 0; i < R; ++i)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          buf[u][i][h] = ok ? ld_stream16<Cfg::kPrefetch>(wp[i][h] + static_cast<std::size_t>(kc + 32 * u) * kmul)
                            : make_uint4(0, 0, 0, 0);
    }
  };
  // Both register buffers of weights in flight before the wait: they do not depend on earlier kernels (x and y
  // may). The loop below keeps the same order of loads and multiplies: a buffer is refilled right after its use.
  load(a, k0);
  load(b, k0 + 32 * U);
  pdl_wait();

  // x [XR, kb .. kb + kXPiece) -> buffer `buf`, asynchronously; zeros past `rows` and past k1.
  auto stage = [&](int buf, int kb) {
    constexpr int kPieces = kXPiece / 8;
    T* dst = xs + buf * XR * kXLd;
    for (int p = threadIdx.x; p < XR * kPieces; p += blockDim.x) {
      const int r = p / kPieces, kk = (p - r * kPieces) * 8;
      const bool ok = r < rows && kb + kk < k1;
      cp_async16(dst + r * kXLd + kk, ok ? x + static_cast<std::size_t>(r) * in + kb + kk : x, ok ? 16 : 0);
    }
    cp_async_commit();
  };
  stage(0, k0);  // while the first weights travel

  // Two accumulator sets (the lo and hi k halves of each 32-k chunk): two independent MMA chains per tile.
  float acc[R][NT][4], acc2[R][NT][4];
#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] = acc2[i][j][c] = 0.0f;
  auto multiply = [&](const uint4(&buf)[U][R][2], const T* xb, int kc) {  // xb: x at k = kc, row 0
#pragma unroll
    for (int u = 0; u < U; ++u) {
      if (kc + 32 * u >= k1) break;  // the same for the whole warp
      const T* xp = xb + gid * kXLd + 32 * u + 8 * tig;
#pragma unroll
      for (int j = 0; j < NT; ++j) {
        const uint4 bx = *reinterpret_cast<const uint4*>(xp + 8 * j * kXLd);
#pragma unroll
        for (int i = 0; i < R; ++i) {
          const std::uint32_t lo[4] = {buf[u][i][0].x, buf[u][i][1].x, buf[u][i][0].y, buf[u][i][1].y};
          const std::uint32_t hi[4] = {buf[u][i][0].z, buf[u][i][1].z, buf[u][i][0].w, buf[u][i][1].w};
          mma16816<T>(acc[i][j], lo, bx.x, bx.y);
          mma16816<T>(acc2[i][j], hi, bx.z, bx.w);
        }
      }
    }
  };
  for (int kb = k0, piece = 0; kb < k1; kb += kXPiece, ++piece) {
    const int buf = piece & 1;
    if (kb + kXPiece < k1) {
      stage(buf ^ 1, kb + kXPiece);  // its last readers passed the barrier at the end of the previous piece
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const T* xb = xs + buf * XR * kXLd;
    for (int kc = kb; kc < min(k1, kb + kXPiece); kc += 64 * U) {
      multiply(a, xb + (kc - kb), kc);
      load(a, kc + 64 * U);
      multiply(b, xb + (kc - kb) + 32 * U, kc + 32 * U);
      load(b, kc + 96 * U);
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < R; ++i)
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][j][c] += acc2[i][j][c];
  // acc[i][j]: c0, c1 = (weight row n0 + 16 i + gid, x rows 8 j + 2 tig, + 1); c2, c3 = weight row + 8.
  // f(value, x row, weight row within this warp's 16 R rows) for every accumulator.
  auto each_acc = [&](auto&& f) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int c = 0; c < 4; ++c) f(acc[i][j][c], 8 * j + 2 * tig + (c & 1), 16 * i + gid + 8 * (c >> 1));
  };
  if (splits == 1) {
    each_acc([&](float v, int xr, int nw) {
      if (xr < rows && n0 + nw < out) write_out(y, out, xr, n0 + nw, v, beta);
    });
    return;
  }
  // Partial sums [rows][BN] in this block's shared memory (over the x pieces: every warp is done with them).
  float* red = reinterpret_cast<float*>(stream_smem);
  const int nl0 = warp * 16 * R;
  each_acc([&](float v, int xr, int nw) {
    if (xr < rows) red[xr * BN + nl0 + nw] = v;
  });
  cluster_reduce_out(red, rows, BN, blockIdx.x * BN, y, out, beta);
}

}  // namespace kernel

/// How one product is split: row blocks x k splits (one cluster per row block), the k range of one block and
/// its shared memory.
struct StreamGemmPlan {
  int row_blocks = 0, splits = 1, kchunk = 0;
  std::size_t smem = 0;
};

/// True when stream_gemm takes this product: 16-bit storage, 1 <= rows <= 32, in a multiple of 8 and both
/// operands 16-byte aligned (every 16-byte piece of a row is then whole).
template <class T>
bool stream_gemm_supported(const T* x, const T* w, int rows, int in) {
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return sizeof(T) == 2 && rows >= 1 && rows <= kStreamGemmMaxRows && in >= 8 && in % 8 == 0 && aligned(x) &&
         aligned(w);
}

namespace detail {

inline constexpr std::size_t stream_gemm_smem(int nt, int block_rows, std::size_t elem) {
  return std::max(std::size_t(2) * 8 * nt * kernel::kXLd * elem, std::size_t(8) * nt * block_rows * sizeof(float));
}

// One wave with as many blocks as fit: the most k splits (at most 8, never a k range under 256) whose blocks are
// all resident at once; one split when the row blocks alone fill the device.
template <class T, class TY, int NT, class Cfg>
StreamGemmPlan plan_stream_gemm(int in, int out, int sms, int force_splits) {
  StreamGemmPlan p;
  p.row_blocks = (out + Cfg::kRows - 1) / Cfg::kRows;
  p.smem = stream_gemm_smem(NT, Cfg::kRows, sizeof(T));
  const auto fn = kernel::stream_gemm<T, TY, NT, Cfg>;
  if (p.smem > 48 * 1024) allow_dynamic_smem<kernel::stream_gemm<T, TY, NT, Cfg>>(p.smem);
  int occ = 0;
  EARN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, Cfg::kWarps * 32, p.smem));
  const long long slots = static_cast<long long>(std::max(occ, 1)) * sms;
  const int want = choose_splits(p.row_blocks, slots, std::clamp(in / 256, 1, kStreamGemmMaxSplits), force_splits);
  p.kchunk = ((in + want - 1) / want + 31) / 32 * 32;
  p.splits = (in + p.kchunk - 1) / p.kchunk;  // the 32-k rounding may leave fewer non-empty splits
  return p;
}

}  // namespace detail

/// The plan stream_gemm uses for this shape on the current device (`sms` multiprocessors). force_splits > 0
/// (tests, benchmarks): that many k splits (at most 8 and in / 256; rounding k ranges to 32 may leave fewer).
template <class T, class TY, class Cfg = StreamGemmDefault>
StreamGemmPlan stream_gemm_plan(int rows, int in, int out, int sms, int force_splits = 0) {
  return detail::with_n_tiles(rows, [&]<int NT>(std::integral_constant<int, NT>) {
    return detail::plan_stream_gemm<T, TY, NT, Cfg>(in, out, sms, force_splits);
  });
}

namespace detail {
template <class T, class TY, class Cfg>
void launch_stream_gemm(cudaStream_t s, const StreamGemmPlan& plan, const T* x, const T* w, TY* y, int rows, int in,
                        int out, float beta, bool pdl, StreamLayout layout) {
  detail::with_n_tiles(rows, [&]<int NT>(std::integral_constant<int, NT>) {
    detail::launch_split_k(pdl, kernel::stream_gemm<T, TY, NT, Cfg>, plan.row_blocks, plan.splits, Cfg::kWarps * 32,
                           plan.smem, s, x, w, y, rows, in, out, plan.kchunk, beta, static_cast<int>(layout));
  });
}
}  // namespace detail

/// y [rows, out] = x [rows, in] w^T + beta y (beta = 0: y is not read). Requires stream_gemm_supported and a plan
/// from stream_gemm_plan for the same rows' tile count, in and out. pdl: launched as a programmatic dependent (its
/// first weight loads are issued before it waits for the kernel before it).
template <class T, class TY, class Cfg = StreamGemmDefault>
void stream_gemm(cudaStream_t s, const StreamGemmPlan& plan, const T* x, const T* w, TY* y, int rows, int in, int out,
                 float beta, bool pdl = false) {
  detail::launch_stream_gemm<T, TY, Cfg>(s, plan, x, w, y, rows, in, out, beta, pdl, StreamLayout::kRowMajor);
}

/// A weight matrix [out, in] in the stream-packed layout (pack_stream_weights above): stream_gemm's warps read it
/// 512 contiguous bytes an instruction instead of 8 rows x 64 bytes. Owns its device copy.
template <class T>
class StreamPackedWeights {
 public:
  StreamPackedWeights() = default;
  /// Packs w [out, in] (16-bit, in a multiple of 8, 16-byte aligned) on stream s.
  StreamPackedWeights(const T* w, int out, int in, cudaStream_t s, StreamLayout layout = StreamLayout::kChunkMajor)
      : out_(out), in_(in), layout_(layout), buf_(std::size_t((out + 15) / 16) * 16 * kernel::stream_packed_kp(in)) {
    static_assert(sizeof(T) == 2, "stream-packed weights are 16-bit");
    if (layout == StreamLayout::kRowMajor) throw ConfigError("StreamPackedWeights: a packed layout, not row-major");
    if (out < 1 || in < 8 || in % 8 != 0 || reinterpret_cast<std::uintptr_t>(w) % 16 != 0)
      throw ConfigError("StreamPackedWeights: a [" + std::to_string(out) + ", " + std::to_string(in) +
                        "] matrix needs in a multiple of 8 and 16-byte alignment");
    kernel::pack_stream_weights<T><<<1024, 256, 0, s>>>(w, buf_.data(), out, in, static_cast<int>(layout));
    EARN_CUDA_CHECK_LAUNCH();
  }
  const T* data() const { return buf_.data(); }
  int out() const { return out_; }
  int in() const { return in_; }
  StreamLayout layout() const { return layout_; }
  std::size_t bytes() const { return buf_.size() * sizeof(T); }

 private:
  int out_ = 0, in_ = 0;
  StreamLayout layout_ = StreamLayout::kChunkMajor;
  DeviceBuffer<T> buf_;
};

/// stream_gemm over stream-packed weights (same plan, same result bit for bit: the same products in the same order).
template <class T, class TY, class Cfg = StreamGemmDefault>
void stream_gemm(cudaStream_t s, const StreamGemmPlan& plan, const T* x, const StreamPackedWeights<T>& w, TY* y,
                 int rows, float beta, bool pdl = false) {
  detail::launch_stream_gemm<T, TY, Cfg>(s, plan, x, w.data(), y, rows, w.in(), w.out(), beta, pdl, w.layout());
}

}  // namespace earn::cuda
