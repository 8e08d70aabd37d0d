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
//
// Instead of the static visible(q_pos, k_pos), a policy may answer with a member function that reads its own
// values (run-time windows, per-head lists) and where it is asked (the layer, the query head):
//   constexpr bool visible(Where where, int q_pos, int k_pos) const
// The policy's value is the one its Layer holds (Layer::rule, set when the schedule is built); every kernel, on
// both backends and in both trainers, asks through LayerMask, which carries that value and the layer to the head
// loop. Such a policy stays one instantiation for every value of its parameters. On the GPU it must be trivially
// copyable (kernels take it by value) and its hook a constexpr function (DeviceUsable).
// New strategies (sink + window, SnapKV, H2O, PyramidKV) are new policies, not new models.
#pragma once

#include <concepts>
#include <type_traits>

#include "earn/attention/row_kind.hpp"

namespace earn::attention {

/// Where a visibility question is asked: the layer and the query head (its KV head is head / (heads / kv heads)).
struct Where {
  int layer = 0;
  int head = 0;
};

/// Whether P answers visibility with the member hook `visible(Where, q_pos, k_pos) const` (see the file comment).
template <class P>
concept HasWhereRule = requires(const P& p, Where w, int q, int k) {
  { p.visible(w, q, k) } -> std::convertible_to<bool>;
};

/// Whether P answers visibility with the static hook `visible(q_pos, k_pos)`.
template <class P>
concept HasStaticRule = requires(int q, int k) {
  { P::visible(q, k) } -> std::convertible_to<bool>;
};

/// A type usable as an attention policy: keeps, name, keeps_prompt and one of the two visibility hooks.
template <class P>
concept Policy = requires(RowKind kind) {
  { P::keeps_prompt } -> std::convertible_to<bool>;
  { P::keeps(kind) } -> std::convertible_to<bool>;
  { P::name } -> std::convertible_to<const char*>;
} && (HasStaticRule<P> || HasWhereRule<P>) && std::is_default_constructible_v<P>;

/// Whether the CUDA kernels can call P's hooks: keeps and visible must be constant expressions (static constexpr
/// functions, or for a where rule a constexpr member function evaluable on a default-constructed P; nvcc's
/// --expt-relaxed-constexpr makes them device functions), and a policy with values must be trivially copyable
/// (the kernels take it by value). A policy whose visible reads state outside itself (a global) is host-only: the
/// CPU engine takes it, the CUDA engine refuses it at compile time.
template <class P>
concept DeviceUsable = Policy<P> && requires { typename std::bool_constant<P::keeps(RowKind::kPrompt)>; } &&
                       (HasWhereRule<P> ? std::is_trivially_copyable_v<P> &&
                                              requires { typename std::bool_constant<P{}.visible(Where{}, 0, 0)>; }
                                        : requires { typename std::bool_constant<P::visible(0, 0)>; });

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

/// A row's position and kind in one int, position * 4 + kind (positions below 2^29): what kernels whose operands are
/// position arrays compare when the policy has a kind rule (the CUDA trainer's attention).
constexpr int pack_row(int pos, RowKind kind) { return pos * 4 + static_cast<int>(kind); }

/// P's visibility at one layer: what every attention kernel asks, per query head. It holds the policy's value (the
/// layer's Layer::rule; empty for the static policies) and the layer, is trivially copyable when P is (CUDA kernels
/// take it by value), and answers
///   mask(head, q_pos, k_pos)                   visible, by the where rule or the static one
///   mask(head, q_pos, k_pos, q_kind, k_kind)   that, and the kind rule (sees)
///   mask.packed(head, q, k)                    the same for two pack_row values
/// For a static policy it compiles to P::visible(q_pos, k_pos): the head and layer are not read.
template <class P>
struct LayerMask {
  [[no_unique_address]] P rule{};
  int layer = 0;

  /// Whether the answer can depend on the head (a where rule): kernels that share one mask over heads must not.
  static constexpr bool per_head = HasWhereRule<P>;

  constexpr bool operator()(int head, int q_pos, int k_pos) const {
    if constexpr (HasWhereRule<P>)
      return rule.visible(Where{layer, head}, q_pos, k_pos);
    else
      return P::visible(q_pos, k_pos);
  }
  constexpr bool operator()(int head, int q_pos, int k_pos, RowKind q_kind, RowKind k_kind) const {
    return (*this)(head, q_pos, k_pos) && sees<P>(q_kind, k_kind);
  }
  constexpr bool packed(int head, int q, int k) const {
    return (*this)(head, q >> 2, k >> 2, static_cast<RowKind>(q & 3), static_cast<RowKind>(k & 3));
  }
};

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
