// bench/cuda/bench_cuda_gemm.cu - how fast the decode GEMMs at Llama-7B shapes stream their weights:
// y [rows, out] = x [rows, in] w^T in bf16 (fp32 accumulation).
// 1. The card's read bandwidth (a kernel that only reads 2 GiB with 16-byte loads): the rate a weight stream can
//    reach, beside the copy bandwidth the floors use.
// 2. Access-pattern probes over w13's weights (read only, no arithmetic; see probe_frag / probe_rows).
// 3. The five shapes as one chain (4 layers' worth) at 2-32 rows: cuBLAS, bulk_gemm, bulk_gemm as programmatic
//    dependent launches, stream_gemm over row-major weights, over the two stream-packed layouts, and chunk-major
//    as programmatic dependents.
// 4. rows 2, 8, 20, 32 (EARN's register rows of 1 / 4 users, one user's 20 beams): cuda::stream_gemm
//    (stream_gemm.cuh) in its default shape and cuda::bulk_gemm (bulk_gemm.cuh) in five shapes
//    (BulkGemmConfig<m-tiles, warps per m-tile, k per stage, stages, min blocks>; the first is its default; the
//    first three hold 128 KB of weights in their rings, the fourth 192 KB) against cublasGemmEx's default,
//    per shape, same buffers, back to back; "s" = k splits.
// 5. rows 20, 80, 640: cublasGemmEx's default against up to 16 cuBLASLt heuristic algorithms per shape, each timed
//    over 4 weight copies in turn (as Engine::tune_gemms chooses), then the chain with the defaults and the choices.
// --variants runs 3 and 4, --chains 3 only, --stream-configs stream_gemm's shapes in the chain, --lt-chain 5 only,
// --read-chain 1 and the read-only chain (read_chain), --profile / --profile-chunk the default stream_gemm for ncu.
// Every time is the median of 20 calls timed with CUDA events after 3 warm-ups. Without a CUDA device it prints
// "skipped: no CUDA device" and exits 0.
#include <algorithm>
#include <cstdio>
#include <string>
#include <type_traits>
#include <vector>

#include "earn/backend/cuda/blas.cuh"
#include "earn/backend/cuda/bulk_gemm.cuh"
#include "earn/backend/cuda/stream_gemm.cuh"
#include "earn/cuda.cuh"

using namespace earn;

namespace {

using T = __nv_bfloat16;

template <class F>
float median_ms(cudaStream_t s, F&& f) {
  cuda::Event a, b;
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    a.record(s);
    f();
    b.record(s);
    ms.push_back(cuda::Event::elapsed_ms(a, b));
  }
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}


__global__ void read_only(const uint4* __restrict__ p, long long n, unsigned* sink) {
  unsigned acc = 0;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const uint4 v = earn::cuda::kernel::ld_stream16<false>(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;  // keeps the loads
}

// Access-pattern probes: read a [rows, in] weight matrix once (XOR-folded, no math), one warp per 16-row tile over
// the whole k range (as stream_gemm with one split). frag: each load instruction covers 8 rows x 64 bytes (the MMA
// fragment order stream_gemm uses), U chunks of 32 k per burst; rows: each instruction covers one row's 512
// contiguous bytes, 16 rows per burst (what a shared-memory-staged kernel would copy).
template <int U, bool Pf, int KS = 1>
__global__ void probe_frag(const T* w, int rows, int in, unsigned* sink) {
  const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
  const int wid = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  const int tile = wid / KS, ks = wid % KS;
  if (tile * 16 >= rows) return;
  const T* p0 = w + static_cast<std::size_t>(tile * 16 + gid) * in + 8 * tig;
  const T* p1 = p0 + static_cast<std::size_t>(8) * in;
  unsigned acc = 0;
  const int kr = in / KS;
  for (int k = ks * kr; k < (ks + 1) * kr; k += 32 * U) {
    uint4 v[U][2];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      v[u][0] = earn::cuda::kernel::ld_stream16<Pf>(p0 + k + 32 * u);
      v[u][1] = earn::cuda::kernel::ld_stream16<Pf>(p1 + k + 32 * u);
    }
#pragma unroll
    for (int u = 0; u < U; ++u) acc ^= v[u][0].x ^ v[u][0].w ^ v[u][1].y ^ v[u][1].z;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}
template <int KS = 1>
__global__ void probe_rows(const T* w, int rows, int in, unsigned* sink) {
  const int lane = threadIdx.x & 31;
  const int wid = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) >> 5);
  const int tile = wid / KS, ks = wid % KS;
  if (tile * 16 >= rows) return;
  const T* p = w + static_cast<std::size_t>(tile * 16) * in + 8 * lane;
  unsigned acc = 0;
  const int kr = in / KS;
  for (int k = ks * kr; k < (ks + 1) * kr; k += 256) {
    uint4 v[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) v[r] = earn::cuda::kernel::ld_stream16<false>(p + static_cast<std::size_t>(r) * in + k);
#pragma unroll
    for (int r = 0; r < 16; ++r) acc ^= v[r].x ^ v[r].w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

struct Shape {
  const char* name;
  int in, out;
  bool fp32_out;
};
const Shape kShapes[] = {{"qkv", 4096, 12288, false}, {"wo", 4096, 4096, true}, {"w13", 4096, 22016, false},
                         {"w2", 11008, 4096, true},   {"head", 4096, 33024, true}};

double gemm_bytes(const Shape& sh, int rows) {
  return (double(sh.out) * sh.in + double(rows) * sh.in) * 2 + double(rows) * sh.out * (sh.fp32_out ? 4 : 2);
}

// One configuration (a StreamGemmConfig or a BulkGemmConfig) on one shape: the plan for this device, then the
// timed calls.
template <class Cfg>
constexpr bool kIsBulk = requires { Cfg::KS; };
template <class Cfg, class TY>
float time_variant(cudaStream_t s, const Shape& sh, int rows, const T* x, const T* w, TY* y, int sms, int* splits) {
  const float beta = sh.fp32_out ? 1.0f : 0.0f;  // wo and w2 add into the residual
  if constexpr (kIsBulk<Cfg>) {
    const cuda::BulkGemmPlan plan = cuda::bulk_gemm_plan<T, TY, Cfg>(rows, sh.in, sh.out, sms);
    *splits = plan.splits;
    return median_ms(s, [&] { cuda::bulk_gemm<T, TY, Cfg>(s, plan, x, w, y, rows, sh.in, sh.out, beta); });
  } else {
    const cuda::StreamGemmPlan plan = cuda::stream_gemm_plan<T, TY, Cfg>(rows, sh.in, sh.out, sms);
    *splits = plan.splits;
    return median_ms(s, [&] { cuda::stream_gemm<T, TY, Cfg>(s, plan, x, w, y, rows, sh.in, sh.out, beta); });
  }
}

void read_bandwidth(cudaStream_t s) {
  const long long n = (2LL << 30) / 16;
  cuda::DeviceBuffer<uint4> buf(n);
  cuda::DeviceBuffer<unsigned> sink(1);
  EARN_CUDA_CHECK(cudaMemsetAsync(buf.data(), 1, n * 16, s));
  const float ms = median_ms(s, [&] {
    read_only<<<cuda::sm_count() * 8, 256, 0, s>>>(buf.data(), n, sink.data());
    EARN_CUDA_CHECK_LAUNCH();
  });
  std::printf("read bandwidth: 2 GiB in %.3f ms = %.0f GB/s\n", ms, double(n) * 16 / (ms * 1e-3) / 1e9);
}

// The ceiling of any one-kernel-per-product design: the 5 shapes x 4 copies (2.7 GB, one buffer) read by one
// launch, against the same bytes read by 20 launches, one per product, in the chain's order; launched plainly or as
// programmatic dependents (each triggers its dependent at its start; WaitAfter: each waits for the previous after
// its first loads, as a GEMM that asks for weights before x would). Same kernel, same grid, same buffer.
template <bool WaitAfter>
__global__ void read_only_pdl(const uint4* __restrict__ p, long long n, unsigned* sink) {
  earn::cuda::kernel::pdl_trigger();
  unsigned acc = 0;
  bool waited = !WaitAfter;
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    const uint4 v = earn::cuda::kernel::ld_stream16<false>(p + i);
    if (!waited) {
      earn::cuda::kernel::pdl_wait();
      waited = true;
    }
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

void read_chain(cudaStream_t s) {
  constexpr int kCopies = 4;
  std::vector<long long> len;  // uint4 per product, chain order
  long long total = 0;
  for (int c = 0; c < kCopies; ++c)
    for (const Shape& sh : kShapes) {
      len.push_back(static_cast<long long>(sh.out) * sh.in * 2 / 16);
      total += len.back();
    }
  cuda::DeviceBuffer<uint4> buf(total);
  cuda::DeviceBuffer<unsigned> sink(1);
  EARN_CUDA_CHECK(cudaMemsetAsync(buf.data(), 1, total * 16, s));
  const double bytes = double(total) * 16;
  for (int per_sm : {2, 4, 8, 16}) {
    const int blocks = cuda::sm_count() * per_sm;
    auto one = [&] {
      read_only<<<blocks, 256, 0, s>>>(buf.data(), total, sink.data());
      EARN_CUDA_CHECK_LAUNCH();
    };
    auto chain = [&](int mode) {
      long long off = 0;
      for (long long n : len) {
        if (mode == 0) {
          read_only<<<blocks, 256, 0, s>>>(buf.data() + off, n, sink.data());
          EARN_CUDA_CHECK_LAUNCH();
        } else if (mode == 1) {
          cuda::launch(true, read_only_pdl<false>, dim3(blocks), dim3(256), 0, s, buf.data() + off, n, sink.data());
        } else {
          cuda::launch(true, read_only_pdl<true>, dim3(blocks), dim3(256), 0, s, buf.data() + off, n, sink.data());
        }
        off += n;
      }
    };
    float t[4];
    t[0] = median_ms(s, one);
    for (int m = 0; m < 3; ++m) t[m + 1] = median_ms(s, [&] { chain(m); });
    std::printf("read chain %d blocks/SM (%.0f MB): one launch %.1f us %.2f TB/s | 20 launches %.1f us %.2f TB/s | "
                "20 pdl %.1f us %.2f TB/s | 20 pdl wait-after-first %.1f us %.2f TB/s\n",
                per_sm, bytes / 1e6, t[0] * 1e3, bytes / (t[0] * 1e-3) / 1e12, t[1] * 1e3,
                bytes / (t[1] * 1e-3) / 1e12, t[2] * 1e3, bytes / (t[2] * 1e-3) / 1e12, t[3] * 1e3,
                bytes / (t[3] * 1e-3) / 1e12);
  }
}

void probes(cudaStream_t s) {
  const int rows = 22016, in = 4096;  // w13
  cuda::DeviceBuffer<T> w(std::size_t(rows) * in);
  cuda::DeviceBuffer<unsigned> sink(1);
  EARN_CUDA_CHECK(cudaMemsetAsync(w.data(), 1, w.size() * sizeof(T), s));
  const double bytes = double(rows) * in * sizeof(T);
  auto run = [&](const char* name, auto kernel, int ks = 1) {
    const int blocks = (rows / 16 * ks + 7) / 8;
    const float ms = median_ms(s, [&] {
      kernel<<<blocks, 256, 0, s>>>(w.data(), rows, in, sink.data());
      EARN_CUDA_CHECK_LAUNCH();
    });
    std::printf("probe %-22s %6.1f us %.2f TB/s\n", name, ms * 1e3, bytes / (ms * 1e-3) / 1e12);
  };
  run("frag U=2", probe_frag<2, true>);
  run("frag U=4", probe_frag<4, true>);
  run("frag U=8", probe_frag<8, true>);
  run("frag U=4 no prefetch", probe_frag<4, false>);
  run("frag U=4 k/2", probe_frag<4, true, 2>, 2);
  run("frag U=4 k/4", probe_frag<4, true, 4>, 4);
  run("frag U=4 k/8", probe_frag<4, true, 8>, 8);
  run("frag U=2 k/8", probe_frag<2, true, 8>, 8);
  run("rows 512 B", probe_rows<1>);
  run("rows 512 B k/2", probe_rows<2>, 2);
  run("rows 512 B k/4", probe_rows<4>, 4);
  run("rows 512 B k/8", probe_rows<8>, 8);
}

void stream_vs_cublas(cublasHandle_t h, cudaStream_t s) {
  using Def = cuda::StreamGemmDefault;  // R 1, 8 warps, U 4, 2 blocks per multiprocessor
  using B1 = cuda::BulkGemmDefault;     // 256 rows (16 warps of 16), 64 k per stage, 4 stages
  using B2 = cuda::BulkGemmConfig<8, 1, 128, 4, 1>;
  using B3 = cuda::BulkGemmConfig<8, 1, 64, 8, 1>;
  using B4 = cuda::BulkGemmConfig<16, 1, 128, 3, 1>;
  using B5 = cuda::BulkGemmConfig<4, 2, 128, 4, 2>;
  constexpr int kV = 6;
  const char* names[kV] = {"stream", "bulk (16,1,64,4)", "bulk (8,1,128,4)", "bulk (8,1,64,8)",
                           "bulk (16,1,128,3)", "bulk (4,2,128,4,x2)"};
  const int sms = cuda::sm_count();
  for (int rows : {2, 8, 20, 32}) {
    double blas_total = 0, bytes_total = 0, cfg_total[kV] = {};
    for (const Shape& sh : kShapes) {
      cuda::DeviceBuffer<T> x(std::size_t(rows) * sh.in), w(std::size_t(sh.out) * sh.in), y16(std::size_t(rows) * sh.out);
      cuda::DeviceBuffer<float> y32(std::size_t(rows) * sh.out);
      cuda::kernel::fill_uniform<T><<<1024, 256, 0, s>>>(x.data(), static_cast<long long>(x.size()), 1, -1.0f, 1.0f);
      cuda::kernel::fill_uniform<T><<<1024, 256, 0, s>>>(w.data(), static_cast<long long>(w.size()), 2, -0.02f, 0.02f);
      EARN_CUDA_CHECK(cudaMemsetAsync(y32.data(), 0, y32.size() * sizeof(float), s));
      EARN_CUDA_CHECK_LAUNCH();
      const float blas = median_ms(s, [&] {
        if (sh.fp32_out) cuda::linear<T, float>(h, x.data(), w.data(), y32.data(), rows, sh.in, sh.out, 1.0f);
        else cuda::linear<T, T>(h, x.data(), w.data(), y16.data(), rows, sh.in, sh.out);
      });
      int splits[kV];
      // Configuration Cfg (as a type tag) into slot i, with the output type of this shape.
      auto run = [&]<class Cfg>(std::type_identity<Cfg>, int i) {
        return sh.fp32_out ? time_variant<Cfg, float>(s, sh, rows, x.data(), w.data(), y32.data(), sms, &splits[i])
                           : time_variant<Cfg, T>(s, sh, rows, x.data(), w.data(), y16.data(), sms, &splits[i]);
      };
      const float t[kV] = {run(std::type_identity<Def>{}, 0), run(std::type_identity<B1>{}, 1),
                           run(std::type_identity<B2>{}, 2), run(std::type_identity<B3>{}, 3),
                           run(std::type_identity<B4>{}, 4), run(std::type_identity<B5>{}, 5)};
      const double bytes = gemm_bytes(sh, rows);
      std::printf("rows %2d %-5s cuBLAS %6.1f us %.2f TB/s |", rows, sh.name, blas * 1e3, bytes / (blas * 1e-3) / 1e12);
      for (int i = 0; i < kV; ++i) {
        std::printf(" %s %6.1f us %.2f TB/s s%d |", names[i], t[i] * 1e3, bytes / (t[i] * 1e-3) / 1e12, splits[i]);
        cfg_total[i] += t[i];
      }
      std::printf("\n");
      blas_total += blas;
      bytes_total += bytes;
    }
    std::printf("rows %2d all five: cuBLAS %.1f us (%.2f TB/s)", rows, blas_total * 1e3,
                bytes_total / (blas_total * 1e-3) / 1e12);
    for (int i = 0; i < kV; ++i)
      std::printf(" | %s %.1f us (%.2f TB/s, %.2fx)", names[i], cfg_total[i] * 1e3,
                  bytes_total / (cfg_total[i] * 1e-3) / 1e12, blas_total / cfg_total[i]);
    std::printf("\n");
  }
}

// One weight matrix per shape and x / y buffers for up to 32 rows, shared by the chain measurements (chains(),
// stream_configs()); blas(h, i, rows) is shape i's product through cublasGemmEx's default (fp32 outputs add into
// y, as the engine's residual GEMMs do).
struct ChainOperands {
  static constexpr int kShapesN = sizeof(kShapes) / sizeof(kShapes[0]);
  std::vector<cuda::DeviceBuffer<T>> w;
  cuda::DeviceBuffer<T> x{std::size_t(32) * 11008}, y16{std::size_t(32) * 33024};
  cuda::DeviceBuffer<float> y32{std::size_t(32) * 33024};

  explicit ChainOperands(cudaStream_t s) : w(kShapesN) {
    for (int i = 0; i < kShapesN; ++i) {
      w[i] = cuda::DeviceBuffer<T>(std::size_t(kShapes[i].out) * kShapes[i].in);
      cuda::kernel::fill_uniform<T><<<1024, 256, 0, s>>>(w[i].data(), static_cast<long long>(w[i].size()), 2 + i,
                                                         -0.02f, 0.02f);
      EARN_CUDA_CHECK_LAUNCH();
    }
    cuda::kernel::fill_uniform<T><<<1024, 256, 0, s>>>(x.data(), static_cast<long long>(x.size()), 1, -1.0f, 1.0f);
    EARN_CUDA_CHECK_LAUNCH();
    EARN_CUDA_CHECK(cudaMemsetAsync(y32.data(), 0, y32.size() * sizeof(float), s));
  }
  void blas(cublasHandle_t h, int i, int rows) {
    const Shape& sh = kShapes[i];
    if (sh.fp32_out) cuda::linear<T, float>(h, x.data(), w[i].data(), y32.data(), rows, sh.in, sh.out, 1.0f);
    else cuda::linear<T, T>(h, x.data(), w[i].data(), y16.data(), rows, sh.in, sh.out);
  }
};

// The five decode shapes as one chain, 4 times over (as 4 layers' GEMMs, each weight evicted from L2 by the
// others before it comes again), timed as one unit: cuBLAS; bulk_gemm; bulk_gemm launched as programmatic
// dependents (each product asks for its first weights while the one before it drains); stream_gemm over row-major
// weights, over the tile-major and chunk-major packed copies, and chunk-major as programmatic dependents. Per row
// count, same buffers.
void chains(cublasHandle_t h, cudaStream_t s) {
  const int sms = cuda::sm_count();
  constexpr int kShapesN = sizeof(kShapes) / sizeof(kShapes[0]);
  ChainOperands ops(s);
  auto& w = ops.w;
  auto& x = ops.x;
  auto& y16 = ops.y16;
  auto& y32 = ops.y32;
  std::vector<cuda::StreamPackedWeights<T>> tile_major, chunk_major;
  for (int i = 0; i < kShapesN; ++i) {
    tile_major.emplace_back(w[i].data(), kShapes[i].out, kShapes[i].in, s, cuda::StreamLayout::kTileMajor);
    chunk_major.emplace_back(w[i].data(), kShapes[i].out, kShapes[i].in, s, cuda::StreamLayout::kChunkMajor);
  }
  constexpr int kModes = 7;
  const char* names[kModes] = {"cuBLAS", "bulk", "bulk + pdl", "stream", "stream tile-major",
                               "stream chunk-major", "stream chunk-major + pdl"};
  for (int rows : {2, 8, 20, 32}) {
    cuda::BulkGemmPlan plans[kShapesN];
    cuda::StreamGemmPlan splans[kShapesN];
    double bytes = 0;
    for (int i = 0; i < kShapesN; ++i) {
      const Shape& sh = kShapes[i];
      plans[i] = sh.fp32_out ? cuda::bulk_gemm_plan<T, float>(rows, sh.in, sh.out, sms)
                             : cuda::bulk_gemm_plan<T, T>(rows, sh.in, sh.out, sms);
      splans[i] = sh.fp32_out ? cuda::stream_gemm_plan<T, float>(rows, sh.in, sh.out, sms)
                              : cuda::stream_gemm_plan<T, T>(rows, sh.in, sh.out, sms);
      bytes += 4 * gemm_bytes(sh, rows);
    }
    auto chain = [&](int mode) {
      for (int rep = 0; rep < 4; ++rep)
        for (int i = 0; i < kShapesN; ++i) {
          const Shape& sh = kShapes[i];
          const float beta = sh.fp32_out ? 1.0f : 0.0f;
          const bool pdl = mode == 2 || mode == 6;
          if (mode >= 3) {
            const auto& pw = mode == 4 ? tile_major[i] : chunk_major[i];
            if (sh.fp32_out) {
              if (mode == 3) cuda::stream_gemm<T, float>(s, splans[i], x.data(), w[i].data(), y32.data(), rows, sh.in, sh.out, beta);
              else cuda::stream_gemm<T, float>(s, splans[i], x.data(), pw, y32.data(), rows, beta, pdl);
            } else {
              if (mode == 3) cuda::stream_gemm<T, T>(s, splans[i], x.data(), w[i].data(), y16.data(), rows, sh.in, sh.out, beta);
              else cuda::stream_gemm<T, T>(s, splans[i], x.data(), pw, y16.data(), rows, beta, pdl);
            }
          } else if (mode == 0) {
            ops.blas(h, i, rows);
          } else if (sh.fp32_out) {
            cuda::bulk_gemm<T, float>(s, plans[i], x.data(), w[i].data(), y32.data(), rows, sh.in, sh.out, beta, pdl);
          } else {
            cuda::bulk_gemm<T, T>(s, plans[i], x.data(), w[i].data(), y16.data(), rows, sh.in, sh.out, beta, pdl);
          }
        }
    };
    float t[kModes];
    for (int m = 0; m < kModes; ++m) t[m] = median_ms(s, [&] { chain(m); });
    std::printf("chain rows %2d (5 shapes x 4, %.0f MB):", rows, bytes / 1e6);
    for (int m = 0; m < kModes; ++m)
      std::printf(" | %s %.1f us %.2f TB/s %.2fx", names[m], t[m] * 1e3, bytes / (t[m] * 1e-3) / 1e12, t[0] / t[m]);
    std::printf("\n");
  }
}

// --stream-configs: stream_gemm's compile-time shapes over chunk-major packed weights, the five shapes x 4 as one
// chain (as chains() times them), against cuBLAS's default in the same call.
template <class Cfg>
float stream_chain_ms(cudaStream_t s, int rows, const std::vector<cuda::StreamPackedWeights<T>>& pw, const T* x,
                      T* y16, float* y32) {
  constexpr int kShapesN = sizeof(kShapes) / sizeof(kShapes[0]);
  const int sms = cuda::sm_count();
  cuda::StreamGemmPlan plans[kShapesN];
  for (int i = 0; i < kShapesN; ++i)
    plans[i] = kShapes[i].fp32_out ? cuda::stream_gemm_plan<T, float, Cfg>(rows, kShapes[i].in, kShapes[i].out, sms)
                                   : cuda::stream_gemm_plan<T, T, Cfg>(rows, kShapes[i].in, kShapes[i].out, sms);
  return median_ms(s, [&] {
    for (int rep = 0; rep < 4; ++rep)
      for (int i = 0; i < kShapesN; ++i) {
        if (kShapes[i].fp32_out) cuda::stream_gemm<T, float, Cfg>(s, plans[i], x, pw[i], y32, rows, 1.0f);
        else cuda::stream_gemm<T, T, Cfg>(s, plans[i], x, pw[i], y16, rows, 0.0f);
      }
  });
}

void stream_configs(cublasHandle_t h, cudaStream_t s) {
  ChainOperands ops(s);
  std::vector<cuda::StreamPackedWeights<T>> pw;
  for (int i = 0; i < ChainOperands::kShapesN; ++i) pw.emplace_back(ops.w[i].data(), kShapes[i].out, kShapes[i].in, s);
  for (int rows : {2, 8, 20, 32}) {
    double bytes = 0;
    for (const Shape& sh : kShapes) bytes += 4 * gemm_bytes(sh, rows);
    const float blas = median_ms(s, [&] {
      for (int rep = 0; rep < 4; ++rep)
        for (int i = 0; i < ChainOperands::kShapesN; ++i) ops.blas(h, i, rows);
    });
    std::printf("configs rows %2d: cuBLAS %.1f us %.2f TB/s", rows, blas * 1e3, bytes / (blas * 1e-3) / 1e12);
    auto one = [&]<class Cfg>(const char* name, std::type_identity<Cfg>) {
      const float t = stream_chain_ms<Cfg>(s, rows, pw, ops.x.data(), ops.y16.data(), ops.y32.data());
      std::printf(" | %s %.1f us %.2f TB/s %.2fx", name, t * 1e3, bytes / (t * 1e-3) / 1e12, blas / t);
    };
    one("(1,8,4,pf,2)", std::type_identity<cuda::StreamGemmConfig<1, 8, 4, true, 2>>{});
    one("(1,8,4,-,2)", std::type_identity<cuda::StreamGemmConfig<1, 8, 4, false, 2>>{});
    one("(1,8,2,pf,4)", std::type_identity<cuda::StreamGemmConfig<1, 8, 2, true, 4>>{});
    one("(1,16,4,pf,1)", std::type_identity<cuda::StreamGemmConfig<1, 16, 4, true, 1>>{});
    one("(1,4,4,pf,4)", std::type_identity<cuda::StreamGemmConfig<1, 4, 4, true, 4>>{});
    one("(2,8,2,pf,2)", std::type_identity<cuda::StreamGemmConfig<2, 8, 2, true, 2>>{});
    std::printf("\n");
  }
}

// cublasGemmEx's default against cuBLASLt algorithms chosen per shape the way an engine could choose them: each of
// up to 16 heuristic candidates (and the default) timed over 4 copies of the weights in turn (so none stays in L2),
// the fastest kept; then the five shapes x 4 copies as one chain with the defaults and with the choices. Rows 20,
// 80, 640 (1, 4, 32 users' beams); fp32 outputs add into y (beta = 1) as the engine's residual GEMMs do.
void lt_chain(cublasHandle_t h, cudaStream_t s) {
  constexpr int kShapesN = sizeof(kShapes) / sizeof(kShapes[0]), kCopies = 4;
  cuda::LtHandle lt;
  const std::size_t ws_bytes = std::size_t(32) << 20;
  cuda::DeviceBuffer<char> ws(ws_bytes);
  EARN_CUDA_CHECK(cublasSetWorkspace(h, ws.data(), ws_bytes));
  std::vector<cuda::DeviceBuffer<T>> w(kShapesN * kCopies);
  for (int i = 0; i < kShapesN * kCopies; ++i) {
    const Shape& sh = kShapes[i / kCopies];
    w[i] = cuda::DeviceBuffer<T>(std::size_t(sh.out) * sh.in);
    cuda::kernel::fill_uniform<T><<<1024, 256, 0, s>>>(w[i].data(), static_cast<long long>(w[i].size()), 10 + i, -0.02f, 0.02f);
    EARN_CUDA_CHECK_LAUNCH();
  }
  for (int rows : {20, 80, 640}) {
    cuda::DeviceBuffer<T> x(std::size_t(rows) * 11008), y16(std::size_t(rows) * 33024);
    cuda::DeviceBuffer<float> y32(std::size_t(rows) * 33024);
    cuda::kernel::fill_uniform<T><<<1024, 256, 0, s>>>(x.data(), static_cast<long long>(x.size()), 1, -1.0f, 1.0f);
    EARN_CUDA_CHECK_LAUNCH();
    EARN_CUDA_CHECK(cudaMemsetAsync(y32.data(), 0, y32.size() * sizeof(float), s));
    std::vector<cuda::LtProduct> products;
    std::vector<cuda::LtAlgo> chosen(kShapesN);
    std::vector<bool> use_lt(kShapesN, false);
    double bytes = 0;
    // Shape si on weight copy `copy`: cublasGemmEx's default (algo null) or the cuBLASLt algorithm.
    auto call = [&](int si, int copy, const cuda::LtAlgo* algo) {
      const Shape& sh = kShapes[si];
      const T* wp = w[si * kCopies + copy].data();
      if (algo != nullptr)
        products[si].run(lt.get(), *algo, x.data(), wp, sh.fp32_out ? static_cast<void*>(y32.data()) : y16.data(),
                         sh.fp32_out ? 1.0f : 0.0f, ws.data(), ws_bytes, s);
      else if (sh.fp32_out) cuda::linear<T, float>(h, x.data(), wp, y32.data(), rows, sh.in, sh.out, 1.0f);
      else cuda::linear<T, T>(h, x.data(), wp, y16.data(), rows, sh.in, sh.out);
    };
    for (int si = 0; si < kShapesN; ++si) {
      const Shape& sh = kShapes[si];
      bytes += kCopies * gemm_bytes(sh, rows);
      products.push_back(sh.fp32_out ? cuda::LtProduct::make<T, float>(rows, sh.in, sh.out)
                                     : cuda::LtProduct::make<T, T>(rows, sh.in, sh.out));
      const auto algos = products[si].candidates(lt.get(), ws_bytes, 16);
      float best = median_ms(s, [&] {
        for (int k = 0; k < kCopies; ++k) call(si, k, nullptr);
      });
      const float def = best;
      for (const cuda::LtAlgo& a : algos) {
        const float t = median_ms(s, [&] {
          for (int k = 0; k < kCopies; ++k) call(si, k, &a);
        });
        if (t < best) best = t, use_lt[si] = true, chosen[si] = a;
      }
      std::printf("lt rows %3d %-5s default %7.1f us, chosen %7.1f us (%.3fx, %s of %zu candidates)\n", rows, sh.name,
                  def * 1e3 / kCopies, best * 1e3 / kCopies, def / best, use_lt[si] ? "a cuBLASLt algorithm" : "the default",
                  algos.size());
    }
    auto chain = [&](bool tuned) {
      for (int k = 0; k < kCopies; ++k)
        for (int si = 0; si < kShapesN; ++si) call(si, k, tuned && use_lt[si] ? &chosen[si] : nullptr);
    };
    const float t0 = median_ms(s, [&] { chain(false); }), t1 = median_ms(s, [&] { chain(true); });
    const float t2 = median_ms(s, [&] { chain(false); }), t3 = median_ms(s, [&] { chain(true); });
    std::printf("lt chain rows %3d (5 shapes x %d, %.0f MB): default %.1f / %.1f us, chosen %.1f / %.1f us (%.3fx, "
                "%.2f -> %.2f TB/s)\n",
                rows, kCopies, bytes / 1e6, t0 * 1e3, t2 * 1e3, t1 * 1e3, t3 * 1e3, (t0 + t2) / (t1 + t3),
                bytes / (0.5e-3 * (t0 + t2)) / 1e12, bytes / (0.5e-3 * (t1 + t3)) / 1e12);
  }
}

}  // namespace

// --profile: only the default stream_gemm at 20 rows, each of the five shapes 5 times (for ncu); --profile-chunk:
// the same over chunk-major packed weights.
void profile_stream(cudaStream_t s, bool chunk_major) {
  const int rows = 20, sms = cuda::sm_count();
  for (const Shape& sh : kShapes) {
    cuda::DeviceBuffer<T> x(std::size_t(rows) * sh.in), w(std::size_t(sh.out) * sh.in), y16(std::size_t(rows) * sh.out);
    cuda::DeviceBuffer<float> y32(std::size_t(rows) * sh.out);
    EARN_CUDA_CHECK(cudaMemsetAsync(y32.data(), 0, y32.size() * sizeof(float), s));
    cuda::StreamPackedWeights<T> pw;
    if (chunk_major) pw = cuda::StreamPackedWeights<T>(w.data(), sh.out, sh.in, s);
    for (int i = 0; i < 5; ++i) {
      if (sh.fp32_out) {
        const auto plan = cuda::stream_gemm_plan<T, float>(rows, sh.in, sh.out, sms);
        if (chunk_major) cuda::stream_gemm<T, float>(s, plan, x.data(), pw, y32.data(), rows, 1.0f);
        else cuda::stream_gemm<T, float>(s, plan, x.data(), w.data(), y32.data(), rows, sh.in, sh.out, 1.0f);
      } else {
        const auto plan = cuda::stream_gemm_plan<T, T>(rows, sh.in, sh.out, sms);
        if (chunk_major) cuda::stream_gemm<T, T>(s, plan, x.data(), pw, y16.data(), rows, 0.0f);
        else cuda::stream_gemm<T, T>(s, plan, x.data(), w.data(), y16.data(), rows, sh.in, sh.out, 0.0f);
      }
    }
  }
  EARN_CUDA_CHECK(cudaStreamSynchronize(s));
}

int main(int argc, char** argv) {
  if (cuda::device_count() == 0) {
    std::printf("skipped: no CUDA device\n");
    return 0;
  }
  if (argc > 1 && (std::string(argv[1]) == "--profile" || std::string(argv[1]) == "--profile-chunk")) {
    cuda::Stream s;
    profile_stream(s.get(), std::string(argv[1]) == "--profile-chunk");
    return 0;
  }
  cuda::BlasHandle h;
  cuda::Stream s;
  EARN_CUDA_CHECK(cublasSetStream(h.get(), s.get()));
  if (argc > 1 && std::string(argv[1]) == "--read-chain") {
    read_bandwidth(s.get());
    read_chain(s.get());
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "--lt-chain") {
    lt_chain(h.get(), s.get());
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "--stream-configs") {
    stream_configs(h.get(), s.get());
    return 0;
  }
  if (argc > 1 && std::string(argv[1]) == "--chains") {
    chains(h.get(), s.get());
    return 0;
  }
  const bool only_variants = argc > 1 && std::string(argv[1]) == "--variants";
  if (!only_variants) {
    read_bandwidth(s.get());
    probes(s.get());
  }
  chains(h.get(), s.get());
  stream_vs_cublas(h.get(), s.get());
  if (only_variants) return 0;
  lt_chain(h.get(), s.get());
  return 0;
}
