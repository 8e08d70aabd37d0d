// Must not compile with EARN_SHOULD_FAIL: a pressed cache under a policy that is not causal (decode rows would
// see every kept key whatever the policy says).
#include "earn/schedule/presets.hpp"

struct SlidingWindow {
  static constexpr const char* name = "sliding_window";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(earn::RowKind) { return true; }
  static constexpr bool visible(int q, int k) { return k <= q && q - k < 16; }
};

#ifdef EARN_SHOULD_FAIL
using L = earn::Layer<SlidingWindow, earn::kv::Pressed<earn::kv::press::SnapKV>>;
#else
using L = earn::Layer<SlidingWindow, earn::kv::Contiguous>;
#endif
L layer;
