// earn/train/cpu_step.hpp - one optimizer step of training on the host: forward and backward over micro-batches
// (gradients accumulated), the finiteness checks, clipping and AdamW. The CUDA twin is
// earn/backend/cuda/train_step.cuh; the training loop (train/trainer.hpp) drives either through the same calls:
//   accumulate(seqs, targets, norm)   forward + backward of one micro-batch (CpuStep returns its loss share)
//   StepResult apply(lr)              check, clip, update, zero the gradients; the step's loss and gradient norm
#pragma once

#include <cmath>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "earn/backend/cpu/tag.hpp"
#include "earn/backend/cpu/train.hpp"
#include "earn/core/error.hpp"
#include "earn/model/weights.hpp"
#include "earn/plan/forward.hpp"
#include "earn/train/optimizer.hpp"

namespace earn::train {

/// The training state of one model on the host: weights (fp32, or fp64 for checks), gradient buffers, AdamW.
/// \code
///   earn::train::CpuStep<earn::EarnSchedule> step(weights, earn::EarnSchedule{2}, {.weight_decay = 0.01});
///   double loss = step.accumulate(seqs, targets, /*norm=*/targets.size());   // once per micro-batch
///   earn::train::StepResult r = step.apply(schedule.at(step.steps()));   // r.loss, r.grad_norm
/// \endcode
template <class Schedule, class T = float>
class CpuStep {
 public:
  using backend_type = Cpu;
  using Weights = BasicModelWeights<T>;

  CpuStep(Weights weights, Schedule schedule, AdamWOptions opt)
      : w_(std::move(weights)), schedule_(schedule), opt_(w_, std::move(opt)) {
    w_.validate();
    schedule_.validate(w_.config.n_layers, w_.registers.count());
    g_ = w_.zeros_like();
  }

  const Weights& weights() const { return w_; }
  Weights& weights() { return w_; }
  const Schedule& schedule() const { return schedule_; }
  AdamW<T>& optimizer() { return opt_; }
  const AdamW<T>& optimizer() const { return opt_; }
  /// Optimizer steps taken; a resumed run restores the count (AdamW's bias correction).
  long long steps() const { return opt_.steps(); }
  void set_steps(long long t) { opt_.set_steps(t); }
  const AdamWOptions& options() const { return opt_.options(); }
  /// Replaces every parameter (same shapes).
  void set_weights(const Weights& w) {
    if (w.tensors().size() != w_.tensors().size()) throw ConfigError("train: the model's tensors differ");
    w_ = w;
  }
  /// AdamW's moments (checkpoints) and their restoration.
  const Weights& first_moment() const { return opt_.first_moment(); }
  const Weights& second_moment() const { return opt_.second_moment(); }
  void set_moments(const Weights& m, const Weights& v) {
    opt_.first_moment() = m;
    opt_.second_moment() = v;
  }
  /// Rows the last micro-batch computed, summed over layers (EARN's late layers count only their kept rows).
  long long last_layer_rows() const { return layer_rows_; }

  /// Forward and backward of one micro-batch: `seqs` with their answers' first tokens fed, `targets` one token per
  /// answer row (plan::ForwardPlan::all_answer_rows order). Gradients of sum(-log p) / norm are added to the
  /// buffers; returns sum(-log p) / norm. NumericError when the loss is not finite.
  double accumulate(std::span<const plan::Sequence> seqs, std::span<const int> targets, double norm) {
    const plan::ForwardPlan fp = plan::plan_forward(schedule_, w_.config.n_layers,
                                                    static_cast<int>(w_.registers.prefix.rows()),
                                                    static_cast<int>(w_.registers.suffix.rows()), seqs);
    const double loss = cpu::train_forward(w_, schedule_, fp, targets, norm, tape_);
    if (!std::isfinite(loss))
      throw NumericError("train: step " + std::to_string(steps() + 1) + ": the loss is " + std::to_string(loss));
    cpu::train_backward(w_, schedule_, fp, tape_, g_);
    layer_rows_ = 0;
    for (int l = 0; l < fp.n_layers(); ++l) layer_rows_ += fp.layer_rows(l).size();
    pending_loss_ += loss;
    return loss;
  }

  /// Ends an optimizer step: NumericError naming the tensor when a gradient is NaN or Inf; otherwise clips, updates
  /// every trainable tensor at learning rate `lr` and zeroes the gradients. Returns the step's loss (the sum of
  /// its micro-batches') and the gradient norm before clipping.
  StepResult apply(double lr) {
    for (const auto& t : g_.tensors())
      for (Index i = 0; i < t.size; ++i)
        if (!std::isfinite(t.data[i]))
          throw NumericError("train: step " + std::to_string(steps() + 1) + ": the gradient of " + t.name +
                             " holds " + std::to_string(double(t.data[i])) + " at element " + std::to_string(i));
    StepResult r{pending_loss_, opt_.step(w_, g_, lr)};
    for (auto& t : g_.tensors()) std::fill(t.data, t.data + t.size, T(0));
    pending_loss_ = 0;
    return r;
  }

  /// The accumulated gradients (diagnostics; a caller may add its own terms before apply).
  const Weights& gradients() const { return g_; }
  Weights& gradients() { return g_; }

 private:
  Weights w_;
  Schedule schedule_;
  AdamW<T> opt_;
  Weights g_;
  cpu::TrainTape<T> tape_;
  long long layer_rows_ = 0;
  double pending_loss_ = 0;
};

}  // namespace earn::train
