// earn/backend/cuda/bulk_gemm.cuh - y [rows, out] (+)= x [rows, in] w^T for few rows (1 <= rows <= 32) in bf16 /
// fp16 with fp32 accumulation, the operands brought into a shared-memory ring by the tensor memory accelerator
// (sm_90 tensor-map box copies). The same product as stream_gemm.cuh, with the weights travelling another way:
// - stream_gemm loads them straight into tensor-core fragments (8 rows x 64 bytes per load instruction) and keeps
//   as many loads in flight as its registers hold; it falls behind cuBLAS at 20-32 rows (0.90-0.99x).
// - here one producer thread per block asks for stage s of a ring of Stages buffers: per 64 k, one box of the
//   block's BM weight rows and one of the 8 NT x rows (128-byte swizzle, zeros outside the matrices), and tells
//   an mbarrier how many bytes to expect; the consumer warps wait for the stage, read A (weights) and B (x)
//   fragments with ldmatrix (conflict-free through the swizzle), multiply, and release the stage through a second
//   mbarrier. The bytes in flight per multiprocessor are the ring, independent of registers.
// Consumer warps: MT m16 tiles x KW warps that share a stage's k steps; their partial sums are added in shared
// memory in a fixed order. k splits are one thread-block cluster reduced over distributed shared memory in split
// order (as stream_gemm): results do not depend on timing.
// Launched as a programmatic dependent (pdl), the producer asks for the first Stages of weights before waiting for
// the kernel before it (weights are constants), so a chain of products keeps the weight stream going.
// Measured (H200, bench_cuda_gemm, bench/cuda/NOTES.md v17-v22): level with cuBLAS at 2-32 rows timed alone
// (0.96-1.08x over the five Llama-7B decode shapes), 0.84-0.93x in a chain of them (0.87-0.95x as dependents); a
// first version with one bulk copy per row piece (no tensor map) was bound by the copy-issue rate (0.3-1.6 TB/s),
// and weights packed into contiguous boxes gained 5 % in the chain, still under cuBLAS. The engine uses it only
// when asked (State::use_bulk_gemm): there it made B = 1 decode steps 13-16 % slower than cuBLAS. It is here,
// tested, for experiments.
#pragma once

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

#include <cudaTypedefs.h>  // CUtensorMap, PFN_cuTensorMapEncodeTiled (the driver entry point, no -lcuda)

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/mma.cuh"
#include "earn/backend/cuda/split_k.cuh"

namespace earn::cuda {

template <int MT_, int KW_, int KS_, int Stages_, int MinBlocks_ = 1>
struct BulkGemmConfig {
  static constexpr int MT = MT_;          // m16 tiles per block
  static constexpr int KW = KW_;          // consumer warps per m16 tile (they share each stage's k steps)
  static constexpr int KS = KS_;          // k per stage: KS / 64 boxes of 64 k (128 bytes) per operand
  static constexpr int kStages = Stages_;
  static constexpr int kMinBlocks = MinBlocks_;
  static constexpr int kRows = 16 * MT;          // weight rows per block (one box is 64 k x kRows rows)
  static constexpr int kConsumers = MT * KW;     // consumer warps; one producer warp besides
  static constexpr int kThreads = (kConsumers + 1) * 32;
  static constexpr int kBoxes = KS / 64;
  static_assert(KS % 64 == 0 && KS / 16 >= KW, "whole 64-k boxes, at least one k16 step per warp");
  static_assert(kRows <= 256, "a tensor-map box has at most 256 rows");
  static_assert(Stages_ >= 2 && Stages_ <= 8, "2..8 stages");
};
// 16 warps x 16 rows, 64 k (one box) per stage, 4 stages: the best of the shapes bench_cuda_gemm compares, by a
// few percent (bench/cuda/NOTES.md, v18).
using BulkGemmDefault = BulkGemmConfig<16, 1, 64, 4, 1>;

inline constexpr int kBulkGemmMaxRows = 32;

/// The two tensor maps of one product (weights [out, in], x [rows, in]; boxes of 64 k x the block's rows and
/// 64 k x 8 NT x rows, 128-byte swizzle), made on the host for each call and passed by value to the kernel.
struct BulkGemmMaps {
  CUtensorMap w, x;
};

namespace kernel {

// Byte offset of 16-byte chunk q (0..7) of row r inside a box of 128-byte rows stored with the 128-byte swizzle
// (the box starts on a 1024-byte boundary): chunk q of row r lives at chunk q ^ (r mod 8).
__device__ inline std::uint32_t swz128(int r, int q) { return r * 128 + ((q ^ (r & 7)) << 4); }

template <class T, class TY, int NT, class Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, Cfg::kMinBlocks)
    bulk_gemm(const __grid_constant__ BulkGemmMaps maps, TY* __restrict__ y, int rows, int in, int out,
              int split_stages, float beta) {
  constexpr int BM = Cfg::kRows, KS = Cfg::KS, S = Cfg::kStages, XR = 8 * NT, NB = Cfg::kBoxes;
  constexpr int MT = Cfg::MT, KW = Cfg::KW;
  constexpr std::uint32_t kWBox = BM * 128, kXBox = XR * 128, kStageBytes = NB * (kWBox + kXBox);
  extern __shared__ __align__(1024) unsigned char bulk_smem[];
  auto* full = reinterpret_cast<std::uint64_t*>(bulk_smem);  // [S]: the stage's bytes have landed
  std::uint64_t* empty = full + S;                            // [S]: every consumer is done with the stage
  // The ring [S][NB W boxes, NB x boxes] on a 1024-byte boundary (the swizzle pattern repeats every 1024 bytes).
  const std::uint32_t base = smem_addr(bulk_smem);
  unsigned char* ring = bulk_smem + ((base + 128 + 1023) / 1024 * 1024 - base);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int n0 = blockIdx.x * BM;
  // This block's k range: stages [first, first + nk) of KS k (split blockIdx.y of gridDim.y).
  const int splits = gridDim.y, split = blockIdx.y;
  const int first = split * split_stages;
  const int nk = min(split_stages, (in + KS - 1) / KS - first);
  // 64-k boxes of stage i that hold any k < in (boxes past `in` are neither sent nor read).
  auto boxes_of = [&](int i) { return min(NB, (in - (first + i) * KS + 63) / 64); };
  pdl_trigger();  // the kernel after this one may be placed now: it waits for this grid before touching memory
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], Cfg::kConsumers);
    }
    mbar_fence_init();
  }
  __syncthreads();

  float acc[NT][4];
#pragma unroll
  for (int j = 0; j < NT; ++j)
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[j][c] = 0.0f;

  if (warp == Cfg::kConsumers) {  // the producer warp: one lane issues every copy
    if (lane == 0) {
      auto load_w = [&](int i) {
        unsigned char* st = ring + (i % S) * kStageBytes;
        const int kb = (first + i) * KS;
        for (int b = 0, boxes = boxes_of(i); b < boxes; ++b)
          tma_load_2d(st + b * kWBox, &maps.w, kb + 64 * b, n0, &full[i % S]);
      };
      auto load_x = [&](int i) {
        unsigned char* st = ring + (i % S) * kStageBytes;
        const int kb = (first + i) * KS;
        for (int b = 0, boxes = boxes_of(i); b < boxes; ++b)
          tma_load_2d(st + NB * kWBox + b * kXBox, &maps.x, kb + 64 * b, 0, &full[i % S]);
      };
      // The weights do not depend on earlier kernels: the first stages' weights are asked for before waiting for
      // the kernel before this one (a programmatic dependent launch starts while it still runs), x after.
      const int pre = min(nk, S);
      for (int i = 0; i < pre; ++i) {
        mbar_arrive_expect_tx(&full[i], boxes_of(i) * (kWBox + kXBox));
        load_w(i);
      }
      pdl_wait();
      for (int i = 0; i < pre; ++i) load_x(i);
      for (int i = pre; i < nk; ++i) {
        const int s = i % S;
        mbar_wait(&empty[s], ((i / S) & 1) ^ 1);
        mbar_arrive_expect_tx(&full[s], boxes_of(i) * (kWBox + kXBox));
        load_w(i);
        load_x(i);
      }
    }
  } else {
    const int mt = warp % MT, kw = warp / MT;
    for (int i = 0; i < nk; ++i) {
      const int s = i % S;
      mbar_wait(&full[s], (i / S) & 1);
      const std::uint32_t st = smem_addr(ring + s * kStageBytes);
      const int steps = 4 * boxes_of(i);  // k16 steps
      for (int kk = kw; kk < steps; kk += KW) {
        const int b = kk >> 2, q0 = (kk & 3) * 2;
        const std::uint32_t wb = st + b * kWBox, xb = st + NB * kWBox + b * kXBox;
        std::uint32_t a[4];
        ldmatrix_x4_addr(a, wb + swz128(mt * 16 + (lane & 15), q0 + (lane >> 4)));
#pragma unroll
        for (int j = 0; j + 1 < NT; j += 2) {  // two n-tiles per ldmatrix.x4: (j, k lo), (j, k hi), (j+1, ..)
          std::uint32_t bb[4];
          ldmatrix_x4_addr(bb, xb + swz128(8 * j + (lane & 7) + 8 * (lane >> 4), q0 + ((lane >> 3) & 1)));
          mma16816<T>(acc[j], a, bb[0], bb[1]);
          mma16816<T>(acc[j + 1], a, bb[2], bb[3]);
        }
        if constexpr (NT % 2 == 1) {
          std::uint32_t bb[4];  // the x4 form over rows 8 (NT - 1) .. + 7 twice (lanes 16-31 repeat 0-15)
          ldmatrix_x4_addr(bb, xb + swz128(8 * (NT - 1) + (lane & 7), q0 + ((lane >> 3) & 1)));
          mma16816<T>(acc[NT - 1], a, bb[0], bb[1]);
        }
      }
      __syncwarp();
      if (lane == 0) mbar_arrive(&empty[s]);
    }
  }
  __syncthreads();  // every stage was consumed: the ring is free for the partial sums
  pdl_wait();       // y may be read (beta) and written only once the kernel before has finished

  // Partial sums of the KW warps of each m-tile, [KW][MT][NT * 4][32], added in kw order by the kw = 0 warps.
  float* red = reinterpret_cast<float*>(ring);
  const int mt = warp % MT, kw = warp / MT;
  if (warp < Cfg::kConsumers && kw > 0) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) red[((kw * MT + mt) * NT * 4 + j * 4 + c) * 32 + lane] = acc[j][c];
  }
  __syncthreads();
  const int gid = lane >> 2, tig = lane & 3;
  // f(sum of the KW warps, x row, weight row within the block) for each output of the kw = 0 warps.
  auto each_sum = [&](auto&& f) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float v = acc[j][c];
        for (int q = 1; q < KW; ++q) v += red[((q * MT + mt) * NT * 4 + j * 4 + c) * 32 + lane];
        f(v, 8 * j + 2 * tig + (c & 1), mt * 16 + gid + 8 * (c >> 1));
      }
  };
  if (splits == 1) {
    if (warp < MT)
      each_sum([&](float v, int xr, int nl) {
        if (xr < rows && n0 + nl < out) write_out(y, out, xr, n0 + nl, v, beta);
      });
    return;
  }
  // k splits = one cluster: this block's sums [rows][BM] (after the KW partials), reduced over the cluster.
  float* part = red + Cfg::kConsumers * NT * 4 * 32;
  if (warp < MT)
    each_sum([&](float v, int xr, int nl) {
      if (xr < rows) part[xr * BM + nl] = v;
    });
  cluster_reduce_out(part, rows, BM, n0, y, out, beta);
}

}  // namespace kernel

namespace detail {

template <class Cfg, int NT>
constexpr std::size_t bulk_gemm_smem() {
  const std::size_t ring = std::size_t(Cfg::kStages) * Cfg::kBoxes * (Cfg::kRows + 8 * NT) * 128;
  const std::size_t red = (std::size_t(Cfg::kConsumers) * NT * 4 * 32 + std::size_t(8) * NT * Cfg::kRows) * sizeof(float);
  return 128 + 1024 + std::max(ring, red);  // barriers, alignment of the ring to 1024 bytes
}

}  // namespace detail

/// True when bulk_gemm takes this product: 16-bit storage, 1 <= rows <= 32, in a multiple of 8 and both operands
/// 16-byte aligned (a tensor map's rows must start on 16-byte boundaries).
template <class T>
bool bulk_gemm_supported(const T* x, const T* w, int rows, int in) {
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; };
  return sizeof(T) == 2 && rows >= 1 && rows <= kBulkGemmMaxRows && in >= 8 && in % 8 == 0 && aligned(x) &&
         aligned(w);
}

namespace detail {

inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult q{};
    EARN_CUDA_CHECK(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &q));
    if (q != cudaDriverEntryPointSuccess || f == nullptr)
      throw CudaError("cuTensorMapEncodeTiled: not found in the CUDA driver (needs a CUDA 12+ driver)");
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A [outer, inner] row-major 16-bit matrix read in boxes of 64 x box_rows with the 128-byte swizzle.
template <class T>
CUtensorMap tensor_map_2d(const T* p, int inner, int outer, int box_rows) {
  static_assert(sizeof(T) == 2);
  const CUtensorMapDataType dt =
      std::is_same_v<T, __half> ? CU_TENSOR_MAP_DATA_TYPE_FLOAT16 : CU_TENSOR_MAP_DATA_TYPE_BFLOAT16;
  CUtensorMap m;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(inner), static_cast<cuuint64_t>(outer)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(inner) * sizeof(T)};
  const cuuint32_t box[2] = {64, static_cast<cuuint32_t>(box_rows)}, unit[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(&m, dt, 2, const_cast<T*>(p), dims, strides, box, unit,
                                          CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
                                          CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS)
    throw CudaError("cuTensorMapEncodeTiled failed (error " + std::to_string(static_cast<int>(r)) + ") for a [" +
                    std::to_string(outer) + ", " + std::to_string(inner) + "] matrix");
  return m;
}

}  // namespace detail

inline constexpr int kBulkGemmMaxSplits = kMaxClusterSplits;

/// Row blocks x k splits (one cluster per row block) and the k stages of one split.
struct BulkGemmPlan {
  int row_blocks = 0, splits = 1, split_stages = 0;
};

namespace detail {
template <class T, class TY, int NT, class Cfg>
BulkGemmPlan plan_bulk_gemm(int in, int out, int sms, int force_splits) {
  BulkGemmPlan p;
  p.row_blocks = (out + Cfg::kRows - 1) / Cfg::kRows;
  constexpr std::size_t smem = bulk_gemm_smem<Cfg, NT>();
  const auto fn = kernel::bulk_gemm<T, TY, NT, Cfg>;
  if constexpr (smem > 48 * 1024) allow_dynamic_smem<kernel::bulk_gemm<T, TY, NT, Cfg>>(smem);
  int occ = 0;
  EARN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ, fn, Cfg::kThreads, smem));
  const long long slots = static_cast<long long>(std::max(occ, 1)) * sms;
  const int nk = (in + Cfg::KS - 1) / Cfg::KS;
  // at least 2 stages per split
  const int want = choose_splits(p.row_blocks, slots, std::clamp(nk / 2, 1, kBulkGemmMaxSplits), force_splits);
  p.split_stages = (nk + want - 1) / want;
  p.splits = (nk + p.split_stages - 1) / p.split_stages;
  return p;
}
}  // namespace detail

/// The plan bulk_gemm uses for this shape on the current device (`sms` multiprocessors): the most k splits (at
/// most 8, at least 2 stages each) whose blocks are all resident at once. force_splits > 0: that many (tests).
template <class T, class TY, class Cfg = BulkGemmDefault>
BulkGemmPlan bulk_gemm_plan(int rows, int in, int out, int sms, int force_splits = 0) {
  return detail::with_n_tiles(rows, [&]<int NT>(std::integral_constant<int, NT>) {
    return detail::plan_bulk_gemm<T, TY, NT, Cfg>(in, out, sms, force_splits);
  });
}

/// y [rows, out] = x [rows, in] w^T + beta y (beta = 0: y is not read). Requires bulk_gemm_supported and a plan
/// from bulk_gemm_plan for the same rows' tile count, in and out. pdl: launched as a programmatic dependent of the
/// kernel before it in the stream: the blocks start, and ask for their first Stages of weights, while that kernel
/// still runs; x and y are touched only after it has finished (kernel::pdl_wait). So w must not be written by
/// that kernel (weights are constants; write them in an earlier step and synchronise).
template <class T, class TY, class Cfg = BulkGemmDefault>
void bulk_gemm(cudaStream_t s, const BulkGemmPlan& plan, const T* x, const T* w, TY* y, int rows, int in, int out,
               float beta, bool pdl = false) {
  detail::with_n_tiles(rows, [&]<int NT>(std::integral_constant<int, NT>) {
    constexpr std::size_t smem = detail::bulk_gemm_smem<Cfg, NT>();
    const BulkGemmMaps maps{detail::tensor_map_2d(w, in, out, Cfg::kRows), detail::tensor_map_2d(x, in, rows, 8 * NT)};
    detail::launch_split_k(pdl, kernel::bulk_gemm<T, TY, NT, Cfg>, plan.row_blocks, plan.splits, Cfg::kThreads, smem,
                           s, maps, y, rows, in, out, plan.split_stages, beta);
  });
}

}  // namespace earn::cuda
