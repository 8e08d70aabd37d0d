// earn/backend/cuda/split_k.cuh - what the few-row GEMMs (stream_gemm.cuh, bulk_gemm.cuh) share: the output write
// with beta, the k splits of one row block reduced over a thread-block cluster's shared memories (deterministic:
// each output adds the splits in rank order), the choice of the split count, the launch with or without a
// cluster, and the dispatch of a row count to its n-tile count (8 x rows per tile, at most 4 tiles).
#pragma once

#include <algorithm>
#include <type_traits>
#include <utility>

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/mma.cuh"

namespace earn::cuda {

inline constexpr int kMaxClusterSplits = 8;  // a portable cluster

namespace kernel {

// y[xr, n] = v (+ beta y[xr, n]); beta = 0: y is not read.
template <class TY>
__device__ inline void write_out(TY* y, int out, int xr, int n, float v, float beta) {
  TY* p = y + static_cast<std::size_t>(xr) * out + n;
  *p = from_float<TY>(beta != 0.0f ? v + beta * to_float(*p) : v);
}

// Every block of the cluster (the gridDim.y k splits of one row block, rank = blockIdx.y) left its partial sums
// [rows][block_rows] in `part`, in its own shared memory; block r finishes every splits-th output, adding the
// splits in rank order, and writes it. All threads of every block call this.
template <class TY>
__device__ inline void cluster_reduce_out(const float* part, int rows, int block_rows, int n0, TY* y, int out,
                                          float beta) {
  const int splits = gridDim.y, split = blockIdx.y;
  cluster_sync();
  for (int e = split * blockDim.x + threadIdx.x; e < rows * block_rows; e += splits * blockDim.x) {
    const int xr = e / block_rows, n = n0 + (e - xr * block_rows);
    float v = 0.0f;
    for (int r = 0; r < splits; ++r) v += ld_cluster_f32(part + e, r);
    if (n < out) write_out(y, out, xr, n, v, beta);
  }
  cluster_sync();  // the other blocks may still read this block's shared memory
}

}  // namespace kernel

namespace detail {

// f(std::integral_constant<int, NT>) for the fewest n-tiles of 8 rows that hold `rows` (1..32).
template <int NT = 1, class F>
decltype(auto) with_n_tiles(int rows, F&& f) {
  if constexpr (NT == 4) {
    return f(std::integral_constant<int, 4>{});
  } else {
    if (rows <= 8 * NT) return f(std::integral_constant<int, NT>{});
    return with_n_tiles<NT + 1>(rows, std::forward<F>(f));
  }
}

// The most splits (<= max_splits) whose row_blocks x splits blocks are resident at once (`slots` = blocks per
// multiprocessor x multiprocessors): one wave. force > 0: that many, capped at max_splits.
inline int choose_splits(int row_blocks, long long slots, int max_splits, int force) {
  if (force > 0) return std::min(force, max_splits);
  int want = 1;
  for (int s = 2; s <= max_splits; ++s)
    if (static_cast<long long>(row_blocks) * s <= slots) want = s;
  return want;
}

// kern<<<(row_blocks, splits), threads, smem, s>>>(args...): one split without a cluster (the scheduler need not
// place blocks together), more as clusters of (1, splits, 1); pdl: as a programmatic dependent launch (the kernel
// calls kernel::pdl_wait() before it touches what earlier kernels write).
template <class... P, class... A>
void launch_split_k(bool pdl, void (*kern)(P...), int row_blocks, int splits, int threads, std::size_t smem,
                    cudaStream_t s, A&&... args) {
  if (splits == 1) {
    launch(pdl, kern, row_blocks, threads, smem, s, std::forward<A>(args)...);
    return;
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 1;
  attr.val.clusterDim.y = splits;
  attr.val.clusterDim.z = 1;
  if (pdl)
    launch_with({attr, pdl_attribute()}, kern, dim3(row_blocks, splits), threads, smem, s, std::forward<A>(args)...);
  else
    launch_with({attr}, kern, dim3(row_blocks, splits), threads, smem, s, std::forward<A>(args)...);
}

}  // namespace detail
}  // namespace earn::cuda
