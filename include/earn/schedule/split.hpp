// earn/schedule/split.hpp - compose layer types over layer ranges at compile time.
//
//   Split<k, Early, Late>   layers [0, k) are Early, layers [k, L) are Late; k a constant or earn::Dynamic
//   Uniform<L>              every layer is L (the plain dense model)
#pragma once

#include <string>
#include <utility>

#include "earn/core/error.hpp"
#include "earn/layer/layer.hpp"

namespace earn {

/// Marks a split layer chosen at run time (one binary sweeps k = 0..L).
inline constexpr int Dynamic = -1;

/// Layers [0, k) use `Early`, layers [k, n_layers) use `Late`.
/// \code
///   using Earn = earn::Split<earn::Dynamic, earn::Layer<DenseCausal, kv::Contiguous>,
///                            earn::Layer<RegisterOnly, kv::Register>>;
///   Earn schedule{6};                              // k = 6 chosen at run time
///   earn::Split<6, Early, Late> fixed;            // k = 6 fixed at compile time
/// \endcode
template <int K, class Early, class Late>
class Split {
  static_assert(is_layer_v<Early> && is_layer_v<Late>, "earn: Split<k, Early, Late> takes two earn::Layer types");
  static_assert(K >= 0 || K == Dynamic, "earn: Split's k must be >= 0 or earn::Dynamic");
  static_assert(Early::policy::keeps_prompt || !Late::policy::keeps_prompt,
                "earn: a layer that drops prompt rows cannot sit below one that keeps them (rows that left the "
                "residual stream cannot come back): put the dense layer first, Split<k, Dense, RegisterOnly>");

 public:
  using early_layer = Early;
  using late_layer = Late;
  static constexpr bool is_dynamic = K == Dynamic;

  constexpr Split() requires(!is_dynamic) = default;
  /// Runtime split layer; only for Split<Dynamic, ...>.
  constexpr explicit Split(int k) requires(is_dynamic) : k_(k) {
    if (k < 0) throw ConfigError("schedule: split layer k = " + std::to_string(k) + " is negative");
  }

  constexpr int k() const { return k_; }
  /// Whether layer `l` (0-based) is a late layer.
  constexpr bool is_late(int l) const { return l >= k_; }

  /// Call f(Early{}) or f(Late{}) for layer l: the runtime k becomes a compile-time layer type here, once.
  template <class F>
  constexpr decltype(auto) visit(int l, F&& f) const {
    return is_late(l) ? std::forward<F>(f)(Late{}) : std::forward<F>(f)(Early{});
  }

  /// Refuse what is undefined for a model of `n_layers` layers with `registers` register rows.
  void validate(int n_layers, int registers) const {
    if (k_ > n_layers)
      throw ConfigError("schedule: split layer k = " + std::to_string(k_) + " exceeds the model's " +
                        std::to_string(n_layers) + " layers");
    if (k_ < n_layers && !Late::policy::keeps_prompt && registers == 0)
      throw ConfigError("schedule: split layer k = " + std::to_string(k_) + " < " + std::to_string(n_layers) +
                        " layers with no registers: nothing would carry the prompt past layer k");
  }

 private:
  int k_ = (K == Dynamic ? 0 : K);
};

/// Every layer of the model is `L`.
template <class L>
class Uniform {
  static_assert(is_layer_v<L>, "earn: Uniform<L> takes an earn::Layer type");

 public:
  using early_layer = L;
  using late_layer = L;
  static constexpr bool is_dynamic = false;
  constexpr int k() const { return 0; }
  constexpr bool is_late(int) const { return false; }
  template <class F>
  constexpr decltype(auto) visit(int, F&& f) const { return std::forward<F>(f)(L{}); }
  void validate(int, int registers) const {
    if (!L::policy::keeps_prompt && registers == 0)
      throw ConfigError("schedule: every layer drops the prompt and there are no registers");
  }
};

}  // namespace earn
