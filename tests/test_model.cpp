// The dense model: RoPE conventions, tied/untied heads, sampling, and generate() against the reference.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <vector>

#include "earn/earn.hpp"
#ifdef _OPENMP
#include <omp.h>
#endif
#include "reference_model.hpp"

using namespace earn;

namespace {

ModelConfig config(RopeStyle style, bool tied) {
  ModelConfig c;
  c.dim = 32;
  c.hidden_dim = 50;
  c.n_layers = 3;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 61;
  c.max_seq_len = 64;
  c.rope_theta = 10000.0f;
  c.rope_style = style;
  c.tied_embeddings = tied;
  return c;
}

// Permutes each head's rows of a projection from interleaved pairs (2i, 2i+1) to halves (i, i + d/2), the
// conversion Hugging Face applies to Meta checkpoints: rotate-half on the permuted weights is interleaved RoPE.
Matrix interleaved_to_halves(const Matrix& w, int heads, int hd) {
  Matrix out(w.rows(), w.cols());
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < hd / 2; ++i) {
      out.row(h * hd + i) = w.row(h * hd + 2 * i);
      out.row(h * hd + i + hd / 2) = w.row(h * hd + 2 * i + 1);
    }
  return out;
}

}  // namespace

TEST_CASE("Interleaved RoPE equals rotate-half RoPE on head-permuted q/k weights") {
  const ModelWeights a = random_weights(config(RopeStyle::kInterleaved, true), {.seed = 4, .scale = 2.0f,
                                                                               .prefix_registers = 0,
                                                                               .suffix_registers = 0});
  ModelWeights b = a;
  b.config.rope_style = RopeStyle::kRotateHalf;
  const int hd = a.config.head_dim();
  for (auto& l : b.layers) {
    l.wq = interleaved_to_halves(l.wq, a.config.n_heads, hd);
    l.wk = interleaved_to_halves(l.wk, a.config.n_kv_heads, hd);
  }
  Engine<DenseSchedule> ea(a), eb(b);
  const std::vector<int> prompt{3, 14, 15, 9, 26, 5, 35};
  auto sa = ea.make_state({.max_prompt = 7, .max_new_tokens = 1});
  auto sb = eb.make_state({.max_prompt = 7, .max_new_tokens = 1});
  const Matrix la = ea.prefill_all_logits(sa, 0, prompt), lb = eb.prefill_all_logits(sb, 0, prompt);
  CHECK((la - lb).cwiseAbs().maxCoeff() <= 1e-5f * std::max(1.0f, la.cwiseAbs().maxCoeff()));
  // And the style matters: the unpermuted weights under rotate-half give different logits.
  ModelWeights c = a;
  c.config.rope_style = RopeStyle::kRotateHalf;
  Engine<DenseSchedule> ec(c);
  auto sc = ec.make_state({.max_prompt = 7, .max_new_tokens = 1});
  CHECK((la - ec.prefill_all_logits(sc, 0, prompt)).cwiseAbs().maxCoeff() > 1e-3f);
}

TEST_CASE("Every prompt position's logits match the reference, tied and untied heads, both RoPE styles") {
  for (bool tied : {true, false})
    for (auto style : {RopeStyle::kRotateHalf, RopeStyle::kInterleaved}) {
      CAPTURE(tied);
      const ModelWeights w = random_weights(config(style, tied), {.seed = 6, .scale = 2.0f, .prefix_registers = 0,
                                                                  .suffix_registers = 0});
      Engine<DenseSchedule> e(w);
      const std::vector<int> prompt{1, 2, 3, 5, 8, 13, 21, 34, 55};
      auto st = e.make_state({.max_prompt = 9, .max_new_tokens = 1});
      const Matrix got = e.prefill_all_logits(st, 0, prompt);
      std::vector<earn::test::RefKind> kinds;
      const auto ref = earn::test::reference_logits(w, earn::test::reference_input(w, prompt, {}, kinds),
                                                    [](int, int q, int k) { return k <= q; });
      REQUIRE(got.rows() == 9);
      // Relative error of a row: max |got - ref| over max(1, max |ref|) (the logits' own scale).
      double worst = 0;
      for (int t = 0; t < 9; ++t) {
        double err = 0, scale = 1;
        for (int v = 0; v < w.config.vocab_size; ++v) {
          err = std::max(err, std::abs(got(t, v) - ref[t][v]));
          scale = std::max(scale, std::abs(ref[t][v]));
        }
        worst = std::max(worst, err / scale);
      }
      CHECK(worst <= 1e-5);
    }
}

TEST_CASE("Greedy generate follows the reference's argmax step by step, and stops on the stop token") {
  const ModelWeights w = random_weights(config(RopeStyle::kRotateHalf, false), {.seed = 12, .scale = 3.0f,
                                                                              .prefix_registers = 0,
                                                                              .suffix_registers = 0});
  Engine<DenseSchedule> e(w);
  std::vector<int> seq{7, 1, 4};
  const auto out = generate(e, seq, {.max_new_tokens = 6});
  REQUIRE(out.size() == 6);
  for (int step = 0; step < 6; ++step) {
    std::vector<earn::test::RefKind> kinds;
    const auto ref = earn::test::reference_logits(w, earn::test::reference_input(w, seq, {}, kinds),
                                                  [](int, int q, int k) { return k <= q; });
    const auto& last = ref.back();
    const int want = int(std::max_element(last.begin(), last.end()) - last.begin());
    CHECK(out[step] == want);
    seq.push_back(want);
  }
  const auto stopped = generate(e, std::vector<int>{7, 1, 4}, {.max_new_tokens = 6, .stop_token = out[2]});
  CHECK(stopped == std::vector<int>(out.begin(), out.begin() + 2));
  // A list of stop tokens (several EOS ids): the first of them generated stops; timings count the steps fed.
  earn::GenerateTimings t;
  const auto listed = generate(e, std::vector<int>{7, 1, 4},
                               {.max_new_tokens = 6, .stop_tokens = {-5, out[3], out[4]}, .timings = &t});
  const int first = int(std::find_first_of(out.begin(), out.end(), out.begin() + 3, out.begin() + 5) - out.begin());
  CHECK(listed == std::vector<int>(out.begin(), out.begin() + first));
  CHECK(t.prompt_tokens == 3);
  CHECK(t.decode_steps == first);  // tokens 1..first were each produced by one decode step
  CHECK(t.prefill_seconds > 0);
}

TEST_CASE("Decode of one row over a long context (attention's heads split over the threads) matches the reference") {
  ModelConfig c = config(RopeStyle::kRotateHalf, false);
  c.dim = 64;
  c.hidden_dim = 96;
  c.n_layers = 2;
  c.max_seq_len = 640;  // 4 heads of 16 over >= 512 keys: past attention_decode's bar for splitting the heads
  const ModelWeights w = random_weights(c, {.seed = 21, .scale = 2.0f, .prefix_registers = 0, .suffix_registers = 0});
#ifdef _OPENMP
  const int had = omp_get_max_threads();
  omp_set_num_threads(2);  // the split needs two threads, whatever the machine
#endif
  Engine<DenseSchedule> e(w);
  std::vector<int> prompt(520);
  for (int i = 0; i < 520; ++i) prompt[i] = (i * 7 + 3) % c.vocab_size;
  const std::vector<int> fed{5, 9, 17};
  auto st = e.make_state({.max_prompt = 520, .max_new_tokens = 3});
  (void)e.prefill(st, 0, prompt);
  const int row_user[1] = {0};
  st.set_rows(row_user);
  for (int step = 0; step < 3; ++step) {
    const int tok[1] = {fed[step]};
    const Matrix got = e.decode(st, tok);
    std::vector<earn::test::RefKind> kinds;
    const std::vector<int> gen(fed.begin(), fed.begin() + step + 1);
    const auto ref = earn::test::reference_logits(w, earn::test::reference_input(w, prompt, gen, kinds),
                                                  [](int, int q, int k) { return k <= q; });
    double err = 0, scale = 1;
    for (int v = 0; v < c.vocab_size; ++v) {
      err = std::max(err, std::abs(got(0, v) - ref.back()[v]));
      scale = std::max(scale, std::abs(ref.back()[v]));
    }
    CAPTURE(step);
    CHECK(err / scale <= 1e-5);
  }
#ifdef _OPENMP
  omp_set_num_threads(had);
#endif
}

TEST_CASE("generate fills the context exactly: the last token is returned, never fed") {
  // run.c accepts steps = seq_len: prompt P and N new tokens use P + N - 1 positions. A state that reserved a row
  // for the unfed last token refused prompt + N = context + 1.
  const ModelWeights w = random_weights(config(RopeStyle::kRotateHalf, false), {.seed = 4, .scale = 3.0f,
                                                                             .prefix_registers = 0,
                                                                             .suffix_registers = 0});
  Engine<DenseSchedule> e(w);
  const std::vector<int> prompt{7, 1, 4};
  const int fill = w.config.max_seq_len - int(prompt.size()) + 1;  // 62 new tokens over 64 positions
  const auto out = generate(e, prompt, {.max_new_tokens = fill});
  REQUIRE(out.size() == std::size_t(fill));
  const auto shorter = generate(e, prompt, {.max_new_tokens = 5});
  CHECK(std::equal(shorter.begin(), shorter.end(), out.begin()));  // greedy: a prefix of the longer run
  CHECK_THROWS_AS(generate(e, prompt, {.max_new_tokens = fill + 1}), ConfigError);
  CHECK(generate(e, prompt, {.max_new_tokens = 1}).size() == 1u);
  CHECK(generate(e, prompt, {.max_new_tokens = 0}).empty());
}

TEST_CASE("advise_huge_pages: a model's 2 MiB blocks are advised, its values untouched; EARN_HUGE_PAGES=0 opts out") {
  ModelConfig c = config(RopeStyle::kRotateHalf, false);
  c.vocab_size = 16384;  // embedding and head: 2 MiB each, spanning at least one block that is mostly theirs
  ModelWeights w = random_weights(c, {.seed = 9});
  const ModelWeights copy = w;
  unsetenv("EARN_HUGE_PAGES");
  const cpu::HugePageAdvice a = cpu::advise_huge_pages(w);
#if defined(__linux__)
  // Each 2 MiB tensor covers one whole block or two halves of neighbouring blocks: >= 1 block each, unless both
  // halves fall short of half a block (impossible: the two parts of 2 MiB sum to 2 MiB, one is >= 1 MiB).
  CHECK(a.blocks >= 2);
  CHECK(a.collapsed <= a.blocks);
  MESSAGE("blocks advised: " << a.blocks << ", collapsed at once: " << a.collapsed);
#else
  CHECK(a.blocks == 0);
#endif
  const auto wt = w.tensors();
  const auto ct = copy.tensors();
  REQUIRE(wt.size() == ct.size());
  for (std::size_t i = 0; i < wt.size(); ++i)
    CHECK(std::equal(wt[i].data, wt[i].data + wt[i].size, ct[i].data));
  setenv("EARN_HUGE_PAGES", "0", 1);
  CHECK(cpu::advise_huge_pages(w).blocks == 0);
  unsetenv("EARN_HUGE_PAGES");
  // An engine advises its weights as it is built, and serves the same logits (the weights are the same bytes).
  const Engine<Uniform<Layer<attention::DenseCausal, kv::Contiguous>>, Cpu> e(w);
  const int prompt[] = {1, 200, 16000};
  auto st = e.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 8, .max_new_tokens = 1});
  const Matrix got = e.prefill(st, 0, prompt);
  setenv("EARN_HUGE_PAGES", "0", 1);
  const Engine<Uniform<Layer<attention::DenseCausal, kv::Contiguous>>, Cpu> e0(copy);
  unsetenv("EARN_HUGE_PAGES");
  auto st0 = e0.make_state({.max_users = 1, .max_rows = 1, .max_prompt = 8, .max_new_tokens = 1});
  CHECK(got == e0.prefill(st0, 0, prompt));
}

TEST_CASE("argmax: the first of the largest logits, as a plain loop finds it, at every length and with ties, "
          "infinities, signed zeros and NaNs") {
  const auto plain = [](const Vector& x) {  // llama2.c's loop
    int best = 0;
    for (Index i = 1; i < x.size(); ++i)
      if (x[i] > x[best]) best = static_cast<int>(i);
    return best;
  };
  const float inf = std::numeric_limits<float>::infinity(), nan = std::numeric_limits<float>::quiet_NaN();
  Rng rng(5);
  int cases = 0;
  for (const Index n : {1, 2, 15, 16, 17, 31, 33, 47, 100, 32000})
    for (int trial = 0; trial < 40; ++trial) {
      Vector x(n);
      // Few distinct values, so that ties across lanes and within a lane are common; then some specials.
      for (Index i = 0; i < n; ++i) x[i] = std::floor(rng.uniform() * 4.0f) - 2.0f;
      const int specials = trial % 8;
      for (int s = 0; s < specials; ++s) {
        const Index at = static_cast<Index>(rng.uniform() * float(n)) % n;
        const float pick[] = {inf, -inf, nan, 0.0f, -0.0f, 1.5f};
        x[at] = pick[static_cast<int>(rng.uniform() * 6.0f) % 6];
      }
      if (trial == 39) x.setConstant(-inf);
      if (trial == 38) x.setConstant(nan);
      if (trial == 37 && n > 1) x[0] = nan;
      if (trial == 36) x.setZero(), x[n - 1] = -0.0f;
      CHECK_MESSAGE(argmax(x) == plain(x), "n = " << n << ", trial " << trial);
      CHECK(Sampler(0.0f, 1.0f, 1)(x) == plain(x));
      ++cases;
    }
  CHECK(cases == 400);
  CHECK_THROWS_AS(argmax(Vector(0)), RangeError);
}

TEST_CASE("Sampler: temperature 0 is argmax; seeded sampling is reproducible and follows softmax; top-p truncates") {
  Vector logits(5);
  logits << 1.0f, 3.0f, 2.0f, 3.0f, -1.0f;
  CHECK(Sampler(0.0f, 1.0f, 1)(logits) == 1);  // first of the tied maxima
  Sampler s1(1.0f, 1.0f, 99), s2(1.0f, 1.0f, 99);
  for (int i = 0; i < 50; ++i) CHECK(s1(logits) == s2(logits));
  // Frequencies over 20000 draws against softmax probabilities (4-sigma band of a binomial).
  Sampler s(1.0f, 1.0f, 7);
  std::map<int, int> count;
  const int n = 20000;
  for (int i = 0; i < n; ++i) ++count[s(logits)];
  double z = 0;
  for (int i = 0; i < 5; ++i) z += std::exp(logits[i]);
  for (int i = 0; i < 5; ++i) {
    const double p = std::exp(logits[i]) / z, sd = std::sqrt(n * p * (1 - p));
    CHECK(std::abs(count[i] - n * p) <= 4 * sd + 1);
  }
  // top_p = 0.5: only the two tied maxima (mass 0.73 together; the first alone is 0.36 < 0.5) can be drawn.
  Sampler t(1.0f, 0.5f, 3);
  for (int i = 0; i < 2000; ++i) {
    const int x = t(logits);
    CHECK((x == 1 || x == 3));
  }
  CHECK_THROWS_AS(Sampler(-1.0f, 1.0f, 1), ConfigError);
  CHECK_THROWS_AS(Sampler(1.0f, 0.0f, 1), ConfigError);
}
