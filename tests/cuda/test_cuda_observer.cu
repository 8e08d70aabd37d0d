// The attention observer on the GPU (backend/cuda/observe.cuh): statistics reduced on the device equal those the
// CPU engine's observer gets (itself tested against the naive reference in tests/test_observer.cpp), for dense,
// EARN, a pressed schedule and per-head visibility (attention::HeadWise), two users of different lengths in one
// batch, GQA, both density rules; an observer that asks for whole rows is refused.
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "earn/cuda.cuh"
#include "../reference_model.hpp"  // random_tokens
#include "compare.cuh"

using namespace earn;
using attention::Observer;
using attention::ObserverOptions;
using earn::test::gqa_config;
using earn::test::random_tokens;
using earn::test::round_to;

TYPE_TO_STRING(earn::dtype::F32);
TYPE_TO_STRING(earn::dtype::Bf16);

namespace {

// Both engines prefill the same two users with an observer of options `o`; every (layer, head) cell must agree:
// masses and entropy within tol, density within tol plus what keys near the threshold may flip (fp32 vs the CPU's
// summation order; bf16 storage).
template <class D, class S>
void check_observer(const ModelWeights& w, const S& schedule, const ObserverOptions& o, double tol) {
  Engine<S> cpu(w, schedule);
  Engine<S, CudaT<D>> gpu(w, schedule);
  const StateOptions so{.max_users = 2, .max_rows = 2, .max_prompt = 80, .max_new_tokens = 4};
  auto cs = cpu.make_state(so);
  auto gs = gpu.make_state(so);
  Observer oc(o), og(o);
  cs.observe(&oc);
  gs.observe(&og);
  const int users[2] = {0, 1};
  const std::vector<int> prompts[2] = {random_tokens(57, w.config.vocab_size, 1), random_tokens(23, w.config.vocab_size, 2)};
  cpu.prefill_batch(cs, users, prompts);
  gpu.prefill_batch(gs, users, prompts);
  REQUIRE(og.samples() == 2);
  for (int l = 0; l < w.config.n_layers; ++l)
    for (int h = 0; h < w.config.n_heads; ++h) {
      CAPTURE(l);
      CAPTURE(h);
      const auto& a = oc.stats(l, h);
      const auto& b = og.stats(l, h);
      CHECK(a.samples == b.samples);
      CHECK(a.rows == b.rows);
      const auto ma = a.mean(), mb = b.mean();
      CHECK(std::abs(ma.head_mass - mb.head_mass) <= tol);
      CHECK(std::abs(ma.tail_mass - mb.tail_mass) <= tol);
      CHECK(std::abs(ma.entropy - mb.entropy) <= 10 * tol);
      CHECK(std::abs(ma.density - mb.density) <= tol + 0.02);
    }
}

}  // namespace

TEST_CASE_TEMPLATE("CUDA observer statistics equal the CPU observer's (dense, EARN, a press; both density rules)", D,
                   dtype::F32, dtype::Bf16) {
  ModelWeights w = random_weights(gqa_config(), {.seed = 21, .scale = 2.0f});
  round_to<D>(w);
  const double tol = std::is_same_v<D, dtype::F32> ? 1e-4 : 3e-2;
  const ObserverOptions all{.head_keys = 2, .tail_keys = 3};
  check_observer<D>(w, DenseSchedule{}, all, tol);
  check_observer<D>(w, EarnSchedule{2}, all, tol);
  check_observer<D>(w, EarnSchedule{1},
                    {.reduce = {.kinds = attention::kind_bit(RowKind::kSuffixRegister)}, .head_keys = 1, .tail_keys = 1,
                     .density = attention::DensityRule::kAboveUniform},
                    tol);
  check_observer<D>(w, press_schedule(kv::press::SnapKV{.budget = {.ratio = 0.25, .rows = 2}}),
                    {.reduce = {.readout = true, .layers = {0, 3}}, .head_keys = 4, .tail_keys = 4}, tol);
  // Per-head visibility: the streaming heads' rows see 2 sinks and 6 recent keys, the others everything.
  using Duo = Layer<attention::HeadWise, kv::Contiguous>;
  check_observer<D>(w, Uniform<Duo>{Duo{{.streaming = 0b1010, .sinks = 2, .window = 6}}}, all, tol);
}

TEST_CASE("CUDA observer refuses to record whole probability rows") {
  const ModelWeights w = random_weights(gqa_config(), {.seed = 3});
  Engine<EarnSchedule, Cuda> gpu(w, EarnSchedule{2});
  auto gs = gpu.make_state({.max_users = 1, .max_prompt = 40, .max_new_tokens = 4});
  Observer o({.record = {.readout = true}});
  gs.observe(&o);
  const auto prompt = random_tokens(20, w.config.vocab_size, 4);
  CHECK_THROWS_AS(gpu.prefill(gs, 0, prompt), ConfigError);
  CHECK(o.samples() == 0);
}
