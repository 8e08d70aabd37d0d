// earn/backend/cuda/blas.cuh - the CUDA backend's GEMMs through cuBLAS, always with fp32 accumulation
// (CUBLAS_COMPUTE_32F: no TF32 shortcut for fp32, tensor cores for bf16 / fp16 operands).
//
// Row-major tensors are column-major transposes, so y [rows, out] = x [rows, in] w^T with w [out, in] (the
// checkpoint layout) is the column-major product y^T = w x^T: op(A) = w^T as stored, B = x^T as stored.
#pragma once

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

}  // namespace earn::cuda
