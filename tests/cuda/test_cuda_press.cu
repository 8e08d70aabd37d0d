// KV presses on the GPU (backend/cuda/press.cuh): the selection kernel against kv::select_rows (the pipeline's
// host definition) on scores with ties, and the CUDA engine under every press against the CPU engine (itself tested
// against the naive reference in tests/test_press.cpp): batched prefill of users with different prompt lengths,
// kept rows and KV bytes, beams, reorder and decode. fp32 (1e-4) for every press; bf16 / fp16 (2e-2, on weights
// rounded alike) for the position-only StreamingLLM, whose selection cannot flip on rounding; Gist (its register-only
// cache) in fp32 and bf16; the visibility policies with run-time values and per-head rules (attention/windowed.hpp).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <vector>

#include "earn/cuda.cuh"
#include "earn/backend/cuda/press.cuh"
#include "../reference_model.hpp"  // random_tokens
#include "compare.cuh"

using namespace earn;
using earn::test::check_close;
using earn::test::gqa_config;
using earn::test::random_tokens;
using earn::test::round_to;

TYPE_TO_STRING(earn::dtype::F32);
TYPE_TO_STRING(earn::dtype::Bf16);
TYPE_TO_STRING(earn::dtype::F16);

namespace {

// Prefill two users (different prompt lengths) in one batch, then 2 beams each through 3 decode steps with a
// reorder, on the CPU and the GPU engine of the same schedule.
template <class D, class S>
void check_engines(const ModelWeights& w, const S& schedule) {
  Engine<S> cpu(w, schedule);
  Engine<S, CudaT<D>> gpu(w, schedule);
  const StateOptions o{.max_users = 2, .max_rows = 4, .max_prompt = 80, .max_new_tokens = 4};
  auto cs = cpu.make_state(o);
  auto gs = gpu.make_state(o);
  gs.enable_poison();
  CHECK(cs.kv_capacity_bytes() / sizeof(float) == gs.kv_capacity_bytes() / sizeof(earn::cuda::storage_t<D>));
  const int users[2] = {0, 1};
  const std::vector<int> prompts[2] = {random_tokens(61, w.config.vocab_size, 4),
                                       random_tokens(37, w.config.vocab_size, 5)};
  check_close<D>(gpu.prefill_batch(gs, users, prompts), cpu.prefill_batch(cs, users, prompts), "prefill");
  for (int l = 0; l < w.config.n_layers; ++l)
    for (int u = 0; u < 2; ++u) CHECK(gs.layer_cache(l).prefix_len(u) == cs.layer_cache(l).prefix_len(u));
  CHECK(gs.kv_bytes() / sizeof(earn::cuda::storage_t<D>) == cs.kv_bytes() / sizeof(float));
  const int rows[4] = {0, 0, 1, 1};
  cs.set_rows(rows);
  gs.set_rows(rows);
  const int parent[4] = {1, 1, 3, 2};
  for (int step = 0; step < 3; ++step) {
    const std::vector<int> tok = random_tokens(4, w.config.vocab_size, 20 + step);
    check_close<D>(gpu.decode(gs, tok), cpu.decode(cs, tok), "decode");
    cs.reorder(parent);
    gs.reorder(parent);
  }
  CHECK(gs.kv_bytes() / sizeof(earn::cuda::storage_t<D>) == cs.kv_bytes() / sizeof(float));
}

}  // namespace

TEST_CASE("press_select on the GPU keeps what kv::select_rows keeps, ties to the lower index") {
  std::mt19937 rng(7);
  const int nkv = 2;
  std::vector<cuda::PressSeg> segs;
  std::vector<float> scores;
  std::vector<kv::PressRule> rules;
  std::vector<int> ns;
  int idx_total = 0;
  // Integer scores in a small range (many ties), several rules and lengths.
  for (int n : {1, 5, 31, 64, 200, 777})
    for (int pool : {1, 3, 7})
      for (int keep : {0, 1, 4, n / 3, n - 1, n}) {
        if (keep < 0 || keep > n) continue;
        kv::PressRule r{keep, std::min(2, keep), std::min(3, std::max(0, keep - 2)), kv::Score::kWindow, 4, pool};
        cuda::PressSeg ps;
        ps.n = n;
        ps.keep = std::min(keep, n);
        ps.sinks = r.sinks;
        ps.recent = r.recent;
        ps.pool = pool;
        ps.score_off = static_cast<int>(scores.size());
        ps.idx_off = idx_total;
        idx_total += nkv * ps.keep;
        for (int i = 0; i < nkv * n; ++i) scores.push_back(static_cast<float>(rng() % 9));
        segs.push_back(ps);
        rules.push_back(r);
        ns.push_back(n);
      }
  int max_n = *std::max_element(ns.begin(), ns.end());
  cuda::DeviceBuffer<cuda::PressSeg> dsegs(segs.size());
  cuda::DeviceBuffer<float> dscores(scores.size());
  cuda::DeviceBuffer<int> didx(std::max(idx_total, 1));
  EARN_CUDA_CHECK(cudaMemcpy(dsegs.data(), segs.data(), segs.size() * sizeof(cuda::PressSeg), cudaMemcpyHostToDevice));
  EARN_CUDA_CHECK(cudaMemcpy(dscores.data(), scores.data(), scores.size() * sizeof(float), cudaMemcpyHostToDevice));
  cuda::kernel::press_select<<<dim3(static_cast<unsigned>(segs.size()), nkv), 128, max_n * (sizeof(float) + 1)>>>(
      dsegs.data(), dscores.data(), didx.data());
  EARN_CUDA_CHECK(cudaGetLastError());
  std::vector<int> idx(std::max(idx_total, 1));
  EARN_CUDA_CHECK(cudaMemcpy(idx.data(), didx.data(), idx.size() * sizeof(int), cudaMemcpyDeviceToHost));
  for (std::size_t s = 0; s < segs.size(); ++s)
    for (int g = 0; g < nkv; ++g) {
      CAPTURE(ns[s]);
      CAPTURE(rules[s].keep);
      CAPTURE(rules[s].pool);
      std::vector<double> raw(ns[s]);
      for (int j = 0; j < ns[s]; ++j) raw[j] = scores[segs[s].score_off + g * ns[s] + j];
      const std::vector<int> want = kv::select_rows(rules[s], ns[s], raw);
      const std::vector<int> got(idx.begin() + segs[s].idx_off + g * segs[s].keep,
                                 idx.begin() + segs[s].idx_off + (g + 1) * segs[s].keep);
      CHECK(got == want);
    }
}

TEST_CASE("CUDA engine under every press equals the CPU engine (fp32)") {
  const ModelConfig c = gqa_config();
  const ModelWeights w = random_weights(c, {.seed = 11, .scale = 2.0f, .prefix_registers = 0, .suffix_registers = 0});
  check_engines<dtype::F32>(w, press_schedule(kv::press::StreamingLLM{.budget = {.rows = 12}, .sinks = 3}));
  check_engines<dtype::F32>(w, press_schedule(kv::press::SnapKV{.budget = {.ratio = 0.25, .rows = 2}, .window = 6}));
  check_engines<dtype::F32>(w, press_schedule(kv::press::H2O{.budget = {.ratio = 0.3}}));
  check_engines<dtype::F32>(w, press_schedule(kv::press::PyramidKV{.budget = {.ratio = 0.25, .rows = 4}, .beta = 5}));
  // With registers, and a budget past the prompt (keeps everything).
  const ModelWeights wr = random_weights(c, {.seed = 12, .scale = 2.0f});
  check_engines<dtype::F32>(wr, press_schedule(kv::press::SnapKV{.budget = {.ratio = 0.2, .rows = 3}, .window = 4}));
  check_engines<dtype::F32>(wr, press_schedule(kv::press::H2O{.budget = {.rows = 500}}));
}

TEST_CASE("CUDA engine under H2O evicting during decode equals the CPU engine: logits, and the rows freed each step") {
  const ModelConfig c = gqa_config();
  const ModelWeights w = random_weights(c, {.seed = 14, .scale = 2.0f, .prefix_registers = 0, .suffix_registers = 0});
  // Both users drop a row at every step; then user 0 (61 rows) only from the second step, user 1 (37) never.
  check_engines<dtype::F32>(w, press_schedule(kv::press::H2O{.budget = {.ratio = 0.3}, .evict_in_decode = true}));
  check_engines<dtype::F32>(w, press_schedule(kv::press::H2O{.budget = {.rows = 62}, .recent_share = 0.0,
                                                             .evict_in_decode = true}));
  const ModelWeights wr = random_weights(c, {.seed = 15, .scale = 2.0f});
  check_engines<dtype::F32>(wr, press_schedule(kv::press::H2O{.budget = {.ratio = 0.2, .rows = 3},
                                                              .evict_in_decode = true}));
}

TEST_CASE_TEMPLATE("CUDA engine under StreamingLLM equals the CPU engine on rounded weights (flash paths)", D,
                   dtype::Bf16, dtype::F16) {
  ModelWeights w = random_weights(gqa_config(), {.seed = 13});  // scale 1: 16-bit storage, as the engine tests
  round_to<D>(w);
  check_engines<D>(w, press_schedule(kv::press::StreamingLLM{.budget = {.ratio = 0.2, .rows = 4}, .sinks = 2}));
}

TEST_CASE("CUDA presses repeat bit for bit: scores summed in a fixed order, no atomics") {
  const ModelWeights w = random_weights(gqa_config(), {.seed = 14, .scale = 2.0f});
  const auto schedule = press_schedule(kv::press::H2O{.budget = {.ratio = 0.25, .rows = 2}});
  Engine<std::decay_t<decltype(schedule)>, CudaBf16> gpu(w, schedule);
  const int users[2] = {0, 1};
  const std::vector<int> prompts[2] = {random_tokens(77, w.config.vocab_size, 8), random_tokens(45, w.config.vocab_size, 9)};
  auto run = [&] {
    auto st = gpu.make_state({.max_users = 2, .max_rows = 2, .max_prompt = 80, .max_new_tokens = 4});
    Matrix first = gpu.prefill_batch(st, users, prompts);
    const int rows[2] = {0, 1}, tok[2] = {5, 6};
    st.set_rows(rows);
    Matrix next = gpu.decode(st, tok);
    return std::pair<Matrix, Matrix>{first, next};
  };
  const auto a = run();
  for (int rep = 0; rep < 3; ++rep) {
    const auto b = run();
    CHECK(b.first == a.first);
    CHECK(b.second == a.second);
  }
}

TEST_CASE("CUDA engine under Gist equals the CPU engine: the cache holds the registers only (fp32; bf16 rounded)") {
  const ModelWeights w = random_weights(gqa_config(), {.seed = 14, .scale = 2.0f, .prefix_registers = 2,
                                                       .suffix_registers = 1});
  check_engines<dtype::F32>(w, GistSchedule{});
  ModelWeights wb = random_weights(gqa_config(), {.seed = 15, .prefix_registers = 1, .suffix_registers = 2});
  round_to<dtype::Bf16>(wb);
  check_engines<dtype::Bf16>(wb, GistSchedule{});
}

TEST_CASE("CUDA engine under policies with run-time values and per-head rules equals the CPU engine (fp32; bf16 flash)") {
  // SinkWindow, HeadWise and a per-layer HeadWise list (attention/windowed.hpp) ask the where hook in every kernel:
  // the cuBLAS path's softmax (fp32), flash prefill and flash-decoding's partial and combine passes (bf16), with
  // windows narrower than a 64-key tile, so tiles are partly visible and differ between heads.
  using Stream = Layer<attention::SinkWindow, kv::Contiguous>;
  using Duo = Layer<attention::HeadWise, kv::Contiguous>;
  const ModelWeights w = random_weights(gqa_config(), {.seed = 16, .scale = 2.0f});
  check_engines<dtype::F32>(w, Uniform<Stream>{Stream{{.sinks = 2, .window = 9}}});
  check_engines<dtype::F32>(w, Uniform<Duo>{Duo{{.streaming = 0b0101, .sinks = 1, .window = 7}}});
  std::vector<Duo> layers;
  for (int l = 0; l < w.config.n_layers; ++l)
    layers.push_back(Duo{{.streaming = std::uint64_t(l + 1), .sinks = l % 2, .window = 3 + 5 * l}});
  check_engines<dtype::F32>(w, PerLayer<Duo>{layers});
  ModelWeights wb = random_weights(gqa_config(), {.seed = 17, .prefix_registers = 1, .suffix_registers = 1});
  round_to<dtype::Bf16>(wb);
  check_engines<dtype::Bf16>(wb, Uniform<Duo>{Duo{{.streaming = 0b0110, .sinks = 2, .window = 11}}});
  check_engines<dtype::Bf16>(wb, PerLayer<Duo>{layers});
  using S = Split<Dynamic, Duo, Layer<attention::RegisterOnly, kv::Register>>;
  check_engines<dtype::Bf16>(wb, S{2, Duo{{.streaming = 0b1001, .sinks = 1, .window = 5}}});
}
