// tests/tokenizer_reference.hpp - llama2.c run.c's encode, loop for loop: the naive O(n^2) reference that
// Llama2cTokenizer::encode (a heap over candidate pairs) is checked against, in test_tokenizer.cpp and by the
// tokenizer fuzz harness. Not part of the library.
#pragma once

#include <string>
#include <string_view>
#include <vector>

#include "earn/tokenizer/llama2c.hpp"

namespace earn::test {

/// run.c's encode over `tok`'s pieces and scores (byte fallback: id = byte + 3, as the library documents).
inline std::vector<int> reference_encode(const Llama2cTokenizer& tok, std::string_view text, bool bos, bool eos) {
  std::vector<int> tokens;
  auto lookup_or_bytes = [&](const std::string& s) {
    const int id = tok.find(s);
    if (id != -1) {
      tokens.push_back(id);
      return;
    }
    for (unsigned char ch : s) tokens.push_back(int(ch) + 3);
  };
  if (bos) tokens.push_back(Llama2cTokenizer::kBos);
  if (!text.empty()) lookup_or_bytes(" ");
  // run.c: str_buffer collects a codepoint's bytes until the next byte is not a continuation byte (or 4 are held).
  std::string str_buffer;
  for (std::size_t i = 0; i < text.size(); ++i) {
    if ((static_cast<unsigned char>(text[i]) & 0xC0) != 0x80) str_buffer.clear();
    str_buffer += text[i];
    if (i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80 && str_buffer.size() < 4)
      continue;
    lookup_or_bytes(str_buffer);
    str_buffer.clear();
  }
  // run.c: each round scans every adjacent pair and merges the best (the first of equal scores).
  while (true) {
    float best_score = -1e10f;
    int best_id = -1, best_idx = -1;
    for (std::size_t i = 0; i + 1 < tokens.size(); ++i) {
      const int id = tok.find(tok.piece(tokens[i]) + tok.piece(tokens[i + 1]));
      if (id != -1 && tok.score(id) > best_score) {
        best_score = tok.score(id);
        best_id = id;
        best_idx = static_cast<int>(i);
      }
    }
    if (best_idx == -1) break;
    tokens[best_idx] = best_id;
    tokens.erase(tokens.begin() + best_idx + 1);
  }
  if (eos) tokens.push_back(Llama2cTokenizer::kEos);
  return tokens;
}

}  // namespace earn::test
