// earn/layer/layer.hpp - a decoder layer type: an attention policy paired with the KV cache it writes.
#pragma once

#include "earn/attention/policy.hpp"
#include "earn/kv/layout.hpp"

namespace earn {

/// A decoder block computed under attention policy `P`, caching into layout `C`. Pure description: the
/// backend's engine supplies the arithmetic, so one Layer type serves the CPU and the CUDA backend.
/// \code
///   using Early = earn::Layer<earn::attention::DenseCausal, earn::kv::Contiguous>;
///   using Late  = earn::Layer<earn::attention::RegisterOnly, earn::kv::Register>;
/// \endcode
template <class P, class C>
struct Layer {
  static_assert(attention::Policy<P>, "earn: Layer's first argument must be an attention policy (see attention/policy.hpp)");
  static_assert(kv::Layout<C>, "earn: Layer's second argument must be a KV-cache layout (see kv/layout.hpp)");
  static_assert(!P::keeps_prompt || C::holds_prompt,
                "earn: this attention policy keeps prompt rows, but its KV cache cannot hold the prompt: "
                "pair it with kv::Contiguous, not kv::Register");
  using policy = P;
  using cache = C;
};

template <class T>
inline constexpr bool is_layer_v = false;
template <class P, class C>
inline constexpr bool is_layer_v<Layer<P, C>> = true;

}  // namespace earn
