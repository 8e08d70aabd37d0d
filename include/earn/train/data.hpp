// earn/train/data.hpp - training examples from a recommendation data set, and the deterministic micro-batches of a
// training run.
//
//   examples   make_examples turns a split's cases into (prompt, answer) pairs: the prompt built by a
//              rec::PromptBuilder from the case's history (optionally capped below the data set's cap), the answer
//              the target item's 4 code tokens. Train: one example per case (every prefix -> next item).
//   order      Batcher walks the examples epoch by epoch, each epoch in its own permutation: Fisher-Yates driven by
//              earn::Rng (splitmix64) seeded from (seed, epoch), with an unbiased bounded draw. std::shuffle and
//              std::uniform_int_distribution are avoided on purpose: their results differ between standard
//              libraries, and a run must replay the same batches wherever it resumes.
//   cursor     DataCursor {epoch, position, seed, examples} is all a Batcher's state: a resumed run that seeks to a
//              saved cursor yields exactly the batches the uninterrupted run would have (checkpoint.hpp stores it).
//   batches    micro-batches of `micro_batch` examples; an epoch's last batch is short, or dropped with drop_last.
//              teacher_batch turns one into the trainer's input: a plan::Sequence per example (fed = the first 3
//              answer tokens) and its 4 targets, sequence by sequence as ForwardPlan::all_answer_rows() orders rows
//              (the readout row predicts answer token 0, fed row j predicts token j + 1). Histories of 1-20 items
//              mix freely: the plan packs sequences as segments, so nothing is padded.
//
// \code
//   auto ds = earn::rec::Dataset::load("../shared/data/amazon-beauty");
//   auto pb = earn::rec::PromptBuilder::code_tokens();
//   std::vector<earn::train::Example> ex = earn::train::make_examples(ds, pb, earn::rec::DataSplit::kTrain);
//   earn::train::Batcher batcher(ex.size(), {.micro_batch = 16, .seed = 7});
//   earn::train::TeacherBatch tb = earn::train::teacher_batch(ex, batcher.next().indices);
//   auto fp = earn::plan::plan_forward(schedule, n_layers, 1, 1, tb.sequences);   // targets: tb.targets
// \endcode
#pragma once

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <numeric>
#include <span>
#include <string>
#include <vector>

#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/plan/forward.hpp"
#include "earn/rec/catalogue.hpp"
#include "earn/rec/dataset.hpp"
#include "earn/rec/item_vocab.hpp"
#include "earn/rec/prompt.hpp"

namespace earn::train {

/// One training example: a prompt over a user's history and the item that should follow it.
struct Example {
  std::vector<int> prompt;   ///< [P] token ids: [head] history item codes, separated [tail]; P >= 1
  rec::ItemTokens answer{};  ///< [4] the target item's code tokens, level a first
  int user = 0;              ///< 0-based user the case belongs to
};

/// The examples of one split: one per (case, target item), in the data set's case order. Train and valid cases
/// have one target each, so one example per case; a test case gives one example per test item (teacher-forced
/// test loss). `history_len` in [1, ds.history_len()] keeps only the most recent items of each history; 0 keeps the
/// data set's cap. ConfigError for a cap outside that range (a larger cap needs the data set reloaded with it) or
/// an empty prompt (empty history and an empty template: the plan needs a prompt token); RangeError from the
/// vocabulary for items it cannot write.
inline std::vector<Example> make_examples(const rec::Dataset& ds, const rec::PromptBuilder& pb,
                                          rec::DataSplit split = rec::DataSplit::kTrain, int history_len = 0) {
  if (history_len < 0 || history_len > ds.history_len())
    throw ConfigError("make_examples: history_len " + std::to_string(history_len) + " is outside [0, " +
                      std::to_string(ds.history_len()) + "] (0 keeps the data set's cap; a larger cap needs "
                      "the data set loaded with DatasetOptions::history_len)");
  const std::size_t cap = static_cast<std::size_t>(history_len > 0 ? history_len : ds.history_len());
  const rec::Catalogue& cat = ds.catalogue();
  std::vector<Example> out;
  out.reserve(ds.cases(split).size());
  for (const rec::Case& c : ds.cases(split)) {
    std::span<const int> h(c.history);
    if (h.size() > cap) h = h.last(cap);  // the most recent items, as the data set caps them
    for (int item : c.target_items) {
      Example e;
      pb.build_into(cat, h, e.prompt);
      if (e.prompt.empty())
        throw ConfigError("make_examples: user " + std::to_string(c.user) + " of the " + rec::split_name(split) +
                          " split has an empty prompt (empty history and an empty template)");
      e.answer = pb.vocab().item_tokens(cat, item);
      e.user = c.user;
      out.push_back(std::move(e));
    }
  }
  return out;
}

/// Prompt-length summary of a set of examples, for logs.
struct ExampleStats {
  std::int64_t examples = 0;
  std::int64_t prompt_tokens = 0;  ///< sum of P
  int min_prompt = 0, max_prompt = 0;
  double mean_prompt() const { return examples ? double(prompt_tokens) / double(examples) : 0.0; }
};

/// Count and prompt lengths of `examples`.
inline ExampleStats example_stats(std::span<const Example> examples) {
  ExampleStats s;
  for (const Example& e : examples) {
    const int p = static_cast<int>(e.prompt.size());
    s.min_prompt = s.examples == 0 ? p : std::min(s.min_prompt, p);
    s.max_prompt = std::max(s.max_prompt, p);
    s.prompt_tokens += p;
    ++s.examples;
  }
  return s;
}

/// An integer uniform in [0, bound) from `rng`, the same on every platform. Rejection sampling: draws below
/// 2^64 mod bound are redrawn, so every value has exactly floor(2^64 / bound) preimages (no modulo bias).
inline std::uint64_t uniform_below(Rng& rng, std::uint64_t bound) {
  if (bound == 0) throw RangeError("uniform_below: bound must be positive");
  const std::uint64_t threshold = (0 - bound) % bound;  // 2^64 mod bound, in unsigned arithmetic
  for (;;) {
    const std::uint64_t r = rng.next_u64();
    if (r >= threshold) return r % bound;
  }
}

/// Shuffles `v` in place with Fisher-Yates (Durstenfeld's backward form) driven by `rng`: deterministic and
/// platform-independent, unlike std::shuffle.
template <class U>
void fisher_yates(std::span<U> v, Rng& rng) {
  for (std::size_t i = v.size(); i > 1; --i) {
    const std::size_t j = static_cast<std::size_t>(uniform_below(rng, i));
    std::swap(v[i - 1], v[j]);
  }
}

/// Where a Batcher stands; the whole of its state, so saving it is saving the data order of a run.
struct DataCursor {
  std::int64_t epoch = 0;     ///< epochs completed
  std::int64_t position = 0;  ///< examples of this epoch's order consumed, in [0, examples)
  std::uint64_t seed = 0;     ///< seed every epoch's permutation derives from
  std::int64_t examples = 0;  ///< size of the example set it walks (a resumed run must have the same)
  friend bool operator==(const DataCursor&, const DataCursor&) = default;
};

/// How a Batcher cuts epochs into micro-batches.
struct BatcherOptions {
  int micro_batch = 8;     ///< examples per micro-batch
  bool drop_last = false;  ///< drop an epoch's last batch when it is short (else it is yielded short)
  bool shuffle = true;     ///< false: every epoch in example order (evaluation passes)
  std::uint64_t seed = 0;  ///< the run's data seed
};

/// One micro-batch: which examples, and where it sits in the run.
struct MicroBatch {
  std::vector<std::size_t> indices;  ///< [B] indices into the example set, B <= micro_batch
  std::int64_t epoch = 0;            ///< epoch it belongs to
  std::int64_t position = 0;         ///< offset of its first example in that epoch's order
  bool last_of_epoch = false;        ///< the epoch ends with it
};

/// Deterministic per-epoch shuffles cut into micro-batches, resumable from a DataCursor.
/// \code
///   earn::train::Batcher b(examples.size(), {.micro_batch = 16, .seed = 42});
///   b.seek(saved_cursor);                          // a resumed run: the same batches from here on
///   earn::train::MicroBatch mb = b.next();         // mb.indices index `examples`
///   earn::train::DataCursor c = b.cursor();        // store it with the checkpoint
/// \endcode
class Batcher {
 public:
  /// ConfigError for no examples, micro_batch < 1, or drop_last with fewer examples than one batch (no epoch
  /// would yield anything).
  Batcher(std::size_t examples, BatcherOptions opt) : opt_(opt) {
    if (examples == 0) throw ConfigError("batcher: no examples");
    if (opt_.micro_batch < 1) throw ConfigError("batcher: micro_batch must be >= 1");
    if (opt_.drop_last && examples < static_cast<std::size_t>(opt_.micro_batch))
      throw ConfigError("batcher: drop_last with " + std::to_string(examples) + " examples and micro_batch " +
                        std::to_string(opt_.micro_batch) + " leaves no batch in an epoch");
    cursor_ = {0, 0, opt_.seed, static_cast<std::int64_t>(examples)};
    build_order();
  }

  const BatcherOptions& options() const { return opt_; }
  std::size_t size() const { return order_.size(); }
  const DataCursor& cursor() const { return cursor_; }
  /// The current epoch's order: example indices, a permutation of [0, size()).
  std::span<const std::size_t> order() const { return order_; }
  /// Micro-batches every epoch yields.
  std::int64_t batches_per_epoch() const {
    const std::int64_t n = static_cast<std::int64_t>(size()), b = opt_.micro_batch;
    return opt_.drop_last ? n / b : (n + b - 1) / b;
  }

  /// Continues from `c` (typically a checkpoint's): the same batches an uninterrupted run yields from there.
  /// ConfigError when `c` walks another number of examples or stands outside the epoch.
  void seek(const DataCursor& c) {
    if (c.examples != static_cast<std::int64_t>(size()))
      throw ConfigError("batcher: cursor walks " + std::to_string(c.examples) + " examples, this run has " +
                        std::to_string(size()) + " (another data set or history cap?)");
    if (c.epoch < 0 || c.position < 0 || c.position >= c.examples)
      throw ConfigError("batcher: cursor epoch " + std::to_string(c.epoch) + " position " +
                        std::to_string(c.position) + " is outside [0, " + std::to_string(c.examples) + ")");
    const bool rebuild = c.epoch != cursor_.epoch || c.seed != cursor_.seed;
    cursor_ = c;
    if (rebuild) build_order();
  }

  /// The next micro-batch; crosses into the next epoch (a fresh permutation) after the last one.
  MicroBatch next() {
    MicroBatch mb;
    mb.epoch = cursor_.epoch;
    mb.position = cursor_.position;
    const std::size_t from = static_cast<std::size_t>(cursor_.position);
    const std::size_t to = std::min(size(), from + static_cast<std::size_t>(opt_.micro_batch));
    mb.indices.assign(order_.begin() + static_cast<std::ptrdiff_t>(from),
                      order_.begin() + static_cast<std::ptrdiff_t>(to));
    cursor_.position = static_cast<std::int64_t>(to);
    // Normalize at once: a cursor never rests at an epoch's end (or before a dropped short tail), so a saved
    // cursor has one spelling whatever the caller does next.
    const std::size_t left = size() - to;
    if (left == 0 || (opt_.drop_last && left < static_cast<std::size_t>(opt_.micro_batch))) {
      mb.last_of_epoch = true;
      ++cursor_.epoch;
      cursor_.position = 0;
      build_order();
    }
    return mb;
  }

  /// The permutation of epoch `epoch` for `seed` over `n` examples (what order() holds during that epoch).
  static std::vector<std::size_t> epoch_order(std::size_t n, std::uint64_t seed, std::int64_t epoch,
                                              bool shuffle = true) {
    std::vector<std::size_t> order(n);
    std::iota(order.begin(), order.end(), std::size_t{0});
    if (!shuffle) return order;
    // One generator per epoch, seeded by mixing (seed, epoch) through splitmix64: epoch e's order depends on
    // nothing drawn in earlier epochs, so seeking is O(n) and not O(epochs * n).
    Rng mix(seed ^ (0xD1B54A32D192ED03ull * (static_cast<std::uint64_t>(epoch) + 1)));
    Rng rng(mix.next_u64());
    fisher_yates(std::span<std::size_t>(order), rng);
    return order;
  }

 private:
  void build_order() {
    order_ = epoch_order(static_cast<std::size_t>(cursor_.examples), cursor_.seed, cursor_.epoch, opt_.shuffle);
  }

  BatcherOptions opt_;
  DataCursor cursor_;
  std::vector<std::size_t> order_;
};

/// A micro-batch as the training step takes it: plan input and targets, sequence by sequence.
struct TeacherBatch {
  /// [B] per example: prompt = its prompt, fed = its first 3 answer tokens (views into the examples, which must
  /// outlive the batch).
  std::vector<plan::Sequence> sequences;
  /// [4 B] per sequence its 4 answer tokens: the readout row's target, then each fed row's (the order of
  /// ForwardPlan::all_answer_rows()).
  std::vector<int> targets;
  std::int64_t prompt_tokens = 0;  ///< sum of P over the batch

  int size() const { return static_cast<int>(sequences.size()); }
  /// Fed (teacher-forced) rows of the batch: 3 per sequence.
  std::int64_t fed_tokens() const { return std::int64_t{rec::kCodeLevels - 1} * size(); }
  /// Input rows of the forward pass with r_p + r_s registers per sequence: the dense layers' rows (throughput).
  std::int64_t input_rows(int prefix_registers, int suffix_registers) const {
    return prompt_tokens + fed_tokens() + std::int64_t{prefix_registers + suffix_registers} * size();
  }
};

/// The forward-pass input of examples `indices` (in that order). RangeError for an index outside `examples`.
inline TeacherBatch teacher_batch(std::span<const Example> examples, std::span<const std::size_t> indices) {
  constexpr std::size_t kFed = rec::kCodeLevels - 1;  // the last answer token is predicted, never fed
  TeacherBatch tb;
  tb.sequences.reserve(indices.size());
  tb.targets.reserve(indices.size() * rec::kCodeLevels);
  for (std::size_t i : indices) {
    if (i >= examples.size())
      throw RangeError("teacher_batch: example " + std::to_string(i) + " is outside [0, " +
                       std::to_string(examples.size()) + ")");
    const Example& e = examples[i];
    tb.sequences.push_back(plan::Sequence{e.prompt, std::span<const int>(e.answer.data(), kFed)});
    tb.targets.insert(tb.targets.end(), e.answer.begin(), e.answer.end());
    tb.prompt_tokens += static_cast<std::int64_t>(e.prompt.size());
  }
  return tb;
}

}  // namespace earn::train
