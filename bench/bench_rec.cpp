// bench_rec: what the recommendation loop costs besides the model. Beam search spends time in the engine (prefill,
// 3 decode steps of B rows per user) and in selection (log_softmax over the vocabulary, trie children, top-B).
//
//   BM_Select_Trie/B         one full search with a model-free engine (fixed random logits): selection alone
//   BM_Select_DenseMask/B    the naive baseline of the same 4 steps: write a -inf mask over the vocabulary per
//                            row (CodeTrie::mask), then sort every (row, token) candidate
//   BM_Decode_Rows/B/k       one engine decode step of B rows over a shared prompt (the model's share of a step)
//   BM_BeamSearch_User/B/k   the whole search for one user: prefill + decode + selection (users/s, and the FLOPs
//                            and bytes a search cannot avoid, for its floor)
// --model PATH: a checkpoint instead of the random model (its code tokens are its vocabulary's last 1024 ids).
//
// Catalogue: Amazon Beauty's 12023 code tuples when ../shared/data is present, else 12023 random ones.
// Model: the examples' CPU-sized random Llama (d 512, 8 layers, vocab 8192; code tokens are its last 1024 ids).
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cmath>
#include <filesystem>
#include <numeric>
#include <vector>

#include "../examples/model_source.hpp"
#include "common.hpp"
#include "earn/rec/rec.hpp"

using namespace earn;
using namespace earn::rec;

namespace {

// The --model checkpoint when given (bench_rec --model runs/earn/checkpoints/step-N), else the random one.
const ModelWeights& model() {
  if (const ModelWeights* c = bench::checkpoint()) return *c;
  static const ModelWeights w = random_weights(examples::cpu_sized_llama(), {.seed = 7});
  return w;
}

const ItemVocab& vocab() {
  static const ItemVocab v(model().config.vocab_size - kCodeLevels * kCodesPerLevel);
  return v;
}

const Catalogue& catalogue() {
  static const Catalogue cat = [] {
    const std::filesystem::path dir = std::filesystem::path(EARN_SHARED_DATA_DIR) / "amazon-beauty";
    if (std::filesystem::exists(dir / "sequential_train.txt")) return Dataset::load(dir).catalogue();
    Rng rng(11);
    std::vector<ItemCodes> codes(12023);
    for (auto& c : codes)
      for (int& x : c) x = static_cast<int>(rng.next_u64() % kCodesPerLevel);
    return Catalogue(codes);
  }();
  return cat;
}

const CodeTrie& trie() {
  static const CodeTrie t(catalogue(), vocab());
  return t;
}

// A prompt of the code template over 20 items: 3 + 80 + 19 = 102 tokens.
std::vector<int> prompt() {
  std::vector<int> hist(20);
  for (int i = 0; i < 20; ++i) hist[i] = (i * 613) % catalogue().n_items();
  return PromptBuilder::code_tokens(vocab()).build(catalogue(), hist);
}

// An engine without a model: fixed random logits, so a search measures selection and bookkeeping only.
class FakeEngine {
 public:
  struct State {
    StateOptions opts;
    int rows = 0;
    const StateOptions& options() const { return opts; }
    void set_rows(std::span<const int> r) { rows = static_cast<int>(r.size()); }
    void reorder(std::span<const int> p) { rows = static_cast<int>(p.size()); }
    Index kv_bytes() const { return 0; }
  };
  explicit FakeEngine(const ModelConfig& c) : c_(c), logits_(64 * 4, c.vocab_size) {
    Rng rng(5);
    for (Index i = 0; i < logits_.size(); ++i) logits_.data()[i] = rng.symmetric(4.0f);
  }
  const ModelConfig& config() const { return c_; }
  State make_state(StateOptions o) const { return State{o}; }
  Vector prefill(State&, int user, std::span<const int>) const { return logits_.row(user % 4).transpose(); }
  Matrix prefill_batch(State&, std::span<const int> users, std::span<const std::vector<int>>) const {
    Matrix m(static_cast<Index>(users.size()), c_.vocab_size);
    for (std::size_t i = 0; i < users.size(); ++i) m.row(Index(i)) = logits_.row(users[i] % 4);
    return m;
  }
  Matrix decode(State& st, std::span<const int>) const { return logits_.topRows(st.rows); }

 private:
  ModelConfig c_;
  Matrix logits_;  // [256, vocab]
};

void BM_Select_Trie(benchmark::State& state) {
  const int B = int(state.range(0));
  const FakeEngine engine(model().config);
  BeamSearch search(engine, trie(), {.beam = B}, 1, 128);
  const std::vector<std::vector<int>> prompts{prompt()};
  for (auto _ : state) benchmark::DoNotOptimize(search.run(prompts).data());
  state.counters["users/s"] = benchmark::Counter(1, benchmark::Counter::kIsIterationInvariantRate);
}

// The naive counterpart of one search's selection: for the 1 + 3 steps (1 row, then B rows), per row log_softmax,
// a full -inf mask from the trie, then one sort over rows * vocab candidates.
void BM_Select_DenseMask(benchmark::State& state) {
  const int B = int(state.range(0)), V = model().config.vocab_size;
  const FakeEngine engine(model().config);
  FakeEngine::State st{};
  st.rows = B;
  const Matrix logits = engine.decode(st, {});
  std::vector<float> scores(std::size_t(B) * V);
  std::vector<int> order(scores.size());
  for (auto _ : state) {
    for (int depth = 0; depth < kCodeLevels; ++depth) {
      const int rows = depth == 0 ? 1 : B;
      for (int r = 0; r < rows; ++r) {
        Vector row = logits.row(r).transpose();
        const float m = row.maxCoeff();
        row.array() -= m + std::log((row.array() - m).exp().sum());
        CodeTrie::mask(row, trie().children(depth, r % trie().nodes(depth)).tokens);
        std::copy(row.data(), row.data() + V, scores.begin() + std::ptrdiff_t(r) * V);
      }
      const auto end = order.begin() + std::ptrdiff_t(rows) * V;
      std::iota(order.begin(), end, 0);
      std::partial_sort(order.begin(), order.begin() + B, end, [&](int a, int b) { return scores[a] > scores[b]; });
      benchmark::DoNotOptimize(order.data());
    }
  }
  state.counters["users/s"] = benchmark::Counter(1, benchmark::Counter::kIsIterationInvariantRate);
}

void BM_Decode_Rows(benchmark::State& state) {
  const int B = int(state.range(0)), k = int(state.range(1));
  const Engine<EarnSchedule> engine(model(), EarnSchedule{k});
  const auto p = prompt();
  auto st = engine.make_state({.max_users = 1, .max_rows = B, .max_prompt = int(p.size()), .max_new_tokens = 4});
  engine.prefill(st, 0, p);
  const std::vector<int> users(B, 0), tokens(B, vocab().token(0, 1));
  for (auto _ : state) {
    st.set_rows(users);  // restart at generated position 0 every iteration
    benchmark::DoNotOptimize(engine.decode(st, tokens).data());
  }
  state.counters["rows"] = B;
}

void BM_BeamSearch_User(benchmark::State& state) {
  const ModelConfig& c = model().config;
  const int B = int(state.range(0)), k = std::min(int(state.range(1)), c.n_layers);  // k >= L: dense
  const Engine<EarnSchedule> engine(model(), EarnSchedule{k});
  const std::vector<std::vector<int>> prompts{prompt()};
  BeamSearch search(engine, trie(), {.beam = B}, 1, int(prompts[0].size()));
  for (auto _ : state) benchmark::DoNotOptimize(search.run(prompts).data());
  const BeamStats& s = search.stats();
  const double n = double(s.users);
  state.counters["prefill_ms"] = 1e3 * s.prefill_s / n;
  state.counters["decode_ms"] = 1e3 * s.decode_s / n;
  state.counters["select_ms"] = 1e3 * s.select_s / n;
  state.counters["kv_bytes"] = double(s.peak_kv_bytes);
  state.counters["users/s"] = benchmark::Counter(1, benchmark::Counter::kIsIterationInvariantRate);
  // The work a search cannot avoid, for its floor (bench/README.md divides by bench_model's measured GEMM rate and
  // bandwidth): matrix FLOPs of the prefill (layers below k over P + r rows, the others over r; the last layer
  // projects every one of its rows' Q, K and V, as the engine does, but only the readout row goes on to the output
  // projection, the MLP and the classifier) and of 3 decode steps of B rows; bytes = the weights read once by the
  // prefill and once per step.
  const double P = double(prompts[0].size()), r = engine.registers();
  const double layer = bench::layer_flops(c, 1, 0), head = 2.0 * c.dim * c.vocab_size;  // per row
  const double qkv_proj = 2.0 * c.dim * (double(c.n_heads) * c.head_dim() + 2 * c.kv_dim());  // per row: Q, K, V
  const int below = std::min(k, c.n_layers - 1);  // layers under the last one that still hold the prompt
  const double top_rows = k >= c.n_layers ? P + r : r;
  const double prefill = layer * (below * (P + r) + (c.n_layers - 1 - below) * r) + top_rows * qkv_proj +
                         (layer - qkv_proj) + head;
  const double flops = prefill + 3.0 * B * (layer * c.n_layers + head);
  const double weight_bytes = 4.0 * (c.n_layers * layer / 2 + head / 2);  // 2 FLOPs per weight and row
  state.counters["GFLOP/user"] = flops / 1e9;
  state.counters["MB/user"] = 4.0 * weight_bytes / 1e6;
}

}  // namespace

BENCHMARK(BM_Select_Trie)->Arg(1)->Arg(20)->Arg(64)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Select_DenseMask)->Arg(1)->Arg(20)->Arg(64)->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_Decode_Rows)->ArgsProduct({{1, 20, 64}, {2, 8}})->Unit(benchmark::kMicrosecond);
BENCHMARK(BM_BeamSearch_User)->ArgsProduct({{20}, {2, 8}})->Unit(benchmark::kMillisecond);

EARN_BENCH_MAIN([] {})
