// earn/attention/register_only.hpp - EARN's late-layer policy: the prompt has left the residual stream.
#pragma once

#include "earn/attention/policy.hpp"

namespace earn::attention {

/// Only registers and generated tokens stay; they attend causally among themselves. Positions are the
/// original ones (nothing is re-indexed when prompt rows leave), so RoPE sees the true distances.
struct RegisterOnly {
  static constexpr const char* name = "register_only";
  static constexpr bool keeps_prompt = false;
  static constexpr bool keeps(RowKind kind) { return kind != RowKind::kPrompt; }
  static constexpr bool visible(int q_pos, int k_pos) { return k_pos <= q_pos; }
  static constexpr bool causal = true;  // visible is exactly k_pos <= q_pos (see policy.hpp)
};
static_assert(Policy<RegisterOnly>);

}  // namespace earn::attention
