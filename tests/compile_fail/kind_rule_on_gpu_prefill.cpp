// Must not compile with EARN_SHOULD_FAIL: a kind rule among prefill rows (here: prompt rows do not see the prefix
// registers) on the CUDA engine, whose prefill kernels compare positions only (RequireDeviceUsable, instantiated
// here without nvcc). The CPU engine and the trainers take such a policy.
#include "earn/schedule/presets.hpp"

struct PromptIgnoresPrefix {
  static constexpr const char* name = "prompt_ignores_prefix";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(earn::RowKind) { return true; }
  static constexpr bool visible(int q, int k) { return k <= q; }
  static constexpr bool sees(earn::RowKind q, earn::RowKind k) {
    return !(q == earn::RowKind::kPrompt && k == earn::RowKind::kPrefixRegister);
  }
};

#ifdef EARN_SHOULD_FAIL
using S = earn::Uniform<earn::Layer<PromptIgnoresPrefix, earn::kv::Contiguous>>;
#else
using S = earn::GistSchedule;
#endif
static_assert(earn::RequireDeviceUsable<S>::value);
