// earn/rec/trie.hpp - the prefix trie over valid items' code-token sequences that constrains decoding.
//
// Layout: level-wise sorted child arrays (CSR). Nodes of depth d + 1 are numbered 0..n_(d+1)-1 in
// lexicographic order of their code prefix; the children of node i at depth d (d in 0..3, the root is node 0 of
// depth 0) are nodes [first_[d][i], first_[d][i + 1]) of depth d + 1, whose tokens token_[d][...] ascend. A
// lookup is one slice per step, no pointer chasing; a depth-4 node is an identifier.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "earn/core/error.hpp"
#include "earn/rec/catalogue.hpp"
#include "earn/rec/item_vocab.hpp"

namespace earn::rec {

/// Allowed next tokens of one trie node: tokens ascend; child j is node `first_child + j` one level down.
struct TrieChildren {
  std::span<const int> tokens;
  int first_child = 0;
  std::size_t size() const { return tokens.size(); }
  bool empty() const { return tokens.empty(); }
};

/// A strict prefix trie over every identifier's 4 code tokens: every complete path is a real identifier.
/// \code
///   earn::rec::CodeTrie trie(catalogue, vocab);
///   auto next = trie.children(0, 0);               // allowed first tokens (depth 0, the root)
///   int node = next.first_child + j;               // after choosing next.tokens[j]
///   auto more = trie.children(1, node);            // allowed second tokens
///   int id = trie.identifier(leaf);                // at depth 4
/// \endcode
class CodeTrie {
 public:
  CodeTrie() = default;

  /// Builds the trie over all identifiers of `cat`, with token ids from `vocab`.
  CodeTrie(const Catalogue& cat, const ItemVocab& vocab) : vocab_size_(vocab.size()) {
    const int n = cat.n_identifiers();
    std::vector<ItemTokens> seq(n);
    for (int id = 0; id < n; ++id) seq[id] = vocab.identifier_tokens(cat, id);
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::sort(order.begin(), order.end(), [&](int a, int b) { return seq[a] < seq[b]; });
    // Depth-(d+1) nodes are the distinct (d+1)-prefixes in sorted order; node i of depth d owns a contiguous run.
    for (int d = 0; d < kCodeLevels; ++d) {
      first_[d].push_back(0);
      for (int j = 0; j < n; ++j) {
        const ItemTokens& s = seq[order[j]];
        const bool new_parent = j == 0 || !std::equal(s.begin(), s.begin() + d, seq[order[j - 1]].begin());
        const bool new_child = new_parent || s[d] != seq[order[j - 1]][d];
        if (new_parent && j > 0) first_[d].push_back(static_cast<int>(token_[d].size()));
        if (new_child) token_[d].push_back(s[d]);
      }
      first_[d].push_back(static_cast<int>(token_[d].size()));
    }
    // Identifiers are distinct code tuples, so each depth-4 node holds exactly one.
    identifier_.resize(n);
    for (int j = 0; j < n; ++j) identifier_[j] = order[j];
  }

  /// Nodes at depth d (1 for the root's depth 0, identifiers at depth 4).
  int nodes(int depth) const {
    check_depth(depth, kCodeLevels);
    return depth == 0 ? 1 : static_cast<int>(token_[depth - 1].size());
  }
  int n_identifiers() const { return static_cast<int>(identifier_.size()); }
  int vocab_size() const { return vocab_size_; }

  /// Allowed next tokens of node `node` at depth `depth` in [0, 4).
  TrieChildren children(int depth, int node) const {
    check_depth(depth, kCodeLevels - 1);
    if (node < 0 || node >= nodes(depth))
      throw RangeError("trie: node " + std::to_string(node) + " is outside depth " + std::to_string(depth) + "'s " +
                       std::to_string(nodes(depth)) + " nodes");
    // The root has no parent entry when the catalogue is empty: first_[0] = {0, 0}.
    const int b = first_[depth][node], e = first_[depth][node + 1];
    return {std::span<const int>(token_[depth]).subspan(b, e - b), b};
  }

  /// The identifier of depth-4 node `leaf`.
  int identifier(int leaf) const {
    if (leaf < 0 || leaf >= n_identifiers())
      throw RangeError("trie: leaf " + std::to_string(leaf) + " is outside [0, " + std::to_string(n_identifiers()) +
                       ")");
    return identifier_[leaf];
  }

  /// The node a token prefix leads to (depth = prefix length, 0..4), or nullopt when no item starts with it.
  std::optional<int> find(std::span<const int> prefix) const {
    if (prefix.size() > std::size_t(kCodeLevels))
      throw RangeError("trie: prefix of " + std::to_string(prefix.size()) + " tokens, items have 4");
    int node = 0;
    for (std::size_t d = 0; d < prefix.size(); ++d) {
      const TrieChildren c = children(static_cast<int>(d), node);
      auto it = std::lower_bound(c.tokens.begin(), c.tokens.end(), prefix[d]);
      if (it == c.tokens.end() || *it != prefix[d]) return std::nullopt;
      node = c.first_child + static_cast<int>(it - c.tokens.begin());
    }
    return node;
  }

  /// Allowed next tokens after a prefix of 0..3 tokens; empty when the prefix leads nowhere.
  std::span<const int> allowed(std::span<const int> prefix) const {
    if (prefix.size() >= std::size_t(kCodeLevels))
      throw RangeError("trie: a prefix of " + std::to_string(prefix.size()) + " tokens has no next token");
    const auto node = find(prefix);
    return node ? children(static_cast<int>(prefix.size()), *node).tokens : std::span<const int>{};
  }

  /// The identifier 4 tokens name, or nullopt.
  std::optional<int> identifier_of(std::span<const int> tokens) const {
    if (tokens.size() != std::size_t(kCodeLevels)) return std::nullopt;
    const auto leaf = find(tokens);
    return leaf ? std::optional<int>(identifier_[*leaf]) : std::nullopt;
  }

  /// Masks scores [vocab] in place: allowed tokens keep their value, all others become -inf.
  template <class V>
  static void mask(V& scores, std::span<const int> allowed_tokens) {
    using T = std::decay_t<decltype(scores[0])>;
    std::size_t j = 0;  // allowed tokens ascend, so one merge pass suffices
    for (std::int64_t t = 0; t < static_cast<std::int64_t>(scores.size()); ++t) {
      while (j < allowed_tokens.size() && allowed_tokens[j] < t) ++j;
      if (j == allowed_tokens.size() || allowed_tokens[j] != t) scores[t] = -std::numeric_limits<T>::infinity();
    }
  }

 private:
  static void check_depth(int depth, int max) {
    if (depth < 0 || depth > max)
      throw RangeError("trie: depth " + std::to_string(depth) + " is outside [0, " + std::to_string(max) + "]");
  }

  int vocab_size_ = 0;
  std::vector<int> first_[kCodeLevels];  // per depth d: [nodes(d) + 1] child offsets into token_[d]
  std::vector<int> token_[kCodeLevels];  // per depth d: [nodes(d + 1)] token of each depth-(d+1) node
  std::vector<int> identifier_;          // [nodes(4)] identifier of each leaf
};

}  // namespace earn::rec
