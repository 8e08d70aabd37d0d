// earn/kv/layout.hpp - what a KV-cache type is: a tag saying which rows it can hold and how many.
//
// Every cache splits its rows in two parts, so the beams of one user can share its prompt:
//   prefix:    per user, the K/V rows written by prefill (shared by all decode rows of that user)
//   generated: per decode row (beam), the K/V of the tokens it generated
// The tag decides the prefix capacity; the storage of a backend (kv::Store<Backend>) holds the numbers.
#pragma once

#include <concepts>
#include <cstdint>

namespace earn::kv {

/// A type usable as a KV-cache layout: its prefix capacity is a function of the input size (and of the layer, for
/// layouts whose values differ per layer, such as a press with per-layer budgets).
template <class C>
concept Layout = requires(const C& c, std::int64_t max_input, std::int64_t registers, int l) {
  { C::holds_prompt } -> std::convertible_to<bool>;
  { C::name } -> std::convertible_to<const char*>;
} && (requires(std::int64_t max_input, std::int64_t registers) {
       { C::prefix_capacity(max_input, registers) } -> std::convertible_to<std::int64_t>;
     } || requires(const C& c, std::int64_t max_input, std::int64_t registers, int l) {
       { c.prefix_capacity(max_input, registers, l, l) } -> std::convertible_to<std::int64_t>;
     });

/// Prefix rows per user that layout value `c` reserves at layer l of n_layers.
template <Layout C>
std::int64_t prefix_capacity(const C& c, std::int64_t max_input, std::int64_t registers, int l, int n_layers) {
  if constexpr (requires { C::prefix_capacity(max_input, registers); })
    return C::prefix_capacity(max_input, registers);
  else
    return c.prefix_capacity(max_input, registers, l, n_layers);
}

/// Primary template of a backend's storage: only specializations exist.
template <class Backend>
struct Store {
  static_assert(sizeof(Backend) == 0,
                "earn: no KV storage for this backend; include earn/backend/cpu/kv_store.hpp (Cpu) "
                "or earn/cuda.cuh (Cuda)");
};

}  // namespace earn::kv
