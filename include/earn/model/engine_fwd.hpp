// earn/model/engine_fwd.hpp - the primary template of earn::Engine and its options (no backend code).
#pragma once

#include "earn/backend/cpu/tag.hpp"

namespace earn {

/// Sizes a decoding state reserves.
struct StateOptions {
  int max_users = 1;        ///< prompts prefilled side by side (a batch of users)
  int max_rows = 1;         ///< decode rows (beams) over all users
  int max_prompt = 0;       ///< prompt tokens per user, registers excluded; 0: the model's context less max_new_tokens
  int max_new_tokens = 16;  ///< generated tokens per row
};

/// Runs a model's weights under layer schedule `Schedule` on `Backend`. Only specializations exist.
template <class Schedule, class Backend = Cpu>
class Engine {
  static_assert(sizeof(Backend) == 0,
                "earn: no engine for this backend; the CPU engine is in earn/model/engine.hpp, the CUDA engine "
                "needs nvcc and earn/cuda.cuh");
};

}  // namespace earn
