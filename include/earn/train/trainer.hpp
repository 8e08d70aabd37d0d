// earn/train/trainer.hpp - the training loop: epochs of shuffled examples in micro-batches accumulated to the
// effective batch, the learning-rate schedule, validation every N steps keeping the best checkpoint, early
// stopping, crash-safe checkpoints with exact resume, a CSV log and a progress line. The backend is the Step:
// train::CpuStep (cpu_step.hpp) or train::CudaStep (earn/backend/cuda/train_step.cuh), driven through
//   accumulate(seqs, targets, norm), apply(lr) -> StepResult, steps() / set_steps(), weights(), set_weights(),
//   first_moment() / second_moment() / set_moments(), options()
// A resumed run (same examples, options and seed) continues the uninterrupted run exactly: the checkpoint holds
// the weights, AdamW's moments and step count, the data cursor and the best validation result so far.
#pragma once

#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "earn/core/error.hpp"
#include "earn/model/weights.hpp"
#include "earn/plan/forward.hpp"
#include "earn/train/checkpoint.hpp"
#include "earn/train/data.hpp"
#include "earn/train/optimizer.hpp"

namespace earn::train {

/// Settings of a run.
struct TrainOptions {
  int batch = 128;               ///< examples per optimizer step (the paper's effective batch)
  int micro_batch = 0;           ///< examples per forward / backward pass (0: the whole batch)
  double epochs = 1.0;           ///< passes over the examples (the run's length unless max_steps is set)
  long long max_steps = 0;       ///< > 0: exactly this many optimizer steps
  double lr = 1e-3, warmup_ratio = 0.02, min_lr_ratio = 0.0;  ///< LrSchedule (the paper's 1e-3 and 0.02)
  std::uint64_t seed = 0;        ///< data order
  long long eval_every = 0;      ///< validate every N steps (0: at each epoch's end), and always at the end
  int patience = 0;              ///< stop after this many validations without a better metric (0: never)
  std::filesystem::path out;     ///< run directory: checkpoints/, train_log.csv (empty: neither)
  int keep_last = 2;             ///< step checkpoints kept besides `best`
  bool resume = true;            ///< continue from out/checkpoints/latest when it exists
  bool progress = true;          ///< a progress line on stderr
};

/// A validation result: `metric` is compared (higher is better, e.g. NDCG@10); `details` goes to the log.
struct Evaluation {
  double metric = 0;
  nlohmann::json details = nlohmann::json::object();
};
using Evaluator = std::function<Evaluation(const ModelWeights&)>;

/// One optimizer step as logged.
struct LogRow {
  long long step = 0;       ///< 1-based
  long long epoch = 0;      ///< epochs completed before the step's first micro-batch
  double loss = 0, grad_norm = 0, lr = 0;
  long long tokens = 0;     ///< prompt + answer tokens of the step's examples
  double seconds = 0;       ///< wall time of the step
  std::optional<double> metric;  ///< validation metric when the step validated
};

/// What a run did.
struct TrainSummary {
  long long steps = 0;           ///< optimizer steps at the end (resumed ones included)
  long long resumed_from = 0;    ///< step the run continued from (0: a fresh start)
  std::optional<double> best_metric;
  long long best_step = -1;
  bool stopped_early = false;
  std::vector<LogRow> log;       ///< the steps this process ran
};

/// Runs training of `step`'s model on `examples`.
/// \code
///   earn::train::CpuStep<earn::EarnSchedule> step(earn::train::init_model(cfg), earn::EarnSchedule{2}, {});
///   earn::train::Trainer trainer(step, examples, {.batch = 128, .epochs = 3, .out = "runs/earn"}, validate);
///   earn::train::TrainSummary s = trainer.run();
/// \endcode
template <class Step>
class Trainer {
 public:
  Trainer(Step& step, std::span<const Example> examples, TrainOptions opt, Evaluator evaluate = {})
      : step_(step), examples_(examples), opt_(std::move(opt)), evaluate_(std::move(evaluate)) {
    if (examples_.empty()) throw ConfigError("trainer: no training examples");
    if (opt_.batch < 1) throw ConfigError("trainer: batch must be >= 1");
    if (opt_.micro_batch <= 0) opt_.micro_batch = opt_.batch;
    if (opt_.micro_batch > opt_.batch) throw ConfigError("trainer: micro_batch exceeds batch");
    if (opt_.batch % opt_.micro_batch != 0)
      throw ConfigError("trainer: batch " + std::to_string(opt_.batch) + " is not a multiple of micro_batch " +
                        std::to_string(opt_.micro_batch));
    if (!(opt_.epochs > 0) && opt_.max_steps <= 0) throw ConfigError("trainer: needs epochs > 0 or max_steps > 0");
    if (opt_.eval_every < 0 || opt_.patience < 0) throw ConfigError("trainer: eval_every and patience must be >= 0");
    const double per_epoch = std::ceil(double(examples_.size()) / double(opt_.batch));
    total_ = opt_.max_steps > 0 ? opt_.max_steps : static_cast<long long>(std::ceil(opt_.epochs * per_epoch));
    schedule_ = LrSchedule{opt_.lr, opt_.warmup_ratio, opt_.min_lr_ratio, std::max(1LL, total_)};
    schedule_.at(0);  // validates the schedule's settings now
  }

  long long total_steps() const { return total_; }
  const LrSchedule& schedule() const { return schedule_; }

  TrainSummary run() {
    using Clock = std::chrono::steady_clock;
    Batcher batcher(examples_.size(), {.micro_batch = opt_.micro_batch, .drop_last = false, .shuffle = true,
                                       .seed = opt_.seed});
    TrainSummary sum;
    TrainerState state;
    state.schedule = schedule_;
    std::optional<CheckpointRun> ckpt;
    if (!opt_.out.empty()) {
      std::error_code ec;
      std::filesystem::create_directories(opt_.out, ec);
      if (ec) throw IoError(opt_.out.string() + ": cannot create the run directory: " + ec.message());
      ckpt.emplace(opt_.out / "checkpoints", opt_.keep_last);
      if (opt_.resume && ckpt->latest()) {
        const Checkpoint<float> c = ckpt->load_latest();
        step_.set_weights(c.weights);
        step_.set_moments(c.first_moment, c.second_moment);
        step_.set_steps(c.optimizer_steps);
        batcher.seek(c.trainer.cursor);
        state = c.trainer;
        sum.resumed_from = state.step;
      }
    }
    open_log(sum.resumed_from);
    int since_best = state.extra.value("since_best", 0);
    const int micro = opt_.batch / opt_.micro_batch;
    const auto start = Clock::now();
    long long done_here = 0;
    // A step's micro-batches (an epoch's short last batch makes a smaller step).
    struct Planned {
      std::vector<MicroBatch> mbs;
      long long examples = 0, epoch = 0;
      bool epoch_end = false;
      DataCursor after;  // the batcher's position once this step's batches are taken
    };
    auto plan_step = [&] {
      Planned p;
      p.epoch = batcher.cursor().epoch;
      for (int m = 0; m < micro; ++m) {
        p.mbs.push_back(batcher.next());
        p.examples += static_cast<long long>(p.mbs.back().indices.size());
        if (p.mbs.back().last_of_epoch) {
          p.epoch_end = true;
          break;
        }
      }
      p.after = batcher.cursor();
      return p;
    };
    constexpr bool kPrepares = requires(Step& st, std::span<const plan::Sequence> q, std::span<const int> t) {
      st.prepare(q, t, 1.0);
      st.accumulate();
    };
    Planned cur = plan_step();
    bool cur_prepared = false;
    while (state.step < total_) {
      const auto t0 = Clock::now();
      const double norm = double(cur.examples) * rec::kCodeLevels;
      const long long epoch = cur.epoch;
      const bool epoch_end = cur.epoch_end;
      LogRow row;
      for (std::size_t m = 0; m < cur.mbs.size(); ++m) {
        const TeacherBatch tb = teacher_batch(examples_, cur.mbs[m].indices);
        if constexpr (kPrepares) {
          if (m == 0 && cur_prepared) step_.accumulate();
          else step_.accumulate(tb.sequences, tb.targets, norm);
        } else {
          step_.accumulate(tb.sequences, tb.targets, norm);
        }
        row.tokens += tb.prompt_tokens + static_cast<long long>(tb.targets.size());
      }
      const DataCursor after = cur.after;
      // The next step's first micro-batch is planned and uploaded while the GPU still runs this one.
      cur_prepared = false;
      if (state.step + 1 < total_) {
        cur = plan_step();
        if constexpr (kPrepares) {
          const TeacherBatch tb = teacher_batch(examples_, cur.mbs[0].indices);
          step_.prepare(tb.sequences, tb.targets, double(cur.examples) * rec::kCodeLevels);
          cur_prepared = true;
        }
      }
      row.lr = schedule_.at(state.step);
      const StepResult r = step_.apply(row.lr);
      ++state.step;
      state.cursor = after;
      row.step = state.step;
      row.epoch = epoch;
      row.loss = r.loss;
      row.grad_norm = r.grad_norm;
      row.seconds = std::chrono::duration<double>(Clock::now() - t0).count();
      ++done_here;
      const bool last = state.step == total_;
      const bool validate =
          evaluate_ && (last || (opt_.eval_every > 0 ? state.step % opt_.eval_every == 0 : epoch_end));
      bool improved = false;
      if (validate) {
        const Evaluation e = evaluate_(step_.weights());
        if (!std::isfinite(e.metric))
          throw NumericError("trainer: step " + std::to_string(state.step) + ": the validation metric is not finite");
        row.metric = e.metric;
        improved = !state.best_metric || e.metric > *state.best_metric;
        if (improved) {
          state.best_metric = e.metric;
          state.best_step = state.step;
          since_best = 0;
        } else {
          ++since_best;
        }
        state.extra["since_best"] = since_best;
        state.extra["last_eval"] = e.details;
      }
      write_log(row);
      sum.log.push_back(row);
      const bool stop = validate && opt_.patience > 0 && since_best >= opt_.patience;
      // Checkpoints: after each validation (the best one kept by name), and at the end.
      if (ckpt && (validate || last || stop)) save(*ckpt, state);
      if (opt_.progress) {  // at most five updates a second, and the last step
        const double el = std::chrono::duration<double>(Clock::now() - start).count();
        if (last || stop || el - last_progress_ >= 0.2) {
          last_progress_ = el;
          progress(state.step, row, el, done_here, state.best_metric);
        }
      }
      if (stop) {
        sum.stopped_early = true;
        break;
      }
    }
    if (opt_.progress) std::fprintf(stderr, "\n");
    sum.steps = state.step;
    sum.best_metric = state.best_metric;
    sum.best_step = state.best_step;
    return sum;
  }

 private:
  void save(CheckpointRun& ckpt, const TrainerState& state) {
    const ModelWeights w = step_.weights();
    AdamW<float> opt(w, step_.options());
    opt.first_moment() = step_.first_moment();
    opt.second_moment() = step_.second_moment();
    opt.set_steps(step_.steps());
    ckpt.save(w, opt, state);
  }

  // A fresh log, or (resuming from step `from`) the old one's header and rows up to that step: rows an interrupted
  // process logged after its last checkpoint are rerun, so they are dropped.
  void open_log(long long from) {
    if (opt_.out.empty()) return;
    const auto path = opt_.out / "train_log.csv";
    std::vector<std::string> kept;
    if (from > 0) {
      std::ifstream in(path);
      for (std::string l; std::getline(in, l);)
        if (kept.empty() || std::atoll(l.c_str()) <= from) kept.push_back(l);
    }
    log_.open(path, std::ios::trunc);
    if (!log_) throw IoError(path.string() + ": cannot open the training log");
    if (kept.empty()) kept.push_back("step,epoch,loss,grad_norm,lr,tokens,seconds,tokens_per_s,valid_metric");
    for (const auto& l : kept) log_ << l << "\n";
  }
  void write_log(const LogRow& r) {
    if (!log_.is_open()) return;
    char buf[256];
    std::snprintf(buf, sizeof buf, "%lld,%lld,%.9g,%.9g,%.9g,%lld,%.6f,%.1f,", r.step, r.epoch, r.loss, r.grad_norm,
                  r.lr, r.tokens, r.seconds, r.seconds > 0 ? double(r.tokens) / r.seconds : 0.0);
    log_ << buf;
    if (r.metric) log_ << *r.metric;
    log_ << "\n";
    log_.flush();
    if (!log_) throw IoError((opt_.out / "train_log.csv").string() + ": write failed");
  }
  void progress(long long step, const LogRow& r, double elapsed, long long done_here, std::optional<double> best) {
    const double per = elapsed / double(done_here), eta = per * double(total_ - step);
    const int width = 24, fill = static_cast<int>(width * double(step) / double(total_));
    std::string bar(static_cast<std::size_t>(fill), '=');
    bar.resize(width, ' ');
    std::fprintf(stderr, "\r[%s] %lld/%lld loss %.4f  %.0f tok/s  ETA %02d:%02d%s%s   ", bar.c_str(), step, total_,
                 r.loss, r.seconds > 0 ? double(r.tokens) / r.seconds : 0.0, int(eta) / 60, int(eta) % 60,
                 best ? "  best " : "", best ? std::to_string(*best).substr(0, 6).c_str() : "");
  }

  Step& step_;
  std::span<const Example> examples_;
  TrainOptions opt_;
  Evaluator evaluate_;
  long long total_ = 0;
  LrSchedule schedule_;
  std::ofstream log_;
  double last_progress_ = -1.0;
};

}  // namespace earn::train
