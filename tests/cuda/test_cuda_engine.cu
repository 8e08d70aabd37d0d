// The CUDA engine against the CPU engine on fresh random models and prompts: prefill (single, batched, all rows),
// beams sharing a prompt, reorder and decode, for dense and EARN schedules (several k, 0-3 registers per side),
// both RoPE styles and Qwen2 biases, in fp32 (1e-4) and bf16 / fp16 (2e-2, against the CPU engine run on the
// same rounded weights). Every GPU scratch, output and KV buffer starts as NaN, so an element no kernel wrote
// fails the comparison; NaN never passes.
#include <doctest/doctest.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "earn/backend/cuda/beam_search.cuh"  // earn::cuda::DeviceBeamSearch (CUB: write earn::cuda)
#include "earn/cuda.cuh"
#include "earn/rec/beam_search.hpp"
#include "earn/rec/prompt.hpp"
#include "../reference_model.hpp"  // random_tokens
#include "compare.cuh"

using namespace earn;
using earn::test::check_close;
using earn::test::random_tokens;
using earn::test::round_to;

// Template test cases named by their dtype, short and compiler-independent (tools/gpu.sh racecheck: -tc='*Bf16*').
TYPE_TO_STRING(earn::dtype::F32);
TYPE_TO_STRING(earn::dtype::Bf16);
TYPE_TO_STRING(earn::dtype::F16);

namespace {

ModelConfig small_config(RopeStyle style, bool bias, int seed) {
  ModelConfig c;
  c.dim = 64;
  c.hidden_dim = 88 + 8 * (seed % 3);
  c.n_layers = 4;
  c.n_heads = 4;
  c.n_kv_heads = seed % 2 ? 2 : 4;  // GQA and plain multi-head
  c.vocab_size = 101;
  c.max_seq_len = 128;
  c.rope_theta = 5000.0f;
  c.rope_style = style;
  c.qkv_bias = bias;
  c.tied_embeddings = seed % 2 == 0;
  return c;
}

// A CPU engine and a CUDA engine with the same weights and schedule, each with a state of options `o` (the
// GPU's poisoned).
template <class D>
struct EnginePair {
  Engine<EarnSchedule> cpu;
  Engine<EarnSchedule, CudaT<D>> gpu;
  decltype(std::declval<const Engine<EarnSchedule>&>().make_state(StateOptions{})) cs;
  typename Engine<EarnSchedule, CudaT<D>>::State gs;
  EnginePair(const ModelWeights& w, int k, const StateOptions& o)
      : cpu(w, EarnSchedule{k}), gpu(w, EarnSchedule{k}), cs(cpu.make_state(o)), gs(gpu.make_state(o)) {
    gs.enable_poison();
  }
};

// Prints the worst error of a test case when it ends (the numbers behind the closing note).
struct Worst {
  const char* name;
  double value = 0;
  void operator()(double v) { value = std::max(value, v); }
  ~Worst() { MESSAGE(std::string(name) << ": worst relative error over the case " << value); }
};

}  // namespace

TEST_CASE_TEMPLATE("CUDA engine equals the CPU engine: prefill, beams, reorder, decode", D, dtype::F32, dtype::Bf16,
                   dtype::F16) {
  using T = earn::cuda::storage_t<D>;
  Worst worst{"prefill/decode/reorder"};
  struct Case {
    int rp, rs;
    RopeStyle style;
    bool bias;
  };
  const Case cases[] = {{1, 1, RopeStyle::kRotateHalf, false},
                        {0, 2, RopeStyle::kInterleaved, true},
                        {3, 0, RopeStyle::kRotateHalf, true},
                        {0, 0, RopeStyle::kInterleaved, false}};
  int seed = 0;
  for (const Case& cs : cases) {
    ++seed;
    const ModelConfig c = small_config(cs.style, cs.bias, seed);
    // fp32 runs the sharpened scale-2 model (as the CPU tests). bf16 / fp16 run the default scale, as trained
    // weights: at scale 2 the layers amplify storage rounding chaotically (0.2 max element error seen in bf16),
    // which measures the toy model's conditioning rather than the engine.
    const float scale = std::is_same_v<D, dtype::F32> ? 2.0f : 1.0f;
    ModelWeights w = random_weights(c, {.seed = std::uint64_t(1000 + seed), .scale = scale,
                                        .prefix_registers = cs.rp, .suffix_registers = cs.rs});
    round_to<D>(w);
    for (int k : {0, 1, 2, c.n_layers}) {
      if (k < c.n_layers && cs.rp + cs.rs == 0) continue;  // refused (tested on the CPU side)
      CAPTURE(seed);
      CAPTURE(k);
      Engine<EarnSchedule> cpu(w, EarnSchedule{k});
      Engine<EarnSchedule, CudaT<D>> gpu(w, EarnSchedule{k});
      const StateOptions o{.max_users = 2, .max_rows = 5, .max_prompt = 40, .max_new_tokens = 3};
      auto cs_ = cpu.make_state(o);
      auto gs = gpu.make_state(o);
      gs.enable_poison();
      const auto p0 = random_tokens(37, c.vocab_size, 77 * seed + k), p1 = random_tokens(5, c.vocab_size, 13 * seed + k);
      {
        const Vector a = gpu.prefill(gs, 0, p0), b = cpu.prefill(cs_, 0, p0);
        worst(check_close<D>(Matrix(a.transpose()), Matrix(b.transpose()), "prefill user 0"));
        const Vector a1 = gpu.prefill(gs, 1, p1), b1 = cpu.prefill(cs_, 1, p1);
        worst(check_close<D>(Matrix(a1.transpose()), Matrix(b1.transpose()), "prefill user 1"));
      }
      // Five beams over two users, rows deliberately not grouped by user.
      const int row_user[5] = {0, 1, 0, 0, 1};
      gs.set_rows(row_user);
      cs_.set_rows(row_user);
      const std::vector<std::vector<int>> steps = {{3, 9, 27, 81, 42}, {5, 6, 7, 8, 9}, {1, 100, 50, 25, 12}};
      for (std::size_t g = 0; g < steps.size(); ++g) {
        CAPTURE(g);
        worst(check_close<D>(gpu.decode(gs, steps[g]), cpu.decode(cs_, steps[g]), "decode"));
        if (g == 0) {
          const int parent[5] = {4, 2, 2, 0, 1};  // beams die and fork; users follow their parents
          gs.reorder(parent);
          cs_.reorder(parent);
          CHECK(std::vector<int>(gs.row_user().begin(), gs.row_user().end()) ==
                std::vector<int>(cs_.row_user().begin(), cs_.row_user().end()));
        }
      }
      // The same rows held, in the GPU's element size.
      CHECK(gs.kv_bytes() == cs_.kv_bytes() / Index{sizeof(float)} * Index{sizeof(T)});
      CHECK(gs.kv_capacity_bytes() == cs_.kv_capacity_bytes() / Index{sizeof(float)} * Index{sizeof(T)});
      for (int l = 0; l < c.n_layers; ++l) CHECK(gs.layer_cache(l).prefix_capacity() == cs_.layer_cache(l).prefix_capacity());
    }
  }
}

TEST_CASE_TEMPLATE("CUDA batched prefill and all-row logits equal the CPU engine's per-user prefill", D, dtype::F32,
                   dtype::Bf16) {
  Worst worst{"batched prefill"};
  const ModelConfig c = small_config(RopeStyle::kRotateHalf, false, 3);
  ModelWeights w = random_weights(c, {.seed = 99, .scale = std::is_same_v<D, dtype::F32> ? 2.0f : 1.0f, .prefix_registers = 1, .suffix_registers = 2});
  round_to<D>(w);
  for (int k : {0, 2, c.n_layers}) {
    CAPTURE(k);
    Engine<EarnSchedule> cpu(w, EarnSchedule{k});
    Engine<EarnSchedule, CudaT<D>> gpu(w, EarnSchedule{k});
    const StateOptions o{.max_users = 4, .max_rows = 8, .max_prompt = 33, .max_new_tokens = 2};
    auto cs = cpu.make_state(o);
    auto gs = gpu.make_state(o);
    gs.enable_poison();
    // Users in any order, prompts of different lengths (1 token to the maximum).
    const std::vector<int> users = {2, 0, 3};
    const std::vector<std::vector<int>> prompts = {random_tokens(33, c.vocab_size, 5 + k),
                                                   random_tokens(1, c.vocab_size, 6 + k),
                                                   random_tokens(17, c.vocab_size, 7 + k)};
    const Matrix got = gpu.prefill_batch(gs, users, prompts);
    REQUIRE(got.rows() == 3);
    for (int i = 0; i < 3; ++i) {
      const Vector want = cpu.prefill(cs, users[i], prompts[i]);
      worst(check_close<D>(Matrix(got.row(i)), Matrix(want.transpose()), "batched prefill"));
    }
    // Beams of the batch decode against the CPU state prefilled user by user.
    const int row_user[6] = {3, 3, 0, 2, 2, 0};
    gs.set_rows(row_user);
    cs.set_rows(row_user);
    const std::vector<int> toks = {1, 2, 3, 4, 5, 6};
    worst(check_close<D>(gpu.decode(gs, toks), cpu.decode(cs, toks), "decode after batched prefill"));
    worst(check_close<D>(gpu.prefill_all_logits(gs, 1, prompts[2]), cpu.prefill_all_logits(cs, 1, prompts[2]),
                "all-row logits"));
  }
}

TEST_CASE_TEMPLATE("bf16 / fp16: the flash kernels + stream_gemm or bulk_gemm and the cuBLAS paths all equal the CPU engine", D,
                   dtype::Bf16, dtype::F16) {
  // Prompts past one 64-key tile (batched, different lengths), then decode steps over them: the 16-bit engine's
  // own kernels (flash attention; stream_gemm for the <= 8-row GEMMs, or bulk_gemm for the <= 32-row ones: decode,
  // late layers, logits) and its cuBLAS paths against the CPU engine on the same rounded weights.
  Worst worst{"own kernels vs cuBLAS"};
  const ModelConfig c = small_config(RopeStyle::kRotateHalf, false, 1);  // GQA 4/2
  ModelWeights w = random_weights(c, {.seed = 123, .prefix_registers = 1, .suffix_registers = 1});
  round_to<D>(w);
  for (int k : {1, c.n_layers}) {
    for (int mode : {0, 1, 2}) {  // flash + stream_gemm, flash + bulk_gemm, cuBLAS only
      const bool flash = mode < 2, bulk = mode == 1;
      CAPTURE(k);
      CAPTURE(mode);
      EnginePair<D> e(w, k, {.max_users = 3, .max_rows = 6, .max_prompt = 120, .max_new_tokens = 3});
      auto& [cpu, gpu, cs, gs] = e;
      gs.use_flash_attention(flash);
      gs.use_stream_gemm(mode == 0);
      gs.use_bulk_gemm(bulk);
      CHECK(gs.flash_attention() == flash);
      CHECK(gs.stream_gemm() == (mode == 0));
      CHECK(gs.bulk_gemm() == bulk);
      const std::vector<int> users = {1, 0, 2};
      const std::vector<std::vector<int>> prompts = {random_tokens(120, c.vocab_size, 31 + k),
                                                     random_tokens(63, c.vocab_size, 32 + k),
                                                     random_tokens(64, c.vocab_size, 33 + k)};
      const Matrix got = gpu.prefill_batch(gs, users, prompts);
      for (int i = 0; i < 3; ++i) {
        const Vector want = cpu.prefill(cs, users[i], prompts[i]);
        worst(check_close<D>(Matrix(got.row(i)), Matrix(want.transpose()), "prefill"));
      }
      const int row_user[6] = {0, 1, 1, 2, 0, 1};
      gs.set_rows(row_user);
      cs.set_rows(row_user);
      const std::vector<std::vector<int>> steps = {{3, 9, 27, 81, 42, 7}, {5, 6, 7, 8, 9, 10}};
      for (const auto& toks : steps) worst(check_close<D>(gpu.decode(gs, toks), cpu.decode(cs, toks), "decode"));
    }
  }
}

TEST_CASE("bf16 with more new tokens than flash-decoding takes: flash prefill, cuBLAS decode, equal to the CPU") {
  // max_new_tokens = 10 > 8: prefill still runs the flash kernels; decode takes the cuBLAS path over the prompt KV
  // the flash prefill wrote, through 9 steps (up to 9 generated keys per beam).
  using D = dtype::Bf16;
  Worst worst{"flash prefill + cuBLAS decode, 10 new tokens"};
  const ModelConfig c = small_config(RopeStyle::kRotateHalf, false, 3);  // GQA 4/2
  ModelWeights w = random_weights(c, {.seed = 321, .prefix_registers = 1, .suffix_registers = 1});
  round_to<D>(w);
  for (int k : {1, c.n_layers}) {
    CAPTURE(k);
    EnginePair<D> e(w, k, {.max_users = 2, .max_rows = 4, .max_prompt = 80, .max_new_tokens = 10});
    auto& [cpu, gpu, cs, gs] = e;
    const std::vector<int> users = {0, 1};
    const std::vector<std::vector<int>> prompts = {random_tokens(80, c.vocab_size, 41 + k),
                                                   random_tokens(65, c.vocab_size, 42 + k)};
    const Matrix got = gpu.prefill_batch(gs, users, prompts);
    for (int i = 0; i < 2; ++i) {
      const Vector want = cpu.prefill(cs, users[i], prompts[i]);
      worst(check_close<D>(Matrix(got.row(i)), Matrix(want.transpose()), "prefill"));
    }
    const int row_user[4] = {1, 0, 1, 0};
    gs.set_rows(row_user);
    cs.set_rows(row_user);
    for (int step = 0; step < 9; ++step) {
      CAPTURE(step);
      std::vector<int> toks(4);
      for (int r = 0; r < 4; ++r) toks[r] = (7 * step + 13 * r + 5) % c.vocab_size;
      worst(check_close<D>(gpu.decode(gs, toks), cpu.decode(cs, toks), "decode"));
    }
  }
}

TEST_CASE("CUDA engine: dense equals the CPU; EarnScheduleK<2> equals EarnSchedule{2} bit for bit") {
  const ModelConfig c = small_config(RopeStyle::kRotateHalf, false, 2);
  const ModelWeights w = random_weights(c, {.seed = 4, .scale = 2.0f});
  Engine<DenseSchedule, Cuda> dense(w);
  Engine<EarnScheduleK<2>, Cuda> fixed(w);
  Engine<EarnSchedule, Cuda> dynamic(w, EarnSchedule{2});
  Engine<EarnSchedule> cpu_dense(w, EarnSchedule{c.n_layers});
  const auto prompt = random_tokens(20, c.vocab_size, 8);
  auto s1 = dense.make_state({.max_prompt = 20, .max_new_tokens = 1});
  auto s2 = fixed.make_state({.max_prompt = 20, .max_new_tokens = 1});
  auto s3 = dynamic.make_state({.max_prompt = 20, .max_new_tokens = 1});
  auto s4 = cpu_dense.make_state({.max_prompt = 20, .max_new_tokens = 1});
  check_close<dtype::F32>(Matrix(dense.prefill(s1, 0, prompt).transpose()),
                          Matrix(cpu_dense.prefill(s4, 0, prompt).transpose()), "dense");
  const Vector a = fixed.prefill(s2, 0, prompt), b = dynamic.prefill(s3, 0, prompt);
  CHECK((a - b).cwiseAbs().maxCoeff() == 0.0f);  // same kernels, same order: bit-identical
}

TEST_CASE("CUDA engine: programmatic dependent launches give bf16 logits bit-identical to ordinary launches") {
  // With cuBLAS GEMMs (earn's kernels after them wait for them) and with bulk_gemm (which also starts early
  // itself, asking for its weights before the kernel before it ends).
  const ModelConfig c = small_config(RopeStyle::kRotateHalf, false, 1);
  ModelWeights w = random_weights(c, {.seed = 77, .prefix_registers = 1, .suffix_registers = 1});
  round_to<dtype::Bf16>(w);
  Engine<EarnSchedule> cpu(w, EarnSchedule{1});
  const StateOptions o{.max_users = 2, .max_rows = 6, .max_prompt = 40, .max_new_tokens = 3};
  for (const bool bulk : {false, true}) {
    CAPTURE(bulk);
    Engine<EarnSchedule, CudaBf16> gpu(w, EarnSchedule{1});
    auto on = gpu.make_state(o), off = gpu.make_state(o);
    auto cs = cpu.make_state(o);
    off.use_pdl(false);  // on is the default
    on.enable_poison();
    on.use_bulk_gemm(bulk);
    off.use_bulk_gemm(bulk);
    CHECK(on.pdl());
    CHECK_FALSE(off.pdl());
    const std::vector<int> users = {0, 1};
    const std::vector<std::vector<int>> prompts = {random_tokens(40, c.vocab_size, 5), random_tokens(17, c.vocab_size, 6)};
    const Matrix a = gpu.prefill_batch(on, users, prompts), b = gpu.prefill_batch(off, users, prompts);
    CHECK((a - b).cwiseAbs().maxCoeff() == 0.0f);
    for (int i = 0; i < 2; ++i)
      check_close<dtype::Bf16>(Matrix(a.row(i)), Matrix(cpu.prefill(cs, users[i], prompts[i]).transpose()), "prefill");
    const int row_user[6] = {0, 0, 1, 1, 1, 0};
    on.set_rows(row_user);
    off.set_rows(row_user);
    cs.set_rows(row_user);
    for (const std::vector<int>& toks : {std::vector<int>{1, 2, 3, 4, 5, 6}, std::vector<int>{7, 8, 9, 10, 11, 12}}) {
      const Matrix x = gpu.decode(on, toks), y = gpu.decode(off, toks);
      CHECK((x - y).cwiseAbs().maxCoeff() == 0.0f);  // decode steps replay graphs captured with the PDL edges
      check_close<dtype::Bf16>(x, cpu.decode(cs, toks), "decode");
    }
  }
}

TEST_CASE_TEMPLATE("CUDA engine: GEMMs given cuBLASLt algorithms by tune_gemms equal the CPU engine", D, dtype::F32,
                   dtype::Bf16, dtype::F16) {
  // Every product the forward pass runs (decode 6 rows, late layers 2 users x 2 registers, 2 logits rows) forced
  // onto a cuBLASLt algorithm (prefer_lt), then prefill and decode steps against the CPU engine.
  const ModelConfig c = small_config(RopeStyle::kRotateHalf, false, 1);
  ModelWeights w = random_weights(c, {.seed = 91, .prefix_registers = 1, .suffix_registers = 1});
  round_to<D>(w);
  EnginePair<D> e(w, 1, {.max_users = 2, .max_rows = 6, .max_prompt = 40, .max_new_tokens = 3});
  auto& [cpu, gpu, cs, gs] = e;
  CHECK_THROWS_AS(gpu.tune_gemms(gs, std::vector<int>{0}), ConfigError);
  CHECK_THROWS_AS(gpu.tune_gemms(gs, std::vector<int>{6}, {.candidates = 0}), ConfigError);
  const auto report = gpu.tune_gemms(gs, std::vector<int>{6, 4, 2}, {.candidates = 4, .copies = 2, .prefer_lt = true});
  REQUIRE(report.size() == 15);
  for (const auto& t : report) {
    CAPTURE(t.gemm);
    CAPTURE(t.rows);
    CHECK(t.candidates > 0);
    CHECK(t.lt);
    CHECK(t.default_us > 0.0f);
    CHECK(t.chosen_us > 0.0f);
  }
  CHECK(gs.tuned_gemms() == 15);
  // Prefill's dense rows (42 + 25 in layer 0) without the classifier, which never runs at that row count.
  const auto pre = gpu.tune_gemms(gs, std::vector<int>{67}, {.candidates = 4, .copies = 2, .prefer_lt = true,
                                                             .classifier = false});
  REQUIRE(pre.size() == 4);
  for (const auto& t : pre) CHECK(std::string(t.gemm) != "classifier");
  CHECK(gs.tuned_gemms() == 19);
  Worst worst{"tuned cuBLASLt GEMMs"};
  const std::vector<int> users = {0, 1};
  const std::vector<std::vector<int>> prompts = {random_tokens(40, c.vocab_size, 15), random_tokens(23, c.vocab_size, 16)};
  const Matrix got = gpu.prefill_batch(gs, users, prompts);
  for (int i = 0; i < 2; ++i)
    worst(check_close<D>(Matrix(got.row(i)), Matrix(cpu.prefill(cs, users[i], prompts[i]).transpose()), "prefill"));
  const int row_user[6] = {0, 1, 1, 0, 0, 1};
  gs.set_rows(row_user);
  cs.set_rows(row_user);
  for (const std::vector<int>& toks : {std::vector<int>{1, 2, 3, 4, 5, 6}, std::vector<int>{7, 8, 9, 10, 11, 12}})
    worst(check_close<D>(gpu.decode(gs, toks), cpu.decode(cs, toks), "decode"));
  gs.clear_tuned_gemms();
  CHECK(gs.tuned_gemms() == 0);
}

TEST_CASE("reorder_generated moves every layer's generated K and V rows as a naive permutation, in any grouping") {
  // 3 layers (6 buffers) of 5 rows x 3 steps (2 generated so far), kv_dim 12 (bf16: whole 16-byte pieces, the
  // uint4 path) and 6 (the element path); scratch budgets that give groups of 1, 4 and all 6 buffers.
  using T = __nv_bfloat16;
  const int rows = 5, max_new = 3, gen_len = 2;
  const std::vector<int> parent = {3, 3, 0, 4, 1};
  for (const int kvd : {12, 6}) {
    for (const std::size_t groups_of : {1, 4, 6}) {
      CAPTURE(kvd);
      CAPTURE(groups_of);
      std::vector<kv::Store<CudaBf16>> layers;
      for (int l = 0; l < 3; ++l) layers.emplace_back(1, 1, rows, max_new, kvd);
      const std::size_t n = std::size_t(rows) * max_new * kvd;
      // buffer b = 2 l + (0 K, 1 V): element e holds the bit pattern b * n + e (every element distinct)
      std::vector<std::vector<std::uint16_t>> before;
      for (int b = 0; b < 6; ++b) {
        std::vector<std::uint16_t> v(n);
        for (std::size_t e = 0; e < n; ++e) v[e] = static_cast<std::uint16_t>(b * n + e);
        T* dst = b % 2 == 0 ? layers[b / 2].gen_k() : layers[b / 2].gen_v();
        EARN_CUDA_CHECK(cudaMemcpy(dst, v.data(), n * sizeof(T), cudaMemcpyHostToDevice));
        before.push_back(std::move(v));
      }
      earn::cuda::DeviceBuffer<int> dparent(parent.size());
      EARN_CUDA_CHECK(cudaMemcpy(dparent.data(), parent.data(), parent.size() * sizeof(int), cudaMemcpyHostToDevice));
      earn::cuda::DeviceBuffer<void*> ptrs;
      earn::cuda::DeviceBuffer<T> scratch;
      kv::reorder_generated(layers, dparent.data(), rows, gen_len, ptrs, scratch, nullptr,
                            groups_of * rows * gen_len * kvd * sizeof(T));
      EARN_CUDA_CHECK(cudaDeviceSynchronize());
      int wrong = 0;
      for (int b = 0; b < 6; ++b) {
        std::vector<std::uint16_t> got(n);
        const T* src = b % 2 == 0 ? layers[b / 2].gen_k() : layers[b / 2].gen_v();
        EARN_CUDA_CHECK(cudaMemcpy(got.data(), src, n * sizeof(T), cudaMemcpyDeviceToHost));
        for (int i = 0; i < rows; ++i)
          for (int g = 0; g < max_new; ++g)
            for (int d = 0; d < kvd; ++d) {
              // steps < gen_len come from the parent row; the step not generated yet stays as it was
              const int from = g < gen_len ? parent[i] : i;
              const std::size_t at = (std::size_t(i) * max_new + g) * kvd + d;
              const std::size_t want = (std::size_t(from) * max_new + g) * kvd + d;
              wrong += got[at] != before[b][want];
            }
      }
      CHECK(wrong == 0);
    }
  }
}

TEST_CASE("CUDA engine refuses what the CPU engine refuses") {
  const ModelConfig c = small_config(RopeStyle::kRotateHalf, false, 2);
  const ModelWeights w = random_weights(c);
  Engine<EarnSchedule, Cuda> e(w, EarnSchedule{1});
  auto st = e.make_state({.max_users = 2, .max_rows = 2, .max_prompt = 8, .max_new_tokens = 1});
  CHECK_THROWS_AS(e.prefill(st, 0, std::vector<int>{}), ConfigError);
  CHECK_THROWS_AS(e.prefill(st, 0, std::vector<int>{1, c.vocab_size}), RangeError);
  CHECK_THROWS_AS(e.prefill(st, 0, std::vector<int>(9, 1)), RangeError);
  CHECK_THROWS_AS(e.prefill(st, 2, std::vector<int>{1}), RangeError);
  const int users[2] = {1, 1};
  const std::vector<std::vector<int>> prompts = {{1}, {2}};
  CHECK_THROWS_AS(e.prefill_batch(st, users, prompts), ConfigError);  // a user twice in one batch
  const int rows[1] = {1};
  CHECK_THROWS_AS(st.set_rows(rows), RangeError);  // user 1 not prefilled
  e.prefill(st, 0, std::vector<int>{3, 4});
  const int row0[1] = {0};
  st.set_rows(row0);
  CHECK_THROWS_AS(e.decode(st, std::vector<int>{1, 2}), RangeError);  // two tokens for one row
  e.decode(st, std::vector<int>{1});
  CHECK_THROWS_AS(e.decode(st, std::vector<int>{1}), RangeError);  // past max_new_tokens
  using GpuEngine = Engine<EarnSchedule, Cuda>;
  CHECK_THROWS_AS(GpuEngine(w, EarnSchedule{c.n_layers + 1}), ConfigError);
  // CUDA failures arrive as earn::CudaError, an earn::Error.
  CHECK_THROWS_AS(EARN_CUDA_CHECK(cudaErrorInvalidValue), CudaError);
}

TEST_CASE("Trie-constrained beam search returns the same items on the GPU (host or device selection) as on the CPU") {
  using namespace earn::rec;
  const ItemVocab vocab(CodeTemplate::kBaseVocab);
  ModelConfig c = small_config(RopeStyle::kRotateHalf, false, 1);
  c.vocab_size = vocab.size();
  c.max_seq_len = 160;
  const ModelWeights w = random_weights(c, {.seed = 21, .scale = 2.0f});
  // 40 items over 3 x 4 x 3 x 4 codes (shared prefixes), taken in a shuffled order.
  std::vector<ItemCodes> all;
  for (int a = 0; a < 3; ++a)
    for (int b = 0; b < 4; ++b)
      for (int d = 0; d < 3; ++d)
        for (int e = 0; e < 4; ++e) all.push_back({a * 90 + 1, b * 60 + 2, d * 31 + 3, e * 50 + 4});
  Rng rng(5);
  for (std::size_t i = all.size() - 1; i > 0; --i) std::swap(all[i], all[rng.next_u64() % (i + 1)]);
  const Catalogue cat(std::vector<ItemCodes>(all.begin(), all.begin() + 40));
  const CodeTrie trie(cat, vocab);
  const auto builder = PromptBuilder::code_tokens(vocab);
  const std::vector<std::vector<int>> prompts = {builder.build(cat, std::vector<int>{3, 1, 7, 20}),
                                                 builder.build(cat, std::vector<int>{0, 39}),
                                                 builder.build(cat, std::vector<int>{11, 12, 13, 14, 15, 16})};
  int max_prompt = 0;
  for (const auto& p : prompts) max_prompt = std::max(max_prompt, int(p.size()));
  for (int k : {1, c.n_layers}) {
    CAPTURE(k);
    Engine<EarnSchedule> cpu(w, EarnSchedule{k});
    Engine<EarnSchedule, Cuda> gpu(w, EarnSchedule{k});
    BeamSearch on_cpu(cpu, trie, {.beam = 8}, 3, max_prompt);
    BeamSearch on_gpu(gpu, trie, {.beam = 8}, 3, max_prompt);
    // Selection on the device (trie-masked scores, CUB segmented top-k), run twice on one searcher.
    earn::cuda::DeviceBeamSearch on_dev(gpu, trie, {.beam = 8}, 3, max_prompt);
    const auto a = on_gpu.run(prompts), b = on_cpu.run(prompts);
    on_dev.run(prompts);
    const auto d = on_dev.run(prompts);
    REQUIRE(a.size() == b.size());
    REQUIRE(d.size() == b.size());
    for (std::size_t u = 0; u < a.size(); ++u) {
      REQUIRE(a[u].size() == b[u].size());
      REQUIRE(d[u].size() == b[u].size());
      CHECK(a[u].size() == 8u);
      for (std::size_t j = 0; j < a[u].size(); ++j) {
        CHECK(a[u][j].identifier == b[u][j].identifier);
        CHECK(a[u][j].score == doctest::Approx(b[u][j].score).epsilon(1e-4));
        CHECK(d[u][j].identifier == b[u][j].identifier);
        CHECK(d[u][j].tokens == b[u][j].tokens);
        CHECK(d[u][j].score == doctest::Approx(a[u][j].score).epsilon(1e-6));  // same logits as the host search
      }
    }
    // Batched prefill (fp32: its logits differ from one-user prefills by ~1e-6, far below this model's gaps).
    earn::cuda::DeviceBeamSearch batched(gpu, trie, {.beam = 8}, 3, max_prompt, /*batched_prefill=*/true);
    const auto e = batched.run(prompts);
    for (std::size_t u = 0; u < e.size(); ++u) {
      REQUIRE(e[u].size() == b[u].size());
      for (std::size_t j = 0; j < e[u].size(); ++j) CHECK(e[u][j].identifier == b[u][j].identifier);
    }
    // GEMMs tuned for this search's row counts, every product on a cuBLASLt algorithm (prefer_lt): the same items.
    earn::cuda::DeviceBeamSearch tuned(gpu, trie, {.beam = 8}, 3, max_prompt, /*batched_prefill=*/true);
    CHECK_THROWS_AS(tuned.tune_gemms(4), RangeError);
    CHECK_THROWS_AS(tuned.tune_gemms(0), RangeError);
    const auto report = tuned.tune_gemms(3, {.candidates = 2, .copies = 1, .prefer_lt = true});
    CHECK(report.size() % 5 == 0);
    CHECK(tuned.state().tuned_gemms() > 0);
    const auto tt = tuned.run(prompts);
    for (std::size_t u = 0; u < tt.size(); ++u) {
      REQUIRE(tt[u].size() == b[u].size());
      for (std::size_t j = 0; j < tt[u].size(); ++j) CHECK(tt[u][j].identifier == b[u][j].identifier);
    }
    // top_k < beam and a beam wider than some prefixes' fan-out: the same items as the host search.
    BeamSearch narrow_host(gpu, trie, {.beam = 5, .top_k = 3}, 3, max_prompt);
    earn::cuda::DeviceBeamSearch narrow_dev(gpu, trie, {.beam = 5, .top_k = 3}, 3, max_prompt);
    const auto h3 = narrow_host.run(prompts), d3 = narrow_dev.run(prompts);
    for (std::size_t u = 0; u < h3.size(); ++u) {
      REQUIRE(d3[u].size() == h3[u].size());
      for (std::size_t j = 0; j < h3[u].size(); ++j) CHECK(d3[u][j].identifier == h3[u][j].identifier);
    }
    CHECK(on_gpu.stats().peak_kv_bytes == on_cpu.stats().peak_kv_bytes);  // fp32 on both sides: same bytes
  }
}

TEST_CASE("CUDA decode graphs: replayed steps equal the CPU on new data, and graphs off give the same logits") {
  const ModelConfig c = small_config(RopeStyle::kRotateHalf, true, 3);
  ModelWeights w = random_weights(c, {.seed = 4242, .scale = 2.0f, .prefix_registers = 1, .suffix_registers = 1});
  Engine<EarnSchedule> cpu(w, EarnSchedule{2});
  Engine<EarnSchedule, Cuda> gpu(w, EarnSchedule{2});
  const StateOptions o{.max_users = 2, .max_rows = 6, .max_prompt = 30, .max_new_tokens = 3};
  auto cs = cpu.make_state(o);
  auto gs = gpu.make_state(o);
  auto plain = gpu.make_state(o);
  gs.enable_poison();
  plain.enable_poison();
  plain.use_graphs(false);
  CHECK(gs.graphs());
  const int row_user[6] = {1, 0, 1, 0, 0, 1};
  const int parent[6] = {5, 5, 0, 3, 1, 2};
  // Three rounds of the same shapes on fresh prompts and tokens: round 0 captures one graph per step, later rounds
  // replay them (a prefill's row gathers swap the residual buffers in between; the key must not see that).
  for (int round = 0; round < 3; ++round) {
    CAPTURE(round);
    const auto p0 = random_tokens(23, c.vocab_size, 500 + round), p1 = random_tokens(9, c.vocab_size, 600 + round);
    for (auto* st : {&gs, &plain}) {
      gpu.prefill(*st, 0, p0);
      gpu.prefill(*st, 1, p1);
      st->set_rows(row_user);
    }
    cpu.prefill(cs, 0, p0);
    cpu.prefill(cs, 1, p1);
    cs.set_rows(row_user);
    for (int g = 0; g < 3; ++g) {
      CAPTURE(g);
      const auto toks = random_tokens(6, c.vocab_size, 700 + 10 * round + g);
      const Matrix a = gpu.decode(gs, toks), b = gpu.decode(plain, toks);
      check_close<dtype::F32>(a, cpu.decode(cs, toks), "graph decode vs CPU");
      CHECK((a.array() == b.array()).all());  // same launches, same data: bit for bit
      if (g == 0) {
        gs.reorder(parent);
        plain.reorder(parent);
        cs.reorder(parent);
      }
    }
    CHECK(gs.graph_count() == 3);  // one per step shape, captured in round 0 only
    CHECK(plain.graph_count() == 0);
  }
}
