// bench/cuda/bench_cuda_gemm.cu - how fast cuBLAS streams the weights of the decode GEMMs at Llama-7B shapes, and
// whether another cuBLASLt algorithm than cublasGemmEx's default would be faster: y [rows, out] = x [rows, in] w^T
// in bf16 (fp32 accumulation), rows = 20 B (B users x 20 beams). For each shape: the cublasGemmEx time (as
// cuda::linear calls it), then every algorithm cublasLtMatmulAlgoGetHeuristic offers (up to 32, 32 MB workspace),
// each timed with CUDA events as the median of 20 calls; prints the default, the best and its bandwidth.
// Without a CUDA device it prints "skipped: no CUDA device" and exits 0.
#include <cublasLt.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "earn/cuda.cuh"

using namespace earn;

namespace {

using T = __nv_bfloat16;

template <class F>
float median_ms(cudaStream_t s, F&& f) {
  cudaEvent_t a, b;
  EARN_CUDA_CHECK(cudaEventCreate(&a));
  EARN_CUDA_CHECK(cudaEventCreate(&b));
  for (int i = 0; i < 3; ++i) f();
  std::vector<float> ms;
  for (int i = 0; i < 20; ++i) {
    EARN_CUDA_CHECK(cudaEventRecord(a, s));
    f();
    EARN_CUDA_CHECK(cudaEventRecord(b, s));
    EARN_CUDA_CHECK(cudaEventSynchronize(b));
    float m = 0;
    EARN_CUDA_CHECK(cudaEventElapsedTime(&m, a, b));
    ms.push_back(m);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}

#define LT_CHECK(x) EARN_CUDA_CHECK(x)

}  // namespace

int main() {
  if (cuda::device_count() == 0) {
    std::printf("skipped: no CUDA device\n");
    return 0;
  }
  struct Shape {
    const char* name;
    int in, out;
    bool fp32_out;
  };
  const Shape shapes[] = {{"qkv", 4096, 12288, false}, {"wo", 4096, 4096, true}, {"w13", 4096, 22016, false},
                          {"w2", 11008, 4096, true},   {"head", 4096, 33024, true}};
  cuda::BlasHandle h;
  cuda::Stream s;
  EARN_CUDA_CHECK(cublasSetStream(h.get(), s.get()));
  cublasLtHandle_t lt;
  LT_CHECK(cublasLtCreate(&lt));
  const std::size_t ws_bytes = std::size_t(32) << 20;
  cuda::DeviceBuffer<char> ws(ws_bytes);
  for (int rows : {20, 80, 640}) {
    double def_total = 0, best_total = 0, bytes_total = 0;
    for (const Shape& sh : shapes) {
      cuda::DeviceBuffer<T> x(std::size_t(rows) * sh.in), w(std::size_t(sh.out) * sh.in), y16(std::size_t(rows) * sh.out);
      cuda::DeviceBuffer<float> y32(std::size_t(rows) * sh.out);
      cuda::kernel::fill_uniform<T><<<1024, 256>>>(x.data(), static_cast<long long>(x.size()), 1, -1.0f, 1.0f);
      cuda::kernel::fill_uniform<T><<<1024, 256>>>(w.data(), static_cast<long long>(w.size()), 2, -0.02f, 0.02f);
      EARN_CUDA_CHECK_LAUNCH();
      const float def = median_ms(s.get(), [&] {
        if (sh.fp32_out) cuda::linear<T, float>(h.get(), x.data(), w.data(), y32.data(), rows, sh.in, sh.out);
        else cuda::linear<T, T>(h.get(), x.data(), w.data(), y16.data(), rows, sh.in, sh.out);
      });
      cublasLtMatmulDesc_t op;
      LT_CHECK(cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
      const cublasOperation_t tA = CUBLAS_OP_T, tB = CUBLAS_OP_N;
      LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &tA, sizeof(tA)));
      LT_CHECK(cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tB, sizeof(tB)));
      const cudaDataType_t yt = sh.fp32_out ? CUDA_R_32F : CUDA_R_16BF;
      cublasLtMatrixLayout_t A, B, C;
      LT_CHECK(cublasLtMatrixLayoutCreate(&A, CUDA_R_16BF, sh.in, sh.out, sh.in));
      LT_CHECK(cublasLtMatrixLayoutCreate(&B, CUDA_R_16BF, sh.in, rows, sh.in));
      LT_CHECK(cublasLtMatrixLayoutCreate(&C, yt, sh.out, rows, sh.out));
      cublasLtMatmulPreference_t pref;
      LT_CHECK(cublasLtMatmulPreferenceCreate(&pref));
      LT_CHECK(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_bytes,
                                                    sizeof(ws_bytes)));
      cublasLtMatmulHeuristicResult_t res[32];
      int n = 0;
      LT_CHECK(cublasLtMatmulAlgoGetHeuristic(lt, op, A, B, C, C, pref, 32, res, &n));
      float best = 1e30f;
      int best_i = -1;
      const float alpha = 1.0f, beta = 0.0f;
      void* y = sh.fp32_out ? static_cast<void*>(y32.data()) : static_cast<void*>(y16.data());
      for (int i = 0; i < n; ++i) {
        if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
        const float t = median_ms(s.get(), [&] {
          LT_CHECK(cublasLtMatmul(lt, op, &alpha, w.data(), A, x.data(), B, &beta, y, C, y, C, &res[i].algo, ws.data(),
                                  ws_bytes, s.get()));
        });
        if (t < best) best = t, best_i = i;
      }
      const double bytes = (double(sh.out) * sh.in + double(rows) * sh.in) * 2 + double(rows) * sh.out * (sh.fp32_out ? 4 : 2);
      std::printf("rows %4d %-5s default %7.1f us (%.2f TB/s)  best of %2d Lt algos %7.1f us (%.2f TB/s, #%d)\n", rows,
                  sh.name, def * 1e3, bytes / (def * 1e-3) / 1e12, n, best * 1e3, bytes / (best * 1e-3) / 1e12, best_i);
      def_total += def;
      best_total += std::min(best, def);
      bytes_total += bytes;
      cublasLtMatmulPreferenceDestroy(pref);
      cublasLtMatrixLayoutDestroy(A);
      cublasLtMatrixLayoutDestroy(B);
      cublasLtMatrixLayoutDestroy(C);
      cublasLtMatmulDescDestroy(op);
    }
    std::printf("rows %4d all five: default %.1f us, best %.1f us (%.2fx)\n", rows, def_total * 1e3, best_total * 1e3,
                def_total / best_total);
  }
  cublasLtDestroy(lt);
  return 0;
}
