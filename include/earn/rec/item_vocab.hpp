// earn/rec/item_vocab.hpp - semantic-ID code tokens as vocabulary ids appended after a base vocabulary.
//
// Layout (stable; checkpoints and saved outputs depend on it):
//   ids [0, base)                          the base vocabulary (a text tokenizer's, or the code-template ids)
//   id = base + level * 256 + code         the code token <L_code>, L = 'a' + level, level in 0..3, code in 0..255
//   size() = base + 4 * 256                the vocabulary a model needs
// so <a_0> = base, <b_0> = base + 256, <d_255> = base + 1023.
#pragma once

#include <array>
#include <charconv>
#include <optional>
#include <span>
#include <string>
#include <string_view>

#include "earn/core/error.hpp"
#include "earn/rec/catalogue.hpp"

namespace earn::rec {

/// The 4 vocabulary ids of one item, level a first.
using ItemTokens = std::array<int, kCodeLevels>;

/// Maps (level, code) <-> vocabulary id for code tokens placed after `base` ordinary ids.
/// \code
///   earn::rec::ItemVocab vocab(32000);        // Llama-2 text vocabulary first
///   vocab.token(1, 7);                        // <b_7> = 32000 + 256 + 7
///   vocab.item_tokens(catalogue, item);       // the 4 ids to feed or to expect
/// \endcode
class ItemVocab {
 public:
  ItemVocab() = default;
  explicit ItemVocab(int base) : base_(base) {
    if (base < 0) throw ConfigError("item vocab: base vocabulary size " + std::to_string(base) + " is negative");
  }

  /// First code-token id: the size of the vocabulary in front of the codes.
  int base() const { return base_; }
  /// The full vocabulary a model needs: base + 4 * 256.
  int size() const { return base_ + kCodeLevels * kCodesPerLevel; }

  /// Vocabulary id of <L_code> for `level` in [0, 4), `code` in [0, 256).
  int token(int level, int code) const {
    if (level < 0 || level >= kCodeLevels || code < 0 || code >= kCodesPerLevel)
      throw RangeError("item vocab: (level " + std::to_string(level) + ", code " + std::to_string(code) +
                       ") is outside 4 levels x 256 codes");
    return base_ + level * kCodesPerLevel + code;
  }
  bool is_code_token(int id) const { return id >= base_ && id < size(); }
  /// Level of code token `id`; RangeError for an id that is not a code token.
  int level_of(int id) const { return check_code_token(id) / kCodesPerLevel; }
  /// Code of code token `id` within its level.
  int code_of(int id) const { return check_code_token(id) % kCodesPerLevel; }

  /// The 4 ids of codes `c` (level a first).
  ItemTokens tokens(const ItemCodes& c) const {
    ItemTokens t;
    for (int l = 0; l < kCodeLevels; ++l) t[l] = token(l, c[l]);
    return t;
  }
  /// Codes of 4 ids; RangeError unless token l is a code token of level l.
  ItemCodes codes(std::span<const int, kCodeLevels> t) const {
    ItemCodes c;
    for (int l = 0; l < kCodeLevels; ++l) {
      if (level_of(t[l]) != l)
        throw RangeError("item vocab: token " + std::to_string(t[l]) + " at position " + std::to_string(l) +
                         " is a level-" + std::to_string(level_of(t[l])) + " code, expected level " +
                         std::to_string(l));
      c[l] = code_of(t[l]);
    }
    return c;
  }

  ItemTokens item_tokens(const Catalogue& cat, int item) const { return tokens(cat.item_codes(item)); }
  ItemTokens identifier_tokens(const Catalogue& cat, int id) const { return tokens(cat.identifier_codes(id)); }
  /// The identifier these 4 ids name; RangeError when they are not code tokens in level order or name no item.
  int identifier_of(const Catalogue& cat, std::span<const int, kCodeLevels> t) const {
    const ItemCodes c = codes(t);
    if (auto id = cat.find(c)) return *id;
    throw RangeError("item vocab: " + text(t[0]) + text(t[1]) + text(t[2]) + text(t[3]) +
                     " is not an item of the catalogue");
  }

  /// "<b_7>" for the id of <b_7>.
  std::string text(int id) const {
    std::string s = "<";
    s += char('a' + level_of(id));
    s += '_';
    s += std::to_string(code_of(id));
    s += '>';
    return s;
  }

  /// Parses the token text "<L_N>" into (level, code); nullopt unless L is one of a..d and N a canonical decimal
  /// (no sign, no leading zeros, nothing around it) in [0, 256). On failure `why`, when given, says what is wrong.
  static std::optional<std::array<int, 2>> parse(std::string_view s, std::string* why = nullptr) {
    auto fail = [&](const std::string& w) -> std::optional<std::array<int, 2>> {
      if (why) *why = w;
      return std::nullopt;
    };
    if (s.size() < 5 || s.front() != '<' || s.back() != '>' || s[2] != '_')
      return fail("\"" + std::string(s) + "\" is not a code token <L_N>");
    const int level = s[1] - 'a';
    if (level < 0 || level >= kCodeLevels)
      return fail("\"" + std::string(s) + "\" has level letter '" + std::string(1, s[1]) + "', expected a..d");
    const std::string_view digits = s.substr(3, s.size() - 4);
    for (char ch : digits)
      if (ch < '0' || ch > '9') return fail("\"" + std::string(s) + "\": code is not a decimal number");
    if (digits.size() > 1 && digits[0] == '0') return fail("\"" + std::string(s) + "\": code has leading zeros");
    int code = kCodesPerLevel;  // more than 3 digits is out of range without parsing (and cannot overflow)
    if (digits.size() <= 3) std::from_chars(digits.data(), digits.data() + digits.size(), code);
    if (code >= kCodesPerLevel)
      return fail("\"" + std::string(s) + "\": code is outside [0, " + std::to_string(kCodesPerLevel) + ")");
    return std::array<int, 2>{level, code};
  }

 private:
  int check_code_token(int id) const {
    if (!is_code_token(id))
      throw RangeError("item vocab: id " + std::to_string(id) + " is not a code token [" + std::to_string(base_) +
                       ", " + std::to_string(size()) + ")");
    return id - base_;
  }

  int base_ = 0;
};

}  // namespace earn::rec
