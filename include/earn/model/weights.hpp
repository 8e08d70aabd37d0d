// earn/model/weights.hpp - the parameters of a Llama / Qwen2 decoder plus EARN's register embeddings.
//
// Storage is fp32 on the CPU: loaders convert F16 / BF16 on load (exactly: both widen to float without
// rounding). Matrices keep the checkpoint layout [out_features, in_features], row-major.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "earn/core/config.hpp"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"

namespace earn {

/// One decoder block's parameters.
struct LayerWeights {
  Vector attn_norm;  ///< [dim] RMSNorm gain before attention
  Matrix wq;         ///< [n_heads*head_dim, dim]
  Matrix wk;         ///< [kv_dim, dim]
  Matrix wv;         ///< [kv_dim, dim]
  Vector bq;         ///< [n_heads*head_dim] or empty (no bias)
  Vector bk;         ///< [kv_dim] or empty
  Vector bv;         ///< [kv_dim] or empty
  Matrix wo;         ///< [dim, n_heads*head_dim]
  Vector ffn_norm;   ///< [dim] RMSNorm gain before the MLP
  Matrix w1;         ///< [hidden_dim, dim] gate projection
  Matrix w3;         ///< [hidden_dim, dim] up projection
  Matrix w2;         ///< [dim, hidden_dim] down projection
};

/// EARN's learned register embeddings, injected at the embedding layer (not vocabulary tokens).
struct RegisterWeights {
  Matrix prefix;  ///< [r_p, dim], placed before the prompt
  Matrix suffix;  ///< [r_s, dim], placed after the prompt
  int count() const { return static_cast<int>(prefix.rows() + suffix.rows()); }
};

/// Every parameter of a model. `validate()` checks every shape against `config`.
struct ModelWeights {
  ModelConfig config;
  Matrix tok_embeddings;  ///< [vocab, dim]
  std::vector<LayerWeights> layers;
  Vector final_norm;  ///< [dim]
  Matrix lm_head;     ///< [vocab, dim]; empty when config.tied_embeddings
  RegisterWeights registers;
  int split_layer = -1;  ///< EARN split layer k recorded with the checkpoint; -1 when none was recorded

  /// The classifier matrix [vocab, dim]: the LM head, or the embedding when tied.
  const Matrix& classifier() const { return config.tied_embeddings ? tok_embeddings : lm_head; }

  /// Parameter count (registers included, a tied head counted once).
  Index parameter_count() const {
    Index n = tok_embeddings.size() + final_norm.size() + lm_head.size() + registers.prefix.size() +
              registers.suffix.size();
    for (const auto& l : layers)
      n += l.attn_norm.size() + l.wq.size() + l.wk.size() + l.wv.size() + l.bq.size() + l.bk.size() +
           l.bv.size() + l.wo.size() + l.ffn_norm.size() + l.w1.size() + l.w2.size() + l.w3.size();
    return n;
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
      const LayerWeights& l = layers[i];
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
  }
};

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
