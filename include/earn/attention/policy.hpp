// earn/attention/policy.hpp - what an attention policy is: a small type of hooks, checked by a concept.
//
// A policy answers two questions, FlashInfer-variant style:
//   keeps(kind)             does a row of this kind stay in the residual stream at this layer?
//   visible(q_pos, k_pos)   may a query at position q_pos see a cached key at position k_pos?
// and says whether it ever keeps prompt rows (`keeps_prompt`), which decides the KV cache it needs. Optionally,
//   sees(q_kind, k_kind)    may a query row of this kind see a key row of that kind (row-kind-aware visibility,
//                           Gist's "generated rows see the registers, not the prompt")?
// A pair of rows is visible when visible(q_pos, k_pos) and sees(q_kind, k_kind) both hold; a policy without sees
// sees every kind (and costs nothing for it: kernels test kinds only for policies that have the hook).
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

/// Whether P has a row-kind rule (static constexpr bool sees(RowKind query, RowKind key)).
template <class P>
constexpr bool has_kind_rule() {
  return requires { typename std::bool_constant<P::sees(RowKind::kGenerated, RowKind::kPrompt)>; };
}

/// P's row-kind rule; true for every pair when P has none.
template <class P>
constexpr bool sees(RowKind query, RowKind key) {
  if constexpr (has_kind_rule<P>())
    return P::sees(query, key);
  else
    return true;
}

/// Whether a query row (position, kind) sees a key row under P: visible(q_pos, k_pos) and sees(q_kind, k_kind).
template <class P>
constexpr bool visible_row(int q_pos, int k_pos, RowKind q_kind, RowKind k_kind) {
  return P::visible(q_pos, k_pos) && sees<P>(q_kind, k_kind);
}

/// A row's position and kind in one int, position * 4 + kind (positions below 2^29): what kernels whose operands are
/// position arrays compare when the policy has a kind rule (the CUDA trainer's attention).
constexpr int pack_row(int pos, RowKind kind) { return pos * 4 + static_cast<int>(kind); }

/// visible_row for two packed rows (pack_row).
template <class P>
constexpr bool visible_packed(int q, int k) {
  return visible_row<P>(q >> 2, k >> 2, static_cast<RowKind>(q & 3), static_cast<RowKind>(k & 3));
}

/// Whether P's kind rule leaves the rows of a prefill alone (registers and prompt see every kind): then only decode
/// rows, or rows fed in training, meet it. The CUDA engine's prefill kernels compare positions only and take such
/// policies alone.
template <class P>
constexpr bool kind_rule_spares_input() {
  constexpr RowKind in[] = {RowKind::kPrefixRegister, RowKind::kPrompt, RowKind::kSuffixRegister};
  for (RowKind q : in)
    for (RowKind k : in)
      if (!sees<P>(q, k)) return false;
  return true;
}

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
