// analyze: EARN's two attention findings, measured. Runs a model's prefill over real prompts (each test user's last 20
// items of Amazon Beauty through the LC-Rec prompt builder) with an attention::Observer attached, and writes per
// (layer, head) density, head / tail mass and entropy, plus whole probability rows of the readout row; the
// definitions are printed and written next to the numbers. tools/plot_attention.py draws the figures.
//
//   analyze                                        built-in random model, dense, 200 test users (the numbers
//                                                  describe random weights; it says so)
//   analyze --model runs/finetune/checkpoints/step-N --users 1000 --out out/finetune
//   analyze --model runs/earn/checkpoints/step-N --k 2 --head-keys 4 --tail-keys 4 --threshold 0.02
//   python3 tools/plot_attention.py out/finetune   # attention_density.png, attention_sinks.png
//
// Shows: CpuState::observe (zero cost when absent), ObserverOptions (which rows, T_h, T_t, eps, density rule),
// HeadStats (per-sample means summed in double), RecordedRow (whole rows of chosen query rows).
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <limits>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

#include "earn/attention/observer.hpp"
#include "earn/earn.hpp"
#include "earn/rec/evaluate.hpp"
#include "earn/rec/rec.hpp"
#include "earn/tokenizer/llama2c.hpp"
#include "model_source.hpp"

using namespace earn;
using namespace earn::rec;

namespace {

struct MeanSd {
  double mean = 0, sd = 0;
};

// Mean and (population) standard deviation of xs.
MeanSd mean_sd(const std::vector<double>& xs) {
  MeanSd r;
  if (xs.empty()) return r;
  for (double x : xs) r.mean += x;
  r.mean /= double(xs.size());
  for (double x : xs) r.sd += (x - r.mean) * (x - r.mean);
  r.sd = std::sqrt(r.sd / double(xs.size()));
  return r;
}

// The paper's two findings and this program's measurement of them, as printed and written to definitions.txt.
std::string definitions(const attention::ObserverOptions& o, const std::string& rows) {
  std::ostringstream s;
  s << "EARN (Yang et al., KDD 2025, arXiv 2507.00715), the two observations the method rests on:\n"
    << "  1. Layer-wise attention sparsity inversion: in LLM-based recommenders attention is dense (spread over the\n"
    << "     history) in early layers and increasingly sparse in later layers - the reverse of typical NLP models.\n"
    << "  2. Dual attention sinks: attention mass concentrates on both the head tokens and the tail tokens of the\n"
    << "     input, not only on the first token.\n"
    << "Measured here (EARN.md's reading of the paper), per layer and head, over the keys a query row can see at that\n"
    << "layer (in EARN's late layers: registers only):\n";
  if (o.density == attention::DensityRule::kAbsolute)
    s << "  density   = fraction of visible keys with probability p > eps, eps = " << o.threshold << "\n";
  else
    s << "  density   = fraction of visible keys with probability p > 1 / (visible keys), i.e. above uniform\n";
  s << "  head mass = sum of p over the first T_h = " << o.head_keys << " visible keys (by position)\n"
    << "  tail mass = sum of p over the last T_t = " << o.tail_keys
    << " visible keys (for a causal prompt row: the query itself and the keys just before it)\n"
    << "  entropy   = -sum p ln p over visible keys, in nats\n"
    << "Query rows: " << rows << ". Each prompt's rows are averaged first, then the prompts with equal weight;\n"
    << "\"+-\" in the table is the standard deviation over heads. Sparsity inversion: density falls with depth;\n"
    << "dual sinks: head mass and tail mass both far above their uniform share T / (visible keys).\n";
  return s.str();
}

std::ofstream open_output(const std::filesystem::path& p) {
  std::ofstream f(p);
  if (!f) throw IoError(p.string() + ": cannot open for writing");
  return f;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"EARN's attention findings (sparsity inversion, dual sinks) measured on an LLMRec model's prompts"};
  examples::ModelSource src;
  src.add_options(app);
  std::string data = std::string(EARN_SHARED_DATA_DIR) + "/amazon-beauty", split = "test", tokenizer, rows = "all",
              density = "absolute", out = "attention_out";
  int k = -1, rp = 1, rs = 1, users = 200, batch = 8, last = 1;
  attention::ObserverOptions opt{.record = {.readout = true}, .record_samples = 4, .head_keys = 4, .tail_keys = 4};
  DatasetOptions data_opt;
  app.add_option("--data", data, "data set directory (sequential_*.txt and the codes JSON)");
  app.add_option("--codes", data_opt.codes_file, "the codes JSON file inside --data (item -> 4 code tokens)");
  app.add_option("--split", split, "valid or test")->check(CLI::IsMember({"valid", "test"}));
  app.add_option("--users", users, "the first N users with targets")->check(CLI::Range(1, 1 << 24));
  app.add_option("--k", k, "EARN split layer (default: the checkpoint's, else L: the dense model)")
      ->check(CLI::Range(0, std::numeric_limits<int>::max()));
  app.add_option("--prefix-registers", rp, "r_p when the model has none of its own (dropped when dense unless given)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--suffix-registers", rs, "r_s when the model has none of its own (dropped when dense unless given)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--tokenizer", tokenizer, "llama2.c tokenizer file: use the LC-Rec instruction text as prompt");
  app.add_option("--head-keys", opt.head_keys, "T_h: the first keys whose mass is the head sink");
  app.add_option("--tail-keys", opt.tail_keys, "T_t: the last keys whose mass is the tail sink");
  app.add_option("--threshold", opt.threshold, "eps of density: a key counts when p > eps, eps in (0, 1)");
  app.add_option("--density", density, "absolute (p > eps) or uniform (p > 1/visible keys)")
      ->check(CLI::IsMember({"absolute", "uniform"}));
  app.add_option("--rows", rows, "query rows reduced: all, readout (the row predicting the first item token), last")
      ->check(CLI::IsMember({"all", "readout", "last"}));
  app.add_option("--last", last, "with --rows last: the last N rows of each prompt at each layer")
      ->check(CLI::PositiveNumber);
  app.add_option("--record-samples", opt.record_samples, "prompts whose readout rows are written whole")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--batch", batch, "prompts per prefill")->check(CLI::Range(1, 256));
  app.add_option("--out", out, "output directory: attention_layers.csv, attention_rows.csv, definitions.txt");
  CLI11_PARSE(app, argc, argv);

  try {
    opt.density = density == "uniform" ? attention::DensityRule::kAboveUniform : attention::DensityRule::kAbsolute;
    if (rows == "readout") opt.reduce.readout = true;
    if (rows == "last") opt.reduce.last = last;
    const std::string rows_text = rows == "all"       ? "every input row (registers included) that exists at the layer"
                                  : rows == "readout" ? "the readout row (it predicts the first item token)"
                                                      : "the last " + std::to_string(last) + " rows at each layer";
    attention::Observer obs(opt);  // refuses T < 1 and eps outside (0, 1) before anything is loaded

    // Outputs first: a path that cannot be written fails now, not after the run.
    std::error_code ec;
    std::filesystem::create_directories(out, ec);
    if (ec || !std::filesystem::is_directory(out, ec)) throw IoError(out + ": cannot create the output directory");
    std::ofstream layers_csv = open_output(std::filesystem::path(out) / "attention_layers.csv");
    std::ofstream rows_csv = open_output(std::filesystem::path(out) / "attention_rows.csv");
    std::ofstream defs_txt = open_output(std::filesystem::path(out) / "definitions.txt");

    ModelWeights w = src.load(rp, rs);
    const ModelConfig& c = w.config;
    if (k < 0) k = w.split_layer >= 0 ? w.split_layer : c.n_layers;
    // The paper measures the plain (Finetune) model, which has no registers: a dense run drops the random ones
    // unless asked for (registers a checkpoint brings stay).
    const bool random_registers = src.path.empty() || src.description().ends_with("(+ random registers)");
    if (k >= c.n_layers && random_registers && !app.count("--prefix-registers") && !app.count("--suffix-registers"))
      w.registers = RegisterWeights{Matrix(0, c.dim), Matrix(0, c.dim)};
    const ItemVocab vocab(c.vocab_size - kCodeLevels * kCodesPerLevel);
    std::optional<Llama2cTokenizer> tok;
    if (!tokenizer.empty()) tok.emplace(tokenizer);
    const PromptBuilder pb = tok ? PromptBuilder::text(*tok, vocab) : PromptBuilder::code_tokens(vocab);
    const Dataset ds = Dataset::load(data, data_opt);
    const std::vector<const Case*> cases =
        cases_with_targets(ds, split == "test" ? DataSplit::kTest : DataSplit::kValid, users);

    const EarnSchedule schedule{k};
    const Engine<EarnSchedule> engine(w, schedule);
    const int max_prompt = pb.length(ds.history_len());
    batch = static_cast<int>(std::clamp<std::size_t>(cases.size(), 1, static_cast<std::size_t>(batch)));
    examples::check_fits_memory(double(batch) * (max_prompt + w.registers.count()) *
                                    (double(c.n_layers) * c.kv_dim() * 2 + c.dim * 8.0) * sizeof(float),
                                "--batch " + std::to_string(batch));
    auto st = engine.make_state({.max_users = batch, .max_rows = batch, .max_prompt = max_prompt, .max_new_tokens = 1});
    st.observe(&obs);

    std::cout << "model:   " << src.description() << ", " << c.n_layers << " layers, " << c.n_heads << " heads ("
              << c.n_kv_heads << " KV), d " << c.dim << "\n";
    if (src.path.empty())
      std::cout << "         (random weights: these numbers describe an untrained model, not the paper's claims)\n";
    std::cout << "data:    " << data << ", split " << split << ", " << cases.size() << " users, prompts of up to "
              << max_prompt << " tokens (" << (tok ? "LC-Rec text" : "code template") << ")\n"
              << "layout:  k = " << k << " of " << c.n_layers << (k >= c.n_layers ? " (dense)" : " (EARN)")
              << ", registers " << w.registers.prefix.rows() << " + " << w.registers.suffix.rows() << "\n\n";
    const std::string defs = definitions(opt, rows_text);
    std::cout << defs << "\n";
    defs_txt << defs;

    std::vector<int> slots(batch);
    for (int i = 0; i < batch; ++i) slots[i] = i;
    for (std::size_t b = 0; b < cases.size(); b += std::size_t(batch)) {
      const std::size_t n = std::min(cases.size() - b, std::size_t(batch));
      std::vector<std::vector<int>> prompts;
      for (std::size_t i = 0; i < n; ++i) prompts.push_back(pb.build(ds.catalogue(), cases[b + i]->history));
      engine.prefill_batch(st, std::span<const int>(slots.data(), n), prompts);
    }

    layers_csv << std::setprecision(10) << "layer,policy,head,density,head_mass,tail_mass,entropy,samples,rows\n";
    std::printf("%5s %-14s %15s %15s %15s %15s\n", "layer", "policy", "density", "head mass", "tail mass",
                "entropy");
    std::vector<double> layer_density(c.n_layers);
    for (int l = 0; l < c.n_layers; ++l) {
      const char* policy = schedule.visit(l, [&]<class L>(L) { return L::policy::name; });
      std::vector<double> d, hm, tm, en;
      for (int h = 0; h < c.n_heads; ++h) {
        const attention::HeadStats& s = obs.stats(l, h);
        const attention::RowStats m = s.mean();
        layers_csv << l << "," << policy << "," << h << "," << m.density << "," << m.head_mass << "," << m.tail_mass
                   << "," << m.entropy << "," << s.samples << "," << s.rows << "\n";
        if (!s.samples) continue;
        d.push_back(m.density);
        hm.push_back(m.head_mass);
        tm.push_back(m.tail_mass);
        en.push_back(m.entropy);
      }
      const MeanSd a = mean_sd(d), b = mean_sd(hm), t = mean_sd(tm), e = mean_sd(en);
      layer_density[l] = a.mean;
      std::printf("%5d %-14s %7.4f +-%5.4f %7.4f +-%5.4f %7.4f +-%5.4f %7.3f +-%5.3f\n", l, policy, a.mean, a.sd, b.mean,
                  b.sd, t.mean, t.sd, e.mean, e.sd);
    }
    const int half = c.n_layers / 2;
    if (half > 0) {
      const double early = mean_sd({layer_density.begin(), layer_density.begin() + half}).mean;
      const double late = mean_sd({layer_density.begin() + half, layer_density.end()}).mean;
      std::printf("\ndensity, layers 0..%d: %.4f; layers %d..%d: %.4f (sparsity inversion: the first is larger)\n",
                  half - 1, early, half, c.n_layers - 1, late);
    }

    rows_csv << std::setprecision(9) << "sample,user,layer,head,q_pos,q_kind,k_pos,k_kind,p\n";
    const auto recorded = obs.recorded();
    for (const auto& r : recorded)
      for (std::size_t j = 0; j < r.p.size(); ++j)
        rows_csv << r.sample << "," << cases[std::size_t(r.sample)]->user << "," << r.layer << "," << r.head << ","
                 << r.q_pos << "," << row_kind_name(r.q_kind) << "," << r.k_pos[j] << ","
                 << row_kind_name(r.k_kind[j]) << "," << r.p[j] << "\n";
    for (std::ofstream* f : {&layers_csv, &rows_csv, &defs_txt}) {
      f->close();
      if (!*f) throw IoError(out + ": write failed");
    }
    std::cout << "\nwrote " << out << "/attention_layers.csv (" << c.n_layers * c.n_heads << " rows), " << out
              << "/attention_rows.csv (" << recorded.size() << " query rows of " << std::min<int>(obs.samples(),
              opt.record_samples ? opt.record_samples : obs.samples()) << " prompts), " << out
              << "/definitions.txt; figures: python3 tools/plot_attention.py " << out << "\n";
  } catch (const Error& e) {
    std::cerr << "analyze: " << e.what() << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "analyze: out of memory\n";
    return 1;
  }
  return 0;
}
