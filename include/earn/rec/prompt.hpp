// earn/rec/prompt.hpp - the one prompt builder of the recommendation loop: a history of items -> token ids.
//
// Layout of every prompt (registers are not part of it: the engine puts prefix registers before and suffix
// registers after whatever token list it is given):
//   [head] [item 1: 4 code tokens] [separator] [item 2: 4 code tokens] ... [item n: 4 code tokens] [tail]
// n = 0 gives [head][tail]. Length = |head| + 4n + |separator|(n - 1) + |tail|.
//
// Two ways to fill head / separator / tail:
//  (a) text(tokenizer, vocab): the LC-Rec instruction text of EARN.md,
//        "### Instruction: The user has interacted with items {history} in chronological order. Can you predict
//         the next possible item that the user may expect?\n### Response:"   with ", " between items.
//      The three text pieces are encoded once, separately and verbatim, with the tokenizer (BOS on the head only,
//      no EOS); a SentencePiece tokenizer applies its dummy-prefix space to each piece as it would to any text.
//  (b) code_tokens(vocab): for a model trained from scratch on code tokens, fixed ids at the start of the base
//      vocabulary (CodeTemplate): head = [kBos, kInstruction], separator = [kSeparator], tail = [kResponse];
//      the model's vocabulary is then ItemVocab(CodeTemplate::kBaseVocab).size() = 4 + 1024 ids.
#pragma once

#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

#include "earn/core/error.hpp"
#include "earn/rec/catalogue.hpp"
#include "earn/rec/item_vocab.hpp"

namespace earn::rec {

/// Fixed template ids of a code-token model trained from scratch: the first ids of its base vocabulary.
struct CodeTemplate {
  static constexpr int kBos = 0;          ///< start of sequence
  static constexpr int kInstruction = 1;  ///< stands for the instruction text before the history
  static constexpr int kSeparator = 2;    ///< between two items of the history
  static constexpr int kResponse = 3;     ///< stands for the text after the history; the answer follows
  static constexpr int kBaseVocab = 4;    ///< code tokens start here
};

/// The instruction text of the LC-Rec sequential task (EARN.md), split around the history.
struct TextTemplate {
  std::string head = "### Instruction: The user has interacted with items ";
  std::string separator = ", ";
  std::string tail =
      " in chronological order. Can you predict the next possible item that the user may expect?\n### Response:";
};

/// Builds prompts [head][item codes, separated][tail]; see the file comment for the layout.
/// \code
///   auto pb = earn::rec::PromptBuilder::text(tokenizer, earn::rec::ItemVocab(tokenizer.vocab_size()));
///   std::vector<int> ids = pb.build(dataset.catalogue(), c.history);
/// \endcode
class PromptBuilder {
 public:
  PromptBuilder() = default;
  /// Explicit pieces; every id must lie in the base vocabulary [0, vocab.base()) so none is a code token.
  PromptBuilder(ItemVocab vocab, std::vector<int> head, std::vector<int> separator, std::vector<int> tail)
      : vocab_(vocab), head_(std::move(head)), separator_(std::move(separator)), tail_(std::move(tail)) {
    for (const auto* piece : {&head_, &separator_, &tail_})
      for (int id : *piece)
        if (id < 0 || id >= vocab_.base())
          throw ConfigError("prompt: template id " + std::to_string(id) + " is outside the base vocabulary [0, " +
                            std::to_string(vocab_.base()) + ")");
  }

  /// (a) Text template encoded with `tok`: anything with `std::vector<int> encode(std::string_view, bool bos,
  /// bool eos)`, e.g. earn::Llama2cTokenizer. `vocab.base()` must cover the tokenizer's ids.
  template <class Tokenizer>
  static PromptBuilder text(const Tokenizer& tok, ItemVocab vocab, const TextTemplate& t = {}) {
    return PromptBuilder(vocab, to_vector(tok.encode(std::string_view(t.head), true, false)),
                         to_vector(tok.encode(std::string_view(t.separator), false, false)),
                         to_vector(tok.encode(std::string_view(t.tail), false, false)));
  }

  /// (b) Fixed template ids for a code-token model; `vocab.base()` must be at least CodeTemplate::kBaseVocab.
  static PromptBuilder code_tokens(ItemVocab vocab = ItemVocab(CodeTemplate::kBaseVocab)) {
    return PromptBuilder(vocab, {CodeTemplate::kBos, CodeTemplate::kInstruction}, {CodeTemplate::kSeparator},
                         {CodeTemplate::kResponse});
  }

  const ItemVocab& vocab() const { return vocab_; }
  std::span<const int> head() const { return head_; }
  std::span<const int> separator() const { return separator_; }
  std::span<const int> tail() const { return tail_; }

  /// Tokens of a prompt over `n_items` history items.
  int length(int n_items) const {
    if (n_items < 0) throw RangeError("prompt: negative history length");
    return static_cast<int>(head_.size() + tail_.size()) + kCodeLevels * n_items +
           (n_items > 0 ? (n_items - 1) * static_cast<int>(separator_.size()) : 0);
  }

  /// Appends the prompt for `history` (0-based items of `cat`, oldest first) to `out`.
  void build_into(const Catalogue& cat, std::span<const int> history, std::vector<int>& out) const {
    out.reserve(out.size() + length(static_cast<int>(history.size())));
    out.insert(out.end(), head_.begin(), head_.end());
    for (std::size_t i = 0; i < history.size(); ++i) {
      if (i > 0) out.insert(out.end(), separator_.begin(), separator_.end());
      const ItemTokens t = vocab_.item_tokens(cat, history[i]);
      out.insert(out.end(), t.begin(), t.end());
    }
    out.insert(out.end(), tail_.begin(), tail_.end());
  }

  /// The prompt for `history` (0-based items of `cat`, oldest first).
  std::vector<int> build(const Catalogue& cat, std::span<const int> history) const {
    std::vector<int> out;
    build_into(cat, history, out);
    return out;
  }

  /// The text the prompt stands for, code tokens written as <a_N>... (for logs and debugging).
  std::string render(const Catalogue& cat, std::span<const int> history, const TextTemplate& t = {}) const {
    std::string s = t.head;
    for (std::size_t i = 0; i < history.size(); ++i) {
      if (i > 0) s += t.separator;
      for (int id : vocab_.item_tokens(cat, history[i])) s += vocab_.text(id);
    }
    return s + t.tail;
  }

 private:
  template <class R>
  static std::vector<int> to_vector(const R& r) {
    return std::vector<int>(r.begin(), r.end());
  }

  ItemVocab vocab_;
  std::vector<int> head_, separator_, tail_;
};

}  // namespace earn::rec
