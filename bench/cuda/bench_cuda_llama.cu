// bench/cuda/bench_cuda_llama.cu - earn's CUDA engine at Llama-7B dimensions (random bf16 weights made on the
// GPU): LLMRec beam search shape (B users, prompt P, beam 20, 4 new tokens = prefill + 3 decode steps with a
// beam reorder between steps), dense vs EARN k in {2, 4, 6, 8} with 1 + 1 registers. Per setting: prefill ms,
// decode ms, total, KV bytes, and the roofline floor from the copy bandwidth and bf16 GEMM rate measured on this
// card in the same run. Timed with CUDA events on the state's stream (host planning included), median of reps.
//
//   bench_cuda_llama [--json out.json] [--reps 3] [--layers 32] [--users 1,4,32] [--prompts 256,512]
//                    [--ks -1,2,4,6,8] [--graphs 1] [--flash 1] [--stream-gemm 0] [--bulk-gemm 0] [--pdl 1] [--tune 1]
//                    [--tune-prefill 0] [--tune-candidates 8] [--profile 0] [--registers 1,1]
//                    [--dim 4096 --hidden 11008 --heads 32 --vocab 33024 --tied 0]
//                    [--presses streaming_llm,snapkv,h2o,h2o_evict,pyramidkv --press-k 8 --press-registers 2] [--gist 0]
// --presses: the inference-time baselines (kv/press.hpp) over the dense model, each layer's cache pressed to the KV
//   of EARN at split layer --press-k (default L/4) with --press-registers registers (Budget::matching_earn); their
//   prefill is dense (plus the press), decode reads the kept rows;
// --gist 1: also Gist (attention/gist.hpp) with the model's registers: a dense prefill, then every layer caches the
//   registers' rows only (--ks "" leaves the EARN / dense rows out);
// --registers rp,rs: the model's prefix and suffix registers (0,0 with --ks -1: plain Finetune, no register rows);
// --dim/--hidden/--heads/--vocab/--tied: another model shape than Llama-7B's (a recommendation model's, say);
// --ks: schedules (-1 dense); --graphs 0: decode steps launch kernel by kernel instead of replaying CUDA graphs;
// --flash 0: attention (prefill and decode) through the cuBLAS path instead of the tensor-core flash kernels;
// --stream-gemm 1: GEMMs of <= 8 rows through the weight-streaming kernel (stream_gemm.cuh) instead of cuBLAS;
// --bulk-gemm 1: GEMMs of <= 32 rows through the tensor-map ring kernel (bulk_gemm.cuh);
// --tune 1 (default; 0: cublasGemmEx's default algorithm everywhere): Engine::tune_gemms for the decode rows
//   (B x 20), the late layers' register rows (B x 2) and the prefill logits rows (B) before the first prefill (not
//   timed; the tuning time is printed);
// --tune-prefill 1: also tune the prefill's dense row count B x (P + 2) (not the classifier there; off by default:
//   no gain measured, NOTES v29); --tune-candidates: cuBLASLt heuristic algorithms tried per product;
// --pdl 0: the kernels after a layer's GEMMs as ordinary launches instead of programmatic dependent ones
//   (State::use_pdl, on by default);
// --profile 1 (2): only the last repetition's decode steps (prefill) run between cudaProfilerStart/Stop, for
// `ncu --profile-from-start off`.
//
// Not timed: sampling / top-k of the logits (they stay on the device; beam parents here are random).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>
#include <vector>

#include <cuda_profiler_api.h>
#include <nlohmann/json.hpp>

#include "common.cuh"
#include "earn/cuda.cuh"

using namespace earn;

using earn::bench::median;
using earn::bench::Timer;
using earn::bench::measure_bandwidth;
using earn::bench::measure_gemm_rate;
using earn::bench::GemmRate;

namespace {

struct Result {
  int B, P, k;  // k = -1: dense (and the presses: dense compute)
  std::string schedule;  // dense, earn, or a press's name
  float prefill_ms, decode_ms;
  Index kv_bytes;         // after the decode steps (prompt + every beam's generated rows)
  Index kv_prefill_bytes;  // after the prefill: the prompt's cache, what EARN shrinks
  double prefill_floor_ms, decode_floor_ms;
  double prefill_seq_floor_ms;  // layer by layer: sum of each layer's max(bytes / bandwidth, FLOPs / rate)
  double burst_floor_ms;  // the whole floor at the burst GEMM rate
  double flops, bytes;
};

}  // namespace

int main(int argc, char** argv) {
  std::string json;
  int dim = 4096, hidden = 11008, heads = 32, vocab = 33024, tied = 0;
  std::vector<int> regs = {1, 1};
  int reps = 3, layers = 32, graphs = 1, flash = 1, stream_gemm = 0, bulk_gemm = 0, pdl = 1, tune = 1, tune_prefill = 0, candidates = 8, profile = 0;
  std::vector<int> Bs = {1, 4, 32}, Ps = {256, 512}, Ks = {-1, 2, 4, 6, 8};
  std::vector<std::string> presses;  // inference-time baselines over the dense model, at EARN's KV at --press-k
  int press_k = -1, press_regs = 2, gist = 0;
  for (int i = 1; i + 1 < argc; i += 2) {
    const std::string a = argv[i];
    if (a == "--json") json = argv[i + 1];
    else if (a == "--reps") reps = std::atoi(argv[i + 1]);
    else if (a == "--layers") layers = std::atoi(argv[i + 1]);
    else if (a == "--users") Bs = earn::bench::parse_list(argv[i + 1]);
    else if (a == "--prompts") Ps = earn::bench::parse_list(argv[i + 1]);
    else if (a == "--ks") Ks = earn::bench::parse_list(argv[i + 1]);
    else if (a == "--graphs") graphs = std::atoi(argv[i + 1]);
    else if (a == "--flash") flash = std::atoi(argv[i + 1]);
    else if (a == "--stream-gemm") stream_gemm = std::atoi(argv[i + 1]);
    else if (a == "--bulk-gemm") bulk_gemm = std::atoi(argv[i + 1]);
    else if (a == "--tune") tune = std::atoi(argv[i + 1]);
    else if (a == "--tune-prefill") tune_prefill = std::atoi(argv[i + 1]);
    else if (a == "--tune-candidates") candidates = std::atoi(argv[i + 1]);
    else if (a == "--pdl") pdl = std::atoi(argv[i + 1]);
    else if (a == "--profile") profile = std::atoi(argv[i + 1]);
    else if (a == "--registers") regs = earn::bench::parse_list(argv[i + 1]);
    else if (a == "--presses") {
      std::stringstream ss(argv[i + 1]);
      for (std::string x; std::getline(ss, x, ',');) presses.push_back(x);
    } else if (a == "--press-k") press_k = std::atoi(argv[i + 1]);
    else if (a == "--press-registers") press_regs = std::atoi(argv[i + 1]);
    else if (a == "--gist") gist = std::atoi(argv[i + 1]);
    else if (a == "--dim") dim = std::atoi(argv[i + 1]);
    else if (a == "--hidden") hidden = std::atoi(argv[i + 1]);
    else if (a == "--heads") heads = std::atoi(argv[i + 1]);
    else if (a == "--vocab") vocab = std::atoi(argv[i + 1]);
    else if (a == "--tied") tied = std::atoi(argv[i + 1]);
    else {
      std::fprintf(stderr, "unknown argument %s\n", a.c_str());
      return 2;
    }
  }
  if (cuda::device_count() == 0) {
    std::printf("skipped: no CUDA device\n");
    return 77;
  }
  try {
    cudaDeviceProp prop{};
    EARN_CUDA_CHECK(cudaGetDeviceProperties(&prop, 0));
    const double bw = measure_bandwidth();
    const GemmRate gr = measure_gemm_rate();
    const double rate = gr.sustained;  // the floors: what the card keeps up for a prefill's length
    std::printf("card: %s, %d SMs; measured copy bandwidth %.0f GB/s (read + write), bf16 GEMM %.0f TFLOP/s "
                "sustained (%.0f burst)\n",
                prop.name, prop.multiProcessorCount, bw / 1e9, gr.sustained / 1e12, gr.burst / 1e12);

    if (regs.size() != 2 || regs[0] < 0 || regs[1] < 0) {
      std::fprintf(stderr, "--registers takes rp,rs\n");
      return 2;
    }
    ModelConfig c = earn::bench::llama7b_config(layers, vocab);
    c.dim = dim, c.hidden_dim = hidden, c.n_heads = c.n_kv_heads = heads, c.tied_embeddings = tied != 0;
    c.validate();
    const int beam = 20, new_tokens = 4, steps = new_tokens - 1, r = regs[0] + regs[1];
    auto weights = std::make_shared<const cuda::DeviceWeights<dtype::Bf16>>(cuda::DeviceWeights<dtype::Bf16>::random(
        c, {.seed = 7, .scale = 1.0f, .prefix_registers = regs[0], .suffix_registers = regs[1]}));
    const double wbytes = double(weights->bytes());
    std::printf("model: d %d, FFN %d, %d heads, vocab %d%s (Llama-7B: 4096, 11008, 32, 33024), %d layers, %d + %d "
                "registers, %.3f GB of bf16 weights; decode %s, attention %s, small GEMMs "
                "%s, programmatic dependent launch %s\n", dim, hidden, heads, vocab, tied ? " tied" : "", layers,
                regs[0], regs[1], wbytes / 1e9,
                graphs ? "replays CUDA graphs" : "launches kernel by kernel",
                flash ? "flash kernels (prefill; flash-decoding)" : "cuBLAS batched",
                bulk_gemm ? "bulk_gemm (<= 32 rows)" : stream_gemm ? "stream_gemm (<= 8 rows)" : "cuBLAS",
                pdl ? "on" : "off");

    const int hd = c.head_dim(), qd = c.n_heads * hd, kvd = c.kv_dim();
    const double layer_params = double(c.dim) * (qd + 2 * kvd) + double(c.dim) * qd + 3.0 * c.dim * c.hidden_dim;
    const double head_params = double(c.vocab_size) * c.dim;
    std::vector<Result> results;
    Rng rng(11);

    // One setting: B users, prompt P, under `schedule`; kk = the layers computing every input row (the rest compute
    // the registers only); cached(l, n) = rows layer l caches of n input rows (its keep for a press).
    auto run_setting = [&]<class Sched>(int B, int P, int k, const std::string& name, const Sched& schedule, int kk,
                                    auto cached) {
          Engine<Sched, CudaBf16> engine(weights, schedule);
          auto st = engine.make_state({.max_users = B, .max_rows = B * beam, .max_prompt = P, .max_new_tokens = new_tokens});
          st.use_graphs(graphs != 0);
          st.use_flash_attention(flash != 0);
          st.use_stream_gemm(stream_gemm != 0);
          st.use_bulk_gemm(bulk_gemm != 0);
          st.use_pdl(pdl != 0);
          if (tune) {
            const auto t0 = std::chrono::steady_clock::now();
            std::vector<int> rows = {B * beam, B};
            if (r > 0) rows.push_back(B * r);  // the late layers' register rows (none without registers)
            int lt = 0;
            int n = 0;
            for (const auto& t : engine.tune_gemms(st, rows, {.candidates = candidates})) lt += t.lt, ++n;
            if (tune_prefill) {
              const std::vector<int> pre_rows = {B * (P + r)};
              for (const auto& t : engine.tune_gemms(st, pre_rows, {.candidates = candidates, .classifier = false}))
                lt += t.lt, ++n;
            }
            std::printf("  tune_gemms(%d, %d, %d rows%s): %d of %d products on a cuBLASLt algorithm, %.0f ms\n", B * beam,
                        B, B * r, tune_prefill ? (", " + std::to_string(B * (P + r)) + " w/o classifier").c_str() : "",
                        lt, n, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
          }
          std::vector<int> users(B), row_user(B * beam);
          std::vector<std::vector<int>> prompts(B);
          for (int u = 0; u < B; ++u) {
            users[u] = u;
            prompts[u].resize(P);
            for (int& t : prompts[u]) t = int(rng.next_u64() % std::uint64_t(c.vocab_size));
            for (int j = 0; j < beam; ++j) row_user[u * beam + j] = u;
          }
          std::vector<int> tokens(B * beam), parent(B * beam);
          Timer t;
          Index kv_prefill = 0;
          std::vector<float> pre, dec, host_ms;  // host_ms: until prefill_batch_device returns (planning, launches)
          for (int rep = 0; rep <= reps; ++rep) {  // rep 0 warms up (cuBLAS heuristics, scratch allocation)
            const bool prof_pre = profile == 2 && rep == reps;
            if (prof_pre) EARN_CUDA_CHECK(cudaProfilerStart());
            t.start(st.stream());
            const auto h0 = std::chrono::steady_clock::now();
            engine.prefill_batch_device(st, users, prompts);
            host_ms.push_back(std::chrono::duration<float, std::milli>(std::chrono::steady_clock::now() - h0).count());
            const float p_ms = t.stop(st.stream());
            kv_prefill = st.kv_bytes();
            if (prof_pre) EARN_CUDA_CHECK(cudaProfilerStop());
            st.set_rows(row_user);
            const bool prof = profile == 1 && rep == reps;
            if (prof) EARN_CUDA_CHECK(cudaProfilerStart());
            t.start(st.stream());
            for (int g = 0; g < steps; ++g) {
              for (auto& x : tokens) x = int(rng.next_u64() % std::uint64_t(c.vocab_size));
              engine.decode_device(st, tokens);
              if (g + 1 < steps) {  // beams fork within their user
                for (int i = 0; i < B * beam; ++i) parent[i] = (i / beam) * beam + int(rng.next_u64() % beam);
                st.reorder(parent);
              }
            }
            const float d_ms = t.stop(st.stream());
            if (prof) EARN_CUDA_CHECK(cudaProfilerStop());
            if (rep > 0) {
              pre.push_back(p_ms);
              dec.push_back(d_ms);
            }
          }
          Result res{B, P, k, name, median(pre), median(dec), st.kv_bytes(), kv_prefill, 0, 0, 0, 0, 0, 0};
          // Floors. Prefill: weights read once + KV written, against the GEMM FLOPs (+ causal attention pairs).
          const double n_in = P + r;
          // The layer-sequential floor adds each layer's own roofline: a layer cannot start before the one below
          // ends, so a compute-bound early layer does not hide a bandwidth-bound late layer's weights (EARN's
          // prefill at few users: dense early layers over B (P + 2) rows, register-only late layers over 2B).
          const double row_bytes = 2.0 * kvd * 2;  // K and V, bf16
          double pf = 2.0 * head_params * B, pre_kv_rows = 0;
          double seq = std::max(2.0 * head_params / bw, 2.0 * head_params * B / rate);
          for (int l = 0; l < layers; ++l) {
            const double rows = l < kk ? n_in : r, kept = cached(l, rows);
            const double lf = 2.0 * layer_params * rows * B + 4.0 * hd * c.n_heads * (rows * (rows + 1) / 2) * B;
            pf += lf;
            pre_kv_rows += kept * B;
            seq += std::max((2.0 * layer_params + kept * B * row_bytes) / bw, lf / rate);
          }
          const double pb = wbytes + pre_kv_rows * row_bytes;
          res.prefill_floor_ms = std::max(pb / bw, pf / rate) * 1e3;
          res.prefill_seq_floor_ms = std::max(res.prefill_floor_ms, seq * 1e3);
          res.burst_floor_ms = std::max(pb / bw, pf / gr.burst) * 1e3;
          // Decode step g: weights + the prefix KV (once per user) + generated KV read; logits written.
          const double R = double(B) * beam;
          double dfloor = 0, dflops_all = 0, dbytes_all = 0;
          for (int g = 0; g < steps; ++g) {
            double f = 2.0 * (layer_params * layers + head_params) * R, kvb = 0;
            for (int l = 0; l < layers; ++l) {
              const double S = cached(l, l < kk ? n_in : r);
              f += 4.0 * hd * c.n_heads * R * (S + g + 1);
              kvb += (S * B + R * (g + 1)) * row_bytes;
            }
            const double b = wbytes + kvb + R * c.vocab_size * 4.0;
            dfloor += std::max(b / bw, f / rate) * 1e3;
            res.burst_floor_ms += std::max(b / bw, f / gr.burst) * 1e3;
            dflops_all += f;
            dbytes_all += b;
          }
          res.decode_floor_ms = dfloor;
          res.flops = pf + dflops_all;
          res.bytes = pb + dbytes_all;
          results.push_back(res);
          const double total = res.prefill_ms + res.decode_ms, floor = res.prefill_floor_ms + res.decode_floor_ms;
          const double seq_floor = res.prefill_seq_floor_ms + res.decode_floor_ms;
          std::printf("B=%2d P=%3d %-6s prefill %8.2f ms (floor %7.2f, layer-seq %7.2f)  decode %7.2f ms (floor %6.2f)  "
                      "total %8.2f ms  floor %8.2f  x%.2f (burst floor x%.2f, layer-seq x%.2f)  KV %.3f GB  prefill host "
                      "%.1f ms\n",
                      B, P, name == "earn" ? ("k=" + std::to_string(k)).c_str() : name.c_str(), res.prefill_ms, res.prefill_floor_ms,
                      res.prefill_seq_floor_ms, res.decode_ms, res.decode_floor_ms, total, floor, total / floor,
                      total / res.burst_floor_ms, total / seq_floor, double(res.kv_bytes) / 1e9, median(host_ms));
          std::fflush(stdout);
        };
    const auto all_rows = [](int, double rows) { return rows; };
    for (int B : Bs)
      for (int P : Ps) {
        for (int k : Ks) {
          if (k > layers) continue;
          const int kk = k < 0 ? layers : k;  // dense = every layer early (registers included: P + 2 rows)
          run_setting(B, P, k, k < 0 ? "dense" : "earn", EarnSchedule{kk}, kk, all_rows);
        }
        // The baselines: the dense model, each layer's cache pressed to EARN's KV at --press-k (Budget::matching_earn).
        const kv::Budget budget = kv::Budget::matching_earn(press_k >= 0 ? press_k : layers / 4, layers, press_regs);
        for (const std::string& name : presses)
          kv::visit_press(name, budget, [&]<class Pr>(const Pr& press) {
            run_setting(B, P, -1, name, press_schedule(press), layers, [&](int l, double rows) {
              return double(std::min(press.rule(l, layers, int(rows)).keep, int(rows)));
            });
          });
        if (gist) run_setting(B, P, -1, "gist", GistSchedule{}, layers, [&](int, double) { return double(r); });
      }

    if (!json.empty()) {
      nlohmann::json out = {{"card", prop.name},
                            {"copy_bandwidth_Bps", bw},
                            {"bf16_gemm_flops", rate},
                            {"bf16_gemm_flops_burst", gr.burst},
                            {"layers", layers},
                            {"dim", dim},
                            {"hidden", hidden},
                            {"heads", heads},
                            {"vocab", vocab},
                            {"prefix_registers", regs[0]},
                            {"suffix_registers", regs[1]},
                            {"weight_bytes", wbytes},
                            {"graphs", graphs != 0},
                            {"flash", flash != 0},
                            {"small_gemm", bulk_gemm ? "bulk_gemm" : stream_gemm ? "stream_gemm" : "cublas"},
                            {"pdl", pdl != 0},
                            {"tuned_gemms", tune != 0},
                            {"tuned_prefill_rows", tune != 0 && tune_prefill != 0},
                            {"results", nlohmann::json::array()}};
      for (const Result& x : results)
        out["results"].push_back({{"B", x.B},
                                  {"schedule", x.schedule},
                                  {"P", x.P},
                                  {"k", x.k},
                                  {"prefill_ms", x.prefill_ms},
                                  {"decode_ms", x.decode_ms},
                                  {"kv_bytes", x.kv_bytes},
                                  {"kv_prefill_bytes", x.kv_prefill_bytes},
                                  {"prefill_floor_ms", x.prefill_floor_ms},
                                  {"prefill_seq_floor_ms", x.prefill_seq_floor_ms},
                                  {"decode_floor_ms", x.decode_floor_ms},
                                  {"burst_floor_ms", x.burst_floor_ms},
                                  {"flops", x.flops},
                                  {"bytes", x.bytes}});
      std::ofstream(json) << out.dump(1) << "\n";
    }
  } catch (const earn::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  return 0;
}
