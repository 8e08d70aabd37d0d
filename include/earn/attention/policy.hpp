// earn/attention/policy.hpp - what an attention policy is: a small type of hooks, checked by a concept.
//
// A policy answers two questions, FlashInfer-variant style:
//   keeps(kind)             does a row of this kind stay in the residual stream at this layer?
//   visible(q_pos, k_pos)   may a query at position q_pos see a cached key at position k_pos?
// and says whether it ever keeps prompt rows (`keeps_prompt`), which decides the KV cache it needs.
// New strategies (sink + window, SnapKV, H2O, PyramidKV) are new policies, not new models.
#pragma once

#include <concepts>

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

}  // namespace earn::attention
