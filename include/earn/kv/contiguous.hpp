// earn/kv/contiguous.hpp - the dense layers' cache: every input row (registers and prompt) plus generated ones.
#pragma once

#include <cstdint>

#include "earn/kv/layout.hpp"

namespace earn::kv {

/// Per layer and user, one contiguous block of [max_input, kv_dim] for K and for V, plus the generated rows.
struct Contiguous {
  static constexpr const char* name = "contiguous";
  static constexpr bool holds_prompt = true;
  /// Rows reserved per user for prefill: the whole input (registers included).
  static constexpr std::int64_t prefix_capacity(std::int64_t max_input, std::int64_t /*registers*/) {
    return max_input;
  }
};
static_assert(Layout<Contiguous>);

}  // namespace earn::kv
