// earn/backend/cuda/train_kernels.cuh - the row and element kernels of a training step on the GPU (forward with
// saved statistics, and their backward passes), the optimizer's fused AdamW and the deterministic reductions
// around it. GEMMs are cuBLAS (blas.cuh, train_step.cuh); attention is train_attention.cuh.
//
// Numerics as in the CPU trainer (backend/cpu/train.hpp, backward.hpp): residual stream, its gradients, RMSNorm
// statistics, logits, the loss and every parameter gradient are fp32; storage type T (float or bf16 / fp16) holds
// GEMM operands (normed rows, q/k/v, gate/up, activations, their gradients) with the math on them in fp32 registers.
// Every reduction runs in a fixed order (no float atomics), so a step is bitwise repeatable on one GPU.
#pragma once

#include <cstdint>

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"

namespace earn::cuda::kernel {

/// Input rows of a training micro-batch: code >= 0 a token row of the [vocab + r, dim] table, code < 0 register
/// -code-1 (row vocab - code - 1), kPadRow a zero row (the padding that keeps a micro-batch's shapes in few buckets).
constexpr int kPadRow = -2147483647 - 1;
__global__ inline void embed_train(const int* codes, const float* table, int rows, int dim, int vocab, float* x) {
  const long long n = static_cast<long long>(rows) * dim;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = t / dim, d = t % dim;
    const int code = codes[r];
    x[t] = code == kPadRow ? 0.0f : table[(code >= 0 ? code : vocab - code - 1) * static_cast<long long>(dim) + d];
  }
}

/// dst[idx[i]] = src[i] for rows of `dim` floats (dst zeroed before: rows no index names keep 0). The gradient
/// of gather_rows: rows a policy dropped at this layer get nothing from above.
__global__ inline void scatter_rows(const float* src, const int* idx, int rows, int dim, float* dst) {
  const long long n = static_cast<long long>(rows) * dim;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = t / dim, d = t % dim;
    dst[idx[r] * static_cast<long long>(dim) + d] = src[t];
  }
}

/// out[r] = x[r] * inv[r] * g with inv[r] = rsqrt(mean(x[r]^2) + eps) saved for the backward pass. One block per row.
template <class T>
__global__ void rmsnorm_save(const float* x, const float* g, float eps, int dim, T* out, float* inv) {
  __shared__ float red[32];
  const float* xr = x + static_cast<long long>(blockIdx.x) * dim;
  float ss = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_reduce<false>(ss, red);
  const float r = 1.0f / sqrtf(ss / static_cast<float>(dim) + eps);
  if (threadIdx.x == 0) inv[blockIdx.x] = r;
  T* o = out + static_cast<long long>(blockIdx.x) * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = from_float<T>(xr[i] * r * g[i]);
}

/// RMSNorm's input gradient, added to `base` (null: 0): out = base + r (dy . g) - x r^3 / d * sum(dy . g . x). One
/// block per row; out may alias base. (The gain's gradient is colsum_norm_partial.)
__global__ inline void rmsnorm_backward(const float* x, const float* g, const float* inv, const float* dy,
                                        const float* base, int dim, float* out) {
  __shared__ float red[32];
  const long long off = static_cast<long long>(blockIdx.x) * dim;
  float dot = 0.0f;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) dot += dy[off + i] * g[i] * x[off + i];
  dot = block_reduce<false>(dot, red);
  const float r = inv[blockIdx.x], c = r * r * r * dot / static_cast<float>(dim);
  for (int i = threadIdx.x; i < dim; i += blockDim.x)
    out[off + i] = (base ? base[off + i] : 0.0f) + r * dy[off + i] * g[i] - c * x[off + i];
}

/// Column sums in two passes with a fixed order: partial[c][j] = sum over rows [c*chunk, (c+1)*chunk) of
/// f(i, j), then colsum_finish adds the chunks in order into dst (dst += total). f: RMSNorm gain
/// (dy x inv) or a plain column (a bias: the rows of a T matrix).
constexpr int kColChunks = 64;

__global__ inline void colsum_norm_partial(const float* dy, const float* x, const float* inv, int rows, int dim,
                                           float* partial) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y;
  if (j >= dim) return;
  const int chunk = (rows + kColChunks - 1) / kColChunks, r0 = c * chunk, r1 = min(rows, r0 + chunk);
  float s = 0.0f;
  for (int i = r0; i < r1; ++i) s += dy[static_cast<long long>(i) * dim + j] * x[static_cast<long long>(i) * dim + j] * inv[i];
  partial[static_cast<long long>(c) * dim + j] = s;
}

template <class T>
__global__ void colsum_partial(const T* a, int rows, int dim, int ld, float* partial) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x, c = blockIdx.y;
  if (j >= dim) return;
  const int chunk = (rows + kColChunks - 1) / kColChunks, r0 = c * chunk, r1 = min(rows, r0 + chunk);
  float s = 0.0f;
  for (int i = r0; i < r1; ++i) s += to_float(a[static_cast<long long>(i) * ld + j]);
  partial[static_cast<long long>(c) * dim + j] = s;
}

__global__ inline void colsum_finish(const float* partial, int dim, float* dst) {
  const int j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= dim) return;
  float s = 0.0f;
  for (int c = 0; c < kColChunks; ++c) s += partial[static_cast<long long>(c) * dim + j];
  dst[j] += s;
}

/// In place on the fused [rows, qd + 2 kvd] q|k|v rows: forward (inverse = 0) adds the biases to q, k, v and
/// rotates q and k by position; backward (inverse = 1) rotates the gradients of q and k back by the same angles
/// (RoPE's adjoint). One thread per (row, head, pair).
template <class T>
__global__ void bias_rope(T* qkv, const float* bias, const int* pos, int rows, int nh, int nkv, int hd, float theta,
                          int interleaved, int inverse) {
  const int half = hd / 2, qd = nh * hd, width = qd + 2 * nkv * hd, heads = nh + nkv;
  const long long n = static_cast<long long>(rows) * heads * half;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const int r = static_cast<int>(t / (static_cast<long long>(heads) * half));
    const int head = static_cast<int>((t / half) % heads), i = static_cast<int>(t % half);
    T* row = qkv + static_cast<long long>(r) * width;
    const int base = head < nh ? head * hd : qd + (head - nh) * hd;
    const int ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
    float c, s;
    rope_cos_sin(theta, i, hd, pos[r], c, s);
    if (inverse) s = -s;
    float a = to_float(row[base + ia]), b = to_float(row[base + ib]);
    if (bias && !inverse) {
      a += bias[base + ia];
      b += bias[base + ib];
    }
    row[base + ia] = from_float<T>(a * c - b * s);
    row[base + ib] = from_float<T>(a * s + b * c);
  }
  // v's biases (no rotation): one thread per (row, element of v).
  if (bias && !inverse) {
    const int kvd = nkv * hd;
    const long long m = static_cast<long long>(rows) * kvd;
    for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < m;
         t += static_cast<long long>(gridDim.x) * blockDim.x) {
      const long long r = t / kvd;
      const int e = static_cast<int>(t % kvd);
      T* v = qkv + r * width + qd + kvd + e;
      *v = from_float<T>(to_float(*v) + bias[qd + kvd + e]);
    }
  }
}

/// SwiGLU's backward over the fused gate|up rows: dgu[r, i] = da . up . sig (1 + gate (1 - sig)),
/// dgu[r, H + i] = da . silu(gate).
template <class T>
__global__ void swiglu_backward(const T* gu, const T* da, int rows, int H, T* dgu) {
  const long long n = static_cast<long long>(rows) * H;
  for (long long t = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; t < n;
       t += static_cast<long long>(gridDim.x) * blockDim.x) {
    const long long r = t / H, i = t % H;
    const float g = to_float(gu[r * 2 * H + i]), u = to_float(gu[r * 2 * H + H + i]), d = to_float(da[t]);
    const float sig = 1.0f / (1.0f + expf(-g));
    dgu[r * 2 * H + i] = from_float<T>(d * u * sig * (1.0f + g * (1.0f - sig)));
    dgu[r * 2 * H + H + i] = from_float<T>(d * g * sig);
  }
}

/// Cross-entropy per row of logits [rows, vocab] against targets: loss[r] = lse - logit[target] (log-sum-exp in
/// double, as the CPU trainer), dlogits = (softmax - onehot) * inv_norm[0] in storage type T. A target < 0 (a
/// padding row) gives loss 0 and no gradient. One block per row.
template <class T>
__global__ void cross_entropy(const float* logits, const int* targets, int vocab, const float* inv_norm, double* loss,
                              T* dlogits) {
  __shared__ float red[32];
  __shared__ double dred[32];
  const float* x = logits + static_cast<long long>(blockIdx.x) * vocab;
  const int tg = targets[blockIdx.x];
  if (tg < 0) {
    if (threadIdx.x == 0) loss[blockIdx.x] = 0.0;
    T* d = dlogits + static_cast<long long>(blockIdx.x) * vocab;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) d[i] = from_float<T>(0.0f);
    return;
  }
  float m = -INFINITY;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, x[i]);
  m = block_reduce<true>(m, red);
  double s = 0.0;
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) s += exp(static_cast<double>(x[i] - m));
  // Block sum in double, fixed order (warp shuffles, then warp 0 over the warps).
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
  if (lane == 0) dred[warp] = s;
  __syncthreads();
  double tot = 0.0;
  for (int w = 0; w < warps; ++w) tot += dred[w];
  const double lse = static_cast<double>(m) + log(tot);
  if (threadIdx.x == 0) loss[blockIdx.x] = lse - static_cast<double>(x[tg]);
  T* d = dlogits + static_cast<long long>(blockIdx.x) * vocab;
  const double scale = static_cast<double>(inv_norm[0]);
  for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
    const double p = exp(static_cast<double>(x[i]) - lse);
    d[i] = from_float<T>(static_cast<float>((p - (i == tg ? 1.0 : 0.0)) * scale));
  }
}

/// Embedding (and register) gradients without atomics: for each distinct input id (rows of the [vocab + r_p + r_s,
/// dim] block: token t, or register j at vocab + j), the rows that used it in a fixed order (CSR: rows_of[off[u]
/// .. off[u+1])), summed and added to its gradient row. One block per id.
__global__ inline void embedding_backward(const float* dx, const int* ids, const int* off, const int* rows_of,
                                          const int* n_ids, int dim, float* dtable) {
  const int u = blockIdx.x;
  if (u >= n_ids[0]) return;  // the grid covers every row; a micro-batch uses fewer distinct ids
  float* dst = dtable + static_cast<long long>(ids[u]) * dim;
  for (int j = threadIdx.x; j < dim; j += blockDim.x) {
    float s = 0.0f;
    for (int k = off[u]; k < off[u + 1]; ++k) s += dx[static_cast<long long>(rows_of[k]) * dim + j];
    dst[j] += s;
  }
}

/// Sum of squares of every tensor's gradient in fixed-size pieces: partial[p] = sum of g^2 over piece p of the
/// flat gradient buffer (pieces never straddle tensors: the host cuts them per tensor). Finite-ness follows from it.
constexpr int kPiece = 4096;
struct Piece {
  long long begin;  // first element in the flat buffer
  int size;         // elements, <= kPiece
  int tensor;       // index into the tensor table
};

__global__ inline void piece_sumsq(const float* g, const Piece* pieces, float* partial) {
  __shared__ float red[32];
  const Piece p = pieces[blockIdx.x];
  float s = 0.0f;
  for (int i = threadIdx.x; i < p.size; i += blockDim.x) {
    const float v = g[p.begin + i];
    s += v * v;
  }
  s = block_reduce<false>(s, red);
  if (threadIdx.x == 0) partial[blockIdx.x] = s;
}

/// One tensor's AdamW settings.
struct AdamTensor {
  float decay;  // 1 - lr * weight_decay for this tensor
  int frozen;   // 1: leave the parameter and its state as they are
};

/// AdamW over the pieces (torch.optim.AdamW's arithmetic, as train/optimizer.hpp): g *= clip; p *= decay;
/// m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2; p -= step_size m / (sqrt(v) / sqrt_bc2 + eps); then the compute
/// copy w[i] = T(p[i]). Frozen tensors only refresh the copy.
template <class T>
__global__ void adamw_pieces(float* p, float* g, float* m, float* v, T* w, const Piece* pieces,
                             const AdamTensor* tensors, float clip, float b1, float b2, float step_size,
                             float sqrt_bc2, float eps) {
  const Piece pc = pieces[blockIdx.x];
  const AdamTensor tt = tensors[pc.tensor];
  for (int i = threadIdx.x; i < pc.size; i += blockDim.x) {
    const long long e = pc.begin + i;
    if (!tt.frozen) {
      const float gi = clip != 1.0f ? g[e] * clip : g[e];
      float pi = p[e] * tt.decay;
      const float mi = b1 * m[e] + (1.0f - b1) * gi;
      const float vi = b2 * v[e] + (1.0f - b2) * gi * gi;
      pi -= step_size * mi / (sqrtf(vi) / sqrt_bc2 + eps);
      p[e] = pi;
      m[e] = mi;
      v[e] = vi;
    }
    w[e] = from_float<T>(p[e]);
  }
}

/// Busy-waits about `cycles` clock cycles (profiling: holds the stream while the host enqueues the work to time).
__global__ inline void spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) {
  }
}

/// loss[0] = inv_norm[0] * sum of rows[0, n) in order (one thread: n is a micro-batch's answer rows, a few hundred).
__global__ inline void sum_in_order(const double* rows, int n, const float* inv_norm, double* loss) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double s = 0.0;
  for (int i = 0; i < n; ++i) s += rows[i];
  loss[0] = s * static_cast<double>(inv_norm[0]);
}

}  // namespace earn::cuda::kernel
