// earn/attention/gist.hpp - Gist-style prompt compression (Mu et al., 2023), the paper's trained baseline: at every
// layer the registers read the prompt, later rows read only the registers.
#pragma once

#include "earn/attention/policy.hpp"

namespace earn::attention {

/// Every row stays and attends causally, except that a generated row (decoded, or fed in training) never sees a
/// prompt row: what the prompt says reaches the answer through the registers (the "gist" rows) alone, from layer 0
/// on. Paired with kv::Pressed<kv::press::Gist>, the cache holds only the registers' rows (presets.hpp:
/// GistSchedule). Unlike EARN's register-only layers the prompt rows stay in the residual stream, so a Gist prefill
/// costs a dense one; only the cache, and every decode step, shrinks.
struct Gist {
  static constexpr const char* name = "gist";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(RowKind) { return true; }
  static constexpr bool visible(int q_pos, int k_pos) { return k_pos <= q_pos; }
  static constexpr bool causal = true;  // in positions; the kind rule below comes on top (policy.hpp)
  static constexpr bool sees(RowKind query, RowKind key) {
    return !(query == RowKind::kGenerated && key == RowKind::kPrompt);
  }
};
static_assert(Policy<Gist> && has_kind_rule<Gist>() && kind_rule_spares_input<Gist>());

}  // namespace earn::attention
