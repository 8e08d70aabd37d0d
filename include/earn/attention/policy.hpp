// earn/attention/policy.hpp - what an attention policy is: a small type of hooks, checked by a concept.
//
// A policy answers two questions, FlashInfer-variant style:
//   keeps(kind)             does a row of this kind stay in the residual stream at this layer?
//   visible(q_pos, k_pos)   may a query at position q_pos see a cached key at position k_pos?
// and says whether it ever keeps prompt rows (`keeps_prompt`), which decides the KV cache it needs.
// New strategies (sink + window, SnapKV, H2O, PyramidKV) are new policies, not new models.
#pragma once

#include <concepts>
#include <type_traits>

#include "earn/attention/row_kind.hpp"

namespace earn::attention {

/// A type usable as an attention policy.
template <class P>
concept Policy = requires(RowKind kind, int q, int k) {
  { P::keeps_prompt } -> std::convertible_to<bool>;
  { P::keeps(kind) } -> std::convertible_to<bool>;
  { P::visible(q, k) } -> std::convertible_to<bool>;
  { P::name } -> std::convertible_to<const char*>;
};

/// Whether the CUDA kernels can call P's hooks: keeps and visible must be constant expressions (static constexpr
/// functions; nvcc's --expt-relaxed-constexpr makes them device functions). A policy whose visible reads run-time
/// state (a global, a member) is host-only: the CPU engine takes it, the CUDA engine refuses it at compile time.
template <class P>
concept DeviceUsable = Policy<P> && requires {
  typename std::bool_constant<P::visible(0, 0)>;
  typename std::bool_constant<P::keeps(RowKind::kPrompt)>;
};

/// Optional promise: `static constexpr bool causal = true` says visible(q, k) is exactly k <= q. Kernels may then
/// decide whether a tile of keys is visible to a tile of queries from their smallest and largest positions
/// instead of asking pair by pair (flash_attention.cuh); a policy without it is asked pair by pair.
template <class P>
constexpr bool is_causal() {
  if constexpr (requires { P::causal; })
    return static_cast<bool>(P::causal);
  else
    return false;
}

}  // namespace earn::attention
