// earn/io/llama2c.hpp - loader for llama2.c's legacy fp32 checkpoints (stories15M.bin, stories260K.bin, ...).
//
// Layout (little-endian): 7 int32 {dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len}, then
// fp32 tensors in this order, each stacked over layers where it has a layer index:
//   token_embedding [vocab, dim]; rms_att [L, dim]; wq [L, dim, dim]; wk [L, kv_dim, dim]; wv [L, kv_dim, dim];
//   wo [L, dim, dim]; rms_ffn [L, dim]; w1 [L, hidden, dim]; w2 [L, dim, hidden]; w3 [L, hidden, dim];
//   rms_final [dim]; freq_cis_real, freq_cis_imag [seq_len, head_dim/2] (legacy RoPE tables, skipped);
//   wcls [vocab, dim] only when the header's vocab_size is negative (untied classifier).
// The whole layout is checked against the byte count before anything is allocated, so a hostile header cannot
// make the loader allocate more than the file could hold.
//
// \code
//   earn::ModelWeights w = earn::io::load_llama2c("../shared/data/llama2c/stories260K.bin");
// \endcode
#pragma once

#include <array>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "earn/core/config.hpp"
#include "earn/io/bytes.hpp"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/model/weights.hpp"

namespace earn::io {


/// Plausibility bounds on a llama2.c header; anything outside is refused as hostile before sizes are computed.
struct Llama2cLimits {
  static constexpr std::int32_t kMaxDim = 1 << 16;
  static constexpr std::int32_t kMaxHiddenDim = 1 << 18;
  static constexpr std::int32_t kMaxLayers = 1 << 10;
  static constexpr std::int32_t kMaxVocab = 1 << 22;
  static constexpr std::int32_t kMaxSeqLen = 1 << 22;
};

/// Loads a llama2.c checkpoint held in memory; `name` (usually the file name) prefixes every error message.
/// Throws FormatError for a malformed header, a truncated or oversized body, and sizes that do not fit.
inline ModelWeights load_llama2c(std::span<const std::byte> bytes, const std::string& name) {
  using detail::checked_add;
  using detail::checked_mul;
  detail::ByteReader in(bytes, name);
  auto fail = [&](const std::string& field, const std::string& what) { earn::detail::throw_format(name, field, what); };

  // ---- header -------------------------------------------------------------------------------------------
  static constexpr std::array<const char*, 7> kHeader = {"dim",        "hidden_dim", "n_layers", "n_heads",
                                                         "n_kv_heads", "vocab_size", "seq_len"};
  std::array<std::int32_t, 7> h{};
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = in.i32(std::string("header.") + kHeader[i]);
  const auto [dim, hidden, n_layers, n_heads, n_kv_heads, vocab_signed, seq_len] = h;
  auto bounded = [&](const char* field, std::int32_t v, std::int32_t hi) {
    if (v < 1 || v > hi)
      fail(std::string("header.") + field,
           std::to_string(v) + " is outside the plausible range 1.." + std::to_string(hi));
  };
  bounded("dim", dim, Llama2cLimits::kMaxDim);
  bounded("hidden_dim", hidden, Llama2cLimits::kMaxHiddenDim);
  bounded("n_layers", n_layers, Llama2cLimits::kMaxLayers);
  bounded("n_heads", n_heads, dim);
  bounded("n_kv_heads", n_kv_heads, n_heads);
  bounded("seq_len", seq_len, Llama2cLimits::kMaxSeqLen);
  // Negative means "untied classifier appended"; INT32_MIN has no positive counterpart, the bound catches it.
  if (vocab_signed == 0 || vocab_signed < -Llama2cLimits::kMaxVocab || vocab_signed > Llama2cLimits::kMaxVocab)
    fail("header.vocab_size", std::to_string(vocab_signed) + " is outside the plausible range +-1.." +
                                  std::to_string(Llama2cLimits::kMaxVocab) + " (negative: untied classifier)");
  if (dim % n_heads != 0)
    fail("header.n_heads", std::to_string(n_heads) + " does not divide dim " + std::to_string(dim));
  const std::int32_t head_dim = dim / n_heads;
  if (head_dim % 2 != 0) fail("header.n_heads", "head_dim " + std::to_string(head_dim) + " is odd; RoPE needs pairs");
  if (n_heads % n_kv_heads != 0)
    fail("header.n_kv_heads", std::to_string(n_kv_heads) + " does not divide n_heads " + std::to_string(n_heads));
  const bool tied = vocab_signed > 0;
  const std::int32_t vocab = tied ? vocab_signed : -vocab_signed;
  const std::int64_t kv_dim = std::int64_t{n_kv_heads} * head_dim;

  // ---- layout: every tensor's place, checked against the byte count before any allocation ---------------
  struct Entry {
    const char* field;
    std::int64_t layers;  // 1 for unstacked tensors
    std::int64_t rows, cols;
    std::int64_t offset = 0, bytes = 0;
  };
  const std::int64_t L = n_layers;
  std::vector<Entry> layout = {
      {"token_embedding", 1, vocab, dim},   {"rms_att", L, 1, dim},          {"wq", L, dim, dim},
      {"wk", L, kv_dim, dim},               {"wv", L, kv_dim, dim},          {"wo", L, dim, dim},
      {"rms_ffn", L, 1, dim},               {"w1", L, hidden, dim},          {"w2", L, dim, hidden},
      {"w3", L, hidden, dim},               {"rms_final", 1, 1, dim},        {"freq_cis_real", 1, seq_len, head_dim / 2},
      {"freq_cis_imag", 1, seq_len, head_dim / 2}};
  if (!tied) layout.push_back({"wcls", 1, vocab, dim});
  std::int64_t end = in.offset();
  for (Entry& e : layout) {
    e.offset = end;
    const std::int64_t floats = checked_mul(checked_mul(e.layers, e.rows, name, e.field), e.cols, name, e.field);
    e.bytes = checked_mul(floats, 4, name, e.field);
    end = checked_add(end, e.bytes, name, e.field);
    if (end > in.size()) {
      std::string shape = "[";
      if (e.layers > 1) shape += std::to_string(e.layers) + ", ";
      if (e.rows > 1) shape += std::to_string(e.rows) + ", ";
      shape += std::to_string(e.cols) + "]";
      fail(e.field, "file ends at byte " + std::to_string(in.size()) + ", tensor " + shape + " needs bytes [" +
                        std::to_string(e.offset) + ", " + std::to_string(end) + ")");
    }
  }
  if (end != in.size()) {
    std::string what = std::to_string(in.size() - end) + " bytes after the last tensor (the header implies " +
                       std::to_string(end) + " bytes, the file has " + std::to_string(in.size()) + ")";
    if (tied && in.size() - end == std::int64_t{vocab} * dim * 4)
      what += "; they would fit an untied classifier, whose header has a negative vocab_size";
    fail("end", what);
  }

  // ---- tensors ---------------------------------------------------------------------------------------------
  ModelWeights w;
  ModelConfig& c = w.config;
  c.dim = dim;
  c.hidden_dim = hidden;
  c.n_layers = n_layers;
  c.n_heads = n_heads;
  c.n_kv_heads = n_kv_heads;
  c.vocab_size = vocab;
  c.max_seq_len = seq_len;
  c.rope_theta = 10000.0f;
  c.norm_eps = 1e-5f;
  c.tied_embeddings = tied;
  c.qkv_bias = false;
  c.rope_style = RopeStyle::kInterleaved;  // run.c rotates pairs (2i, 2i+1)

  // Sizes `dst` to entry `idx`'s [rows, cols] (a vector: [cols]) and copies slice `l` of the stacked entry.
  auto fill = [&](std::size_t idx, std::int64_t l, auto& dst) {
    const Entry& e = layout[idx];
    if constexpr (std::is_same_v<std::decay_t<decltype(dst)>, Vector>)
      dst.resize(e.cols);
    else
      dst.resize(e.rows, e.cols);
    detail::copy_le_f32(dst.data(), bytes.data() + e.offset + l * e.rows * e.cols * 4, e.rows * e.cols);
  };
  fill(0, 0, w.tok_embeddings);
  w.layers.resize(static_cast<std::size_t>(n_layers));
  for (std::int64_t l = 0; l < L; ++l) {
    LayerWeights& lw = w.layers[static_cast<std::size_t>(l)];
    fill(1, l, lw.attn_norm);
    fill(2, l, lw.wq);
    fill(3, l, lw.wk);
    fill(4, l, lw.wv);
    fill(5, l, lw.wo);
    fill(6, l, lw.ffn_norm);
    fill(7, l, lw.w1);
    fill(8, l, lw.w2);
    fill(9, l, lw.w3);
  }
  fill(10, 0, w.final_norm);
  if (!tied) fill(13, 0, w.lm_head);
  // llama2.c checkpoints carry no EARN registers and no split layer.
  w.registers.prefix.resize(0, dim);
  w.registers.suffix.resize(0, dim);
  w.split_layer = -1;
  w.validate();
  return w;
}

/// Loads a llama2.c checkpoint file; error messages name the file.
inline ModelWeights load_llama2c(const std::filesystem::path& file) {
  const std::vector<std::byte> bytes = detail::read_file_bytes(file);
  return load_llama2c(bytes, file.string());
}

}  // namespace earn::io
