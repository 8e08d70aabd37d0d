// earn/generate/generate.hpp - autoregressive generation of one sequence with any engine.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <span>
#include <vector>

#include "earn/generate/sampler.hpp"
#include "earn/model/engine_fwd.hpp"

namespace earn {

/// Wall-clock split of one `generate` call (sampling included in each phase).
struct GenerateTimings {
  double prefill_seconds = 0;  ///< state setup excluded: the prefill of the prompt and the first sample
  int prompt_tokens = 0;
  double decode_seconds = 0;  ///< every decode step and its sample
  int decode_steps = 0;
};

/// Options of `generate`.
struct GenerateOptions {
  int max_new_tokens = 64;
  float temperature = 0.0f;  ///< 0: greedy
  float top_p = 1.0f;
  std::uint64_t seed = 42;
  int stop_token = -1;  ///< stop after producing this token (not included in the output); -1: never
  /// More stop tokens (Hugging Face models may name several EOS ids: ModelConfig::eos_token_ids).
  std::vector<int> stop_tokens = {};
  GenerateTimings* timings = nullptr;  ///< when set, receives the prefill / decode split
};

/// Prefill `prompt`, then decode one token at a time. Returns the generated tokens only.
/// \code
///   std::vector<int> out = earn::generate(engine, prompt, {.max_new_tokens = 200, .stop_token = 1});
/// \endcode
template <class EngineT>
std::vector<int> generate(const EngineT& engine, std::span<const int> prompt, const GenerateOptions& opt) {
  Sampler sample(opt.temperature, opt.top_p, opt.seed);
  // The last token is returned, never fed, so N new tokens need N - 1 cache rows: prompt + N may fill the whole
  // context, as llama2.c's run.c allows (steps = seq_len).
  auto st = engine.make_state(
      StateOptions{1, 1, static_cast<int>(prompt.size()), std::max(opt.max_new_tokens - 1, 0)});
  std::vector<int> out;
  if (opt.max_new_tokens <= 0) return out;
  using clock = std::chrono::steady_clock;
  const auto t0 = clock::now();
  int next = sample(engine.prefill(st, 0, prompt));
  const auto t1 = clock::now();
  const int row_user[1] = {0};
  st.set_rows(row_user);
  int steps = 0;
  const auto stops = [&](int t) {
    return t == opt.stop_token || std::find(opt.stop_tokens.begin(), opt.stop_tokens.end(), t) != opt.stop_tokens.end();
  };
  while (true) {
    if (stops(next)) break;
    out.push_back(next);
    if (static_cast<int>(out.size()) == opt.max_new_tokens) break;
    const int tok[1] = {next};
    next = sample(engine.decode(st, tok).row(0));
    ++steps;
  }
  if (opt.timings) {
    *opt.timings = {std::chrono::duration<double>(t1 - t0).count(), static_cast<int>(prompt.size()),
                    std::chrono::duration<double>(clock::now() - t1).count(), steps};
  }
  return out;
}

}  // namespace earn
