// generate: text (or token) generation with the dense CPU engine, printing prefill and decode tokens/s apart.
//
// Loads stories260K from ../shared/data/llama2c when present (the real pretrained llama2.c model and its
// tokenizer), else a built-in deterministic random model whose output is printed as token ids. A --model or
// --tokenizer that is named but cannot be loaded is an error (exit 1), never a silent fallback.
//   generate --steps 256                      greedy, as llama2.c's run.c with -t 0
//   generate --temperature 0.8 --top-p 0.9 --seed 3 --prompt "Once upon a time"
//   generate --model stories15M.bin --tokenizer tokenizer.bin --threads 2 --steps 200 --repeat 3
// Timing: one untimed warm-up generation of a few tokens first (OpenMP's threads start, caches fill), then the
// prefill (prompt tokens / s) and the decode steps (tokens / s) are timed apart; --repeat N reports medians of N.
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <optional>

#include "earn/earn.hpp"
#include "earn/io/llama2c.hpp"
#include "earn/tokenizer/llama2c.hpp"
#include "model_source.hpp"
#ifdef _OPENMP
#include <omp.h>
#endif

using namespace earn;

int main(int argc, char** argv) {
  CLI::App app{"Generate text with earn's CPU engine"};
  std::string model_path = std::string(EARN_SHARED_DATA_DIR) + "/llama2c/stories260K.bin";
  std::string tokenizer_path = std::string(EARN_SHARED_DATA_DIR) + "/llama2c/tok512.bin";
  std::string prompt;
  int steps = 256;
  float temperature = 0.0f, top_p = 0.9f;
  std::uint64_t seed = 42;
  int threads = 0, repeat = 1;
  auto* model_opt = app.add_option("--model", model_path, "llama2.c checkpoint (default: stories260K from ../shared/data)");
  auto* tokenizer_opt = app.add_option("--tokenizer", tokenizer_path, "llama2.c tokenizer of the model");
  app.add_option("--prompt", prompt, "prompt text (empty: start from BOS)");
  app.add_option("--steps", steps, "forward passes, as run.c's -n")->check(CLI::PositiveNumber);
  app.add_option("--temperature", temperature, "0: greedy")->check(CLI::NonNegativeNumber);
  app.add_option("--top-p", top_p, "nucleus sampling mass")->check(CLI::Range(0.0f, 1.0f));
  app.add_option("--seed", seed, "sampling seed");
  app.add_option("--threads", threads, "OpenMP threads (0: OMP_NUM_THREADS or all cores)")->check(CLI::Range(0, 1024));
  app.add_option("--repeat", repeat, "timed generations; medians are reported")->check(CLI::Range(1, 1000));
  CLI11_PARSE(app, argc, argv);
#ifdef _OPENMP
  if (threads > 0) omp_set_num_threads(threads);
  const int used_threads = omp_get_max_threads();
#else
  if (threads > 1) {
    std::fprintf(stderr, "error: --threads %d: this build has no OpenMP\n", threads);
    return 1;
  }
  const int used_threads = 1;
#endif

  try {
    ModelWeights w;
    std::optional<Llama2cTokenizer> tok;
    // A path the user names must load (a typo is an error, never a random model); only the default data may be
    // absent, and then the built-in random model stands in.
    if (model_opt->count() > 0 || io::detail::exists_nothrow(model_path)) {
      w = io::load_llama2c(model_path);
      if (tokenizer_opt->count() > 0 || io::detail::exists_nothrow(tokenizer_path))
        tok.emplace(tokenizer_path, w.config.vocab_size);
      std::printf("model: %s (%.2fM parameters)\n", model_path.c_str(), w.parameter_count() / 1e6);
    } else {
      if (tokenizer_opt->count() > 0)
        throw ConfigError("--tokenizer needs its model (--model): the default model " + model_path + " is absent");
      ModelConfig c = examples::cpu_sized_llama();
      w = random_weights(c, {.seed = seed, .scale = 2.0f, .prefix_registers = 0, .suffix_registers = 0});
      std::printf("model: %s not found; built-in random model (%.1fM parameters), output as token ids\n",
                  model_path.c_str(), w.parameter_count() / 1e6);
    }
    if (!tok && !prompt.empty()) throw ConfigError("--prompt needs a tokenizer (--tokenizer) to encode it");
    Engine<DenseSchedule> engine(w);
    std::vector<int> ids = tok ? tok->encode(prompt, /*bos=*/true, /*eos=*/false) : std::vector<int>{1};
    const int context = w.config.max_seq_len;
    if (static_cast<Index>(ids.size()) > context)
      throw ConfigError("the prompt is " + std::to_string(ids.size()) + " tokens, more than the model's context of " +
                        std::to_string(context));
    // run.c's steps count positions: the prompt's tokens and the generated ones together; the last generated
    // token is printed, never fed, so steps = context fills the context exactly.
    const int new_tokens = std::max(0, std::min(steps, context) - int(ids.size()) + 1);
    GenerateOptions opt{.max_new_tokens = new_tokens, .temperature = temperature, .top_p = top_p, .seed = seed,
                        .stop_token = tok ? Llama2cTokenizer::kBos : -1};
    {  // warm-up, untimed: a few tokens through the same path
      GenerateOptions warm = opt;
      warm.max_new_tokens = std::min(new_tokens, 4);
      (void)generate(engine, ids, warm);
    }
    std::vector<int> out;
    std::vector<double> prefill_s, decode_s;
    GenerateTimings t;
    opt.timings = &t;
    for (int r = 0; r < repeat; ++r) {
      out = generate(engine, ids, opt);
      prefill_s.push_back(t.prefill_seconds);
      decode_s.push_back(t.decode_seconds);
    }
    const auto median = [](std::vector<double> v) {
      std::sort(v.begin(), v.end());
      return v[v.size() / 2];
    };
    if (tok) {
      std::printf("%s%s\n", tok->decode(ids).c_str(), tok->decode(out, ids.back()).c_str());
    } else {
      for (int x : out) std::printf("%d ", x);
      std::printf("\n");
    }
    const double ps = median(prefill_s), ds = median(decode_s);
    std::printf("prefill: %d tokens in %.2f ms, %.1f tokens/s; decode: %d steps in %.3f s, %.1f tokens/s (%d threads, "
                "median of %d, warm-up excluded)\n",
                t.prompt_tokens, ps * 1e3, t.prompt_tokens / ps, t.decode_steps, ds,
                t.decode_steps > 0 ? t.decode_steps / ds : 0.0, used_threads, repeat);
    std::printf("achieved tok/s: %.1f (%zu tokens in %.3f s, prefill included)\n", out.size() / (ps + ds), out.size(),
                ps + ds);
  } catch (const earn::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  } catch (const std::bad_alloc&) {
    std::fprintf(stderr, "error: out of memory\n");
    return 1;
  }
  return 0;
}
