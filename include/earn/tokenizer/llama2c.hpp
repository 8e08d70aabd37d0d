// earn/tokenizer/llama2c.hpp - llama2.c's BPE tokenizer (tokenizer.bin, tok512.bin), encoding as run.c does.
//
// File (little-endian): int32 max_token_length, then per token: float32 score, int32 length, `length` bytes.
// Ids 0, 1, 2 are <unk>, BOS and EOS; ids 3..258 are the byte-fallback pieces "<0x00>".."<0xFF>".
//
// \code
//   earn::Llama2cTokenizer tok("../shared/data/llama2c/tok512.bin", weights.config.vocab_size);
//   std::vector<int> ids = tok.encode("Once upon a time", /*bos=*/true, /*eos=*/false);
//   std::string text = tok.decode(ids);
// \endcode
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <filesystem>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "earn/core/error.hpp"
#include "earn/io/bytes.hpp"

namespace earn {

/// llama2.c's SentencePiece-style BPE: greedy merges by score over UTF-8 codepoints with byte fallback.
class Llama2cTokenizer {
 public:
  static constexpr int kBos = 1;
  static constexpr int kEos = 2;
  static constexpr int kInferVocab = -1;   ///< read tokens until the end of the file
  static constexpr int kMaxTokenLength = 1 << 16;  ///< plausibility bound on the header's max_token_length

  /// Reads `file`. With `vocab_size` >= 1 the file must hold exactly that many tokens (the model's vocabulary);
  /// with kInferVocab every token up to the end of the file is read.
  explicit Llama2cTokenizer(const std::filesystem::path& file, int vocab_size = kInferVocab)
      : Llama2cTokenizer(io::detail::read_file_bytes(file), file.string(), vocab_size) {}

  /// Parses a tokenizer held in memory; `name` prefixes every error message.
  Llama2cTokenizer(std::span<const std::byte> bytes, const std::string& name, int vocab_size = kInferVocab) {
    if (vocab_size != kInferVocab && vocab_size < 1)
      throw ConfigError(name + ": vocab_size " + std::to_string(vocab_size) + " must be positive (or kInferVocab)");
    io::detail::ByteReader in(bytes, name);
    max_token_length_ = in.i32("max_token_length");
    if (max_token_length_ < 1 || max_token_length_ > kMaxTokenLength)
      detail::throw_format(name, "max_token_length",
                           std::to_string(max_token_length_) + " is outside 1.." + std::to_string(kMaxTokenLength));
    // Each token takes at least 8 bytes, which bounds the reservation a hostile vocab_size can cause.
    const std::int64_t fits = in.remaining() / 8;
    const std::int64_t want = vocab_size == kInferVocab ? fits : std::min<std::int64_t>(vocab_size, fits + 1);
    pieces_.reserve(static_cast<std::size_t>(want));
    scores_.reserve(static_cast<std::size_t>(want));
    for (int i = 0; vocab_size == kInferVocab ? in.remaining() > 0 : i < vocab_size; ++i) {
      if (in.remaining() == 0)
        detail::throw_format(name, "vocab_size",
                             "the file holds " + std::to_string(i) + " tokens, " + std::to_string(vocab_size) +
                                 " expected; the tokenizer does not match the model's vocabulary");
      auto field = [i](const char* part) { return [i, part] { return "token[" + std::to_string(i) + "]." + part; }; };
      const float score = in.f32(field("score"));
      const std::int32_t len = in.i32(field("length"));
      if (len < 0 || len > max_token_length_)
        detail::throw_format(name, field("length")(),
                             std::to_string(len) + " is outside 0..max_token_length " +
                                 std::to_string(max_token_length_));
      const auto b = in.take(len, field("bytes"));
      pieces_.emplace_back(reinterpret_cast<const char*>(b.data()), b.size());
      scores_.push_back(score);
    }
    if (in.remaining() > 0)
      detail::throw_format(name, "vocab_size",
                           std::to_string(in.remaining()) + " bytes remain after the " + std::to_string(vocab_size) +
                               " tokens expected; the tokenizer does not match the model's vocabulary");
    if (pieces_.size() < 3)
      detail::throw_format(name, "vocab_size",
                           std::to_string(pieces_.size()) + " tokens; <unk>, BOS and EOS need at least 3");
    // Sorted by (piece, id): lookups find the lowest id of a duplicated piece, whatever order the file has.
    sorted_.resize(pieces_.size());
    for (std::size_t i = 0; i < sorted_.size(); ++i) sorted_[i] = static_cast<int>(i);
    std::sort(sorted_.begin(), sorted_.end(), [this](int a, int b) {
      return pieces_[a] != pieces_[b] ? pieces_[a] < pieces_[b] : a < b;
    });
  }

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  int max_token_length() const { return max_token_length_; }
  /// The raw piece of `id` as stored in the file (dummy-prefix spaces included, "<0xXX>" for byte tokens).
  const std::string& piece(int id) const { return pieces_[check(id)]; }
  /// The merge score of `id`; higher merges first.
  float score(int id) const { return scores_[check(id)]; }

  /// The id whose piece is exactly `s`, or -1.
  int find(std::string_view s) const {
    auto it = std::lower_bound(sorted_.begin(), sorted_.end(), s,
                               [this](int id, std::string_view v) { return std::string_view(pieces_[id]) < v; });
    return it != sorted_.end() && pieces_[*it] == s ? *it : -1;
  }

  /// run.c's encode: optional BOS, a dummy-prefix " " for non-empty text, one token per UTF-8 codepoint (its
  /// bytes as <0xXX> tokens when the codepoint is not a piece), then merges of the adjacent pair with the highest
  /// score (the leftmost among equals) while the concatenation is a piece; optional EOS.
  std::vector<int> encode(std::string_view text, bool bos, bool eos) const {
    std::vector<int> tokens;
    tokens.reserve(text.size() + 3);
    if (bos) tokens.push_back(kBos);
    // run.c looks " " up unconditionally; a vocabulary without it gets the byte token of 0x20 here.
    if (!text.empty()) push_piece_or_bytes(tokens, " ");

    std::string buf;  // the bytes of the current codepoint
    for (std::size_t i = 0; i < text.size(); ++i) {
      const auto c = static_cast<unsigned char>(text[i]);
      if ((c & 0xC0) != 0x80) buf.clear();  // a lead or ASCII byte starts a new codepoint
      buf.push_back(static_cast<char>(c));
      const bool next_continues = i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80;
      // At most 4 bytes per codepoint, as run.c: longer runs of continuation bytes split into byte tokens.
      if (next_continues && buf.size() < 4) continue;
      push_piece_or_bytes(tokens, buf);
      buf.clear();
    }

    merge_pairs(tokens);
    if (eos) tokens.push_back(kEos);
    return tokens;
  }

  /// run.c's decode of one generated token: the leading space of a piece right after BOS is stripped
  /// (SentencePiece's dummy prefix) and a "<0xXX>" piece becomes its raw byte.
  std::string decode_piece(int prev_token, int token) const {
    std::string_view p = pieces_[check(token)];
    if (prev_token == kBos && !p.empty() && p.front() == ' ') p.remove_prefix(1);
    if (const int byte = byte_value(p); byte >= 0) return std::string(1, static_cast<char>(byte));
    return std::string(p);
  }

  /// The text of `tokens` as run.c would print it after `prev_token` (-1: none), without its safe_printf
  /// filter. BOS yields no text - run.c stops generating there and its piece is only a marker - but still
  /// strips the next piece's leading space: decode(encode(text, true, false)) == text.
  std::string decode(std::span<const int> tokens, int prev_token = -1) const {
    std::string out;
    for (int t : tokens) {
      if (t != kBos) out += decode_piece(prev_token, t);
      else check(t);
      prev_token = t;
    }
    return out;
  }

 private:
  std::size_t check(int id) const {
    if (id < 0 || id >= vocab_size())
      throw RangeError("tokenizer: token id " + std::to_string(id) + " is outside the vocabulary 0.." +
                       std::to_string(vocab_size() - 1));
    return static_cast<std::size_t>(id);
  }

  // run.c's merge rule - repeatedly the adjacent pair with the highest score (above -1e10, so never a NaN), the
  // leftmost among equals, while the concatenation is a piece - in O(n log n) instead of run.c's O(n^2) rescans
  // (40k characters took a minute): a max-heap of candidate pairs over a linked list of the tokens. A merged token
  // keeps its left slot, so list order is slot order and "leftmost" is the smallest slot. A candidate goes stale
  // when either slot merges (its version moves on) and is dropped when popped; every pair adjacent now is in the
  // heap, since a merge creates only the two pairs around the merged token.
  void merge_pairs(std::vector<int>& tokens) const {
    struct Candidate {
      float score;
      int left, right, id;
      unsigned left_version, right_version;
    };
    auto below = [](const Candidate& a, const Candidate& b) {
      return a.score != b.score ? a.score < b.score : a.left > b.left;
    };
    const int n = static_cast<int>(tokens.size());
    std::vector<int> next(n), prev(n);
    std::vector<unsigned> version(n, 0);  // bumped when a slot's token changes or leaves the list
    for (int i = 0; i < n; ++i) {
      next[i] = i + 1 < n ? i + 1 : -1;
      prev[i] = i - 1;
    }
    std::vector<Candidate> heap;
    std::string pair;
    auto offer = [&](int l, int r) {
      if (l < 0 || r < 0) return;
      pair.assign(pieces_[tokens[l]]);
      pair.append(pieces_[tokens[r]]);
      const int id = find(pair);
      if (id == -1 || !(scores_[id] > -1e10f)) return;  // run.c's floor: such pairs never merge
      heap.push_back({scores_[id], l, r, id, version[l], version[r]});
      std::push_heap(heap.begin(), heap.end(), below);
    };
    for (int i = 0; i + 1 < n; ++i) offer(i, i + 1);
    while (!heap.empty()) {
      std::pop_heap(heap.begin(), heap.end(), below);
      const Candidate c = heap.back();
      heap.pop_back();
      if (version[c.left] != c.left_version || version[c.right] != c.right_version) continue;
      tokens[c.left] = c.id;
      ++version[c.left];
      ++version[c.right];
      next[c.left] = next[c.right];
      if (next[c.right] >= 0) prev[next[c.right]] = c.left;
      offer(prev[c.left], c.left);
      offer(c.left, next[c.left]);
    }
    std::vector<int> merged;
    merged.reserve(tokens.size());
    for (int i = n > 0 ? 0 : -1; i >= 0; i = next[i]) merged.push_back(tokens[i]);
    tokens = std::move(merged);
  }

  // The piece's id, or run.c's byte fallback: one token per byte, id = byte + 3 (after <unk>, BOS, EOS).
  void push_piece_or_bytes(std::vector<int>& tokens, std::string_view s) const {
    if (const int id = find(s); id != -1) {
      tokens.push_back(id);
      return;
    }
    for (char ch : s) {
      const int id = static_cast<unsigned char>(ch) + 3;
      if (id >= vocab_size())
        throw RangeError("tokenizer: byte fallback token " + std::to_string(id) + " is outside the vocabulary of " +
                         std::to_string(vocab_size()));
      tokens.push_back(id);
    }
  }

  // The byte of an exact "<0xHH>" piece, else -1. (run.c's sscanf("<0x%02hhX>") would also take a piece such
  // as "<0x4" or "<0x41zz"; neither shipped vocabulary has one, and they are text, not bytes.)
  static int byte_value(std::string_view p) {
    if (p.size() != 6 || p.substr(0, 3) != "<0x" || p[5] != '>') return -1;
    auto hex = [](char ch) {
      if (ch >= '0' && ch <= '9') return ch - '0';
      if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
      if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
      return -1;
    };
    const int hi = hex(p[3]), lo = hex(p[4]);
    return hi < 0 || lo < 0 ? -1 : hi * 16 + lo;
  }

  int max_token_length_ = 0;
  std::vector<std::string> pieces_;  ///< [vocab] raw bytes of each token
  std::vector<float> scores_;        ///< [vocab] merge scores
  std::vector<int> sorted_;          ///< [vocab] ids ordered by (piece, id) for binary-search lookup
};

}  // namespace earn
