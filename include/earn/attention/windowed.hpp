// earn/attention/windowed.hpp - visibility policies with run-time values and per-head rules: StreamingLLM's attention
// pattern (attention sinks + a recent window) over every head, and DuoAttention's split into full and streaming heads.
//
// Both answer with the where hook of policy.hpp, `visible(Where, q_pos, k_pos) const`, reading their own values:
// one instantiation serves every window, sink count and head set, on the CPU and the CUDA engine and in both
// trainers. They change what rows see, not what the cache holds (pair them with kv::Contiguous): they are the
// attention patterns themselves, to train under and to measure accuracy with; kv/press.hpp's presses are what free
// KV rows.
#pragma once

#include <cstdint>
#include <string>

#include "earn/attention/policy.hpp"
#include "earn/core/error.hpp"

namespace earn::attention {

namespace detail {
// Whether key k_pos lies among the first `sinks` positions or fewer than `window` positions behind q_pos (k <= q).
constexpr bool in_sink_window(int sinks, int window, int q_pos, int k_pos) {
  return k_pos < sinks || q_pos - k_pos < window;
}
inline void check_sink_window(const char* name, int sinks, int window) {
  if (sinks < 0 || window < 1)
    throw ConfigError(std::string("policy ") + name + ": sinks must be >= 0 and window >= 1 (a row sees itself), got " +
                      std::to_string(sinks) + " and " + std::to_string(window));
}
}  // namespace detail

/// StreamingLLM (Xiao et al., 2024) as a mask: a row sees the keys at or before it that are among the first `sinks`
/// positions or fewer than `window` positions behind it. Every head, every layer it is placed at.
/// \code
///   using Stream = earn::Layer<earn::attention::SinkWindow, earn::kv::Contiguous>;
///   earn::Uniform<Stream> schedule{Stream{{.sinks = 4, .window = 64}}};
/// \endcode
struct SinkWindow {
  static constexpr const char* name = "sink_window";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(RowKind) { return true; }
  int sinks = 4;     ///< the first positions every row sees (attention sinks)
  int window = 256;  ///< a row sees keys q - window < k <= q
  constexpr bool visible(Where, int q_pos, int k_pos) const {
    return k_pos <= q_pos && detail::in_sink_window(sinks, window, q_pos, k_pos);
  }
  void validate() const { detail::check_sink_window(name, sinks, window); }
};
static_assert(Policy<SinkWindow> && DeviceUsable<SinkWindow>);

/// DuoAttention (Xiao et al., 2025): "retrieval" heads see every earlier key, "streaming" heads (bit h of
/// `streaming` set, query heads 0..63) only the sinks and a recent window. A PerLayer schedule gives each layer its
/// own head set.
/// \code
///   using Duo = earn::Layer<earn::attention::HeadWise, earn::kv::Contiguous>;
///   earn::Uniform<Duo> schedule{Duo{{.streaming = 0b1010, .sinks = 1, .window = 16}}};  // heads 1 and 3 stream
/// \endcode
struct HeadWise {
  static constexpr const char* name = "head_wise";
  static constexpr bool keeps_prompt = true;
  static constexpr bool keeps(RowKind) { return true; }
  std::uint64_t streaming = 0;  ///< bit h: query head h is a streaming head
  int sinks = 4;
  int window = 256;
  constexpr bool visible(Where w, int q_pos, int k_pos) const {
    if (k_pos > q_pos) return false;
    const bool stream = w.head >= 0 && w.head < 64 && ((streaming >> w.head) & 1u) != 0;
    return !stream || detail::in_sink_window(sinks, window, q_pos, k_pos);
  }
  void validate() const { detail::check_sink_window(name, sinks, window); }
};
static_assert(Policy<HeadWise> && DeviceUsable<HeadWise>);

}  // namespace earn::attention
