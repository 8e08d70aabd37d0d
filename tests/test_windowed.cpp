// Policies with run-time values and per-head / per-layer visibility (the where hook of attention/policy.hpp):
// attention::SinkWindow (StreamingLLM's pattern), attention::HeadWise (DuoAttention's full and streaming heads),
// a per-layer list of them, one reading the layer, and HeadWise under EARN's split. The CPU engine's prefill and
// decode against the naive double-precision reference with explicit per-(layer, head) masks written here; the
// observer's recorded keys; the CPU trainer's forward against the same reference and its gradients against finite
// differences; the values' checks.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "earn/backend/cpu/train.hpp"
#include "earn/earn.hpp"
#include "engine_checks.hpp"
#include "reference_model.hpp"

using namespace earn;
using earn::test::check_close;
using earn::test::random_tokens;
using earn::test::RefKind;
using earn::test::small_config;

namespace {

// The explicit masks: may row q see row k at layer l and query head h (positions are row indices here).
bool sink_window(int q, int k, int sinks, int window) { return k <= q && (k < sinks || q - k < window); }
bool head_wise(int q, int k, int h, std::uint64_t streaming, int sinks, int window) {
  if (k > q) return false;
  if (!((streaming >> h) & 1u)) return true;
  return k < sinks || q - k < window;
}

// A policy whose window grows with the layer: visible asks where.layer.
struct LayerWindow {
  static constexpr const char* name = "layer_window";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(RowKind) { return true; }
  int base = 2;
  constexpr bool visible(attention::Where w, int q, int k) const { return k <= q && q - k < base + 3 * w.layer; }
};
static_assert(attention::DeviceUsable<LayerWindow>);

// README's per-head policy, as written there.
struct OddHeadsRecent {  // a new per-head policy with a run-time value: odd query heads see only `window` keys back
  static constexpr const char* name = "odd_heads_recent";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(RowKind) { return true; }
  int window = 32;
  constexpr bool visible(attention::Where w, int q, int k) const { return k <= q && (w.head % 2 == 0 || q - k < window); }
};

using Stream = Layer<attention::SinkWindow, kv::Contiguous>;
using Duo = Layer<attention::HeadWise, kv::Contiguous>;
using RefMask = std::function<bool(int l, int q, int h, int k)>;

// Prefill `prompt` (and a second user with a shorter prompt in the same batch), decode `gen` under schedule s;
// every logit row against the reference under `mask`, and the mask must matter (the dense reference differs).
template <class S>
void check_engine(const ModelWeights& w, const S& s, const RefMask& mask, const std::vector<int>& prompt,
                  const std::vector<int>& gen) {
  const int n = w.registers.count() + static_cast<int>(prompt.size());
  std::vector<RefKind> kinds;
  const auto input = earn::test::reference_input(w, prompt, gen, kinds);
  const auto ref = earn::test::reference_logits(w, input, [&](int l, int q, int h, int k) { return mask(l, q, h, k); });
  const auto dense = earn::test::reference_logits(w, input, [](int, int q, int k) { return k <= q; });
  double diff = 0;
  for (std::size_t t = 0; t < ref[n - 1].size(); ++t) diff = std::max(diff, std::abs(ref[n - 1][t] - dense[n - 1][t]));
  CHECK(diff > 1e-4);  // the policy changes the answer: the test can fail

  Engine<S> engine(w, s);
  auto st = engine.make_state({.max_users = 2, .max_rows = 2, .max_prompt = 64, .max_new_tokens = 4});
  check_close(engine.prefill(st, 0, prompt), ref[n - 1], 1e-5, "prefill");
  // The same user in a batch beside another one: the same logits.
  const std::vector<int> other = random_tokens(7, w.config.vocab_size, 99);
  const int users[2] = {1, 0};
  const std::vector<int> prompts[2] = {other, prompt};
  const Matrix both = engine.prefill_batch(st, users, prompts);
  check_close(both.row(1).transpose(), ref[n - 1], 1e-5, "batched prefill");
  const int rows[1] = {0};
  st.set_rows(rows);
  for (int g = 0; g < static_cast<int>(gen.size()); ++g) {
    const int tok[1] = {gen[g]};
    check_close(engine.decode(st, tok).row(0).transpose(), ref[n + g], 1e-5, "decode");
  }
}

}  // namespace

TEST_CASE("SinkWindow and HeadWise: prefill and decode equal the explicit per-head masks, one type for every value") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 71, .scale = 2.0f, .prefix_registers = 1, .suffix_registers = 1});
  const auto prompt = random_tokens(23, c.vocab_size, 5);
  const auto gen = random_tokens(3, c.vocab_size, 6);
  const int values[3][2] = {{1, 4}, {3, 9}, {0, 1}};  // sinks, window
  for (const auto& v : values) {
    const int sinks = v[0], window = v[1];
    CAPTURE(sinks);
    CAPTURE(window);
    check_engine(w, Uniform<Stream>{Stream{{.sinks = sinks, .window = window}}},
                 [=](int, int q, int, int k) { return sink_window(q, k, sinks, window); }, prompt, gen);
  }
  for (std::uint64_t streaming : {0b000101ull, 0b111110ull}) {
    CAPTURE(streaming);
    check_engine(w, Uniform<Duo>{Duo{{.streaming = streaming, .sinks = 2, .window = 5}}},
                 [=](int, int q, int h, int k) { return head_wise(q, k, h, streaming, 2, 5); }, prompt, gen);
  }
}

TEST_CASE("README's per-head policy runs as written and equals its explicit mask") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 70, .scale = 2.0f, .prefix_registers = 1, .suffix_registers = 1});
  using Odd = Layer<OddHeadsRecent, kv::Contiguous>;
  check_engine(w, Uniform<Odd>{Odd{{.window = 8}}},
               [](int, int q, int h, int k) { return k <= q && (h % 2 == 0 || q - k < 8); },
               random_tokens(21, c.vocab_size, 12), random_tokens(3, c.vocab_size, 13));
}

TEST_CASE("Per-layer values (PerLayer), a rule reading the layer, and HeadWise below EARN's split") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 72, .scale = 2.0f, .prefix_registers = 2, .suffix_registers = 1});
  const auto prompt = random_tokens(19, c.vocab_size, 7);
  const auto gen = random_tokens(3, c.vocab_size, 8);
  SUBCASE("PerLayer<HeadWise>: each layer its own streaming heads and window") {
    std::vector<Duo> layers;
    std::vector<std::uint64_t> sets{0b1ull, 0b110ull, 0b101010ull, 0ull};
    for (int l = 0; l < c.n_layers; ++l) layers.push_back(Duo{{.streaming = sets[l], .sinks = 1, .window = 3 + l}});
    check_engine(w, PerLayer<Duo>{layers},
                 [&](int l, int q, int h, int k) { return head_wise(q, k, h, sets[l], 1, 3 + l); }, prompt, gen);
  }
  SUBCASE("a where rule reading the layer") {
    using Lw = Layer<LayerWindow, kv::Contiguous>;
    check_engine(w, Uniform<Lw>{Lw{{.base = 2}}}, [](int l, int q, int, int k) { return k <= q && q - k < 2 + 3 * l; },
                 prompt, gen);
  }
  SUBCASE("HeadWise early layers, register-only late layers (k = 2)") {
    using S = Split<Dynamic, Duo, Layer<attention::RegisterOnly, kv::Register>>;
    std::vector<RefKind> kinds;
    earn::test::reference_input(w, prompt, gen, kinds);
    const auto late = earn::test::earn_mask(2, kinds);
    check_engine(w, S{2, Duo{{.streaming = 0b011001ull, .sinks = 1, .window = 4}}},
                 [&](int l, int q, int h, int k) {
                   return l < 2 ? head_wise(q, k, h, 0b011001ull, 1, 4) : late(l, q, k);
                 },
                 prompt, gen);
  }
}

TEST_CASE("The observer records, per head, exactly the keys a HeadWise head sees") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 73, .prefix_registers = 1, .suffix_registers = 1});
  const auto prompt = random_tokens(15, c.vocab_size, 9);
  const std::uint64_t streaming = 0b100110ull;
  Engine<Uniform<Duo>> engine(w, Uniform<Duo>{Duo{{.streaming = streaming, .sinks = 2, .window = 3}}});
  auto st = engine.make_state({.max_prompt = 64});
  attention::Observer obs({.record = {.layers = {1}}});
  st.observe(&obs);
  engine.prefill(st, 0, prompt);
  const auto rows = obs.recorded();
  REQUIRE(rows.size() == std::size_t(17) * c.n_heads);
  for (const auto& r : rows) {
    std::vector<int> want;
    for (int k = 0; k < 17; ++k)
      if (head_wise(r.q_pos, k, r.head, streaming, 2, 3)) want.push_back(k);
    CAPTURE(r.head);
    CAPTURE(r.q_pos);
    CHECK(r.k_pos == want);
    double sum = 0;
    for (double p : r.p) sum += p;
    CHECK(sum == doctest::Approx(1.0).epsilon(1e-5));
  }
}

TEST_CASE("The CPU trainer under HeadWise: forward equals the explicit mask, gradients equal finite differences") {
  ModelConfig c = small_config();
  c.dim = 24;
  c.hidden_dim = 20;
  c.n_layers = 2;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 13;
  const ModelWeights wf = random_weights(c, {.seed = 74, .scale = 1.5f, .prefix_registers = 1, .suffix_registers = 1});
  const BasicModelWeights<double> w = wf.cast<double>();
  const std::uint64_t streaming = 0b0101ull;
  const Uniform<Duo> schedule{Duo{{.streaming = streaming, .sinks = 1, .window = 2}}};
  const std::vector<int> prompt = random_tokens(6, c.vocab_size, 10), answer = random_tokens(3, c.vocab_size, 11);
  const std::vector<plan::Sequence> seqs{{prompt, std::span<const int>(answer).first(2)}};
  const auto fp = plan::plan_forward(schedule, c.n_layers, 1, 1, std::span<const plan::Sequence>(seqs));
  cpu::TrainTape<double> tape;
  MatrixT<double> logits;
  cpu::train_forward(w, schedule, fp, answer, 1.0, tape, &logits);
  std::vector<RefKind> kinds;
  const std::vector<int> fed(answer.begin(), answer.begin() + 2);
  const auto input = earn::test::reference_input(wf, prompt, fed, kinds);
  const auto ref = earn::test::reference_logits(
      wf, input, [&](int, int q, int h, int k) { return head_wise(q, k, h, streaming, 1, 2); });
  const int n_in = 1 + 6 + 1;
  REQUIRE(logits.rows() == 3);
  for (int r = 0; r < 3; ++r) {
    double err = 0;
    for (int t = 0; t < c.vocab_size; ++t) err = std::max(err, std::abs(logits(r, t) - ref[n_in - 1 + r][t]));
    CHECK(err < 1e-10);
  }
  // Gradients: central differences of the loss at sampled elements of every tensor.
  BasicModelWeights<double> wm = w;
  BasicModelWeights<double> g = wm.zeros_like();
  auto loss = [&] { return cpu::train_forward(wm, schedule, fp, answer, 3.0, tape); };
  loss();
  cpu::train_backward(wm, schedule, fp, tape, g);
  auto params = wm.tensors();
  auto grads = g.tensors();
  Rng rng(5);
  for (std::size_t t = 0; t < params.size(); ++t) {
    CAPTURE(params[t].name);
    double scale = 1.0;
    for (Index i = 0; i < params[t].size; ++i) scale = std::max(scale, std::abs(grads[t].data[i]));
    for (int s = 0; s < 6; ++s) {
      const Index i = static_cast<Index>(rng.next_u64() % std::uint64_t(params[t].size));
      double* x = params[t].data + i;
      const double keep = *x;
      *x = keep + 1e-5;
      const double up = loss();
      *x = keep - 1e-5;
      const double down = loss();
      *x = keep;
      CHECK(std::abs((up - down) / 2e-5 - grads[t].data[i]) / scale <= 1e-7);
    }
  }
}

TEST_CASE("Window values are checked where the schedule is: a row must see itself") {
  const ModelConfig c = small_config();
  const ModelWeights w = random_weights(c, {.seed = 75, .prefix_registers = 1, .suffix_registers = 1});
  CHECK_THROWS_AS((Engine<Uniform<Stream>>(w, Uniform<Stream>{Stream{{.sinks = 1, .window = 0}}})), ConfigError);
  CHECK_THROWS_AS((Engine<Uniform<Duo>>(w, Uniform<Duo>{Duo{{.sinks = -1, .window = 4}}})), ConfigError);
  std::vector<Duo> layers(c.n_layers, Duo{{.window = 4}});
  layers[3].rule.window = 0;
  try {
    Engine<PerLayer<Duo>> engine(w, PerLayer<Duo>{layers});
    FAIL("a window of 0 at layer 3 was taken");
  } catch (const ConfigError& e) {
    CHECK(std::string(e.what()).find("head_wise") != std::string::npos);
  }
  // Values of late layers only count where late layers exist: k = L leaves them unused.
  using S = Split<Dynamic, Layer<attention::DenseCausal, kv::Contiguous>, Layer<attention::RegisterOnly, kv::Register>>;
  CHECK_NOTHROW((Engine<S>(w, S{c.n_layers})));
}
