// earn/backend/cuda/weights.cuh - a model's parameters on the device, in the layout the CUDA engine runs:
// q/k/v stacked into one matrix and gate/up into another, so each is one GEMM; norms and biases in fp32.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"
#include "earn/model/weights.hpp"

namespace earn::cuda {

/// One decoder block on the device. Matrices keep the checkpoint layout [out, in], row-major.
template <class DType>
struct DeviceLayer {
  using T = storage_t<DType>;
  DeviceBuffer<float> attn_norm;  ///< [dim]
  DeviceBuffer<T> wqkv;           ///< [qd + 2 kv_dim, dim]: wq, wk, wv stacked
  DeviceBuffer<float> bqkv;       ///< [qd + 2 kv_dim], empty without biases
  DeviceBuffer<T> wo;             ///< [dim, qd]
  DeviceBuffer<float> ffn_norm;   ///< [dim]
  DeviceBuffer<T> w13;            ///< [2 hidden_dim, dim]: w1 (gate), w3 (up) stacked
  DeviceBuffer<T> w2;             ///< [dim, hidden_dim]
};

/// Every parameter of a model on the device in storage type `DType`. Move-only.
/// \code
///   auto dw = earn::cuda::DeviceWeights<earn::dtype::Bf16>::upload(host_weights);   // from a loaded model
///   auto rw = earn::cuda::DeviceWeights<earn::dtype::Bf16>::random(cfg, {.seed = 1}); // made on the GPU
/// \endcode
template <class DType>
struct DeviceWeights {
  using T = storage_t<DType>;
  ModelConfig config;
  int prefix_registers = 0, suffix_registers = 0;
  DeviceBuffer<T> tok_embeddings;  ///< [vocab, dim]
  DeviceBuffer<T> lm_head;         ///< [vocab, dim]; empty when tied
  DeviceBuffer<T> registers;       ///< [r_p + r_s, dim]: prefix rows, then suffix rows
  DeviceBuffer<float> final_norm;  ///< [dim]
  std::vector<DeviceLayer<DType>> layers;

  int register_count() const { return prefix_registers + suffix_registers; }
  const T* classifier() const { return config.tied_embeddings ? tok_embeddings.data() : lm_head.data(); }

  /// Bytes of device memory the parameters take.
  Index bytes() const {
    Index n = Index(tok_embeddings.size() + lm_head.size() + registers.size()) * Index{sizeof(T)} +
              Index(final_norm.size()) * 4;
    for (const auto& l : layers)
      n += Index(l.wqkv.size() + l.wo.size() + l.w13.size() + l.w2.size()) * Index{sizeof(T)} +
           Index(l.attn_norm.size() + l.ffn_norm.size() + l.bqkv.size()) * 4;
    return n;
  }

  /// Copy host weights (validated first) to the device, rounding to T.
  static DeviceWeights upload(const ModelWeights& w) {
    w.validate();
    const ModelConfig& c = w.config;
    DeviceWeights d;
    d.config = c;
    d.prefix_registers = static_cast<int>(w.registers.prefix.rows());
    d.suffix_registers = static_cast<int>(w.registers.suffix.rows());
    const Index qd = Index{c.n_heads} * c.head_dim(), kvd = c.kv_dim(), width = qd + 2 * kvd;
    // Big enough for the largest single tensor.
    DeviceBuffer<float> staging(std::size_t(std::max({Index{c.vocab_size} * c.dim, 2 * Index{c.hidden_dim} * c.dim,
                                                      width * c.dim, Index{c.dim} * qd,
                                                      Index{d.register_count()} * c.dim})));
    // Host rows are appended to the staging buffer, then converted into `dst` in one kernel.
    auto put = [&](DeviceBuffer<T>& dst, std::initializer_list<const Matrix*> parts) {
      Index n = 0;
      for (const Matrix* m : parts) {
        EARN_CUDA_CHECK(cudaMemcpy(staging.data() + n, m->data(), std::size_t(m->size()) * 4, cudaMemcpyHostToDevice));
        n += m->size();
      }
      dst.reserve(std::size_t(n));
      if (n == 0) return;
      kernel::convert<T><<<kernel::grid_for(n), kernel::kThreads>>>(staging.data(), n, dst.data());
      EARN_CUDA_CHECK_LAUNCH();
      EARN_CUDA_CHECK(cudaDeviceSynchronize());  // the staging buffer is reused by the next call
    };
    auto put_f32 = [&](DeviceBuffer<float>& dst, std::initializer_list<const Vector*> parts) {
      Index n = 0;
      for (const Vector* v : parts) n += v->size();
      dst.reserve(std::size_t(n));
      Index o = 0;
      for (const Vector* v : parts) {
        EARN_CUDA_CHECK(cudaMemcpy(dst.data() + o, v->data(), std::size_t(v->size()) * 4, cudaMemcpyHostToDevice));
        o += v->size();
      }
    };
    put(d.tok_embeddings, {&w.tok_embeddings});
    if (!c.tied_embeddings) put(d.lm_head, {&w.lm_head});
    put(d.registers, {&w.registers.prefix, &w.registers.suffix});
    put_f32(d.final_norm, {&w.final_norm});
    d.layers.resize(c.n_layers);
    for (int i = 0; i < c.n_layers; ++i) {
      const LayerWeights& l = w.layers[i];
      DeviceLayer<DType>& o = d.layers[i];
      put_f32(o.attn_norm, {&l.attn_norm});
      put_f32(o.ffn_norm, {&l.ffn_norm});
      if (c.qkv_bias) put_f32(o.bqkv, {&l.bq, &l.bk, &l.bv});
      put(o.wqkv, {&l.wq, &l.wk, &l.wv});
      put(o.wo, {&l.wo});
      put(o.w13, {&l.w1, &l.w3});
      put(o.w2, {&l.w2});
    }
    return d;
  }

  /// A random model made on the device (no host copy: a 7B model fills in a second). Same distribution as
  /// earn::random_weights (uniform +-scale/sqrt(fan_in), norms near 1), not the same numbers.
  static DeviceWeights random(const ModelConfig& c, const RandomInit& init = {}) {
    c.validate();
    DeviceWeights d;
    d.config = c;
    d.prefix_registers = init.prefix_registers;
    d.suffix_registers = init.suffix_registers;
    const Index qd = Index{c.n_heads} * c.head_dim(), kvd = c.kv_dim();
    unsigned long long tensor = 0;
    auto fill = [&](auto& buf, Index n, float center, float bound) {
      using E = std::remove_reference_t<decltype(*buf.data())>;
      buf.reserve(std::size_t(n));
      if (n == 0) return;
      // Each tensor gets its own stream of the hash: seed and tensor index mixed into the counter's start.
      const unsigned long long seed = init.seed * 0x100000001B3ull + (++tensor) * 0xD6E8FEB86659FD93ull;
      kernel::fill_uniform<E><<<kernel::grid_for(n), kernel::kThreads>>>(buf.data(), n, seed, center, bound);
      EARN_CUDA_CHECK_LAUNCH();
    };
    const float s = init.scale;
    fill(d.tok_embeddings, Index{c.vocab_size} * c.dim, 0.0f, 1.0f);
    if (!c.tied_embeddings) fill(d.lm_head, Index{c.vocab_size} * c.dim, 0.0f, s / std::sqrt(float(c.dim)));
    fill(d.registers, Index{d.register_count()} * c.dim, 0.0f, 1.0f);
    fill(d.final_norm, c.dim, 1.0f, 0.2f);
    d.layers.resize(c.n_layers);
    for (auto& l : d.layers) {
      fill(l.attn_norm, c.dim, 1.0f, 0.2f);
      fill(l.ffn_norm, c.dim, 1.0f, 0.2f);
      if (c.qkv_bias) fill(l.bqkv, qd + 2 * kvd, 0.0f, 0.1f);
      fill(l.wqkv, (qd + 2 * kvd) * c.dim, 0.0f, s / std::sqrt(float(c.dim)));
      fill(l.wo, Index{c.dim} * qd, 0.0f, s / std::sqrt(float(qd)));
      fill(l.w13, 2 * Index{c.hidden_dim} * c.dim, 0.0f, s / std::sqrt(float(c.dim)));
      fill(l.w2, Index{c.dim} * c.hidden_dim, 0.0f, s / std::sqrt(float(c.hidden_dim)));
    }
    EARN_CUDA_CHECK(cudaDeviceSynchronize());
    return d;
  }
};

}  // namespace earn::cuda
