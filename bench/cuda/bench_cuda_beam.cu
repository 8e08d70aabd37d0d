// bench/cuda/bench_cuda_beam.cu - the whole trie-constrained beam search at Llama-7B dimensions (random bf16
// weights, EARN k = 6, 1 + 1 registers, vocabulary 32000 + 4 x 256 code tokens, a random catalogue), with the
// per-step selection on the host (rec::BeamSearch: logits copied to the host, log-softmax, trie lookups, partial
// sort) against the device (cuda::DeviceBeamSearch: scores and CUB top-k on the GPU). Wall clock around run(),
// median of reps after a warm-up; both return their items, which are compared position by position.
//
//   bench_cuda_beam [--users 4,32] [--prompt 512] [--items 20000] [--reps 3] [--layers 32]
//
// A third device search, batched and with DeviceBeamSearch::tune_gemms (not timed), shows what tuning adds; the
// first two run cublasGemmEx's defaults like the host search.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <sstream>
#include <string>
#include <vector>

#include "earn/backend/cuda/beam_search.cuh"
#include "common.cuh"
#include "earn/cuda.cuh"

namespace {

template <class F>
double median_ms(int reps, F&& f) {
  f();  // warm-up: cuBLAS heuristics, graphs, scratch
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto a = std::chrono::steady_clock::now();
    f();
    t.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - a).count());
  }
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  std::vector<int> Bs = {4, 32};
  int P = 512, items = 20000, reps = 3, layers = 32;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--users") Bs = earn::bench::parse_list(argv[i + 1]);
    else if (a == "--prompt") P = std::atoi(argv[i + 1]);
    else if (a == "--items") items = std::atoi(argv[i + 1]);
    else if (a == "--reps") reps = std::atoi(argv[i + 1]);
    else if (a == "--layers") layers = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (earn::cuda::device_count() == 0) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  try {
    namespace rec = earn::rec;
    const rec::ItemVocab vocab(32000);
    const earn::ModelConfig c = earn::bench::llama7b_config(layers, vocab.size());
    using DW = earn::cuda::DeviceWeights<earn::dtype::Bf16>;
    auto weights = std::make_shared<const DW>(
        DW::random(c, {.seed = 7, .scale = 1.0f, .prefix_registers = 1, .suffix_registers = 1}));
    earn::Engine<earn::EarnSchedule, earn::CudaBf16> engine(weights, earn::EarnSchedule{6});
    earn::Rng rng(3);
    std::vector<rec::ItemCodes> codes(items);
    for (auto& ic : codes)
      for (int& x : ic) x = int(rng.next_u64() % rec::kCodesPerLevel);
    const rec::Catalogue cat(codes);
    const rec::CodeTrie trie(cat, vocab);
    std::printf("EARN k=6, %d layers, %d identifiers, beam 20, prompt %d\n", layers, cat.n_identifiers(), P);
    for (int B : Bs) {
      std::vector<std::vector<int>> prompts(B, std::vector<int>(P));
      for (auto& p : prompts)
        for (int& t : p) t = int(rng.next_u64() % 32000);
      rec::BeamSearch host(engine, trie, {.beam = 20}, B, P);
      earn::cuda::DeviceBeamSearch dev(engine, trie, {.beam = 20}, B, P);
      earn::cuda::DeviceBeamSearch dev_batched(engine, trie, {.beam = 20}, B, P, /*batched_prefill=*/true);
      earn::cuda::DeviceBeamSearch dev_tuned(engine, trie, {.beam = 20}, B, P, /*batched_prefill=*/true);
      dev_tuned.tune_gemms(B);
      std::vector<std::vector<rec::Recommendation>> a, b, d, e;
      const double th = median_ms(reps, [&] { a = host.run(prompts); });
      const double td = median_ms(reps, [&] { b = dev.run(prompts); });
      const double tb = median_ms(reps, [&] { d = dev_batched.run(prompts); });
      const double tt = median_ms(reps, [&] { e = dev_tuned.run(prompts); });
      auto same = [&](const auto& x) {
        int k = 0;
        for (int u = 0; u < B; ++u)
          for (std::size_t j = 0; j < std::min(a[u].size(), x[u].size()); ++j) k += a[u][j].identifier == x[u][j].identifier;
        return k;
      };
      std::printf("B=%2d host selection %8.2f ms (of which selection %.2f ms per run)  device selection %8.2f ms "
                  "(items equal %d / %d)  + batched prefill %8.2f ms (items equal %d)  + tuned GEMMs %8.2f ms (items "
                  "equal %d)\n",
                  B, th, host.stats().select_s * 1e3 / (reps + 1), td, same(b), B * 20, tb, same(d), tt, same(e));
      std::fflush(stdout);
    }
  } catch (const earn::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
