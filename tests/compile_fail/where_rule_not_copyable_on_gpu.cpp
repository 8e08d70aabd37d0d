// Must not compile with EARN_SHOULD_FAIL: a policy with a where rule (visible(Where, q, k) const reading its own
// values) whose values live in a std::vector: the CPU engine runs it, but CUDA kernels take a policy by value and
// need it trivially copyable, so the CUDA engine's check (RequireDeviceUsable, instantiated here without nvcc)
// refuses it with one message. The control compiles the same policy with its heads in a fixed array.
#include <array>
#include <vector>

#include "earn/schedule/presets.hpp"

struct StreamingHeadsVector {
  static constexpr const char* name = "streaming_heads_vector";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(earn::RowKind) { return true; }
  std::vector<int> window;  // per head
  constexpr bool visible(earn::attention::Where w, int q, int k) const {
    return k <= q && (w.head >= static_cast<int>(window.size()) || q - k < window[std::size_t(w.head)]);
  }
};
struct StreamingHeadsArray {
  static constexpr const char* name = "streaming_heads_array";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(earn::RowKind) { return true; }
  std::array<int, 8> window{16, 16, 16, 16, 16, 16, 16, 16};
  constexpr bool visible(earn::attention::Where w, int q, int k) const {
    return k <= q && (w.head >= 8 || q - k < window[std::size_t(w.head)]);
  }
};

#ifdef EARN_SHOULD_FAIL
using S = earn::Uniform<earn::Layer<StreamingHeadsVector, earn::kv::Contiguous>>;
#else
using S = earn::Uniform<earn::Layer<StreamingHeadsArray, earn::kv::Contiguous>>;
#endif
static_assert(earn::RequireDeviceUsable<S>::value);
static_assert(earn::attention::Policy<StreamingHeadsVector>);  // a policy all the same: the CPU engine takes it
