// earn/backend/cuda/observe.cuh - the attention observer's reduction on the GPU (attention/observer.hpp): per
// selected query row and head, head / tail mass, density and entropy of its attention probabilities, without
// writing the probabilities anywhere. The flash kernels never form them, so this kernel recomputes the row's scores
// from the rotated Q and the segment's cached K in fp32 (one block per (row, head)), keeps them in shared memory
// and reduces them there; the host averages the rows of each sample and adds them to the Observer (accumulate).
#pragma once

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"

namespace earn::cuda {

/// What observe_stats reduces to, per (row, head): the four statistics of attention::RowStats.
struct ObserveParams {
  int head_keys = 1, tail_keys = 1;  ///< T_h, T_t
  float threshold = 0.01f;           ///< eps (density: p > eps), unless above_uniform
  int above_uniform = 0;             ///< density: p > 1 / (visible keys)
};

namespace kernel {

/// out[b * nh + h] = (head mass, tail mass, density, entropy) of query row rows[b] = (segment, row within it) at
/// head h over the segment's S prefix keys (sg.pk, sg.kpos), masked by the layer's `mask`. Dynamic shared memory:
/// (hd + max S) floats. Block size a multiple of 32.
template <class Policy, class T>
__global__ void observe_stats(const T* q, const int* pos, const Segment* segs, const int2* rows, int nh, int nkv,
                              int hd, ObserveParams o, float4* out, const attention::LayerMask<Policy> mask) {
  extern __shared__ float sm[];
  __shared__ float red[32];
  const int2 rr = rows[blockIdx.x];
  const Segment sg = segs[rr.x];
  const int h = blockIdx.y, g = h / (nh / nkv), i = sg.q_off + rr.y, S = sg.S;
  const long long qd = static_cast<long long>(nh) * hd, kvd = static_cast<long long>(nkv) * hd;
  float* p = sm + hd;
  const int n = row_probs<Policy, T>(mask, h, q + i * qd + h * hd, pos[i], static_cast<const T*>(sg.pk), kvd, g, hd,
                                     sg.kpos, S, sm, p, red);
  const float eps = o.above_uniform ? 1.0f / static_cast<float>(n) : o.threshold;
  float dens = 0.0f, ent = 0.0f;
  for (int j = threadIdx.x; j < S; j += blockDim.x)
    if (p[j] >= 0.0f) {
      dens += p[j] > eps;
      if (p[j] > 0.0f) ent -= p[j] * logf(p[j]);
    }
  dens = block_reduce<false>(dens, red);
  ent = block_reduce<false>(ent, red);
  if (threadIdx.x == 0) {  // head and tail: the first T_h and last T_t visible keys, in key (position) order
    float head = 0.0f, tail = 0.0f;
    int seen = 0;
    for (int j = 0; j < S; ++j)
      if (p[j] >= 0.0f) {
        if (seen < o.head_keys) head += p[j];
        if (seen >= n - o.tail_keys) tail += p[j];
        ++seen;
      }
    out[static_cast<long long>(blockIdx.x) * nh + h] = make_float4(head, tail, n > 0 ? dens / n : 0.0f, ent);
  }
}

}  // namespace kernel
}  // namespace earn::cuda
