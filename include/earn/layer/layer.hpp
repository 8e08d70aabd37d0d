// earn/layer/layer.hpp - a decoder layer type: an attention policy paired with the KV cache it writes.
#pragma once

#include "earn/attention/policy.hpp"
#include "earn/kv/layout.hpp"
#include "earn/kv/pressed.hpp"

namespace earn {

/// A decoder block computed under attention policy `P`, caching into layout `C`. Pure description: the
/// backend's engine supplies the arithmetic, so one Layer type serves the CPU and the CUDA backend. A value holds
/// the policy's and the layout's run-time parameters (a press's budget); for the parameterless policies and
/// layouts it is empty and costs nothing.
/// \code
///   using Early = earn::Layer<earn::attention::DenseCausal, earn::kv::Contiguous>;
///   using Late  = earn::Layer<earn::attention::RegisterOnly, earn::kv::Register>;
///   using Snap  = earn::Layer<earn::attention::DenseCausal, earn::kv::Pressed<earn::kv::press::SnapKV>>;
///   Snap snap{{}, {{.budget = {.rows = 64}}}};   // 64 rows per layer and user
/// \endcode
template <class P, class C>
struct Layer {
  static_assert(attention::Policy<P>, "earn: Layer's first argument must be an attention policy (see attention/policy.hpp)");
  static_assert(kv::Layout<C>, "earn: Layer's second argument must be a KV-cache layout (see kv/layout.hpp)");
  static_assert(!P::keeps_prompt || C::holds_prompt || kv::is_pressed<C>(),  // a press chooses what is cached
                "earn: this attention policy keeps prompt rows, but its KV cache cannot hold the prompt: "
                "pair it with kv::Contiguous, not kv::Register");
  static_assert(!C::holds_prompt || attention::sees<P>(RowKind::kGenerated, RowKind::kPrompt),
                "earn: this policy's decode rows do not see prompt rows (its kind rule), but its KV cache holds "
                "them: pair it with a cache that keeps only what decode rows see (kv::Pressed<kv::press::Gist>)");
  static_assert(attention::sees<P>(RowKind::kGenerated, RowKind::kPrefixRegister) &&
                    attention::sees<P>(RowKind::kGenerated, RowKind::kSuffixRegister) &&
                    attention::sees<P>(RowKind::kGenerated, RowKind::kGenerated),
                "earn: decode rows attend to every cached register and generated row; a kind rule that hides "
                "registers or generated rows from them has no cache to match it");
  static_assert(!kv::is_pressed<C>() || attention::is_causal<P>(),
                "earn: a pressed KV cache (kv::Pressed) keeps keys by score per head and lets decode rows see all of "
                "them; pair it with a causal policy (attention::is_causal), such as attention::DenseCausal");
  using policy = P;
  using cache = C;
  [[no_unique_address]] P rule{};    ///< the policy's parameters
  [[no_unique_address]] C layout{};  ///< the cache's parameters (a press)
};

template <class T>
inline constexpr bool is_layer_v = false;
template <class P, class C>
inline constexpr bool is_layer_v<Layer<P, C>> = true;

}  // namespace earn
