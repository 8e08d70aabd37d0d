// examples/train.cpp - train a generative recommender with EARN register tokens (or the dense Finetune baseline) on
// an LC-Rec data set, validate with the trie-constrained beam search, keep the best checkpoint, then test it.
//
// --schedule gist trains the paper's Gist baseline instead (attention/gist.hpp: every layer computes the prompt,
// answer rows see only the registers, the cache keeps only the registers' rows).
//
// Shows: train::init_model / extend_vocab (from scratch on code tokens, or an existing Hugging Face / llama2.c /
// earn checkpoint given rows for the code tokens and the registers), train::Trainer over train::CpuStep (this
// program) or train::CudaStep (the same source built by nvcc as train_cuda, --device cuda), rec::evaluate for the
// validation (NDCG@10 picks the best checkpoint, patience stops early) and the final test metrics, the CSV log and a
// learning-curve SVG. The checkpoint directory loads in examples/evaluate (--model <out>/checkpoints/step-...).
//
//   train --out runs/tiny                                   # a tiny EARN model on Beauty, a few minutes on a CPU
//   train_cuda --device cuda --preset small --epochs 10 --out runs/small-earn-k2   # on a GPU
#include <CLI/CLI.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/earn.hpp"
#include "earn/rec/evaluate.hpp"
#include "earn/train/checkpoint.hpp"
#include "earn/train/cpu_step.hpp"
#include "earn/train/data.hpp"
#include "earn/train/init.hpp"
#include "earn/train/trainer.hpp"
#include "svg_plot.hpp"
#ifdef EARN_TRAIN_CUDA
#include "earn/backend/cuda/beam_search.cuh"
#include "earn/backend/cuda/train_step.cuh"
#include "earn/cuda.cuh"
#endif

namespace {

namespace tr = earn::train;
namespace rec = earn::rec;
using earn::ConfigError;
using earn::DenseSchedule;
using earn::EarnSchedule;
using earn::GistSchedule;
using earn::ModelConfig;
using earn::press_schedule;
namespace kv = earn::kv;
using earn::ModelWeights;

// Built-in shapes of a from-scratch recommendation model on the code-token vocabulary (4 + 1024 ids).
ModelConfig preset(const std::string& name) {
  ModelConfig c;
  c.vocab_size = rec::ItemVocab(rec::CodeTemplate::kBaseVocab).size();
  c.max_seq_len = 256;
  c.tied_embeddings = false;
  if (name == "tiny") {
    c.dim = 64, c.hidden_dim = 176, c.n_layers = 4, c.n_heads = 4;
  } else if (name == "small") {
    c.dim = 512, c.hidden_dim = 1408, c.n_layers = 8, c.n_heads = 8;
  } else if (name == "medium") {
    c.dim = 768, c.hidden_dim = 2048, c.n_layers = 12, c.n_heads = 12;
  } else {  // large
    c.dim = 1024, c.hidden_dim = 2816, c.n_layers = 24, c.n_heads = 16;
  }
  c.n_kv_heads = c.n_heads;
  return c;
}

struct Args {
  std::string data = std::string(EARN_SHARED_DATA_DIR) + "/amazon-beauty", codes, init, preset = "tiny", schedule = "earn";
#ifdef EARN_TRAIN_CUDA
  std::string out = "runs/train", device = "cuda", dtype = "bf16", tokenizer;  // train_cuda runs on the GPU only
#else
  std::string out = "runs/train", device = "cpu", dtype = "bf16", tokenizer;
#endif
  int k = -1, rp = 1, rs = 1, batch = 128, micro_batch = 0, eval_every = 0, patience = 0, eval_users = 0, beam = 20;
  int eval_batch = 32, dim = 0, layers = 0, heads = 0, hidden = 0;
  double epochs = 1, lr = 1e-3, warmup = 0.02, weight_decay = 0.01, grad_clip = 1.0;
  long long steps = 0;
  std::uint64_t seed = 0;
  bool no_resume = false, no_test = false, registers_only = false;
  std::vector<std::string> test_presses;  // baselines tested on the best checkpoint (dense schedule)
  int press_k = -1, press_registers = 2;   // the EARN setting whose KV the baselines match (k default L/4)
};

// The CPU backend: the host step and the host beam search over the CPU engine.
struct CpuBackend {
  template <class S>
  static tr::CpuStep<S> make_step(const ModelWeights& w, S s, const tr::AdamWOptions& o, const Args&) {
    return tr::CpuStep<S>(w, s, o);
  }
  template <class S>
  static rec::EvalResult evaluate(const ModelWeights& w, S s, const rec::CodeTrie& trie, const rec::Dataset& ds,
                                  const rec::PromptBuilder& pb, std::span<const rec::Case* const> cases,
                                  const Args& a, double history_share = 1.0) {
    const earn::Engine<S> engine(w, s);
    rec::BeamSearch search(engine, trie, {.beam = a.beam}, a.eval_batch, pb.length(ds.history_len()));
    return rec::evaluate(search, ds, pb, cases, {.batch = a.eval_batch, .history_share = history_share});
  }
};

#ifdef EARN_TRAIN_CUDA
// The CUDA backend: the GPU step (bf16 or fp32 GEMM operands) and the device beam search over the bf16 engine.
template <class DType>
struct CudaBackend {
  template <class S>
  static tr::CudaStep<S, DType> make_step(const ModelWeights& w, S s, const tr::AdamWOptions& o, const Args&) {
    return tr::CudaStep<S, DType>(w, s, o);
  }
  template <class S>
  static rec::EvalResult evaluate(const ModelWeights& w, S s, const rec::CodeTrie& trie, const rec::Dataset& ds,
                                  const rec::PromptBuilder& pb, std::span<const rec::Case* const> cases,
                                  const Args& a, double history_share = 1.0) {
    const earn::Engine<S, earn::CudaBf16> engine(w, s);
    earn::cuda::DeviceBeamSearch search(engine, trie, {.beam = a.beam}, a.eval_batch, pb.length(ds.history_len()),
                                        /*batched_prefill=*/true);
    return rec::evaluate(search, ds, pb, cases, {.batch = a.eval_batch, .history_share = history_share});
  }
};
#endif

nlohmann::json metrics_json(const rec::MetricAccumulator& m) {
  nlohmann::json j;
  for (int k : m.ks()) {
    j["recall@" + std::to_string(k)] = m.recall(k);
    j["ndcg@" + std::to_string(k)] = m.ndcg(k);
  }
  j["users"] = m.users();
  return j;
}

// The schedule a run trains: EARN at split layer k (k = L: dense), or Gist.
template <class S>
S make_schedule(int k) {
  if constexpr (std::is_same_v<S, GistSchedule>)
    return GistSchedule{};
  else
    return EarnSchedule{k};
}

template <class Backend, class Schedule>
int run(const Args& a) {
  constexpr bool gist = std::is_same_v<Schedule, GistSchedule>;
  namespace fs = std::filesystem;
  rec::DatasetOptions dopt;
  if (!a.codes.empty()) dopt.codes_file = a.codes;
  const rec::Dataset ds = rec::Dataset::load(a.data, dopt);
  const rec::DatasetCounts dc = ds.counts();
  std::cout << "data:     " << a.data << ": " << dc.users << " users, " << dc.items << " items, " << dc.identifiers
            << " identifiers, " << dc.train_samples << " training samples, " << dc.valid_cases << " validation cases, "
            << dc.test_users_with_targets << " test users\n";

  // The model: from scratch, or a checkpoint (an earn code-token model as it is; any other gets code-token rows).
  ModelWeights w;
  std::optional<earn::Llama2cTokenizer> tok;
  const bool dense = a.schedule == "dense";
  if (!a.test_presses.empty() && (!dense || a.no_test))
    throw ConfigError("--test-presses tests the inference-time baselines on the dense (Finetune) model's best "
                      "checkpoint: use it with --schedule dense and without --no-test");
  const int rp = dense ? 0 : a.rp, rs = dense ? 0 : a.rs;
  if (a.init.empty()) {
    ModelConfig c = preset(a.preset);
    if (a.dim) c.dim = a.dim;
    if (a.layers) c.n_layers = a.layers;
    if (a.heads) c.n_heads = c.n_kv_heads = a.heads;
    if (a.hidden) c.hidden_dim = a.hidden;
    w = tr::init_model(c, {.seed = a.seed, .prefix_registers = rp, .suffix_registers = rs});
  } else {
    const ModelWeights base = fs::is_directory(a.init) ? earn::io::load_hf(a.init) : earn::io::load_llama2c(a.init);
    const bool code_model = base.config.vocab_size == rec::ItemVocab(rec::CodeTemplate::kBaseVocab).size();
    w = code_model && base.registers.prefix.rows() == rp && base.registers.suffix.rows() == rs
            ? base
            : code_model ? [&] {
                ModelWeights x = base;
                const ModelWeights r = tr::init_model(base.config, {.seed = a.seed, .prefix_registers = rp,
                                                                    .suffix_registers = rs});
                x.registers = r.registers;
                return x;
              }()
                         : tr::extend_vocab(base, rp, rs, a.seed);
    if (!a.tokenizer.empty()) tok.emplace(a.tokenizer);
  }
  const ModelConfig& c = w.config;
  const int k = gist ? 0 : dense ? c.n_layers : (a.k < 0 ? c.n_layers / 4 : a.k);
  const Schedule schedule = make_schedule<Schedule>(k);
  w.split_layer = gist ? -1 : k;
  w.trained_schedule = gist ? "gist" : "";  // saved with every checkpoint: evaluate then serves it as Gist
  const rec::ItemVocab vocab(c.vocab_size - rec::kCodeLevels * rec::kCodesPerLevel);
  const rec::PromptBuilder pb = tok ? rec::PromptBuilder::text(*tok, vocab) : rec::PromptBuilder::code_tokens(vocab);
  const rec::CodeTrie trie(ds.catalogue(), vocab);
  std::cout << "model:    d " << c.dim << ", " << c.n_layers << " layers, " << c.n_heads << " heads, FFN "
            << c.hidden_dim << ", vocab " << c.vocab_size << ", " << w.parameter_count() / 1e6 << "M parameters, "
            << (a.init.empty() ? "from scratch (seed " + std::to_string(a.seed) + ")" : "from " + a.init) << "\n";
  std::cout << "schedule: " << (gist ? "Gist (answer rows see the registers only, from layer 0), "
                                : dense ? "dense (Finetune), " : "EARN, k = " + std::to_string(k) + " of ")
            << c.n_layers << " layers, registers " << rp << " + " << rs << ", device " << a.device << "\n";

  const std::vector<tr::Example> examples = tr::make_examples(ds, pb, rec::DataSplit::kTrain);
  const auto valid = rec::cases_with_targets(ds, rec::DataSplit::kValid, a.eval_users);
  tr::AdamWOptions ao;
  ao.weight_decay = a.weight_decay;
  ao.max_grad_norm = a.grad_clip;
  ao.freeze.all_but_registers = a.registers_only;
  auto step = Backend::make_step(w, schedule, ao, a);
  tr::Evaluator validate = [&](const ModelWeights& cur) {
    const rec::EvalResult r = Backend::evaluate(cur, schedule, trie, ds, pb, valid, a);
    return tr::Evaluation{r.metrics.ndcg(10), metrics_json(r.metrics)};
  };
  tr::TrainOptions to;
  to.batch = a.batch;
  to.micro_batch = a.micro_batch;
  to.epochs = a.epochs;
  to.max_steps = a.steps;
  to.lr = a.lr;
  to.warmup_ratio = a.warmup;
  to.seed = a.seed;
  to.eval_every = a.eval_every;
  to.patience = a.patience;
  to.out = a.out;
  to.resume = !a.no_resume;
  tr::Trainer trainer(step, examples, to, validate);
  std::cout << "training: " << examples.size() << " examples, batch " << a.batch << ", " << trainer.total_steps()
            << " steps, lr " << a.lr << " (warm-up " << a.warmup << ", cosine), validation on " << valid.size()
            << " users every " << (a.eval_every ? std::to_string(a.eval_every) + " steps" : std::string("epoch"))
            << " (NDCG@10)" << std::endl;
  const tr::TrainSummary s = trainer.run();
  if (s.resumed_from) std::cout << "resumed from step " << s.resumed_from << "\n";
  std::cout << "done:     " << s.steps << " steps" << (s.stopped_early ? " (stopped early)" : "");
  if (s.best_metric) std::cout << ", best validation NDCG@10 " << *s.best_metric << " at step " << s.best_step;
  std::cout << "\n";

  // The learning curve from the whole log (resumed runs included).
  std::vector<double> xs, loss, metric_x, metric;
  {
    std::ifstream in(fs::path(a.out) / "train_log.csv");
    std::string line;
    std::getline(in, line);
    while (std::getline(in, line)) {
      std::stringstream ss(line);
      std::vector<std::string> f;
      for (std::string x; std::getline(ss, x, ',');) f.push_back(x);
      if (f.size() < 3) continue;
      xs.push_back(std::stod(f[0]));
      loss.push_back(std::stod(f[2]));
      metric.push_back(f.size() > 8 && !f[8].empty() ? std::stod(f[8]) : (metric.empty() ? 0.0 : metric.back()));
    }
  }
  const std::string svg = (fs::path(a.out) / "learning_curve.svg").string();
  std::ofstream svg_out(svg);
  if (!svg_out) throw earn::IoError(svg + ": cannot open for writing");
  earn::examples::write_svg_chart(svg_out, svg, "training loss and validation NDCG@10", "optimizer step", "loss",
                                  "NDCG@10", xs,
                                  {{"train loss", loss, "#1f77b4", false}, {"valid NDCG@10", metric, "#d62728", true}});

  // Test the best checkpoint (the last one without validation).
  nlohmann::json result = {{"schedule", a.schedule}, {"k", k}, {"layers", c.n_layers},
                           {"registers", {rp, rs}}, {"params", w.parameter_count()}, {"steps", s.steps},
                           {"best_step", s.best_step}, {"seed", a.seed}, {"lr", a.lr}, {"batch", a.batch}};
  if (s.best_metric) result["best_valid_ndcg@10"] = *s.best_metric;
  if (!a.no_test) {
    tr::CheckpointRun run(fs::path(a.out) / "checkpoints");
    const ModelWeights best = (run.best() ? run.load_best() : run.load_latest()).weights;
    const auto test = rec::cases_with_targets(ds, rec::DataSplit::kTest);
    const rec::EvalResult r = Backend::evaluate(best, schedule, trie, ds, pb, test, a);
    std::printf("test (%d users, checkpoint %s):\n%6s %10s %10s\n", r.metrics.users(),
                (run.best() ? run.best() : run.latest())->filename().string().c_str(), "K", "Recall@K", "NDCG@K");
    for (int kk : r.metrics.ks()) std::printf("%6d %10.4f %10.4f\n", kk, r.metrics.recall(kk), r.metrics.ndcg(kk));
    result["test"] = metrics_json(r.metrics);
    result["test_seconds"] = r.seconds;
    // The inference-time baselines on the same checkpoint, at the KV of EARN's (press_k, press_registers) setting.
    const int pk = a.press_k >= 0 ? a.press_k : c.n_layers / 4;
    if (!a.test_presses.empty()) {
      const kv::Budget budget = kv::Budget::matching_earn(pk, c.n_layers, a.press_registers);
      result["press_match"] = {{"k", pk}, {"registers", a.press_registers}, {"ratio", budget.ratio},
                               {"rows", budget.rows}};
    }
    for (const std::string& name : a.test_presses) {
      const kv::Budget budget = kv::Budget::matching_earn(pk, c.n_layers, a.press_registers);
      const rec::EvalResult pr =
          name == "truncate" ? Backend::evaluate(best, DenseSchedule{}, trie, ds, pb, test, a, budget.ratio)
                             : kv::visit_press(name, budget, [&](const auto& press) {
                                 return Backend::evaluate(best, press_schedule(press), trie, ds, pb, test, a);
                               });
      std::printf("test under %s (KV of EARN k = %d, %d registers): R@10 %.4f N@10 %.4f\n", name.c_str(), pk,
                  a.press_registers, pr.metrics.recall(10), pr.metrics.ndcg(10));
      result["test_press"][name] = metrics_json(pr.metrics);
    }
  }
  std::ofstream(fs::path(a.out) / "result.json") << result.dump(1) << "\n";
  std::cout << "wrote " << (fs::path(a.out) / "train_log.csv").string() << ", learning_curve.svg, result.json\n";
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Train an EARN (or dense Finetune) generative recommender on an LC-Rec data set"};
  Args a;
  app.add_option("--data", a.data, "data set directory (sequential_*.txt and the codes JSON)");
  app.add_option("--codes", a.codes, "codes JSON file name inside --data (default: Beauty's)");
  app.add_option("--init", a.init, "start from a checkpoint: Hugging Face / earn directory or llama2.c .bin");
  app.add_option("--tokenizer", a.tokenizer, "llama2.c tokenizer of --init: LC-Rec instruction text as prompt");
  app.add_option("--preset", a.preset, "from-scratch shape: tiny, small (~27M), medium, large (~300M)")
      ->check(CLI::IsMember({"tiny", "small", "medium", "large"}));
  app.add_option("--dim", a.dim, "override the preset's hidden size")->check(CLI::NonNegativeNumber);
  app.add_option("--layers", a.layers, "override the preset's layers")->check(CLI::NonNegativeNumber);
  app.add_option("--heads", a.heads, "override the preset's heads")->check(CLI::NonNegativeNumber);
  app.add_option("--hidden", a.hidden, "override the preset's FFN size")->check(CLI::NonNegativeNumber);
  app.add_option("--schedule", a.schedule, "earn, dense (Finetune: no registers) or gist (Gist-style compression)")
      ->check(CLI::IsMember({"earn", "dense", "gist"}));
  app.add_option("--k", a.k, "EARN split layer (default L/4)")->check(CLI::NonNegativeNumber);
  app.add_option("--prefix-registers", a.rp, "r_p")->check(CLI::Range(0, 64));
  app.add_option("--suffix-registers", a.rs, "r_s")->check(CLI::Range(0, 64));
  app.add_option("--epochs", a.epochs, "passes over the training samples")->check(CLI::PositiveNumber);
  app.add_option("--steps", a.steps, "optimizer steps (overrides --epochs)")->check(CLI::NonNegativeNumber);
  app.add_option("--lr", a.lr, "peak learning rate")->check(CLI::PositiveNumber);
  app.add_option("--warmup", a.warmup, "warm-up ratio of the cosine schedule")->check(CLI::Range(0.0, 1.0));
  app.add_option("--weight-decay", a.weight_decay, "AdamW weight decay (matrices, embeddings, head)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--grad-clip", a.grad_clip, "global gradient-norm clip (0: off)")->check(CLI::NonNegativeNumber);
  app.add_flag("--registers-only", a.registers_only, "train the register embeddings only");
  app.add_option("--batch", a.batch, "examples per optimizer step")->check(CLI::Range(1, 1 << 20));
  app.add_option("--micro-batch", a.micro_batch, "examples per forward/backward (0: the batch)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--seed", a.seed, "initialisation and data-order seed");
  app.add_option("--eval-every", a.eval_every, "validate every N steps (0: every epoch)")->check(CLI::NonNegativeNumber);
  app.add_option("--eval-users", a.eval_users, "validate on the first N validation users (0: all)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--eval-batch", a.eval_batch, "users per beam-search call")->check(CLI::Range(1, 1024));
  app.add_option("--beam", a.beam, "beam width")->check(CLI::Range(1, 64));
  app.add_option("--patience", a.patience, "stop after N validations without improvement (0: never)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--out", a.out, "run directory (checkpoints, log, curve, result)");
  app.add_flag("--no-resume", a.no_resume, "start fresh even if --out holds a checkpoint");
  app.add_flag("--no-test", a.no_test, "skip the final test evaluation");
  app.add_option("--test-presses", a.test_presses,
                 "also test the best checkpoint under these inference-time baselines (a dense model): streaming_llm, "
                 "snapkv, h2o, pyramidkv, truncate (the last share k / L of each history's items)")
      ->check(CLI::IsMember({"streaming_llm", "snapkv", "h2o", "pyramidkv", "truncate"}))
      ->delimiter(',');
  app.add_option("--press-k", a.press_k, "the baselines keep the KV of EARN at this split layer (default L/4)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--press-registers", a.press_registers, "... with this many registers (default 2: 1 + 1)")
      ->check(CLI::Range(0, 64));
  app.add_option("--device", a.device, "cpu (the train build), or cuda (the train_cuda build)")
      ->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--dtype", a.dtype, "CUDA GEMM operands: bf16 or f32")->check(CLI::IsMember({"bf16", "f32"}));
  CLI11_PARSE(app, argc, argv);
  try {
#ifdef EARN_TRAIN_CUDA
    // The GPU build runs the GPU trainer only: its host side would otherwise compile the whole CPU trainer (every
    // schedule's step and engine) a second time, for what the train program already does.
    if (a.device != "cuda")
      throw earn::ConfigError("train_cuda trains on the GPU (--device cuda); the CPU trainer is the train program");
    // Gist trains with bf16 operands on the GPU (one more instantiation of the step per dtype is not worth its
    // build time; --dtype f32 is the check of the bf16 step, tests/cuda/test_cuda_train.cu covers Gist in fp32).
    if (a.schedule == "gist") {
      if (a.dtype == "f32") throw earn::ConfigError("--schedule gist trains with --dtype bf16 on the GPU");
      return run<CudaBackend<earn::dtype::Bf16>, GistSchedule>(a);
    }
    return a.dtype == "f32" ? run<CudaBackend<earn::dtype::F32>, EarnSchedule>(a)
                            : run<CudaBackend<earn::dtype::Bf16>, EarnSchedule>(a);
#else
    if (a.device == "cuda")
      throw earn::ConfigError("--device cuda needs the train_cuda program (built where nvcc is found)");
    return a.schedule == "gist" ? run<CpuBackend, GistSchedule>(a) : run<CpuBackend, EarnSchedule>(a);
#endif
  } catch (const earn::Error& e) {
    std::cerr << "\ntrain: " << e.what() << "\n";
    return 1;
  }
}
