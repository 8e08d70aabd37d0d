// evaluate: the generative-recommendation loop end to end. Loads an LC-Rec data set (Amazon Beauty by default),
// builds each user's prompt from the last 20 items, beam-searches 4 code tokens constrained by the item trie
// under EARN's split-layer schedule, and reports Recall@K / NDCG@K, users/s and the KV cache footprint.
//
//   evaluate                                       built-in random model: timings and KV are meaningful,
//                                                  the accuracy is chance level (it says so)
//   evaluate --k 2 --split valid --limit 500       EARN with split layer 2 on 500 validation users
//   evaluate --model ckpt.bin --tokenizer tok.bin  a checkpoint whose last 1024 ids are the code tokens
//   evaluate --csv out.csv --json out.json
//   evaluate --data dir --codes games.index.json   another data set in the same (AtSpeed / LC-Rec) layout
//
// Code tokens are ids base + level*256 + code with base = vocab - 1024 (earn/rec/item_vocab.hpp). With --tokenizer
// the prompt is the LC-Rec instruction text; otherwise the fixed template ids 0..3 of a code-token model.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/earn.hpp"
#include "earn/rec/evaluate.hpp"
#include "earn/rec/rec.hpp"
#include "earn/tokenizer/llama2c.hpp"
#include "model_source.hpp"

using namespace earn;
using namespace earn::rec;

namespace {

// One-line progress bar on stderr, redrawn at most every 0.2 s.
class Progress {
 public:
  explicit Progress(std::int64_t total) : total_(total), start_(Clock::now()), last_(start_) {}
  void update(std::int64_t done, bool force = false) {
    const auto now = Clock::now();
    if (!force && std::chrono::duration<double>(now - last_).count() < 0.2) return;
    last_ = now;
    const double s = std::chrono::duration<double>(now - start_).count();
    const int width = 30, fill = total_ ? int(width * done / total_) : width;
    std::fprintf(stderr, "\r[%s%s] %lld/%lld users  %.1f users/s ", std::string(fill, '#').c_str(),
                 std::string(width - fill, ' ').c_str(), static_cast<long long>(done),
                 static_cast<long long>(total_), s > 0 ? done / s : 0.0);
    if (done == total_) std::fprintf(stderr, "\n");
  }

 private:
  using Clock = std::chrono::steady_clock;
  std::int64_t total_;
  Clock::time_point start_, last_;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Generative recommendation with EARN: Recall/NDCG, users/s and KV bytes on an LC-Rec data set"};
  examples::ModelSource src;
  src.add_options(app);
  std::string data = std::string(EARN_SHARED_DATA_DIR) + "/amazon-beauty", split = "test", tokenizer, csv, json_out;
  int k = -1, rp = 1, rs = 1, beam = 20, batch = 8, limit = 0, press_k = -1, press_regs = 2;
  std::string press;
  std::vector<int> ks{5, 10, 20};
  DatasetOptions data_opt;
  app.add_option("--data", data, "data set directory (sequential_*.txt and the codes JSON)");
  app.add_option("--codes", data_opt.codes_file, "the codes JSON file inside --data (item -> 4 code tokens)");
  app.add_option("--split", split, "valid or test")->check(CLI::IsMember({"valid", "test"}));
  app.add_option("--k", k, "EARN split layer (default: the one the checkpoint records, else L, the dense model)")
      ->check(CLI::Range(0, std::numeric_limits<int>::max()));
  app.add_option("--prefix-registers", rp, "r_p when the model has none of its own")->check(CLI::NonNegativeNumber);
  app.add_option("--suffix-registers", rs, "r_s when the model has none of its own")->check(CLI::NonNegativeNumber);
  app.add_option("--beam", beam, "beam width (also the number of recommendations)")->check(CLI::Range(1, 64));
  app.add_option("--batch", batch, "users per beam-search call")->check(CLI::PositiveNumber);
  app.add_option("--limit", limit, "evaluate the first N users with targets (0: all)")->check(CLI::NonNegativeNumber);
  app.add_option("--ks", ks, "cut-offs K of Recall@K and NDCG@K")->check(CLI::PositiveNumber);
  app.add_option("--tokenizer", tokenizer, "llama2.c tokenizer file: use the LC-Rec instruction text as prompt");
  app.add_option("--press", press,
                 "an inference-time baseline instead of EARN: the dense model with a KV press over every layer "
                 "(streaming_llm, snapkv, h2o, h2o_evict: H2O evicting during decode, pyramidkv) or each history "
                 "truncated to its last k / L items (truncate)")
      ->check(CLI::IsMember({"streaming_llm", "snapkv", "h2o", "h2o_evict", "pyramidkv", "truncate"}));
  app.add_option("--press-k", press_k, "--press keeps the KV of EARN at this split layer (default L/4)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--press-registers", press_regs, "... with this many registers (default 2)")->check(CLI::NonNegativeNumber);
  app.add_option("--csv", csv, "write the metric table as CSV");
  app.add_option("--json", json_out, "write metrics, speed and KV bytes as JSON");
  CLI11_PARSE(app, argc, argv);

  try {
    // Outputs are opened before the run: a path that cannot be written fails now, not after the evaluation.
    std::ofstream csv_file, json_file;
    auto open_output = [](std::ofstream& f, const std::string& path) {
      if (path.empty()) return;
      f.open(path);
      if (!f) throw IoError(path + ": cannot open for writing");
    };
    open_output(csv_file, csv);
    open_output(json_file, json_out);
    const ModelWeights w = src.load(rp, rs);
    const ModelConfig& c = w.config;
    // A Gist model (train --schedule gist records it) is served as it was trained; no other schedule applies.
    const bool gist = w.trained_schedule == "gist";
    if (gist && (k >= 0 || !press.empty()))
      throw ConfigError("this model was trained as Gist (its answer rows never saw the prompt): drop --k / --press");
    // The default, -1 (a negative --k is refused by its check): the split layer the model was trained with.
    if (k < 0) k = w.split_layer >= 0 ? w.split_layer : c.n_layers;
    const ItemVocab vocab(c.vocab_size - kCodeLevels * kCodesPerLevel);  // throws when the model is too small
    std::optional<Llama2cTokenizer> tok;
    if (!tokenizer.empty()) tok.emplace(tokenizer);
    const PromptBuilder pb = tok ? PromptBuilder::text(*tok, vocab) : PromptBuilder::code_tokens(vocab);

    auto t0 = std::chrono::steady_clock::now();
    const Dataset ds = Dataset::load(data, data_opt);
    const DatasetCounts counts = ds.counts();
    const CodeTrie trie(ds.catalogue(), vocab);
    const std::vector<const Case*> cases =
        cases_with_targets(ds, split == "test" ? DataSplit::kTest : DataSplit::kValid, limit);
    const double load_s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

    std::cout << "model:   " << src.description() << ", " << c.n_layers << " layers, d " << c.dim << ", vocab "
              << c.vocab_size << "\n";
    if (src.path.empty())
      std::cout << "         (random weights: recommendations are chance level; speed and KV bytes are real)\n";
    std::cout << "data:    " << data << " (codes " << data_opt.codes_file << "), loaded in " << load_s << " s\n"
              << "         " << counts.users << " users, " << counts.items << " items, " << counts.identifiers
              << " identifiers (distinct code tuples), " << counts.train_samples << " training samples, "
              << counts.valid_cases << " validation cases, " << counts.test_users_with_targets << " test users, "
              << counts.test_interactions << " test target items\n";
    std::cout << "split:   " << split << ", " << cases.size() << " users with targets"
              << (limit ? " (limited)" : "") << "\n";
    std::cout << (gist ? "Gist:    every layer dense over the prompt, the answer sees the registers only"
                       : "EARN:    k = " + std::to_string(k) + " of " + std::to_string(c.n_layers) +
                             (k == c.n_layers ? " (dense)" : ""))
              << ", registers "
              << w.registers.prefix.rows() << " + " << w.registers.suffix.rows() << ", beam " << beam << ", prompt "
              << (tok ? "LC-Rec text" : "code template") << " (" << pb.length(ds.history_len()) << " tokens at most)\n";

    // A batch larger than the users evaluated only reserves state nobody uses; the rest is checked against memory
    // (each user: the prompt's and the beams' KV rows, and the beams' logits).
    batch = static_cast<int>(std::clamp<std::size_t>(cases.size(), 1, static_cast<std::size_t>(batch)));
    const double user_rows = double(pb.length(ds.history_len())) + w.registers.count() + double(beam) * 3;
    examples::check_fits_memory(batch * (user_rows * c.n_layers * c.kv_dim() * 2 + double(beam) * c.vocab_size) *
                                    sizeof(float),
                                "--batch " + std::to_string(batch));
    // The search under one schedule (EARN's, or a baseline press over every layer); its results and counters.
    auto search_under = [&]<class S>(const S& schedule, double history_share) {
      const Engine<S> engine(w, schedule);
      BeamSearch search(engine, trie, {.beam = beam}, batch, pb.length(ds.history_len()));
      Progress bar(static_cast<std::int64_t>(cases.size()));
      EvalResult r = evaluate(search, ds, pb, cases, {.batch = batch, .ks = ks, .history_share = history_share},
                              [&](int done, int total) { bar.update(done, done == total); });
      return std::pair<EvalResult, BeamStats>{std::move(r), search.stats()};
    };
    std::pair<EvalResult, BeamStats> ran;
    if (gist) {
      ran = search_under(GistSchedule{}, 1.0);
    } else if (press.empty()) {
      ran = search_under(EarnSchedule{k}, 1.0);
    } else {
      const int mk = press_k >= 0 ? press_k : c.n_layers / 4;
      const kv::Budget b = kv::Budget::matching_earn(mk, c.n_layers, press_regs);
      if (press == "truncate")
        std::cout << "press:   truncate, each history to its last ceil(" << b.ratio << " x items) items (k = " << mk
                  << " of " << c.n_layers << "), the dense model\n";
      else
        std::cout << "press:   " << press << " over every layer, the KV of EARN k = " << mk << " with " << press_regs
                  << " registers (" << b.rows << " + " << b.ratio << " x rows a layer)\n";
      ran = press == "truncate"
                ? search_under(DenseSchedule{}, b.ratio)
                : kv::visit_press(press, b, [&](const auto& p) { return search_under(press_schedule(p), 1.0); });
    }
    const EvalResult& res = ran.first;
    const MetricAccumulator& acc = res.metrics;
    const double eval_s = res.seconds;
    const BeamStats& st = ran.second;
    const double users_per_s = eval_s > 0 ? acc.users() / eval_s : 0.0;

    std::printf("\n%6s %10s %10s\n", "K", "Recall@K", "NDCG@K");
    for (int kk : acc.ks()) std::printf("%6d %10.4f %10.4f\n", kk, acc.recall(kk), acc.ndcg(kk));
    std::printf("\nusers %d in %.2f s: %.2f users/s (prefill %.2f s, decode %.2f s, select %.2f s)\n", acc.users(),
                eval_s, users_per_s, st.prefill_s, st.decode_s, st.select_s);
    std::printf("KV cache: peak %.1f KiB for a batch of up to %d users (%.1f KiB per user)\n",
                st.peak_kv_bytes / 1024.0, batch, st.peak_kv_bytes / 1024.0 / std::max(1, std::min<int>(batch, acc.users())));

    if (!csv.empty()) {
      std::ofstream& out = csv_file;
      out << "K,recall,ndcg,users,split,k,layers\n";
      for (int kk : acc.ks())
        out << kk << "," << acc.recall(kk) << "," << acc.ndcg(kk) << "," << acc.users() << "," << split << "," << k
            << "," << c.n_layers << "\n";
      out.close();
      if (!out) throw IoError(csv + ": write failed");
    }
    if (!json_out.empty()) {
      nlohmann::json j;
      j["model"] = src.description();
      j["random_model"] = src.path.empty();
      j["data"] = data;
      j["split"] = split;
      if (!gist) j["split_layer"] = k;
      if (!press.empty()) j["press"] = press;
      if (gist) j["schedule"] = "gist";
      j["layers"] = c.n_layers;
      j["registers"] = {w.registers.prefix.rows(), w.registers.suffix.rows()};
      j["beam"] = beam;
      j["users"] = acc.users();
      for (int kk : acc.ks()) {
        j["recall"][std::to_string(kk)] = acc.recall(kk);
        j["ndcg"][std::to_string(kk)] = acc.ndcg(kk);
      }
      j["seconds"] = {{"total", eval_s}, {"prefill", st.prefill_s}, {"decode", st.decode_s}, {"select", st.select_s}};
      j["users_per_s"] = users_per_s;
      j["peak_kv_bytes"] = st.peak_kv_bytes;
      j["batch"] = batch;
      json_file << j.dump(2) << "\n";
      json_file.close();
      if (!json_file) throw IoError(json_out + ": write failed");
    }
  } catch (const Error& e) {
    std::cerr << "evaluate: " << e.what() << "\n";
    return 1;
  } catch (const std::bad_alloc&) {
    std::cerr << "evaluate: out of memory\n";
    return 1;
  }
  return 0;
}
