// earn/backend/cuda/blas.cuh - the CUDA backend's GEMMs through cuBLAS, always with fp32 accumulation
// (CUBLAS_COMPUTE_32F: no TF32 shortcut for fp32, tensor cores for bf16 / fp16 operands).
//
// Row-major tensors are column-major transposes, so y [rows, out] = x [rows, in] w^T with w [out, in] (the
// checkpoint layout) is the column-major product y^T = w x^T: op(A) = w^T as stored, B = x^T as stored.
#pragma once

#include <cublasLt.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "earn/backend/cuda/common.cuh"

namespace earn::cuda {

/// y [rows, out] = x [rows, in] w^T (+ beta y). TX: the operands' storage type, TY: the output's (fp32 or TX).
/// beta = 1 fuses a residual add into the GEMM.
template <class TX, class TY>
void linear(cublasHandle_t h, const TX* x, const TX* w, TY* y, int rows, int in, int out, float beta = 0.0f) {
  if (rows == 0) return;
  const float alpha = 1.0f;
  EARN_CUDA_CHECK(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, out, rows, in, &alpha, w, blas_type<TX>(), in, x,
                               blas_type<TX>(), in, &beta, y, blas_type<TY>(), out, CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT));
}

/// The input gradient of linear: dx [rows, in] = dy [rows, out] w (+ beta dx), w [out, in]. TX: dy's and w's
/// storage type, TY: dx's (fp32 or TX).
template <class TX, class TY>
void linear_dx(cublasHandle_t h, const TX* dy, const TX* w, TY* dx, int rows, int in, int out, float beta = 0.0f) {
  if (rows == 0) return;
  const float alpha = 1.0f;
  EARN_CUDA_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, in, rows, out, &alpha, w, blas_type<TX>(), in, dy,
                               blas_type<TX>(), out, &beta, dx, blas_type<TY>(), in, CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT));
}

/// The weight gradient of linear, accumulated in fp32: dw [out, in] += dy^T [out, rows] x [rows, in].
template <class TX>
void linear_dw(cublasHandle_t h, const TX* dy, const TX* x, float* dw, int rows, int in, int out) {
  if (rows == 0) return;
  const float alpha = 1.0f, beta = 1.0f;
  EARN_CUDA_CHECK(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_T, in, out, rows, &alpha, x, blas_type<TX>(), in, dy,
                               blas_type<TX>(), out, &beta, dw, CUDA_R_32F, in, CUBLAS_COMPUTE_32F,
                               CUBLAS_GEMM_DEFAULT));
}

/// One batched column-major GEMM over device pointer arrays (all entries share m, n, k and strides).
struct BatchedGemm {
  cublasOperation_t op_a, op_b;
  int m, n, k;
  cudaDataType_t a_type, b_type, c_type;
  int lda, ldb, ldc;
  float alpha, beta;
};

inline void gemm_batched(cublasHandle_t h, const BatchedGemm& g, const void* const* a, const void* const* b,
                         void* const* c, int count) {
  if (count == 0 || g.m == 0 || g.n == 0) return;
  EARN_CUDA_CHECK(cublasGemmBatchedEx(h, g.op_a, g.op_b, g.m, g.n, g.k, &g.alpha, a, g.a_type, g.lda, b, g.b_type,
                                      g.ldb, &g.beta, c, g.c_type, g.ldc, count, CUBLAS_COMPUTE_32F,
                                      CUBLAS_GEMM_DEFAULT));
}

/// Owning cuBLASLt handle. Move-only.
class LtHandle : public OwnedHandle<cublasLtHandle_t, cublasLtDestroy> {
 public:
  LtHandle() { EARN_CUDA_CHECK(cublasLtCreate(&h_)); }
};

/// One cuBLASLt algorithm (a named wrapper: see LtProduct::candidates).
struct LtAlgo {
  cublasLtMatmulAlgo_t algo;
};

/// The product of cuda::linear (y [rows, out] = x [rows, in] w^T + beta y, fp32 compute) as a cuBLASLt operation
/// whose algorithm the caller picks: the descriptors are made once, so a call costs what cublasGemmEx's does.
/// cuBLASLt's heuristic offers several algorithms per shape; the fastest is not always cublasGemmEx's default
/// (bench_cuda_gemm --lt-chain: 1.04-1.05x over the Llama-7B decode shapes at 20 and 80 rows on an H200). Move-only.
class LtProduct {
 public:
  template <class TX, class TY>
  static LtProduct make(int rows, int in, int out) {
    LtProduct p;
    EARN_CUDA_CHECK(cublasLtMatmulDescCreate(&p.op_, CUBLAS_COMPUTE_32F, CUDA_R_32F));
    const cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    EARN_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p.op_, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof(ta)));
    EARN_CUDA_CHECK(cublasLtMatmulDescSetAttribute(p.op_, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof(tb)));
    EARN_CUDA_CHECK(cublasLtMatrixLayoutCreate(&p.a_, blas_type<TX>(), in, out, in));
    EARN_CUDA_CHECK(cublasLtMatrixLayoutCreate(&p.b_, blas_type<TX>(), in, rows, in));
    EARN_CUDA_CHECK(cublasLtMatrixLayoutCreate(&p.c_, blas_type<TY>(), out, rows, out));
    return p;
  }
  LtProduct(const LtProduct&) = delete;
  LtProduct& operator=(const LtProduct&) = delete;
  LtProduct(LtProduct&& o) noexcept
      : op_(std::exchange(o.op_, nullptr)), a_(std::exchange(o.a_, nullptr)), b_(std::exchange(o.b_, nullptr)),
        c_(std::exchange(o.c_, nullptr)) {}
  LtProduct& operator=(LtProduct&& o) noexcept {
    std::swap(op_, o.op_);
    std::swap(a_, o.a_);
    std::swap(b_, o.b_);
    std::swap(c_, o.c_);
    return *this;
  }
  ~LtProduct() {
    if (c_) cublasLtMatrixLayoutDestroy(c_);
    if (b_) cublasLtMatrixLayoutDestroy(b_);
    if (a_) cublasLtMatrixLayoutDestroy(a_);
    if (op_) cublasLtMatmulDescDestroy(op_);
  }

  /// Up to `n` (at most 32) algorithms cuBLASLt's heuristic offers for this product with `workspace` bytes, best
  /// guess first.
  std::vector<LtAlgo> candidates(cublasLtHandle_t lt, std::size_t workspace, int n) const {
    // A plain array, not a vector: nvcc 13.0's front end fails on vectors of cuBLASLt's unnamed-struct typedefs.
    cublasLtMatmulHeuristicResult_t res[32];
    n = std::clamp(n, 1, 32);
    cublasLtMatmulPreference_t pref = nullptr;
    EARN_CUDA_CHECK(cublasLtMatmulPreferenceCreate(&pref));
    int got = 0;
    cublasStatus_t st = cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                                             &workspace, sizeof(workspace));
    if (st == CUBLAS_STATUS_SUCCESS) st = cublasLtMatmulAlgoGetHeuristic(lt, op_, a_, b_, c_, c_, pref, n, res, &got);
    cublasLtMatmulPreferenceDestroy(pref);
    EARN_CUDA_CHECK(st);
    std::vector<LtAlgo> out;
    for (int i = 0; i < got; ++i)
      if (res[i].state == CUBLAS_STATUS_SUCCESS) out.push_back({res[i].algo});
    return out;
  }

  /// y = x w^T + beta y with `algo` (one of candidates()), on stream s with that workspace.
  void run(cublasLtHandle_t lt, const LtAlgo& algo, const void* x, const void* w, void* y, float beta,
           void* workspace, std::size_t workspace_bytes, cudaStream_t s) const {
    const float alpha = 1.0f;
    EARN_CUDA_CHECK(cublasLtMatmul(lt, op_, &alpha, w, a_, x, b_, &beta, y, c_, y, c_, &algo.algo, workspace,
                                   workspace_bytes, s));
  }

 private:
  LtProduct() = default;
  cublasLtMatmulDesc_t op_ = nullptr;
  cublasLtMatrixLayout_t a_ = nullptr, b_ = nullptr, c_ = nullptr;
};

/// A product given a cuBLASLt algorithm (the CUDA engine's tune_gemms): model GEMM g at `rows` rows.
struct TunedGemm {
  int g = 0, rows = 0;
  LtProduct product;
  LtAlgo algo{};
};

}  // namespace earn::cuda
