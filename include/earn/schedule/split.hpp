// earn/schedule/split.hpp - compose layer types over layer ranges at compile time.
//
//   Split<k, Early, Late>   layers [0, k) are Early, layers [k, L) are Late; k a constant or earn::Dynamic
//   Uniform<L>              every layer is L (the plain dense model; a press over every layer)
//   PerLayer<L>             layer l is the l-th of a list of L values (per-layer parameters: budgets, windows)
// Each holds layer values (empty for parameterless layers), and visit(l, f) calls f with layer l's value: the one
// place where a layer index becomes a layer type. Every engine takes any type of the Schedule concept.
#pragma once

#include <concepts>
#include <string>
#include <utility>
#include <vector>

#include "earn/core/error.hpp"
#include "earn/layer/layer.hpp"

namespace earn {

/// Marks a split layer chosen at run time (one binary sweeps k = 0..L).
inline constexpr int Dynamic = -1;

namespace detail {
// A layer value's own check of its run-time parameters: the policy's and the layout's validate(), where they have one.
template <class L>
void validate_values(const L& layer) {
  if constexpr (requires { layer.rule.validate(); }) layer.rule.validate();
  if constexpr (requires { layer.layout.validate(); }) layer.layout.validate();
}
}  // namespace detail

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
  /// Fixed split with layer values (their run-time parameters).
  constexpr Split(Early early, Late late) requires(!is_dynamic) : early_(early), late_(late) {}
  /// Runtime split layer; only for Split<Dynamic, ...>.
  constexpr explicit Split(int k, Early early = {}, Late late = {}) requires(is_dynamic)
      : k_(k), early_(early), late_(late) {
    if (k < 0) throw ConfigError("schedule: split layer k = " + std::to_string(k) + " is negative");
  }

  constexpr int k() const { return k_; }
  /// Whether layer `l` (0-based) is a late layer.
  constexpr bool is_late(int l) const { return l >= k_; }

  /// Call f(early) or f(late) (the layer values) for layer l: the runtime k becomes a compile-time layer type
  /// here, once.
  template <class F>
  constexpr decltype(auto) visit(int l, F&& f) const {
    return is_late(l) ? std::forward<F>(f)(late_) : std::forward<F>(f)(early_);
  }

  /// Refuse what is undefined for a model of `n_layers` layers with `registers` register rows.
  void validate(int n_layers, int registers) const {
    if (k_ > n_layers)
      throw ConfigError("schedule: split layer k = " + std::to_string(k_) + " exceeds the model's " +
                        std::to_string(n_layers) + " layers");
    if (k_ < n_layers && !Late::policy::keeps_prompt && registers == 0)
      throw ConfigError("schedule: split layer k = " + std::to_string(k_) + " < " + std::to_string(n_layers) +
                        " layers with no registers: nothing would carry the prompt past layer k");
    if (k_ > 0) detail::validate_values(early_);
    if (k_ < n_layers) detail::validate_values(late_);
  }

 private:
  int k_ = (K == Dynamic ? 0 : K);
  [[no_unique_address]] Early early_{};
  [[no_unique_address]] Late late_{};
};

namespace detail {
// Uniform's and PerLayer's check: a layer type that drops the prompt everywhere needs registers to carry it.
template <class L>
void require_registers_if_dropping(int registers) {
  if (!L::policy::keeps_prompt && registers == 0)
    throw ConfigError("schedule: every layer drops the prompt and there are no registers");
  if (!attention::sees<typename L::policy>(RowKind::kGenerated, RowKind::kPrompt) && registers == 0)
    throw ConfigError(std::string("schedule: policy ") + L::policy::name +
                      " hides the prompt from generated rows and there are no registers to carry it");
}
}  // namespace detail

/// Every layer of the model is `L`.
template <class L>
class Uniform {
  static_assert(is_layer_v<L>, "earn: Uniform<L> takes an earn::Layer type");

 public:
  using early_layer = L;
  using late_layer = L;
  static constexpr bool is_dynamic = false;
  constexpr Uniform() = default;
  constexpr explicit Uniform(L layer) : layer_(layer) {}
  constexpr int k() const { return 0; }
  constexpr bool is_late(int) const { return false; }
  template <class F>
  constexpr decltype(auto) visit(int, F&& f) const { return std::forward<F>(f)(layer_); }
  void validate(int, int registers) const {
    detail::require_registers_if_dropping<L>(registers);
    detail::validate_values(layer_);
  }

 private:
  [[no_unique_address]] L layer_{};
};

/// Layer l is layers[l]: one layer type with per-layer values (a press with a budget per layer, by hand).
/// \code
///   using Snap = earn::Layer<earn::attention::DenseCausal, earn::kv::Pressed<earn::kv::press::SnapKV>>;
///   std::vector<Snap> layers;
///   for (int l = 0; l < 8; ++l) layers.push_back(Snap{{}, {{.budget = {.rows = 64 - 4 * l}}}});
///   earn::PerLayer<Snap> schedule{layers};
/// \endcode
template <class L>
class PerLayer {
  static_assert(is_layer_v<L>, "earn: PerLayer<L> takes an earn::Layer type");

 public:
  using early_layer = L;
  using late_layer = L;
  static constexpr bool is_dynamic = true;
  explicit PerLayer(std::vector<L> layers) : layers_(std::move(layers)) {
    if (layers_.empty()) throw ConfigError("schedule: PerLayer needs one layer value per layer, got none");
  }
  int k() const { return 0; }
  bool is_late(int) const { return false; }
  /// f(layers[l]); RangeError past the list.
  template <class F>
  decltype(auto) visit(int l, F&& f) const {
    if (l < 0 || l >= static_cast<int>(layers_.size()))
      throw RangeError("schedule: layer " + std::to_string(l) + " of a PerLayer list of " +
                       std::to_string(layers_.size()));
    return std::forward<F>(f)(layers_[static_cast<std::size_t>(l)]);
  }
  void validate(int n_layers, int registers) const {
    if (static_cast<int>(layers_.size()) != n_layers)
      throw ConfigError("schedule: PerLayer lists " + std::to_string(layers_.size()) + " layers, the model has " +
                        std::to_string(n_layers));
    detail::require_registers_if_dropping<L>(registers);
    for (const L& layer : layers_) detail::validate_values(layer);
  }
  const std::vector<L>& layers() const { return layers_; }

 private:
  std::vector<L> layers_;
};

namespace detail {
// A visitor that takes any layer value (the Schedule concept's probe of visit; nvcc refuses a lambda there).
struct VisitProbe {
  template <class L>
  constexpr int operator()(const L&) const { return 0; }
};
}  // namespace detail

/// Whether every layer type of schedule S has hooks the CUDA kernels can call (attention::DeviceUsable).
template <class S>
constexpr bool device_usable_schedule() {
  return attention::DeviceUsable<typename S::early_layer::policy> &&
         attention::DeviceUsable<typename S::late_layer::policy>;
}

/// The CUDA engine's check of its schedule: one readable error for a policy the GPU cannot run.
template <class S>
struct RequireDeviceUsable {
  static_assert(device_usable_schedule<S>(),
                "earn: a layer policy of this schedule has hooks the GPU cannot call (keeps static constexpr, and "
                "visible static constexpr or a constexpr member of a trivially copyable policy: "
                "attention::DeviceUsable); it runs on the CPU engine only");
  static_assert(attention::kind_rule_spares_input<typename S::early_layer::policy>() &&
                    attention::kind_rule_spares_input<typename S::late_layer::policy>(),
                "earn: a layer policy of this schedule has a kind rule among prefill rows (registers, prompt); the "
                "CUDA engine's prefill kernels compare positions only: it runs on the CPU engine and the trainers");
  static constexpr bool value = true;
};

/// What engines, planners and trainers take as a schedule: a split layer, a validity check against a model and
/// visit(l, f), which calls f with layer l's value (an earn::Layer).
template <class S>
concept Schedule = requires(const S& s, int l, int r) {
  typename S::early_layer;
  typename S::late_layer;
  { S::is_dynamic } -> std::convertible_to<bool>;
  { s.k() } -> std::convertible_to<int>;
  { s.is_late(l) } -> std::convertible_to<bool>;
  s.validate(l, r);
  { s.visit(l, detail::VisitProbe{}) } -> std::convertible_to<int>;
} && is_layer_v<typename S::early_layer> && is_layer_v<typename S::late_layer>;

}  // namespace earn
