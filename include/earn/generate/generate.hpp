// earn/generate/generate.hpp - autoregressive generation of one sequence with any engine.
#pragma once

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "earn/generate/sampler.hpp"
#include "earn/model/engine_fwd.hpp"

namespace earn {

/// Options of `generate`.
struct GenerateOptions {
  int max_new_tokens = 64;
  float temperature = 0.0f;  ///< 0: greedy
  float top_p = 1.0f;
  std::uint64_t seed = 42;
  int stop_token = -1;  ///< stop after producing this token (not included in the output); -1: never
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
  int next = sample(engine.prefill(st, 0, prompt));
  const int row_user[1] = {0};
  st.set_rows(row_user);
  while (true) {
    if (next == opt.stop_token) break;
    out.push_back(next);
    if (static_cast<int>(out.size()) == opt.max_new_tokens) break;
    const int tok[1] = {next};
    next = sample(engine.decode(st, tok).row(0));
  }
  return out;
}

}  // namespace earn
