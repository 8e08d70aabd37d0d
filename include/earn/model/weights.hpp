// earn/model/weights.hpp - the parameters of a Llama / Qwen2 decoder plus EARN's register embeddings.
//
// Storage is fp32 on the CPU: loaders convert F16 / BF16 on load (exactly: both widen to float without
// rounding). Matrices keep the checkpoint layout [out_features, in_features], row-major.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "earn/core/config.hpp"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"

namespace earn {

/// One decoder block's parameters (scalar T: float for inference and training, double for gradient checks).
template <class T>
struct BasicLayerWeights {
  VectorT<T> attn_norm;  ///< [dim] RMSNorm gain before attention
  MatrixT<T> wq;         ///< [n_heads*head_dim, dim]
  MatrixT<T> wk;         ///< [kv_dim, dim]
  MatrixT<T> wv;         ///< [kv_dim, dim]
  VectorT<T> bq;         ///< [n_heads*head_dim] or empty (no bias)
  VectorT<T> bk;         ///< [kv_dim] or empty
  VectorT<T> bv;         ///< [kv_dim] or empty
  MatrixT<T> wo;         ///< [dim, n_heads*head_dim]
  VectorT<T> ffn_norm;   ///< [dim] RMSNorm gain before the MLP
  MatrixT<T> w1;         ///< [hidden_dim, dim] gate projection
  MatrixT<T> w3;         ///< [hidden_dim, dim] up projection
  MatrixT<T> w2;         ///< [dim, hidden_dim] down projection
};
using LayerWeights = BasicLayerWeights<float>;

/// EARN's learned register embeddings, injected at the embedding layer (not vocabulary tokens).
template <class T>
struct BasicRegisterWeights {
  MatrixT<T> prefix;  ///< [r_p, dim], placed before the prompt
  MatrixT<T> suffix;  ///< [r_s, dim], placed after the prompt
  int count() const { return static_cast<int>(prefix.rows() + suffix.rows()); }
};
using RegisterWeights = BasicRegisterWeights<float>;

/// What a parameter tensor is, for optimizer parameter groups (weight decay, freezing).
enum class TensorRole : std::uint8_t {
  kEmbedding,  ///< token embedding rows
  kRegister,   ///< EARN register embeddings
  kNorm,       ///< RMSNorm gains
  kMatrix,     ///< a layer's projection weights
  kBias,       ///< q/k/v biases
  kHead,       ///< an untied LM head
};

/// One parameter tensor seen flat: its checkpoint-style name, role, layer (-1 outside layers) and storage.
template <class T>
struct TensorView {
  std::string name;  ///< e.g. "layers.3.wq", "tok_embeddings", "registers.prefix"
  TensorRole role;
  int layer;
  T* data;
  Index size;
  Index rows, cols;  ///< shape (vectors: [size, 1])
};

/// Every parameter of a model. `validate()` checks every shape against `config`.
template <class T>
struct BasicModelWeights {
  using Scalar = T;
  ModelConfig config;
  MatrixT<T> tok_embeddings;  ///< [vocab, dim]
  std::vector<BasicLayerWeights<T>> layers;
  VectorT<T> final_norm;  ///< [dim]
  MatrixT<T> lm_head;     ///< [vocab, dim]; empty when config.tied_embeddings
  BasicRegisterWeights<T> registers;
  int split_layer = -1;  ///< EARN split layer k recorded with the checkpoint; -1 when none was recorded
  /// The schedule the model was trained under, as recorded with it: "gist" for a Gist model (served only by
  /// GistSchedule: its answer rows never saw the prompt); empty otherwise (EARN at split_layer, or dense).
  std::string trained_schedule;

  /// The classifier matrix [vocab, dim]: the LM head, or the embedding when tied.
  const MatrixT<T>& classifier() const { return config.tied_embeddings ? tok_embeddings : lm_head; }

  /// Parameter count (registers included, a tied head counted once).
  Index parameter_count() const {
    Index n = tok_embeddings.size() + final_norm.size() + lm_head.size() + registers.prefix.size() +
              registers.suffix.size();
    for (const auto& l : layers)
      n += l.attn_norm.size() + l.wq.size() + l.wk.size() + l.wv.size() + l.bq.size() + l.bk.size() +
           l.bv.size() + l.wo.size() + l.ffn_norm.size() + l.w1.size() + l.w2.size() + l.w3.size();
    return n;
  }

  /// Every non-empty parameter tensor in a fixed order (the order of checkpoints, optimizer state and gradient
  /// buffers: two models of one config list the same names in the same order).
  std::vector<TensorView<T>> tensors() { return tensor_list<T>(*this); }
  std::vector<TensorView<const T>> tensors() const { return tensor_list<const T>(*this); }

  /// The same model in scalar U (fp32 <-> fp64 for gradient checks, exactly widening).
  template <class U>
  BasicModelWeights<U> cast() const {
    BasicModelWeights<U> w;
    w.config = config;
    w.split_layer = split_layer;
    w.trained_schedule = trained_schedule;
    w.tok_embeddings = tok_embeddings.template cast<U>();
    w.final_norm = final_norm.template cast<U>();
    w.lm_head = lm_head.template cast<U>();
    w.registers.prefix = registers.prefix.template cast<U>();
    w.registers.suffix = registers.suffix.template cast<U>();
    w.layers.resize(layers.size());
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const auto& a = layers[i];
      auto& b = w.layers[i];
      b.attn_norm = a.attn_norm.template cast<U>();
      b.wq = a.wq.template cast<U>();
      b.wk = a.wk.template cast<U>();
      b.wv = a.wv.template cast<U>();
      b.bq = a.bq.template cast<U>();
      b.bk = a.bk.template cast<U>();
      b.bv = a.bv.template cast<U>();
      b.wo = a.wo.template cast<U>();
      b.ffn_norm = a.ffn_norm.template cast<U>();
      b.w1 = a.w1.template cast<U>();
      b.w3 = a.w3.template cast<U>();
      b.w2 = a.w2.template cast<U>();
    }
    return w;
  }

  /// A model of the same shapes with every parameter 0 (gradient buffers).
  BasicModelWeights zeros_like() const {
    BasicModelWeights z = *this;
    for (auto& t : z.tensors()) std::fill(t.data, t.data + t.size, T(0));
    return z;
  }

  /// Throws ConfigError naming the first tensor whose shape disagrees with the config.
  void validate() const {
    config.validate();
    const ModelConfig& c = config;
    const Index qd = Index{c.n_heads} * c.head_dim();
    auto need = [](const std::string& name, Index rows, Index cols, Index want_rows, Index want_cols) {
      if (rows != want_rows || cols != want_cols)
        throw ConfigError("weights: " + name + " has shape [" + std::to_string(rows) + ", " +
                          std::to_string(cols) + "], config needs [" + std::to_string(want_rows) + ", " +
                          std::to_string(want_cols) + "]");
    };
    need("tok_embeddings", tok_embeddings.rows(), tok_embeddings.cols(), c.vocab_size, c.dim);
    if (!c.tied_embeddings) need("lm_head", lm_head.rows(), lm_head.cols(), c.vocab_size, c.dim);
    need("final_norm", final_norm.size(), 1, c.dim, 1);
    if (static_cast<int>(layers.size()) != c.n_layers)
      throw ConfigError("weights: " + std::to_string(layers.size()) + " layers, config says " +
                        std::to_string(c.n_layers));
    for (std::size_t i = 0; i < layers.size(); ++i) {
      const BasicLayerWeights<T>& l = layers[i];
      const std::string p = "layers." + std::to_string(i) + ".";
      need(p + "attn_norm", l.attn_norm.size(), 1, c.dim, 1);
      need(p + "wq", l.wq.rows(), l.wq.cols(), qd, c.dim);
      need(p + "wk", l.wk.rows(), l.wk.cols(), c.kv_dim(), c.dim);
      need(p + "wv", l.wv.rows(), l.wv.cols(), c.kv_dim(), c.dim);
      need(p + "wo", l.wo.rows(), l.wo.cols(), c.dim, qd);
      need(p + "ffn_norm", l.ffn_norm.size(), 1, c.dim, 1);
      need(p + "w1", l.w1.rows(), l.w1.cols(), c.hidden_dim, c.dim);
      need(p + "w3", l.w3.rows(), l.w3.cols(), c.hidden_dim, c.dim);
      need(p + "w2", l.w2.rows(), l.w2.cols(), c.dim, c.hidden_dim);
      if (c.qkv_bias) {
        need(p + "bq", l.bq.size(), 1, qd, 1);
        need(p + "bk", l.bk.size(), 1, c.kv_dim(), 1);
        need(p + "bv", l.bv.size(), 1, c.kv_dim(), 1);
      } else if (l.bq.size() || l.bk.size() || l.bv.size()) {
        throw ConfigError("weights: " + p + "q/k/v biases present but config.qkv_bias is false");
      }
    }
    if (registers.prefix.size() && registers.prefix.cols() != c.dim)
      throw ConfigError("weights: prefix registers have width " + std::to_string(registers.prefix.cols()) +
                        ", model dim is " + std::to_string(c.dim));
    if (registers.suffix.size() && registers.suffix.cols() != c.dim)
      throw ConfigError("weights: suffix registers have width " + std::to_string(registers.suffix.cols()) +
                        ", model dim is " + std::to_string(c.dim));
    if (split_layer > c.n_layers)
      throw ConfigError("weights: recorded split layer " + std::to_string(split_layer) + " exceeds " +
                        std::to_string(c.n_layers) + " layers");
    if (!trained_schedule.empty() && trained_schedule != "gist")
      throw ConfigError("weights: recorded schedule '" + trained_schedule + "' is not gist (the only one recorded)");
  }

 private:
  template <class E, class Self>
  static std::vector<TensorView<E>> tensor_list(Self& self) {
    std::vector<TensorView<E>> out;
    auto add = [&](std::string name, TensorRole role, int layer, auto& t) {
      if (t.size() == 0) return;
      out.push_back({std::move(name), role, layer, t.data(), Index(t.size()), Index(t.rows()), Index(t.cols())});
    };
    add("tok_embeddings", TensorRole::kEmbedding, -1, self.tok_embeddings);
    add("registers.prefix", TensorRole::kRegister, -1, self.registers.prefix);
    add("registers.suffix", TensorRole::kRegister, -1, self.registers.suffix);
    for (std::size_t i = 0; i < self.layers.size(); ++i) {
      auto& l = self.layers[i];
      const std::string p = "layers." + std::to_string(i) + ".";
      const int li = static_cast<int>(i);
      add(p + "attn_norm", TensorRole::kNorm, li, l.attn_norm);
      add(p + "wq", TensorRole::kMatrix, li, l.wq);
      add(p + "wk", TensorRole::kMatrix, li, l.wk);
      add(p + "wv", TensorRole::kMatrix, li, l.wv);
      add(p + "bq", TensorRole::kBias, li, l.bq);
      add(p + "bk", TensorRole::kBias, li, l.bk);
      add(p + "bv", TensorRole::kBias, li, l.bv);
      add(p + "wo", TensorRole::kMatrix, li, l.wo);
      add(p + "ffn_norm", TensorRole::kNorm, li, l.ffn_norm);
      add(p + "w1", TensorRole::kMatrix, li, l.w1);
      add(p + "w3", TensorRole::kMatrix, li, l.w3);
      add(p + "w2", TensorRole::kMatrix, li, l.w2);
    }
    add("final_norm", TensorRole::kNorm, -1, self.final_norm);
    add("lm_head", TensorRole::kHead, -1, self.lm_head);
    return out;
  }
};

/// The fp32 model every loader returns and every engine runs.
using ModelWeights = BasicModelWeights<float>;

/// Options for `random_weights`.
struct RandomInit {
  std::uint64_t seed = 1234;
  float scale = 1.0f;       ///< multiplies the 1/sqrt(fan_in) uniform bound; > 1 sharpens the logits
  int prefix_registers = 1;  ///< r_p
  int suffix_registers = 1;  ///< r_s
};

/// A deterministic random model: uniform weights in +-scale/sqrt(fan_in), norms near 1, biases when configured.
inline ModelWeights random_weights(const ModelConfig& c, const RandomInit& init = {}) {
  c.validate();
  Rng rng(init.seed);
  auto mat = [&](Index rows, Index cols, float bound) {
    Matrix m(rows, cols);
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = rng.symmetric(bound);
    return m;
  };
  auto vec = [&](Index n, float center, float spread) {
    Vector v(n);
    for (Index i = 0; i < n; ++i) v[i] = center + rng.symmetric(spread);
    return v;
  };
  const float s = init.scale;
  const Index qd = Index{c.n_heads} * c.head_dim();
  ModelWeights w;
  w.config = c;
  w.tok_embeddings = mat(c.vocab_size, c.dim, 1.0f);
  w.layers.resize(c.n_layers);
  for (auto& l : w.layers) {
    l.attn_norm = vec(c.dim, 1.0f, 0.2f);
    l.wq = mat(qd, c.dim, s / std::sqrt(float(c.dim)));
    l.wk = mat(c.kv_dim(), c.dim, s / std::sqrt(float(c.dim)));
    l.wv = mat(c.kv_dim(), c.dim, s / std::sqrt(float(c.dim)));
    if (c.qkv_bias) {
      l.bq = vec(qd, 0.0f, 0.1f);
      l.bk = vec(c.kv_dim(), 0.0f, 0.1f);
      l.bv = vec(c.kv_dim(), 0.0f, 0.1f);
    }
    l.wo = mat(c.dim, qd, s / std::sqrt(float(qd)));
    l.ffn_norm = vec(c.dim, 1.0f, 0.2f);
    l.w1 = mat(c.hidden_dim, c.dim, s / std::sqrt(float(c.dim)));
    l.w3 = mat(c.hidden_dim, c.dim, s / std::sqrt(float(c.dim)));
    l.w2 = mat(c.dim, c.hidden_dim, s / std::sqrt(float(c.hidden_dim)));
  }
  w.final_norm = vec(c.dim, 1.0f, 0.2f);
  if (!c.tied_embeddings) w.lm_head = mat(c.vocab_size, c.dim, s / std::sqrt(float(c.dim)));
  w.registers.prefix = mat(init.prefix_registers, c.dim, 1.0f);
  w.registers.suffix = mat(init.suffix_registers, c.dim, 1.0f);
  return w;
}

}  // namespace earn
