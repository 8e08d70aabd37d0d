// Training data: examples against the data set's cases (synthetic and Amazon Beauty), the platform-independent
// shuffle (pinned values), epochs that hold every example once, resumption from a cursor, micro-batch boundaries,
// and the teacher-forcing batch against a ForwardPlan's answer rows.
#include <doctest/doctest.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include <unistd.h>

#include "earn/plan/forward.hpp"
#include "earn/rec/dataset.hpp"
#include "earn/rec/prompt.hpp"
#include "earn/schedule/presets.hpp"
#include "earn/train/data.hpp"
#include "support.hpp"

using namespace earn;
using namespace earn::train;
namespace fs = std::filesystem;

namespace {

// A synthetic data set in a scratch directory: user u (1-based) has (u * 7) % 26 + 1 training items, so histories
// run from 1 to 26 items and cross the cap of 20; items cycle through 40 with distinct codes. One more user has no
// training item, only a validation item (a case with an empty history).
struct SyntheticDataset {
  fs::path dir;
  int users = 30, items = 40;
  SyntheticDataset() {
    static std::atomic<int> counter{0};
    dir = fs::temp_directory_path() /
          ("earn_train_data_" + std::to_string(::getpid()) + "_" + std::to_string(counter++));
    fs::remove_all(dir);
    fs::create_directories(dir);
    std::ofstream tr(dir / "sequential_train.txt"), va(dir / "sequential_valid.txt"), te(dir / "sequential_test.txt");
    for (int u = 1; u <= users; ++u) {
      tr << u;
      for (int j = 0; j < (u * 7) % 26 + 1; ++j) tr << ' ' << (u * 3 + j * 5) % items + 1;
      tr << '\n';
      va << u << (u % 3 ? " " + std::to_string(u % items + 1) : "") << '\n';
      te << u;
      for (int j = 0; j < u % 4; ++j) te << ' ' << (u + j) % items + 1;
      te << '\n';
    }
    tr << users + 1 << '\n';
    va << users + 1 << " 1\n";
    te << users + 1 << '\n';
    std::ofstream codes(dir / "beauty.LCRec-1e-3lr.json");
    codes << '{';
    for (int i = 0; i < items; ++i)
      codes << (i ? ", " : "") << '"' << i << "\": [\"<a_" << i % 7 << ">\", \"<b_" << i << ">\", \"<c_" << 255 - i
            << ">\", \"<d_" << (i * 13) % 256 << ">\"]";
    codes << "}\n";
  }
  ~SyntheticDataset() {
    std::error_code ec;
    fs::remove_all(dir, ec);
  }
};

std::vector<int> last_n(std::vector<int> v, std::size_t n) {
  if (v.size() > n) v.erase(v.begin(), v.end() - static_cast<std::ptrdiff_t>(n));
  return v;
}

// Every batch a batcher yields over `batches` calls.
std::vector<MicroBatch> take(Batcher& b, int batches) {
  std::vector<MicroBatch> out;
  for (int i = 0; i < batches; ++i) out.push_back(b.next());
  return out;
}

bool same_batches(const std::vector<MicroBatch>& a, const std::vector<MicroBatch>& b) {
  if (a.size() != b.size()) return false;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (a[i].indices != b[i].indices || a[i].epoch != b[i].epoch || a[i].position != b[i].position ||
        a[i].last_of_epoch != b[i].last_of_epoch)
      return false;
  return true;
}

}  // namespace

TEST_CASE("make_examples: one example per case, prompt and answer as the prompt builder writes them") {
  const SyntheticDataset sd;
  const rec::Dataset ds = rec::Dataset::load(sd.dir);
  const auto pb = rec::PromptBuilder::code_tokens();
  const rec::Catalogue& cat = ds.catalogue();

  for (int cap : {0, 20, 5, 1}) {
    INFO("history cap " << cap);
    const std::vector<Example> ex = make_examples(ds, pb, rec::DataSplit::kTrain, cap);
    const auto cases = ds.cases(rec::DataSplit::kTrain);
    REQUIRE(std::int64_t(ex.size()) == ds.counts().train_samples);  // capping shortens histories, drops no case
    const std::size_t keep = cap ? std::size_t(cap) : 20;
    for (std::size_t i = 0; i < ex.size(); ++i) {
      const auto h = last_n(cases[i].history, keep);
      CHECK(ex[i].prompt == pb.build(cat, h));
      CHECK(ex[i].answer == pb.vocab().item_tokens(cat, cases[i].target_items[0]));
      CHECK(ex[i].user == cases[i].user);
    }
    const ExampleStats st = example_stats(ex);
    CHECK(st.examples == std::int64_t(ex.size()));
    CHECK(st.min_prompt == pb.length(1));
    CHECK(st.max_prompt == pb.length(int(keep)));
  }
  // A user with 26 training items gives 25 cases, histories 1..25 capped at 20.
  CHECK(ds.history_len() == 20);

  // Valid: one per case; test: one per target item.
  CHECK(make_examples(ds, pb, rec::DataSplit::kValid).size() == std::size_t(ds.counts().valid_cases));
  CHECK(std::int64_t(make_examples(ds, pb, rec::DataSplit::kTest).size()) == ds.counts().test_interactions);

  CHECK_THROWS_AS(make_examples(ds, pb, rec::DataSplit::kTrain, 21), ConfigError);
  CHECK_THROWS_AS(make_examples(ds, pb, rec::DataSplit::kTrain, -1), ConfigError);
  // Empty template and empty history: no prompt token for the plan.
  const rec::PromptBuilder bare(rec::ItemVocab(4), {}, {}, {});
  CHECK_NOTHROW(make_examples(ds, bare, rec::DataSplit::kTrain));  // training histories hold >= 1 item
  CHECK_THROWS_AS(make_examples(ds, bare, rec::DataSplit::kValid), ConfigError);
}

TEST_CASE("make_examples on Amazon Beauty: the 102858 training samples, prompts of 1-20 items") {
  EARN_REQUIRE_SHARED(file, "amazon-beauty/sequential_train.txt");
  const rec::Dataset ds = rec::Dataset::load(file.parent_path());
  const auto pb = rec::PromptBuilder::code_tokens();
  const std::vector<Example> ex = make_examples(ds, pb);
  CHECK(ex.size() == 102858u);
  CHECK(std::int64_t(ex.size()) == ds.counts().train_samples);
  const ExampleStats st = example_stats(ex);
  CHECK(st.min_prompt == pb.length(1));   // 2 + 4 + 1
  CHECK(st.max_prompt == pb.length(20));  // 2 + 80 + 19 + 1
  // Spot checks against the cases; every id inside the code-token model's vocabulary.
  const auto cases = ds.cases(rec::DataSplit::kTrain);
  for (std::size_t i : {std::size_t(0), ex.size() / 2, ex.size() - 1}) {
    CHECK(ex[i].prompt == pb.build(ds.catalogue(), cases[i].history));
    CHECK(ex[i].user == cases[i].user);
  }
  const int vocab = pb.vocab().size();
  bool in_vocab = true;
  for (const Example& e : ex) {
    for (int t : e.prompt) in_vocab = in_vocab && t >= 0 && t < vocab;
    for (int t : e.answer) in_vocab = in_vocab && t >= rec::CodeTemplate::kBaseVocab && t < vocab;
  }
  CHECK(in_vocab);
  // A smaller cap keeps every sample.
  CHECK(make_examples(ds, pb, rec::DataSplit::kTrain, 10).size() == ex.size());
}

TEST_CASE("uniform_below and fisher_yates: pinned values, so every platform replays the same order") {
  Rng rng(42);
  std::vector<std::uint64_t> draws;
  for (std::uint64_t bound : {1ull, 2ull, 3ull, 10ull, 1000ull, 0x8000000000000001ull})
    draws.push_back(uniform_below(rng, bound));
  // Values from an independent Python transcription (splitmix64, redraw below 2^64 mod bound, Durstenfeld); the
  // last bound redraws about half its draws. A change here changes every run's data order and breaks resuming
  // runs saved before it.
  const std::vector<std::uint64_t> want_draws = {0, 1, 0, 4, 250, 6792609088808213253ull};
  CHECK(draws == want_draws);
  CHECK_THROWS_AS(uniform_below(rng, 0), RangeError);

  std::vector<int> v(10);
  for (int i = 0; i < 10; ++i) v[i] = i;
  Rng r2(7);
  fisher_yates(std::span<int>(v), r2);
  const std::vector<int> want_perm = {8, 1, 5, 9, 0, 4, 3, 2, 6, 7};
  CHECK(v == want_perm);
  CHECK(Batcher::epoch_order(8, 123, 0) == std::vector<std::size_t>{4, 0, 5, 6, 2, 7, 1, 3});
  CHECK(Batcher::epoch_order(8, 123, 1) == std::vector<std::size_t>{1, 3, 6, 5, 0, 2, 4, 7});

  // Edge sizes: empty and one element stay as they are.
  std::vector<int> empty;
  fisher_yates(std::span<int>(empty), r2);
  std::vector<int> one{5};
  fisher_yates(std::span<int>(one), r2);
  CHECK(one == std::vector<int>{5});
}

TEST_CASE("Batcher: a seed fixes the order, another seed or epoch changes it, every example once per epoch") {
  for (std::size_t n : {std::size_t(1), std::size_t(7), std::size_t(10), std::size_t(64), std::size_t(1001)}) {
    for (int mb : {1, 3, 8, 64}) {
      INFO("n " << n << " micro_batch " << mb);
      Batcher a(n, {.micro_batch = mb, .seed = 11}), b(n, {.micro_batch = mb, .seed = 11});
      const std::int64_t per_epoch = a.batches_per_epoch();
      CHECK(per_epoch == std::int64_t((n + mb - 1) / mb));
      for (int epoch = 0; epoch < 3; ++epoch) {
        std::vector<int> seen(n, 0);
        std::vector<std::size_t> flat;
        for (std::int64_t k = 0; k < per_epoch; ++k) {
          const MicroBatch x = a.next(), y = b.next();
          CHECK(x.indices == y.indices);
          CHECK(x.epoch == epoch);
          CHECK(x.position == k * mb);
          // Full batches, the last one short by n mod mb.
          const std::size_t want = k + 1 < per_epoch ? std::size_t(mb) : n - std::size_t(k * mb);
          CHECK(x.indices.size() == want);
          CHECK(x.last_of_epoch == (k + 1 == per_epoch));
          for (std::size_t i : x.indices) ++seen[i];
          flat.insert(flat.end(), x.indices.begin(), x.indices.end());
        }
        CHECK(std::all_of(seen.begin(), seen.end(), [](int c) { return c == 1; }));
        CHECK(flat == Batcher::epoch_order(n, 11, epoch));
        CHECK(a.cursor() == DataCursor{epoch + 1, 0, 11, std::int64_t(n)});
      }
    }
  }
  // Orders: another seed differs, another epoch differs, shuffle off is the identity.
  const auto base = Batcher::epoch_order(100, 1, 0);
  CHECK(base != Batcher::epoch_order(100, 2, 0));
  CHECK(base != Batcher::epoch_order(100, 1, 1));
  CHECK(std::is_permutation(base.begin(), base.end(), Batcher::epoch_order(100, 2, 0).begin()));
  Batcher plain(5, {.micro_batch = 2, .shuffle = false, .seed = 9});
  CHECK(plain.next().indices == std::vector<std::size_t>{0, 1});
  CHECK(plain.next().indices == std::vector<std::size_t>{2, 3});
  CHECK(plain.next().indices == std::vector<std::size_t>{4});
  CHECK(plain.next().indices == std::vector<std::size_t>{0, 1});

  CHECK_THROWS_AS(Batcher(0, {}), ConfigError);
  CHECK_THROWS_AS(Batcher(5, {.micro_batch = 0}), ConfigError);
  CHECK_THROWS_AS(Batcher(5, {.micro_batch = 6, .drop_last = true}), ConfigError);
}

TEST_CASE("Batcher drop_last: only full batches, the short tail skipped, a fresh order each epoch") {
  const std::size_t n = 23;
  Batcher b(n, {.micro_batch = 5, .drop_last = true, .seed = 3});
  CHECK(b.batches_per_epoch() == 4);
  std::set<std::size_t> tails;
  for (int epoch = 0; epoch < 4; ++epoch) {
    std::set<std::size_t> seen;
    for (int k = 0; k < 4; ++k) {
      const MicroBatch mb = b.next();
      CHECK(mb.indices.size() == 5u);
      CHECK(mb.epoch == epoch);
      CHECK(mb.last_of_epoch == (k == 3));
      seen.insert(mb.indices.begin(), mb.indices.end());
    }
    CHECK(seen.size() == 20u);  // distinct: no example twice in an epoch
    const auto order = Batcher::epoch_order(n, 3, epoch);
    tails.insert(order.back());
  }
  CHECK(tails.size() > 1);  // the dropped examples change from epoch to epoch
  // Exactly one batch's worth: nothing is dropped.
  Batcher exact(10, {.micro_batch = 5, .drop_last = true, .seed = 3});
  CHECK(exact.next().indices.size() == 5u);
  CHECK(!exact.cursor().epoch);
  CHECK(exact.next().last_of_epoch);
}

TEST_CASE("Batcher: a run resumed from any cursor yields exactly the batches of the uninterrupted run") {
  for (bool drop_last : {false, true}) {
    for (int mb : {1, 4, 7}) {
      const BatcherOptions opt{.micro_batch = mb, .drop_last = drop_last, .seed = 0xFEEDFACECAFEBEEFull};
      const std::size_t n = 30;
      Batcher straight(n, opt);
      const std::vector<MicroBatch> want = take(straight, 40);  // several epochs
      for (int stop = 0; stop <= 25; ++stop) {
        INFO("drop_last " << drop_last << " micro_batch " << mb << " stopped after " << stop);
        Batcher first(n, opt);
        take(first, stop);
        const DataCursor saved = first.cursor();  // what a checkpoint stores
        Batcher resumed(n, opt);
        resumed.seek(saved);
        const std::vector<MicroBatch> got = take(resumed, 40 - stop);
        CHECK(same_batches(got, std::vector<MicroBatch>(want.begin() + stop, want.end())));
      }
    }
  }
  Batcher b(30, {.micro_batch = 4, .seed = 1});
  CHECK_THROWS_AS(b.seek({0, 0, 1, 31}), ConfigError);   // another data set
  CHECK_THROWS_AS(b.seek({0, 30, 1, 30}), ConfigError);  // past the epoch
  CHECK_THROWS_AS(b.seek({-1, 0, 1, 30}), ConfigError);
  // The cursor carries the seed: seeking to another run's cursor follows that run's order.
  Batcher other(30, {.micro_batch = 4, .seed = 2});
  b.seek(other.cursor());
  CHECK(b.next().indices == other.next().indices);
}

TEST_CASE("teacher_batch: prompts, fed tokens and targets in the order of ForwardPlan::all_answer_rows()") {
  std::vector<Example> ex(3);
  ex[0] = {{0, 1, 10, 11, 12, 13, 3}, {20, 21, 22, 23}, 0};
  ex[1] = {{0, 1, 14, 15, 16, 17, 2, 18, 19, 20, 21, 3}, {30, 31, 32, 33}, 1};
  ex[2] = {{7}, {40, 41, 42, 43}, 5};
  const std::vector<std::size_t> idx{2, 0, 1};
  const TeacherBatch tb = teacher_batch(ex, idx);
  REQUIRE(tb.size() == 3);
  CHECK(std::vector<int>(tb.sequences[0].prompt.begin(), tb.sequences[0].prompt.end()) == std::vector<int>{7});
  CHECK(std::vector<int>(tb.sequences[0].fed.begin(), tb.sequences[0].fed.end()) == std::vector<int>{40, 41, 42});
  CHECK(tb.sequences[2].prompt.data() == ex[1].prompt.data());  // views, not copies
  CHECK(tb.targets == std::vector<int>{40, 41, 42, 43, 20, 21, 22, 23, 30, 31, 32, 33});
  CHECK(tb.prompt_tokens == 1 + 7 + 12);
  CHECK(tb.fed_tokens() == 9);
  CHECK(tb.input_rows(1, 1) == 20 + 9 + 6);

  // Against the plan: one target per answer row; a fed row's input token is the previous row's target.
  for (int k : {0, 1, 2}) {
    for (const auto& regs : {std::pair{1, 1}, std::pair{0, 1}, std::pair{2, 0}}) {
      // Plain locals: clang 14 cannot capture structured bindings in INFO's lambda.
      const int rp = regs.first, rs = regs.second;
      INFO("k " << k << " r_p " << rp << " r_s " << rs);
      const auto fp = plan::plan_forward(EarnSchedule{k}, 2, rp, rs, std::span<const plan::Sequence>(tb.sequences));
      const auto rows = fp.all_answer_rows();
      REQUIRE(rows.size() == tb.targets.size());
      CHECK(fp.input().size() == tb.input_rows(rp, rs));
      const plan::RowSet& top = fp.top();
      const plan::RowSet& in = fp.input();
      for (std::size_t j = 0; j < rows.size(); ++j) {
        const int s = top.seg[rows[j]];
        CHECK(s == int(j / 4));
        if (j % 4 == 0) {
          CHECK(top.kind[rows[j]] != RowKind::kGenerated);  // the readout row
        } else {
          REQUIRE(top.kind[rows[j]] == RowKind::kGenerated);
          CHECK(fp.source[in.seg_off[s] + top.pos[rows[j]]] == tb.targets[j - 1]);
        }
      }
    }
  }
  const std::vector<std::size_t> bad{3};
  CHECK_THROWS_AS(teacher_batch(ex, bad), RangeError);
  CHECK(teacher_batch(ex, {}).size() == 0);
}

TEST_CASE("Batcher + teacher_batch over a synthetic data set: histories of 1-20 items share batches") {
  const SyntheticDataset sd;
  const rec::Dataset ds = rec::Dataset::load(sd.dir);
  const std::vector<Example> ex = make_examples(ds, rec::PromptBuilder::code_tokens());
  Batcher b(ex.size(), {.micro_batch = 16, .seed = 5});
  std::int64_t rows = 0, targets = 0;
  std::set<std::size_t> lengths;
  for (std::int64_t k = 0; k < b.batches_per_epoch(); ++k) {
    const TeacherBatch tb = teacher_batch(ex, b.next().indices);
    for (const auto& s : tb.sequences) lengths.insert(s.prompt.size());
    rows += tb.input_rows(1, 1);
    targets += std::int64_t(tb.targets.size());
  }
  const ExampleStats st = example_stats(ex);
  CHECK(rows == st.prompt_tokens + std::int64_t(ex.size()) * (3 + 2));
  CHECK(targets == 4 * std::int64_t(ex.size()));
  CHECK(lengths.size() == 20u);  // every history length 1..20 appears
}
