// earn/kv/register.hpp - EARN's late-layer cache: registers plus generated tokens, never prompt-sized.
#pragma once

#include <cstdint>

#include "earn/kv/layout.hpp"

namespace earn::kv {

/// Per layer and user, r = r_p + r_s register rows; per decode row, its generated tokens. Its capacity does
/// not depend on the prompt length, which is where EARN's KV saving comes from.
struct Register {
  static constexpr const char* name = "register";
  static constexpr bool holds_prompt = false;
  static constexpr std::int64_t prefix_capacity(std::int64_t /*max_input*/, std::int64_t registers) {
    return registers;
  }
};
static_assert(Layout<Register>);

}  // namespace earn::kv
