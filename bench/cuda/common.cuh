// bench/cuda/common.cuh - what the GPU benchmark programs share: list arguments and the Llama-7B configuration.
#pragma once

#include <sstream>
#include <string>
#include <vector>

#include "earn/core/config.hpp"

namespace earn::bench {

/// "1,4,32" -> {1, 4, 32}.
inline std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::stoi(item));
  return v;
}

/// Llama-7B dimensions (hidden 4096, FFN 11008, 32 heads, untied head) with `layers` layers and `vocab` ids.
inline ModelConfig llama7b_config(int layers, int vocab) {
  ModelConfig c;
  c.dim = 4096;
  c.hidden_dim = 11008;
  c.n_layers = layers;
  c.n_heads = 32;
  c.n_kv_heads = 32;
  c.vocab_size = vocab;
  c.max_seq_len = 1024;
  c.tied_embeddings = false;
  return c;
}

}  // namespace earn::bench
