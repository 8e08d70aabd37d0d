// Must not compile with EARN_SHOULD_FAIL: a policy whose visible() reads run-time state (here a global window),
// which the CPU engine runs but the CUDA engine cannot call from its kernels; the CUDA engine's check
// (RequireDeviceUsable, instantiated here without nvcc) refuses it with one message.
#include "earn/schedule/presets.hpp"

inline int g_window = 16;
struct GlobalWindow {
  static constexpr const char* name = "global_window";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(earn::RowKind) { return true; }
  static bool visible(int q, int k) { return k <= q && q - k < g_window; }
};

#ifdef EARN_SHOULD_FAIL
using S = earn::Uniform<earn::Layer<GlobalWindow, earn::kv::Contiguous>>;
#else
using S = earn::Uniform<earn::Layer<earn::attention::DenseCausal, earn::kv::Contiguous>>;
#endif
static_assert(earn::RequireDeviceUsable<S>::value);
static_assert(earn::attention::Policy<GlobalWindow>);  // a policy all the same: the CPU engine takes it
