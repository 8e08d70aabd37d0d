// earn/attention/dense_causal.hpp - ordinary causal attention over everything (EARN's early layers).
#pragma once

#include "earn/attention/policy.hpp"

namespace earn::attention {

/// Every row stays; a query sees every key at or before its own position.
struct DenseCausal {
  static constexpr const char* name = "dense_causal";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(RowKind) { return true; }
  static constexpr bool visible(int q_pos, int k_pos) { return k_pos <= q_pos; }
  static constexpr bool causal = true;  // visible is exactly k_pos <= q_pos (see policy.hpp)
};
static_assert(Policy<DenseCausal>);

}  // namespace earn::attention
