// earn/kv/pressed.hpp - a cache that holds the rows a press keeps (kv/press.hpp): bounded, sized by the press.
#pragma once

#include <algorithm>
#include <cstdint>

#include "earn/kv/layout.hpp"
#include "earn/kv/press.hpp"

namespace earn::kv {

/// Per layer and user, the rows press `P` keeps of the layer's prefill rows (at most its keep for a prompt of
/// max_prompt tokens), plus each decode row's generated rows. Rows are gathered per KV head: K / V row j of head g
/// is the j-th row head g keeps, so heads may hold rows of different positions.
template <class P>
struct Pressed {
  static_assert(Press<P>, "earn: kv::Pressed<P> takes a press (kv/press.hpp: a name and rule(layer, layers, rows), or "
                          "rule(layer, layers, rows, prefix registers, suffix registers))");
  static constexpr const char* name = "pressed";
  static constexpr bool holds_prompt = press_holds_prompt<P>();  // some prompt rows, as many as the press keeps
  static constexpr bool pressed = true;
  using press_type = P;
  P press{};
  /// Rows reserved per user at layer l of n_layers: the most the press keeps of up to max_input rows.
  std::int64_t prefix_capacity(std::int64_t max_input, std::int64_t registers, int l, int n_layers) const {
    int most = 0;
    // A press given the register counts keeps by their sum: all of them are taken as prefix registers here.
    const int r = static_cast<int>(registers);
    for (int n = 1; n <= max_input; ++n)
      most = std::max(most, std::min(rule_of(press, l, n_layers, n, r, 0).keep, n));
    return most;
  }
};

/// Whether layout C is a pressed one.
template <class C>
constexpr bool is_pressed() {
  if constexpr (requires { C::pressed; })
    return static_cast<bool>(C::pressed);
  else
    return false;
}

}  // namespace earn::kv
