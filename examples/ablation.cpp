// ablation: the split-layer sweep of EARN. For one model and prompt length, runs every split layer k in a range
// (k = L is the dense model on the same input) and reports prefill ms, decode ms per token, total, KV bytes and the
// KV reduction against dense; prints a table and writes CSV and an SVG plot of time and KV against k.
//
//   ablation                                  built-in random Llama sized for this CPU
//   ablation --model path/to/hf_dir_or.bin    a Hugging Face directory or llama2.c checkpoint
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <vector>

#include "earn/earn.hpp"
#include "model_source.hpp"
#include "svg_plot.hpp"

using namespace earn;

namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0 : v[v.size() / 2];
}

struct Row {
  int k;
  double prefill_ms, decode_ms, total_ms;
  Index kv_bytes;
  double kv_reduction;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"EARN split-layer ablation: time and KV cache against the split layer k"};
  examples::ModelSource src;
  src.add_options(app);
  int prompt_len = 512, new_tokens = 8, reps = 3, k_lo = 0, k_hi = -1, k_step = 1, rp = 1, rs = 1;
  std::string csv = "ablation.csv", svg = "ablation.svg";
  app.add_option("--prompt", prompt_len, "prompt tokens P (registers excluded)")->check(CLI::PositiveNumber);
  app.add_option("--new-tokens", new_tokens, "tokens decoded after prefill")->check(CLI::PositiveNumber);
  app.add_option("--reps", reps, "repetitions per k (the median is reported)")->check(CLI::PositiveNumber);
  app.add_option("--k-min", k_lo, "first split layer")->check(CLI::NonNegativeNumber);
  app.add_option("--k-max", k_hi, "last split layer (default: L)")
      ->check(CLI::Range(0, std::numeric_limits<int>::max()));
  app.add_option("--k-step", k_step, "step between split layers")->check(CLI::PositiveNumber);
  app.add_option("--prefix-registers", rp, "r_p when the model has none of its own")->check(CLI::NonNegativeNumber);
  app.add_option("--suffix-registers", rs, "r_s when the model has none of its own")->check(CLI::NonNegativeNumber);
  app.add_option("--csv", csv, "CSV output path");
  app.add_option("--svg", svg, "SVG plot output path");
  CLI11_PARSE(app, argc, argv);

  try {
    // Both outputs are opened before the sweep: a path that cannot be written fails now, not after the run.
    std::ofstream out(csv), svg_out(svg);
    if (!out) throw IoError(csv + ": cannot open for writing");
    if (!svg_out) throw IoError(svg + ": cannot open for writing");
    ModelWeights w = src.load(rp, rs);
    const ModelConfig& c = w.config;
    if (k_hi < 0) k_hi = c.n_layers;  // the default, -1 (a negative --k-max is refused by its check)
    if (k_lo > k_hi || k_hi > c.n_layers)
      throw ConfigError("--k-min/--k-max must satisfy 0 <= k-min <= k-max <= " + std::to_string(c.n_layers));
    // Sizes against the context, then the largest state (dense, k = L) against memory, before anything is sized.
    const Index registers = w.registers.count(), context_rows = Index{prompt_len} + registers + new_tokens;
    if (context_rows > c.max_seq_len)
      throw ConfigError("--prompt " + std::to_string(prompt_len) + " + registers " + std::to_string(registers) +
                        " + --new-tokens " + std::to_string(new_tokens) + " exceed the model's context of " +
                        std::to_string(c.max_seq_len));
    examples::check_fits_memory(double(context_rows) * c.n_layers * c.kv_dim() * 2 * sizeof(float), "the KV cache");
    std::printf("model: %s\n  %d layers, d %d, %d heads (%d kv), FFN %d, vocab %d, %.1fM parameters, r_p %ld r_s %ld\n",
                src.description().c_str(), c.n_layers, c.dim, c.n_heads, c.n_kv_heads, c.hidden_dim, c.vocab_size,
                w.parameter_count() / 1e6, long(w.registers.prefix.rows()), long(w.registers.suffix.rows()));
    std::printf("prompt %d tokens, %d new tokens, median of %d runs\n\n", prompt_len, new_tokens, reps);

    std::vector<int> prompt(prompt_len);
    Rng rng(17);
    for (auto& t : prompt) t = int(rng.next_u64() % std::uint64_t(c.vocab_size));
    // Every requested k, and always k = L (the dense model on the same input) as the baseline.
    std::vector<int> ks;
    for (int k = k_lo;; k += k_step) {  // stops before k + k_step could pass k_hi (or overflow int)
      ks.push_back(k);
      if (k_hi - k < k_step) break;
    }
    if (ks.back() != c.n_layers) ks.push_back(c.n_layers);
    std::vector<Row> rows;
    for (int k : ks) {
      Engine<EarnSchedule> engine(w, EarnSchedule{k});
      auto st = engine.make_state({.max_prompt = prompt_len, .max_new_tokens = new_tokens});
      std::vector<double> pre, dec;
      for (int rep = 0; rep < reps; ++rep) {
        auto t0 = std::chrono::steady_clock::now();
        int tok = argmax(engine.prefill(st, 0, prompt));
        auto t1 = std::chrono::steady_clock::now();
        const int r0[1] = {0};
        st.set_rows(r0);
        for (int g = 0; g < new_tokens; ++g) {
          const int in[1] = {tok};
          tok = argmax(engine.decode(st, in).row(0));
        }
        auto t2 = std::chrono::steady_clock::now();
        pre.push_back(std::chrono::duration<double, std::milli>(t1 - t0).count());
        dec.push_back(std::chrono::duration<double, std::milli>(t2 - t1).count() / new_tokens);
      }
      const double p = median(pre), d = median(dec);
      rows.push_back({k, p, d, p + d * new_tokens, st.kv_bytes(), 0});
    }
    const Index dense_bytes = rows.back().kv_bytes;
    for (auto& r : rows) r.kv_reduction = 1.0 - double(r.kv_bytes) / double(dense_bytes);

    const Row& dense = rows.back();
    std::printf("%4s %12s %14s %10s %9s %12s %10s %8s\n", "k", "prefill ms", "decode ms/tok", "total ms", "speedup",
                "KV bytes", "KV saved", "");
    out << "k,prefill_ms,decode_ms_per_token,total_ms,speedup_vs_dense,kv_bytes,kv_reduction\n";
    for (const auto& r : rows) {
      const double speedup = dense.total_ms / r.total_ms;
      std::printf("%4d %12.2f %14.3f %10.2f %8.2fx %12lld %9.1f%% %8s\n", r.k, r.prefill_ms, r.decode_ms, r.total_ms,
                  speedup, static_cast<long long>(r.kv_bytes), 100 * r.kv_reduction, r.k == c.n_layers ? "(dense)" : "");
      out << r.k << ',' << r.prefill_ms << ',' << r.decode_ms << ',' << r.total_ms << ',' << speedup << ','
          << r.kv_bytes << ',' << r.kv_reduction << '\n';
    }
    std::vector<double> kx, total, kv;
    for (const auto& r : rows) {
      kx.push_back(r.k);
      total.push_back(r.total_ms);
      kv.push_back(r.kv_bytes / 1e6);
    }
    out.close();
    if (!out) throw IoError(csv + ": write failed");
    examples::write_svg_chart(svg_out, svg, "EARN split-layer ablation (P = " + std::to_string(prompt_len) + ")",
                              "split layer k (k = L: dense)", "total ms", "KV cache MB", kx,
                              {{"prefill + decode time", total, "#1f77b4", false}, {"KV cache", kv, "#d62728", true}});
    std::printf("\nwrote %s and %s\n", csv.c_str(), svg.c_str());
  } catch (const earn::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return 1;
  }
  return 0;
}
