// earn/rec/catalogue.hpp - the item catalogue of generative recommendation: each item's 4 semantic-ID codes, and
// the identifiers that remain once items sharing all 4 codes are merged.
//
// LC-Rec writes an item as 4 codes <a_i><b_j><c_k><d_l>, one per RQ-VAE level, 256 codes per level. Different
// items can receive the same 4 codes (Amazon Beauty: 12035 items, 12023 distinct code tuples). A model can only
// name a code tuple, so evaluation compares *identifiers*: identifier i is the i-th distinct code tuple in order
// of its first item, and every item maps to exactly one identifier.
#pragma once

#include <array>
#include <cstdint>
#include <optional>
#include <span>
#include <string>
#include <unordered_map>
#include <vector>

#include "earn/core/error.hpp"

namespace earn::rec {

/// Code levels of a semantic ID (a, b, c, d).
inline constexpr int kCodeLevels = 4;
/// Codes per level (RQ-VAE codebook size).
inline constexpr int kCodesPerLevel = 256;

/// One item's semantic ID: the code of each level, each in [0, kCodesPerLevel).
using ItemCodes = std::array<int, kCodeLevels>;

/// Items, their codes, and the deduplicated identifiers. Built once; immutable.
/// \code
///   earn::rec::Catalogue cat({{1, 2, 3, 4}, {5, 6, 7, 8}, {1, 2, 3, 4}});
///   cat.n_items();        // 3
///   cat.n_identifiers();  // 2: items 0 and 2 share codes, both are identifier 0
/// \endcode
class Catalogue {
 public:
  Catalogue() = default;

  /// `item_codes[i]` are item i's codes (0-based items). Throws RangeError for a code outside [0, 256).
  explicit Catalogue(std::vector<ItemCodes> item_codes) : item_codes_(std::move(item_codes)) {
    item_identifier_.resize(item_codes_.size());
    for (std::size_t i = 0; i < item_codes_.size(); ++i) {
      const ItemCodes& c = item_codes_[i];
      for (int l = 0; l < kCodeLevels; ++l)
        if (c[l] < 0 || c[l] >= kCodesPerLevel)
          throw RangeError("catalogue: item " + std::to_string(i) + " level " + std::to_string(l) + " code " +
                           std::to_string(c[l]) + " is outside [0, " + std::to_string(kCodesPerLevel) + ")");
      auto [it, fresh] = by_codes_.try_emplace(pack(c), static_cast<int>(identifier_codes_.size()));
      if (fresh) {
        identifier_codes_.push_back(c);
        identifier_items_.emplace_back();
      }
      item_identifier_[i] = it->second;
      identifier_items_[it->second].push_back(static_cast<int>(i));
    }
  }

  int n_items() const { return static_cast<int>(item_codes_.size()); }
  int n_identifiers() const { return static_cast<int>(identifier_codes_.size()); }

  /// The identifier item `item` belongs to.
  int identifier(int item) const { return item_identifier_[check_item(item)]; }
  const ItemCodes& item_codes(int item) const { return item_codes_[check_item(item)]; }
  const ItemCodes& identifier_codes(int id) const { return identifier_codes_[check_identifier(id)]; }
  /// Items that share identifier `id`'s codes, ascending.
  std::span<const int> items_of(int id) const { return identifier_items_[check_identifier(id)]; }
  /// The identifier with exactly these codes, or nullopt (codes outside [0, 256) are simply not found).
  std::optional<int> find(const ItemCodes& c) const {
    for (int x : c)
      if (x < 0 || x >= kCodesPerLevel) return std::nullopt;
    auto it = by_codes_.find(pack(c));
    if (it == by_codes_.end()) return std::nullopt;
    return it->second;
  }

 private:
  // Four 8-bit codes in one key; valid codes fit by construction.
  static std::uint32_t pack(const ItemCodes& c) {
    return std::uint32_t(c[0]) << 24 | std::uint32_t(c[1]) << 16 | std::uint32_t(c[2]) << 8 | std::uint32_t(c[3]);
  }
  std::size_t check_item(int item) const {
    if (item < 0 || item >= n_items())
      throw RangeError("catalogue: item " + std::to_string(item) + " is outside [0, " + std::to_string(n_items()) +
                       ")");
    return static_cast<std::size_t>(item);
  }
  std::size_t check_identifier(int id) const {
    if (id < 0 || id >= n_identifiers())
      throw RangeError("catalogue: identifier " + std::to_string(id) + " is outside [0, " +
                       std::to_string(n_identifiers()) + ")");
    return static_cast<std::size_t>(id);
  }

  std::vector<ItemCodes> item_codes_;             // per item
  std::vector<int> item_identifier_;              // per item
  std::vector<ItemCodes> identifier_codes_;       // per identifier
  std::vector<std::vector<int>> identifier_items_;  // per identifier
  std::unordered_map<std::uint32_t, int> by_codes_;
};

}  // namespace earn::rec
