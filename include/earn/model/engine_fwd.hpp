// earn/model/engine_fwd.hpp - the primary template of earn::Engine and its options (no backend code).
#pragma once

#include <string>

#include "earn/backend/cpu/tag.hpp"
#include "earn/core/config.hpp"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"

namespace earn {

/// Sizes a decoding state reserves.
struct StateOptions {
  int max_users = 1;        ///< prompts prefilled side by side (a batch of users)
  int max_rows = 1;         ///< decode rows (beams) over all users
  int max_prompt = 0;       ///< prompt tokens per user, registers excluded; 0: the model's context less max_new_tokens
  int max_new_tokens = 16;  ///< generated tokens per row
};

namespace detail {

/// `o` checked against the model's context, with max_prompt = 0 resolved to all the context left. Every backend's
/// make_state starts here.
inline StateOptions resolve_state_options(StateOptions o, const ModelConfig& c, int registers) {
  if (o.max_users <= 0 || o.max_rows <= 0 || o.max_new_tokens < 0 || o.max_prompt < 0)
    throw ConfigError("state: max_users and max_rows must be positive, max_prompt and max_new_tokens >= 0");
  if (o.max_prompt == 0) o.max_prompt = c.max_seq_len - o.max_new_tokens - registers;
  if (o.max_prompt <= 0 || Index{o.max_prompt} + registers + o.max_new_tokens > c.max_seq_len)
    throw ConfigError("state: prompt " + std::to_string(o.max_prompt) + " + registers " + std::to_string(registers) +
                      " + new tokens " + std::to_string(o.max_new_tokens) + " exceed the context of " +
                      std::to_string(c.max_seq_len));
  return o;
}

/// Prefix rows per user that layer `l`'s cache reserves, as its layout decides (registers only for kv::Register).
template <class Schedule>
Index layer_prefix_capacity(const Schedule& schedule, int l, const StateOptions& o, int registers) {
  const Index max_input = Index{o.max_prompt} + registers;
  return schedule.visit(l, [&]<class L>(L) { return Index{L::cache::prefix_capacity(max_input, registers)}; });
}

}  // namespace detail

/// Runs a model's weights under layer schedule `Schedule` on `Backend`. Only specializations exist.
template <class Schedule, class Backend = Cpu>
class Engine {
  static_assert(sizeof(Backend) == 0,
                "earn: no engine for this backend; the CPU engine is in earn/model/engine.hpp, the CUDA engine "
                "needs nvcc and earn/cuda.cuh");
};

}  // namespace earn
