// Two decoding states of one shared const CUDA engine, driven from two threads at once, get exactly what each gets
// alone. Each state owns its cuBLAS handle (bound to its stream and workspace); the engine once kept one handle and
// rebound it from its const methods, so one thread's GEMMs could run on the other's stream and workspace. fp32
// (cuBLAS GEMMs and the cuBLAS attention path) and bf16 (flash attention), prefill, decode graphs and reorder.
#include <doctest/doctest.h>

#include <thread>
#include <vector>

#include "earn/cuda.cuh"
#include "../reference_model.hpp"  // random_tokens

using namespace earn;

TYPE_TO_STRING(earn::dtype::F32);
TYPE_TO_STRING(earn::dtype::Bf16);

namespace {

// Prefill two users, then beams that decode 5 steps with a reorder between them; every logit, in order.
template <class EngineT>
std::vector<float> session(const EngineT& e, int seed) {
  auto st = e.make_state({.max_users = 2, .max_rows = 6, .max_prompt = 40, .max_new_tokens = 6});
  const int vocab = e.config().vocab_size;
  Rng rng(static_cast<std::uint64_t>(seed));
  const std::vector<int> users = {0, 1};
  const std::vector<std::vector<int>> prompts = {earn::test::random_tokens(31, vocab, 2 * seed),
                                                 earn::test::random_tokens(17, vocab, 2 * seed + 1)};
  std::vector<float> out;
  auto keep = [&](const Matrix& m) { out.insert(out.end(), m.data(), m.data() + m.size()); };
  keep(e.prefill_batch(st, users, prompts));
  const std::vector<int> rows = {0, 0, 0, 1, 1, 1};
  st.set_rows(rows);
  std::vector<int> tokens(rows.size());
  for (int step = 0; step < 5; ++step) {
    for (int& t : tokens) t = int(rng.next_u64() % std::uint64_t(vocab));
    keep(e.decode(st, tokens));
    const std::vector<int> parent = {1, 0, 0, 5, 3, 4};
    st.reorder(parent);
  }
  return out;
}

}  // namespace

TEST_CASE_TEMPLATE("two threads drive two states of one const engine and get what each gets alone", D, dtype::F32,
                   dtype::Bf16) {
  const ModelConfig c{.dim = 64, .hidden_dim = 96, .n_layers = 4, .n_heads = 4, .n_kv_heads = 2, .vocab_size = 101,
                      .max_seq_len = 128};
  const ModelWeights w = random_weights(c, {.seed = 3, .prefix_registers = 1, .suffix_registers = 2});
  const Engine<EarnSchedule, CudaT<D>> engine(w, EarnSchedule{2});
  const std::vector<float> alone0 = session(engine, 10), alone1 = session(engine, 11);
  for (int round = 0; round < 3; ++round) {
    std::vector<float> got0, got1;
    std::thread t0([&] { got0 = session(engine, 10); });
    std::thread t1([&] { got1 = session(engine, 11); });
    t0.join();
    t1.join();
    CAPTURE(round);
    CHECK(got0 == alone0);  // bit for bit: same kernels and GEMMs on the same data, whatever runs beside them
    CHECK(got1 == alone1);  // (also when one thread's device-wide sync invalidated the other's decode capture and
                            //  the step ran eagerly: GraphCache::run)
  }
}
