// earn/core/config.hpp - hyper-parameters of a Llama-family decoder.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "earn/core/error.hpp"

namespace earn {

/// Which pairs of a head's dimensions RoPE rotates together.
enum class RopeStyle {
  kRotateHalf,   ///< Hugging Face: dimension i pairs with i + head_dim/2
  kInterleaved,  ///< llama2.c / Meta original: dimension 2i pairs with 2i+1
};

/// Shape and numerics of a Llama / Qwen2 decoder. Loaders fill it; `validate()` refuses nonsense.
struct ModelConfig {
  int dim = 0;          ///< hidden size d
  int hidden_dim = 0;   ///< SwiGLU intermediate size
  int n_layers = 0;     ///< L
  int n_heads = 0;      ///< query heads
  int n_kv_heads = 0;   ///< key/value heads (GQA when < n_heads)
  int vocab_size = 0;
  int max_seq_len = 0;  ///< positions 0..max_seq_len-1 are valid
  float rope_theta = 10000.0f;
  float norm_eps = 1e-5f;
  bool tied_embeddings = true;  ///< LM head shares the token embedding
  bool qkv_bias = false;        ///< Qwen2: q/k/v projections carry biases
  RopeStyle rope_style = RopeStyle::kRotateHalf;
  /// Special tokens, when the checkpoint states them (Hugging Face config.json / generation_config.json):
  int bos_token_id = -1;           ///< -1: not stated
  std::vector<int> eos_token_ids = {};  ///< generation stops at any of them (HF lists several for some models)

  int head_dim() const { return n_heads > 0 ? dim / n_heads : 0; }
  int kv_dim() const { return n_kv_heads * head_dim(); }

  /// Throws ConfigError naming the first inconsistent field.
  void validate() const {
    auto fail = [](const std::string& what) { throw ConfigError("model config: " + what); };
    if (dim <= 0 || hidden_dim <= 0 || n_layers <= 0 || n_heads <= 0 || n_kv_heads <= 0 || vocab_size <= 0 ||
        max_seq_len <= 0)
      fail("dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size and max_seq_len must all be positive");
    if (dim % n_heads != 0) fail("dim (" + std::to_string(dim) + ") is not divisible by n_heads (" +
                                 std::to_string(n_heads) + ")");
    if (head_dim() % 2 != 0) fail("head_dim must be even for RoPE, got " + std::to_string(head_dim()));
    if (n_heads % n_kv_heads != 0)
      fail("n_heads (" + std::to_string(n_heads) + ") is not a multiple of n_kv_heads (" +
           std::to_string(n_kv_heads) + ")");
    // Guard against sizes whose products overflow the index types used for buffers.
    constexpr std::int64_t kMaxElems = std::int64_t{1} << 40;
    if (std::int64_t{vocab_size} * dim > kMaxElems || std::int64_t{hidden_dim} * dim > kMaxElems ||
        std::int64_t{max_seq_len} * dim > kMaxElems)
      fail("sizes are implausibly large");
    // A NaN fails every comparison, so `!(x > 0)` refuses it; +inf passes `> 0` and needs its own check.
    if (!(rope_theta > 0.0f) || !std::isfinite(rope_theta))
      fail("rope_theta must be positive and finite, got " + std::to_string(rope_theta));
    if (!(norm_eps > 0.0f) || !std::isfinite(norm_eps))
      fail("norm_eps must be positive and finite, got " + std::to_string(norm_eps));
    if (bos_token_id < -1 || bos_token_id >= vocab_size)
      fail("bos_token_id " + std::to_string(bos_token_id) + " is outside the vocabulary 0.." +
           std::to_string(vocab_size - 1));
    for (int e : eos_token_ids)
      if (e < 0 || e >= vocab_size)
        fail("eos token id " + std::to_string(e) + " is outside the vocabulary 0.." + std::to_string(vocab_size - 1));
  }
};

}  // namespace earn
