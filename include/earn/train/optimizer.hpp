// earn/train/optimizer.hpp - AdamW with parameter groups and freezing, global-norm clipping, and the learning-rate
// schedule of the EARN recipe (linear warm-up, then cosine), on host tensors (the CPU trainer's optimizer).
//
// Numerics follow PyTorch / Hugging Face so a run here and a run there can be compared step by step:
//   AdamW (torch.optim.AdamW): p -= lr * wd * p; m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
//                              p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)      t = 1, 2, ...
//   clipping (torch.nn.utils.clip_grad_norm_): norm = sqrt(sum g^2) over trainable tensors;
//                              g *= min(1, max / (norm + 1e-6))
//   schedule (transformers' get_cosine_schedule_with_warmup): warm-up steps W = ceil(ratio * total); step s (from
//                              0) runs at lr * s / W for s < W (so the first update is at lr 0, as there), then
//                              lr * (min + (1 - min) * 0.5 (1 + cos(pi (s - W) / (total - W))))
#pragma once

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "earn/core/error.hpp"
#include "earn/model/weights.hpp"

namespace earn::train {

/// What one optimizer step measured (CpuStep::apply, CudaStep::apply).
struct StepResult {
  double loss = 0;       ///< sum over the step's micro-batches of sum(-log p) / norm: the step's mean loss
  double grad_norm = 0;  ///< global gradient norm before clipping
};

/// Linear warm-up then cosine decay over `total_steps` optimizer steps.
struct LrSchedule {
  double lr = 1e-3;             ///< peak learning rate (the paper's 1e-3)
  double warmup_ratio = 0.02;   ///< the paper's 0.02
  double min_ratio = 0.0;       ///< the cosine ends at min_ratio * lr
  long long total_steps = 1;

  long long warmup_steps() const {
    return static_cast<long long>(std::ceil(warmup_ratio * static_cast<double>(total_steps)));
  }
  /// Learning rate of optimizer step `step` (0-based).
  double at(long long step) const {
    if (lr < 0 || warmup_ratio < 0 || warmup_ratio > 1 || min_ratio < 0 || min_ratio > 1 || total_steps < 1)
      throw ConfigError("lr schedule: needs lr >= 0, warm-up ratio and min ratio in [0, 1], total steps >= 1");
    const long long w = warmup_steps();
    if (step < w) return lr * static_cast<double>(step) / static_cast<double>(std::max<long long>(1, w));
    const double progress =
        static_cast<double>(step - w) / static_cast<double>(std::max<long long>(1, total_steps - w));
    const double cosine = std::max(0.0, 0.5 * (1.0 + std::cos(3.14159265358979323846 * std::min(progress, 1.0))));
    return lr * (min_ratio + (1.0 - min_ratio) * cosine);
  }
};

/// Which parameter tensors stay fixed.
struct Freeze {
  bool all_but_registers = false;  ///< train the register embeddings only
  std::vector<int> layers;         ///< every tensor of these layers stays fixed
  std::vector<std::string> names;  ///< tensors by name ("tok_embeddings", "layers.0.wq", "final_norm", ...)

  template <class T>
  bool frozen(const TensorView<T>& t) const {
    if (all_but_registers && t.role != TensorRole::kRegister) return true;
    if (t.layer >= 0 && std::find(layers.begin(), layers.end(), t.layer) != layers.end()) return true;
    return std::find(names.begin(), names.end(), t.name) != names.end();
  }
};

/// AdamW hyper-parameters; weight decay per tensor role (the parameter groups).
struct AdamWOptions {
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double weight_decay = 0.01;     ///< for projection matrices, embeddings and an untied head
  bool decay_norms = false;       ///< RMSNorm gains: no decay by default
  bool decay_biases = false;      ///< q/k/v biases: no decay by default
  bool decay_registers = false;   ///< EARN registers: no decay by default
  double max_grad_norm = 1.0;     ///< global-norm clipping; <= 0 turns it off
  Freeze freeze;

  double decay_of(TensorRole role) const {
    switch (role) {
      case TensorRole::kNorm: return decay_norms ? weight_decay : 0.0;
      case TensorRole::kBias: return decay_biases ? weight_decay : 0.0;
      case TensorRole::kRegister: return decay_registers ? weight_decay : 0.0;
      default: return weight_decay;
    }
  }
  void validate() const {
    if (!(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1 && eps > 0 && weight_decay >= 0))
      throw ConfigError("adamw: needs 0 <= beta1, beta2 < 1, eps > 0, weight decay >= 0");
  }
};

/// AdamW over every parameter tensor of a model (scalar T), state in T: first and second moments of the same
/// shapes, and the step count. The moments are model-shaped, so checkpoints store them by tensor name.
/// \code
///   earn::train::AdamW<float> opt(weights, {.weight_decay = 0.01});
///   double norm = opt.step(weights, grads, schedule.at(step));   // grads are clipped in place
/// \endcode
template <class T>
class AdamW {
 public:
  AdamW() = default;
  AdamW(const BasicModelWeights<T>& like, AdamWOptions opt) : opt_(std::move(opt)) {
    opt_.validate();
    m_ = like.zeros_like();
    v_ = like.zeros_like();
  }

  const AdamWOptions& options() const { return opt_; }
  long long steps() const { return t_; }
  BasicModelWeights<T>& first_moment() { return m_; }
  BasicModelWeights<T>& second_moment() { return v_; }
  const BasicModelWeights<T>& first_moment() const { return m_; }
  const BasicModelWeights<T>& second_moment() const { return v_; }
  /// Restores a checkpoint's step count (moments through first_moment / second_moment).
  void set_steps(long long t) { t_ = t; }

  /// Global L2 norm of the trainable tensors of `grads`, in double.
  double grad_norm(const BasicModelWeights<T>& grads) const {
    double ss = 0;
    for (const auto& g : grads.tensors()) {
      if (opt_.freeze.frozen(g)) continue;
      for (Index i = 0; i < g.size; ++i) ss += double(g.data[i]) * double(g.data[i]);
    }
    return std::sqrt(ss);
  }

  /// One update of `params` from `grads` at learning rate `lr`: clips `grads` in place when their global norm
  /// exceeds max_grad_norm, then decays and moves every trainable tensor. Returns the norm before clipping.
  double step(BasicModelWeights<T>& params, BasicModelWeights<T>& grads, double lr) {
    auto p = params.tensors();
    auto g = grads.tensors();
    auto m = m_.tensors();
    auto v = v_.tensors();
    if (p.size() != g.size() || p.size() != m.size())
      throw ConfigError("adamw: parameters, gradients and optimizer state have different tensors");
    const double norm = grad_norm(grads);
    double clip = 1.0;
    if (opt_.max_grad_norm > 0) clip = std::min(1.0, opt_.max_grad_norm / (norm + 1e-6));  // as torch clamps it
    ++t_;
    const double bc1 = 1.0 - std::pow(opt_.beta1, double(t_)), bc2 = 1.0 - std::pow(opt_.beta2, double(t_));
    const T b1 = T(opt_.beta1), b2 = T(opt_.beta2), step_size = T(lr / bc1), sqrt_bc2 = T(std::sqrt(bc2));
    const T eps = T(opt_.eps);
    for (std::size_t k = 0; k < p.size(); ++k) {
      if (p[k].name != g[k].name || p[k].size != g[k].size || p[k].size != m[k].size)
        throw ConfigError("adamw: tensor " + p[k].name + " does not match its gradient or state");
      if (opt_.freeze.frozen(p[k])) continue;
      const T decay = T(1.0 - lr * opt_.decay_of(p[k].role));
      T* pw = p[k].data;
      T* gw = g[k].data;
      T* mw = m[k].data;
      T* vw = v[k].data;
      for (Index i = 0; i < p[k].size; ++i) {
        if (clip != 1.0) gw[i] = T(double(gw[i]) * clip);
        const T gi = gw[i];
        pw[i] *= decay;
        mw[i] = b1 * mw[i] + (T(1) - b1) * gi;
        vw[i] = b2 * vw[i] + (T(1) - b2) * gi * gi;
        pw[i] -= step_size * mw[i] / (std::sqrt(vw[i]) / sqrt_bc2 + eps);
      }
    }
    return norm;
  }

 private:
  AdamWOptions opt_;
  BasicModelWeights<T> m_, v_;
  long long t_ = 0;
};

}  // namespace earn::train
