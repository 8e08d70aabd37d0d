// The weight-streaming GEMMs (stream_gemm.cuh; bulk_gemm.cuh, its bulk-copy twin) against a naive double-precision product on the host: y [rows, out]
// = x [rows, in] w^T + beta y (stream_gemm also over stream-packed weights), random bf16 / fp16 operands, 16-bit and fp32 outputs, every row count of an n-tile
// boundary (1 .. 32), shapes whose rows and k ranges end inside a block, one k split and up to 8 (the cluster's
// reduction over its blocks' shared memory; bulk_gemm: k ranges ending inside a stage, rows ending inside a block), beta = 0 over a NaN-poisoned output (an element not written, or read when it should not be, fails)
// and beta = 1 (the residual add). bulk_gemm also as the programmatic dependent of a kernel that writes its x and y
// late (its wait for them is tested). Bound per element: |got - want| <= 1e-5 sum_k |x w| (fp32 accumulation) plus
// the output's own rounding of the fp32 sum (2^-8 of it for bf16, 2^-11 for fp16); NaN never passes.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <vector>

#include "cuda/device_io.cuh"
#include "earn/backend/cuda/bulk_gemm.cuh"
#include "earn/backend/cuda/stream_gemm.cuh"

using namespace earn;
using earn::test::download;
using earn::test::upload;

TYPE_TO_STRING(__nv_bfloat16);
TYPE_TO_STRING(__half);

namespace {


template <class T>
std::vector<T> random_values(std::size_t n, float scale, std::mt19937& rng) {
  std::normal_distribution<float> nd(0.0f, scale);
  std::vector<T> v(n);
  for (auto& e : v) e = cuda::from_float<T>(nd(rng));
  return v;
}

struct Case {
  int rows, in, out, splits;  // splits 0: the device's plan
  float beta;
};
enum class Kernel { kStream, kStreamTileMajor, kStreamPacked, kStreamPackedPdl, kBulk, kBulkPdl };

// Copies x and y into place after spinning ~50 us, and lets the kernel after it start at once (a programmatic
// dependent launch): a product that read x or y before this kernel ended would see the NaN they held before.
template <class T, class TY>
__global__ void late_copy(const T* xs, T* x, long long nx, const TY* ys, TY* y, long long ny) {
  cuda::kernel::pdl_trigger();
  for (const long long t0 = clock64(); clock64() - t0 < 100000;) {
  }
  for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < nx + ny;
       i += static_cast<long long>(gridDim.x) * blockDim.x) {
    if (i < nx) x[i] = xs[i];
    else y[i - nx] = ys[i - nx];
  }
}

// Runs one product, checks every element; returns the worst error over its bound (<= 1 passes).
template <class T, class TY, Kernel K = Kernel::kStream>
double check(const Case& c, unsigned seed) {
  std::mt19937 rng(seed);
  const auto x = random_values<T>(std::size_t(c.rows) * c.in, 1.0f, rng);
  const auto w = random_values<T>(std::size_t(c.out) * c.in, 0.05f, rng);
  std::vector<TY> y0(std::size_t(c.rows) * c.out);
  if (c.beta != 0.0f) y0 = random_values<TY>(y0.size(), 1.0f, rng);
  else for (auto& e : y0) e = cuda::from_float<TY>(std::numeric_limits<float>::quiet_NaN());

  auto dx = upload(x), dw = upload(w);
  auto dy = upload(y0);
  int splits = 1;
  constexpr bool kStreamKind = K == Kernel::kStream || K == Kernel::kStreamTileMajor || K == Kernel::kStreamPacked ||
                               K == Kernel::kStreamPackedPdl;
  constexpr bool kPdl = K == Kernel::kBulkPdl || K == Kernel::kStreamPackedPdl;
  cuda::StreamGemmPlan splan;
  cuda::BulkGemmPlan bplan;
  cuda::StreamPackedWeights<T> packed;
  if constexpr (kStreamKind) {
    splan = cuda::stream_gemm_plan<T, TY>(c.rows, c.in, c.out, cuda::sm_count(), c.splits);
    splits = splan.splits;
    REQUIRE(cuda::stream_gemm_supported(dx.data(), dw.data(), c.rows, c.in));
    if constexpr (K != Kernel::kStream)  // chunk-major (the default) unless asked
      packed = cuda::StreamPackedWeights<T>(dw.data(), c.out, c.in, nullptr,
                                            K == Kernel::kStreamTileMajor ? cuda::StreamLayout::kTileMajor
                                                                          : cuda::StreamLayout::kChunkMajor);
  } else {
    bplan = cuda::bulk_gemm_plan<T, TY>(c.rows, c.in, c.out, cuda::sm_count(), c.splits);
    splits = bplan.splits;
    REQUIRE(cuda::bulk_gemm_supported(dx.data(), dw.data(), c.rows, c.in));
  }
  if (c.splits > 0) REQUIRE(splits == c.splits);
  auto product = [&](const T* xp, TY* yp, bool pdl) {
    if constexpr (K == Kernel::kStream)
      cuda::stream_gemm<T, TY>(nullptr, splan, xp, dw.data(), yp, c.rows, c.in, c.out, c.beta);
    else if constexpr (kStreamKind)
      cuda::stream_gemm<T, TY>(nullptr, splan, xp, packed, yp, c.rows, c.beta, pdl);
    else
      cuda::bulk_gemm<T, TY>(nullptr, bplan, xp, dw.data(), yp, c.rows, c.in, c.out, c.beta, pdl);
  };
  if constexpr (!kPdl) {
    product(dx.data(), dy.data(), false);
  } else {
    // x and y written by the kernel just before the product, which is launched as its programmatic dependent
    // (its weights, never written here, it may ask for early).
    cuda::DeviceBuffer<T> late_x(x.size());
    cuda::DeviceBuffer<TY> late_y(y0.size());
    late_x.fill_bytes(0xFF, nullptr);
    late_y.fill_bytes(0xFF, nullptr);
    late_copy<T, TY><<<64, 256>>>(dx.data(), late_x.data(), static_cast<long long>(x.size()), dy.data(),
                                  late_y.data(), static_cast<long long>(y0.size()));
    EARN_CUDA_CHECK_LAUNCH();
    product(late_x.data(), late_y.data(), true);
    EARN_CUDA_CHECK(cudaDeviceSynchronize());
    EARN_CUDA_CHECK(cudaMemcpy(dy.data(), late_y.data(), y0.size() * sizeof(TY), cudaMemcpyDeviceToDevice));
  }
  EARN_CUDA_CHECK(cudaDeviceSynchronize());
  const auto y = download(dy, y0.size());

  const double round = std::is_same_v<TY, float> ? 0.0 : std::is_same_v<TY, __half> ? 0x1p-11 : 0x1p-8;
  double worst = 0.0;
  int bad = 0;
  for (int r = 0; r < c.rows; ++r)
    for (int n = 0; n < c.out; ++n) {
      double want = 0.0, mag = 0.0;
      for (int k = 0; k < c.in; ++k) {
        const double p = double(cuda::to_float(x[std::size_t(r) * c.in + k])) * cuda::to_float(w[std::size_t(n) * c.in + k]);
        want += p;
        mag += std::abs(p);
      }
      const std::size_t i = std::size_t(r) * c.out + n;
      if (c.beta != 0.0f) {
        want += c.beta * double(cuda::to_float(y0[i]));
        mag += std::abs(c.beta * double(cuda::to_float(y0[i])));
      }
      const double got = cuda::to_float(y[i]);
      // fp32 accumulation, then the output's rounding of that fp32 sum (2^-8 of it for bf16).
      const double bound = 1e-5 * mag * (1.0 + round) + round * std::abs(want) + 1e-30;
      const double e = std::abs(got - want) / bound;
      if (!(e <= 1.0)) ++bad;  // NaN counts as bad
      worst = std::max(worst, std::isnan(e) ? 1e30 : e);
    }
  INFO("rows " << c.rows << " in " << c.in << " out " << c.out << " splits " << splits << " (asked " << c.splits
               << ") beta " << c.beta);
  CHECK(bad == 0);
  return worst;
}

const Case kCases[] = {
    {1, 8, 1, 0, 0.0f},      {2, 40, 17, 0, 0.0f},     {7, 256, 300, 1, 0.0f},    {8, 264, 257, 0, 1.0f},
    {9, 1000, 129, 0, 0.0f}, {9, 1000, 129, 3, 1.0f},   {16, 520, 33, 2, 0.0f},    {20, 4096, 520, 0, 1.0f},
    {20, 4096, 520, 1, 0.0f}, {20, 4096, 520, 8, 0.0f}, {24, 2048, 1000, 8, 1.0f}, {25, 776, 64, 0, 0.0f},
    {31, 2048, 300, 0, 0.0f}, {32, 4096, 256, 5, 1.0f},  {32, 512, 4112, 0, 0.0f},
};
// bulk_gemm: one k step, a last stage of one k step (1040 = 8 x 128 + 16), k ending inside a 64-k box (1000,
// 776), several rounds of the ring, rows ending inside a block and inside an n-tile, every n-tile count, 1-8 k
// splits (cluster reduction).
const Case kBulkCases[] = {
    {1, 16, 1, 0, 0.0f},       {3, 48, 17, 1, 1.0f},      {8, 256, 300, 0, 0.0f},   {9, 1040, 129, 3, 0.0f},
    {16, 1040, 33, 2, 1.0f},   {20, 4096, 520, 0, 1.0f},  {20, 4096, 520, 1, 0.0f}, {20, 4096, 520, 8, 0.0f},
    {24, 2064, 1000, 0, 0.0f}, {25, 11008, 70, 5, 1.0f},  {32, 4096, 256, 4, 1.0f}, {32, 512, 4112, 0, 0.0f},
    {9, 1000, 129, 0, 1.0f},   {25, 776, 64, 2, 0.0f},    {2, 8, 3, 0, 0.0f},
};

}  // namespace

TEST_CASE_TEMPLATE("stream_gemm equals a naive product (16-bit output)", T, __nv_bfloat16, __half) {
  double worst = 0.0;
  unsigned seed = 1;
  for (const Case& c : kCases) worst = std::max(worst, check<T, T>(c, seed++));
  MESSAGE("worst error / bound: " << worst);
}

TEST_CASE_TEMPLATE("stream_gemm equals a naive product (fp32 output, the residual stream)", T, __nv_bfloat16, __half) {
  double worst = 0.0;
  unsigned seed = 100;
  for (const Case& c : kCases) worst = std::max(worst, check<T, float>(c, seed++));
  MESSAGE("worst error / bound: " << worst);
}

TEST_CASE_TEMPLATE("stream_gemm over stream-packed weights equals a naive product, also as a programmatic dependent", T,
                   __nv_bfloat16, __half) {
  double worst = 0.0;
  unsigned seed = 400;
  for (const Case& c : kCases) {
    worst = std::max(worst, check<T, T, Kernel::kStreamPacked>(c, seed++));
    worst = std::max(worst, check<T, float, Kernel::kStreamPackedPdl>(c, seed++));
    worst = std::max(worst, check<T, T, Kernel::kStreamTileMajor>(c, seed++));
  }
  MESSAGE("worst error / bound: " << worst);
}

TEST_CASE("stream_gemm: packed and row-major weights give bit-identical products; bad shapes are refused") {
  using T = __nv_bfloat16;
  for (const Case& c : {Case{20, 4096, 520, 8, 0.0f}, Case{9, 1000, 129, 3, 0.0f}, Case{32, 512, 4112, 0, 0.0f}}) {
    std::mt19937 rng(11);
    auto dx = upload(random_values<T>(std::size_t(c.rows) * c.in, 1.0f, rng));
    auto dw = upload(random_values<T>(std::size_t(c.out) * c.in, 0.05f, rng));
    const cuda::StreamGemmPlan plan = cuda::stream_gemm_plan<T, float>(c.rows, c.in, c.out, cuda::sm_count(), c.splits);
    cuda::DeviceBuffer<float> y0(std::size_t(c.rows) * c.out), y1(y0.size());
    cuda::stream_gemm<T, float>(nullptr, plan, dx.data(), dw.data(), y0.data(), c.rows, c.in, c.out, 0.0f);
    for (auto layout : {cuda::StreamLayout::kTileMajor, cuda::StreamLayout::kChunkMajor}) {
      const cuda::StreamPackedWeights<T> packed(dw.data(), c.out, c.in, nullptr, layout);
      CHECK(packed.bytes() == std::size_t((c.out + 15) / 16) * 16 * ((c.in + 31) / 32 * 32) * sizeof(T));
      y1.fill_bytes(0xFF, nullptr);
      cuda::stream_gemm<T, float>(nullptr, plan, dx.data(), packed, y1.data(), c.rows, 0.0f);
      INFO("rows " << c.rows << " in " << c.in << " out " << c.out << " layout " << static_cast<int>(layout));
      CHECK(download(y0, y0.size()) == download(y1, y1.size()));
    }
  }
  cuda::DeviceBuffer<T> w(64 * 64);
  CHECK_THROWS_AS(cuda::StreamPackedWeights<T>(w.data(), 4, 36, nullptr), ConfigError);       // in not a multiple of 8
  CHECK_THROWS_AS(cuda::StreamPackedWeights<T>(w.data() + 4, 4, 32, nullptr), ConfigError);   // misaligned
  CHECK_THROWS_AS(cuda::StreamPackedWeights<T>(w.data(), 0, 32, nullptr), ConfigError);       // no rows
  CHECK_THROWS_AS(cuda::StreamPackedWeights<T>(w.data(), 4, 32, nullptr, cuda::StreamLayout::kRowMajor), ConfigError);
}

// Both launches: ordinary, and as the programmatic dependent of a kernel that writes x and y late (the product
// must wait for them).
template <class T, Kernel K>
void bulk_cases(unsigned seed) {
  double worst16 = 0.0, worst32 = 0.0;
  for (const Case& c : kBulkCases) {
    worst16 = std::max(worst16, check<T, T, K>(c, seed++));
    worst32 = std::max(worst32, check<T, float, K>(c, seed++));
  }
  MESSAGE("worst error / bound: " << worst16 << " (16-bit output), " << worst32 << " (fp32)");
}

TEST_CASE_TEMPLATE("bulk_gemm equals a naive product (16-bit and fp32 outputs)", T, __nv_bfloat16, __half) {
  bulk_cases<T, Kernel::kBulk>(200);
}

TEST_CASE_TEMPLATE("bulk_gemm as a programmatic dependent waits for the kernel before it", T, __nv_bfloat16, __half) {
  bulk_cases<T, Kernel::kBulkPdl>(300);
}

TEST_CASE("bulk_gemm: refuses what its copies cannot take") {
  using T = __nv_bfloat16;
  cuda::DeviceBuffer<T> x(64), w(64);
  CHECK(cuda::bulk_gemm_supported(x.data(), w.data(), 1, 32));
  CHECK_FALSE(cuda::bulk_gemm_supported(x.data(), w.data(), 33, 32));      // more than 32 rows
  CHECK_FALSE(cuda::bulk_gemm_supported(x.data(), w.data(), 0, 32));       // no rows
  CHECK_FALSE(cuda::bulk_gemm_supported(x.data(), w.data(), 1, 36));       // rows not whole 16-byte pieces
  CHECK_FALSE(cuda::bulk_gemm_supported(x.data() + 4, w.data(), 1, 32));   // 8-byte aligned only
  const float* f32 = nullptr;
  CHECK_FALSE(cuda::bulk_gemm_supported(f32, f32, 1, 32));  // fp32 storage takes cuBLAS
}

TEST_CASE("stream_gemm: split products are bit-identical run to run; unsupported shapes are refused") {
  using T = __nv_bfloat16;
  const int rows = 20, in = 4096, out = 1024;
  std::mt19937 rng(7);
  auto dx = upload(random_values<T>(std::size_t(rows) * in, 1.0f, rng));
  auto dw = upload(random_values<T>(std::size_t(out) * in, 0.05f, rng));
  const cuda::StreamGemmPlan plan = cuda::stream_gemm_plan<T, float>(rows, in, out, cuda::sm_count(), 8);
  REQUIRE(plan.splits == 8);
  cuda::DeviceBuffer<float> y(std::size_t(rows) * out);
  std::vector<std::vector<float>> runs;
  for (int i = 0; i < 3; ++i) {
    cuda::stream_gemm<T, float>(nullptr, plan, dx.data(), dw.data(), y.data(), rows, in, out, 0.0f);
    runs.push_back(download(y, y.size()));
  }
  CHECK(runs[0] == runs[1]);
  CHECK(runs[0] == runs[2]);

  CHECK_FALSE(cuda::stream_gemm_supported(dx.data(), dw.data(), 33, in));      // more than 32 rows
  CHECK_FALSE(cuda::stream_gemm_supported(dx.data(), dw.data(), 0, in));       // no rows
  CHECK_FALSE(cuda::stream_gemm_supported(dx.data(), dw.data(), rows, 4092));  // rows not whole 16-byte pieces
  CHECK_FALSE(cuda::stream_gemm_supported(dx.data() + 1, dw.data(), rows, in));  // misaligned
  const float* f32 = nullptr;
  CHECK_FALSE(cuda::stream_gemm_supported(f32, f32, rows, in));  // fp32 storage takes cuBLAS
}
