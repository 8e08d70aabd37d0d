// earn/backend/cuda/train_step.cuh - one optimizer step of training on an NVIDIA GPU: the CUDA twin of
// earn/train/cpu_step.hpp (same calls, same plan, same arithmetic order where it matters).
//
// Layout: every parameter lives in one flat fp32 buffer in ModelWeights::tensors() order (the master weights), with
// gradients and both AdamW moments in the same layout, and a copy in storage type T (bf16 / fp16, or fp32 for parity
// tests) that the GEMMs read. tensors() order makes the fused layouts free: wq|wk|wv are consecutive (one
// [qd + 2 kvd, dim] QKV matrix), bq|bk|bv too, w1|w3 (one [2 hidden, dim] gate|up matrix), tok_embeddings then the
// registers (one [vocab + r, dim] table the input rows index).
// A micro-batch: the plan (plan/forward.hpp) is made on the host and uploaded in one copy; forward saves per layer
// its input rows, the RMSNorm statistics, the normed rows, q|k|v, attention output and log-sum-exp, gate|up and the
// activation; backward walks the layers back, GEMMs on cuBLAS (fp32 accumulation; weight gradients accumulate in
// fp32 over micro-batches), attention on train_attention.cuh, the rest on train_kernels.cuh. apply() reads back the
// per-piece sums of squared gradients and the losses (one synchronisation per optimizer step), refuses a
// non-finite one naming the tensor, clips, and runs AdamW over every tensor in one launch.
// Graphs: a micro-batch's ~25 launches per layer are one CUDA graph replayed for every micro-batch of the same
// padded shape (host launch cost was the step's bottleneck for small models). Each phase's rows are padded to a
// multiple of 128 with zero rows (always at least one: padded keeps, answers and ids point at it), the sequences
// to a multiple of 32 (empty segments), the answer rows likewise (target -1: no loss, no gradient); a padding row
// stays zero through every layer and contributes nothing to any gradient. Every per-micro-batch value a launch
// reads (positions, segments, keeps, answer rows, targets, embedding ids, 1 / norm) comes from the uploaded plan.
#pragma once

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <memory>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "earn/backend/cuda/blas.cuh"
#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"
#include "earn/backend/cuda/train_attention.cuh"
#include "earn/backend/cuda/train_kernels.cuh"
#include "earn/core/error.hpp"
#include "earn/model/weights.hpp"
#include "earn/plan/forward.hpp"
#include "earn/train/optimizer.hpp"

namespace earn::train {

/// The training state of one model on the GPU, storage type `DType` for GEMM operands (fp32 master weights and
/// optimizer state always).
/// \code
///   earn::train::CudaStep<earn::EarnSchedule, earn::dtype::Bf16> step(host_weights, earn::EarnSchedule{2}, {});
///   step.accumulate(seqs, targets, norm);             // per micro-batch, asynchronous
///   earn::train::StepResult r = step.apply(lr);        // synchronises once
/// \endcode
template <class Schedule, class DType>
class CudaStep {
 public:
  using T = cuda::storage_t<DType>;
  using backend_type = CudaT<DType>;

  CudaStep(const ModelWeights& w, Schedule schedule, AdamWOptions opt)
      : c_(w.config), schedule_(schedule), opt_(std::move(opt)), rp_(int(w.registers.prefix.rows())),
        rs_(int(w.registers.suffix.rows())) {
    w.validate();
    opt_.validate();
    schedule_.validate(c_.n_layers, rp_ + rs_);
    // The tensor table and its offsets in the flat buffers.
    std::size_t off = 0;
    for (const auto& t : w.tensors()) {
      table_.push_back({t.name, t.role, t.layer, off, t.size, t.rows, t.cols});
      off += std::size_t(t.size);
    }
    total_ = off;
    p_.reserve(total_);
    g_.reserve(total_);
    m_.reserve(total_);
    v_.reserve(total_);
    w_.reserve(total_);
    set_weights(w);
    EARN_CUDA_CHECK(cudaMemsetAsync(m_.data(), 0, total_ * 4, stream()));
    EARN_CUDA_CHECK(cudaMemsetAsync(v_.data(), 0, total_ * 4, stream()));
    zero_grad();
    // Pieces of at most kPiece elements, never straddling two tensors (per-tensor sums and settings).
    for (std::size_t t = 0; t < table_.size(); ++t)
      for (Index b = 0; b < table_[t].size; b += cuda::kernel::kPiece)
        pieces_host_.push_back({static_cast<long long>(table_[t].offset + b),
                                static_cast<int>(std::min<Index>(cuda::kernel::kPiece, table_[t].size - b)),
                                static_cast<int>(t)});
    pieces_.reserve(pieces_host_.size());
    EARN_CUDA_CHECK(cudaMemcpy(pieces_.data(), pieces_host_.data(), pieces_host_.size() * sizeof(cuda::kernel::Piece),
                               cudaMemcpyHostToDevice));
    partial_.reserve(pieces_host_.size());
    adam_.reserve(table_.size());
    losses_.reserve(kMaxMicro);
    EARN_CUDA_CHECK(cublasSetStream(blas_.get(), stream()));
    int dev = 0;
    EARN_CUDA_CHECK(cudaGetDevice(&dev));
    int smem = 0;
    EARN_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
    smem_limit_ = static_cast<std::size_t>(smem);
    layers_.resize(c_.n_layers);
    // Offsets the launches use, looked up once.
    emb_off_ = offset("tok_embeddings");
    final_norm_off_ = offset("final_norm");
    cls_off_ = offset(c_.tied_embeddings ? "tok_embeddings" : "lm_head");
    for (int l = 0; l < c_.n_layers; ++l) {
      LayerOffsets o;
      o.attn_norm = layer_offset(l, "attn_norm");
      o.wq = layer_offset(l, "wq");
      o.bq = c_.qkv_bias ? layer_offset(l, "bq") : 0;
      o.wo = layer_offset(l, "wo");
      o.ffn_norm = layer_offset(l, "ffn_norm");
      o.w1 = layer_offset(l, "w1");
      o.w2 = layer_offset(l, "w2");
      loff_.push_back(o);
      schedule_.visit(l, [&]<class L>(L) { cuda::prepare_train_attention<typename L::policy, T>(c_.head_dim()); });
    }
    // cuBLAS's workspace is ours: a graph capture must not depend on cuBLAS allocating one.
    blas_ws_.reserve(std::size_t(32) << 20);
    EARN_CUDA_CHECK(cublasSetWorkspace(blas_.get(), blas_ws_.data(), blas_ws_.size()));
    loss_now_.reserve(1);
  }

  const ModelConfig& config() const { return c_; }
  const Schedule& schedule() const { return schedule_; }
  const AdamWOptions& options() const { return opt_; }
  cudaStream_t stream() const { return stream_.get(); }
  /// Optimizer steps taken.
  long long steps() const { return t_; }
  void set_steps(long long t) { t_ = t; }
  /// Rows the last micro-batch computed, summed over layers.
  long long last_layer_rows() const { return layer_rows_; }
  /// Switch the tensor-core attention kernels off (tests: the CUDA-core kernels are the reference).
  void use_tensor_core_attention(bool on) { tc_on_ = on; }
  /// Replay micro-batches of one padded shape from a CUDA graph (default on); off: launch one by one (profiling, and
  /// the tests' second path). Either way the same kernels run on the same padded shapes.
  void use_graphs(bool on) {
    graphs_on_ = on;
    if (!on) graphs_.clear();
  }
  /// Graphs held (tests: a repeated shape replays).
  std::size_t graph_count() const { return graphs_.size(); }

  /// Benchmarks: time the phases of every following step with CUDA events (GPU time between consecutive marks, summed
  /// by phase name) and the host's time in accumulate / apply. profile() returns and clears the sums (ms). Profiling
  /// launches one by one (no graphs) behind a spin kernel of ~0.1 s, so the marks see the GPU's own time, not the
  /// host's launch rate; the steps it times are that much slower.
  void set_profiling(bool on) {
    prof_on_ = on;
    prof_.clear();
    marks_.clear();
  }
  std::vector<std::pair<std::string, double>> profile() {
    flush_marks();
    auto out = std::move(prof_);
    prof_.clear();
    return out;
  }

  /// The master weights copied to the host (waits for the stream).
  ModelWeights weights() const { return download(p_); }
  /// Replaces every parameter (same config and register counts); refreshes the compute copy.
  void set_weights(const ModelWeights& w) {
    upload(p_, w);
    refresh_copy();
  }
  /// AdamW's moments as models (checkpoints) and their restoration.
  ModelWeights first_moment() const { return download(m_); }
  ModelWeights second_moment() const { return download(v_); }
  void set_moments(const ModelWeights& m, const ModelWeights& v) {
    upload(m_, m);
    upload(v_, v);
  }
  /// The accumulated gradients as a model (tests).
  ModelWeights gradients() const { return download(g_); }

  /// Forward and backward of one micro-batch (asynchronous): as CpuStep::accumulate; the loss is reported by apply().
  void accumulate(std::span<const plan::Sequence> seqs, std::span<const int> targets, double norm) {
    prepare(seqs, targets, norm);
    accumulate();
  }

  /// The host half of accumulate: plan, checks, the padded layout and its upload (asynchronous, stream-ordered). A
  /// loop calls it for the next step's first micro-batch before apply(), so the host plans while the GPU still runs
  /// this step; accumulate() then launches it at once.
  void prepare(std::span<const plan::Sequence> seqs, std::span<const int> targets, double norm) {
    if (micro_ >= kMaxMicro) throw ConfigError("train: more than " + std::to_string(kMaxMicro) + " micro-batches in one step");
    pending_.reset();  // one never launched (a loop that stopped early) is superseded
    plan::ForwardPlan fp = plan::plan_forward(schedule_, c_.n_layers, rp_, rs_, seqs);
    const std::vector<int> answers = fp.all_answer_rows();
    if (targets.size() != answers.size())
      throw ConfigError("train: " + std::to_string(targets.size()) + " targets for " + std::to_string(answers.size()) +
                        " answer rows");
    for (int t : targets)
      if (t < 0 || t >= c_.vocab_size) throw RangeError("train: target token " + std::to_string(t) + " is outside the vocabulary");
    for (int s : fp.source)
      if (s >= c_.vocab_size) throw RangeError("train: token " + std::to_string(s) + " is outside the vocabulary");
    if (!(norm > 0)) throw ConfigError("train: the loss normaliser must be positive");
    const auto h0 = std::chrono::steady_clock::now();
    if (prof_on_) {  // the GPU waits while the host plans and enqueues the whole micro-batch: marks time GPU work only
      cuda::kernel::spin<<<1, 1, 0, stream()>>>(200000000LL);
      EARN_CUDA_CHECK_LAUNCH();
    }
    mark("(gpu: a spin while the host plans and launches)");
    Layout lay = layout(fp, answers);
    upload_plan(fp, lay, answers, targets, norm);
    reserve_buffers(fp, lay);
    mark("upload");
    pending_.emplace(Pending{std::move(fp), std::move(lay)});
    add_host("host: prepare (plan, checks, upload)", h0);
  }

  /// Launches the micro-batch prepare() made ready (a graph replay for a shape seen before).
  void accumulate() {
    if (!pending_) throw ConfigError("train: accumulate() without a prepared micro-batch");
    const auto h0 = std::chrono::steady_clock::now();
    const plan::ForwardPlan& fp = pending_->fp;
    const Layout& lay = pending_->lay;
    auto record = [&] {
      forward(fp, lay);
      backward(fp, lay);
    };
    if (graphs_on_ && !prof_on_) {
      std::vector<long long> key{lay.nseg, lay.answers, tc_on_ ? 1 : 0, gen_};
      key.insert(key.end(), lay.rows.begin(), lay.rows.end());
      key.insert(key.end(), lay.max_n.begin(), lay.max_n.end());
      graphs_.run(std::move(key), stream(), record);
    } else {
      record();
    }
    EARN_CUDA_CHECK(cudaMemcpyAsync(losses_.data() + micro_, loss_now_.data(), sizeof(double), cudaMemcpyDeviceToDevice,
                                    stream()));
    ++micro_;
    layer_rows_ = 0;
    for (int l = 0; l < fp.n_layers(); ++l) layer_rows_ += fp.layer_rows(l).size();
    pending_.reset();
    add_host("host: launch", h0);
  }

  /// Ends an optimizer step (as CpuStep::apply): NumericError naming the tensor when a gradient or the loss is not
  /// finite; otherwise clip, AdamW at `lr`, zero the gradients. Returns the step's loss and gradient norm.
  StepResult apply(double lr) {
    namespace k = cuda::kernel;
    const auto h0 = std::chrono::steady_clock::now();
    const int np = static_cast<int>(pieces_host_.size());
    k::piece_sumsq<<<np, 256, 0, stream()>>>(g_.data(), pieces_.data(), partial_.data());
    EARN_CUDA_CHECK_LAUNCH();
    mark("apply: gradient norms");
    std::vector<float> part(np);
    std::vector<double> loss(std::max(micro_, 1));
    EARN_CUDA_CHECK(cudaMemcpyAsync(part.data(), partial_.data(), np * sizeof(float), cudaMemcpyDeviceToHost, stream()));
    if (micro_ > 0)
      EARN_CUDA_CHECK(cudaMemcpyAsync(loss.data(), losses_.data(), micro_ * sizeof(double), cudaMemcpyDeviceToHost,
                                      stream()));
    EARN_CUDA_CHECK(cudaStreamSynchronize(stream()));
    StepResult r;
    for (int i = 0; i < micro_; ++i) r.loss += loss[i];
    if (!std::isfinite(r.loss))
      throw NumericError("train: step " + std::to_string(t_ + 1) + ": the loss is " + std::to_string(r.loss));
    std::vector<double> per(table_.size(), 0.0);
    for (int i = 0; i < np; ++i) per[pieces_host_[i].tensor] += double(part[i]);
    double ss = 0;
    for (std::size_t t = 0; t < table_.size(); ++t) {
      if (!std::isfinite(per[t]))
        throw NumericError("train: step " + std::to_string(t_ + 1) + ": the gradient of " + table_[t].name +
                           " holds NaN or Inf");
      if (!opt_.freeze.frozen(view(t))) ss += per[t];
    }
    r.grad_norm = std::sqrt(ss);
    const double clip = opt_.max_grad_norm > 0 ? std::min(1.0, opt_.max_grad_norm / (r.grad_norm + 1e-6)) : 1.0;
    ++t_;
    const double bc1 = 1.0 - std::pow(opt_.beta1, double(t_)), bc2 = 1.0 - std::pow(opt_.beta2, double(t_));
    std::vector<k::AdamTensor> at(table_.size());
    for (std::size_t t = 0; t < table_.size(); ++t)
      at[t] = {static_cast<float>(1.0 - lr * opt_.decay_of(table_[t].role)), opt_.freeze.frozen(view(t)) ? 1 : 0};
    EARN_CUDA_CHECK(cudaMemcpyAsync(adam_.data(), at.data(), at.size() * sizeof(k::AdamTensor), cudaMemcpyHostToDevice,
                                    stream()));
    k::adamw_pieces<T><<<np, 256, 0, stream()>>>(p_.data(), g_.data(), m_.data(), v_.data(), w_.data(), pieces_.data(),
                                                 adam_.data(), static_cast<float>(clip), float(opt_.beta1),
                                                 float(opt_.beta2), static_cast<float>(lr / bc1),
                                                 static_cast<float>(std::sqrt(bc2)), float(opt_.eps));
    EARN_CUDA_CHECK_LAUNCH();
    zero_grad();
    mark("apply: adamw, zero gradients");
    micro_ = 0;
    add_host("host: apply (incl. waiting for the GPU)", h0);
    return r;
  }

  /// Discards the gradients and losses accumulated since the last apply().
  void zero_grad() {
    EARN_CUDA_CHECK(cudaMemsetAsync(g_.data(), 0, total_ * 4, stream()));
    micro_ = 0;
  }

 private:
  static constexpr int kMaxMicro = 4096;
  struct TensorSlot {
    std::string name;
    TensorRole role;
    int layer;
    std::size_t offset;
    Index size, rows, cols;
  };
  // Per layer: what backward reads (sizes follow the layer's rows).
  struct Saved {
    cuda::DeviceBuffer<float> x, x1, inv1, inv2, lse;
    cuda::DeviceBuffer<T> h1, qkv, att, h2, gu, act;
  };

  TensorView<const float> view(std::size_t t) const {
    const TensorSlot& s = table_[t];
    return {s.name, s.role, s.layer, nullptr, s.size, s.rows, s.cols};
  }
  std::size_t offset(const std::string& name) const {
    for (const auto& s : table_)
      if (s.name == name) return s.offset;
    throw ConfigError("train: no tensor " + name);
  }
  std::size_t layer_offset(int l, const char* what) const { return offset("layers." + std::to_string(l) + "." + what); }

  void upload(cuda::DeviceBuffer<float>& dst, const ModelWeights& w) {
    auto ts = w.tensors();
    if (ts.size() != table_.size()) throw ConfigError("train: the model's tensors differ from the trainer's");
    std::vector<float> flat(total_);
    for (std::size_t t = 0; t < ts.size(); ++t) {
      if (ts[t].name != table_[t].name || ts[t].size != table_[t].size)
        throw ConfigError("train: tensor " + ts[t].name + " differs from the trainer's " + table_[t].name);
      std::copy(ts[t].data, ts[t].data + ts[t].size, flat.begin() + std::ptrdiff_t(table_[t].offset));
    }
    EARN_CUDA_CHECK(cudaMemcpyAsync(dst.data(), flat.data(), total_ * 4, cudaMemcpyHostToDevice, stream()));
    EARN_CUDA_CHECK(cudaStreamSynchronize(stream()));  // `flat` goes away
  }
  ModelWeights download(const cuda::DeviceBuffer<float>& src) const {
    std::vector<float> flat(total_);
    EARN_CUDA_CHECK(cudaMemcpyAsync(flat.data(), src.data(), total_ * 4, cudaMemcpyDeviceToHost, stream()));
    EARN_CUDA_CHECK(cudaStreamSynchronize(stream()));
    ModelWeights w = random_weights(c_, {.prefix_registers = rp_, .suffix_registers = rs_});
    auto ts = w.tensors();
    for (std::size_t t = 0; t < ts.size(); ++t)
      std::copy(flat.begin() + std::ptrdiff_t(table_[t].offset),
                flat.begin() + std::ptrdiff_t(table_[t].offset + std::size_t(table_[t].size)), ts[t].data);
    return w;
  }
  void refresh_copy() {
    cuda::kernel::convert<T><<<cuda::kernel::grid_for(Index(total_)), cuda::kernel::kThreads, 0, stream()>>>(
        p_.data(), static_cast<long long>(total_), w_.data());
    EARN_CUDA_CHECK_LAUNCH();
  }

  // The padded shape of a micro-batch: what a graph bakes in.
  struct Layout {
    int nseg = 0;               // sequences, padded to a multiple of 32 (empty segments)
    int answers = 0;            // answer rows, padded to a multiple of 32 plus a spare
    std::vector<int> rows;      // per phase: rows padded to the next multiple of 128 (row `real` is a zero row)
    std::vector<int> max_n;     // per phase: its longest segment rounded up to kBucket, or kTrainAttnMaxRows when at
                                // most that (every bucket launches: a shorter longest must not change the graph)
  };
  // Tensor-core attention runs per bucket of segment lengths (1-32, 33-64, 65-96, 97-128 rows), each launch with the
  // shared memory of its longest: one size for all would hold every block to the longest segment's occupancy.
  static constexpr int kBucket = 32, kBuckets = cuda::kernel::kTrainAttnMaxRows / kBucket;
  // Always > n: a zero row exists past the real ones. Steps of 256 keep a run's distinct shapes (graphs) few.
  static int pad_rows(int n) { return (n / 256 + 1) * 256; }
  Layout layout(const plan::ForwardPlan& fp, const std::vector<int>& answers) const {
    Layout lay;
    lay.nseg = (fp.input().segments() + 31) / 32 * 32;
    lay.answers = (static_cast<int>(answers.size()) / 32 + 1) * 32;
    for (const auto& ph : fp.phases) {
      lay.rows.push_back(pad_rows(ph.rows.size()));
      int m = 0;
      for (int n : ph.rows.seg_n) m = std::max(m, n);
      lay.max_n.push_back(m <= cuda::kernel::kTrainAttnMaxRows ? cuda::kernel::kTrainAttnMaxRows
                                                               : (m + kBucket - 1) / kBucket * kBucket);
    }
    return lay;
  }

  // The micro-batch's integers, padded to `lay`, in one upload (offsets depend on `lay` alone, so a graph captured for
  // one micro-batch reads the next one's values): input codes, per phase positions (plain and packed with the rows'
  // kinds), keeps and segments, answer rows
  // and targets, the embedding CSR and its id count, 1 / norm.
  void upload_plan(const plan::ForwardPlan& fp, const Layout& lay, const std::vector<int>& answers,
                   std::span<const int> targets, double norm) {
    ints_host_.clear();
    auto add = [&](const auto& v, int size, int fill) {
      const int at = static_cast<int>(ints_host_.size());
      ints_host_.insert(ints_host_.end(), v.begin(), v.end());
      ints_host_.resize(static_cast<std::size_t>(at + size), fill);
      return at;
    };
    const int n0 = fp.input().size();
    i_source_ = add(fp.source, lay.rows[0], cuda::kernel::kPadRow);
    ph_.assign(fp.phases.size(), {});
    for (std::size_t p = 0; p < fp.phases.size(); ++p) {
      const plan::RowSet& r = fp.phases[p].rows;
      ph_[p].rows = lay.rows[p];
      ph_[p].real = r.size();
      ph_[p].pos = add(r.pos, lay.rows[p], 0);
      // The same rows as pack_row(pos, kind), for the attention of a policy with a kind rule (Gist).
      std::vector<int> packed(r.pos.size());
      for (std::size_t i = 0; i < packed.size(); ++i) packed[i] = attention::pack_row(r.pos[i], r.kind[i]);
      ph_[p].packed = add(packed, lay.rows[p], 0);
      // Padding rows of a gathered phase come from the zero row of the phase below.
      ph_[p].keep = p == 0 ? -1 : add(fp.phases[p].keep, lay.rows[p], fp.phases[p - 1].rows.size());
      std::vector<int> segs;
      for (int s = 0; s < r.segments(); ++s) {
        segs.push_back(r.seg_off[s]);
        segs.push_back(r.seg_n[s]);
      }
      ph_[p].segs = add(segs, 2 * lay.nseg, 0);
      // Buckets by length: per bucket its count, then its segments' indices (padded to nseg).
      ph_[p].buckets = static_cast<int>(ints_host_.size());
      for (int b = 0; b < kBuckets; ++b) {
        std::vector<int> ids;
        for (int sg = 0; sg < r.segments(); ++sg)
          if ((r.seg_n[sg] + kBucket - 1) / kBucket - 1 == b) ids.push_back(sg);
        ints_host_.push_back(static_cast<int>(ids.size()));
        add(ids, lay.nseg, 0);
      }
    }
    i_answers_ = add(answers, lay.answers, fp.top().size());  // padding answers read the top's zero row
    i_targets_ = add(targets, lay.answers, -1);
    // Embedding CSR: each distinct table row (token t, or register j at vocab + j) and the input rows using it.
    std::vector<int> id_of(n0), order(n0);
    for (int i = 0; i < n0; ++i) id_of[i] = fp.source[i] >= 0 ? fp.source[i] : c_.vocab_size + (-fp.source[i] - 1);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return id_of[a] < id_of[b]; });
    std::vector<int> ids, off;
    for (int k = 0; k < n0; ++k)
      if (k == 0 || id_of[order[k]] != id_of[order[k - 1]]) {
        ids.push_back(id_of[order[k]]);
        off.push_back(k);
      }
    off.push_back(n0);
    const int n_ids = static_cast<int>(ids.size());
    i_ids_ = add(ids, lay.rows[0], 0);
    i_off_ = add(off, lay.rows[0] + 1, n0);
    i_rows_of_ = add(order, lay.rows[0], 0);
    i_n_ids_ = add(std::vector<int>{n_ids}, 1, 0);
    const float inv = static_cast<float>(1.0 / norm);
    int inv_bits;
    std::memcpy(&inv_bits, &inv, sizeof inv);
    i_inv_norm_ = add(std::vector<int>{inv_bits}, 1, 0);
    // Through one of two pinned buffers: a copy from pageable memory would first wait for the stream to drain,
    // keeping the GPU idle while the host plans; the buffer used two micro-batches ago is free once its copy is.
    Pinned& pb = pinned_[pinned_next_];
    pinned_next_ ^= 1;
    EARN_CUDA_CHECK(cudaEventSynchronize(pb.copied.get()));
    if (pb.cap < ints_host_.size()) {
      if (pb.p) EARN_CUDA_CHECK(cudaFreeHost(pb.p));
      pb.p = nullptr;
      EARN_CUDA_CHECK(cudaMallocHost(&pb.p, ints_host_.size() * sizeof(int)));
      pb.cap = ints_host_.size();
    }
    std::copy(ints_host_.begin(), ints_host_.end(), pb.p);
    const int* before = ints_.data();
    ints_.reserve(ints_host_.size());
    if (ints_.data() != before) ++gen_;
    EARN_CUDA_CHECK(cudaMemcpyAsync(ints_.data(), pb.p, ints_host_.size() * sizeof(int), cudaMemcpyHostToDevice,
                                    stream()));
    pb.copied.record(stream());
  }
  const int* ints(int at) const { return ints_.data() + at; }
  const float* inv_norm() const { return reinterpret_cast<const float*>(ints_.data() + i_inv_norm_); }

  // Every buffer sized for `lay`; a buffer that moves invalidates the graphs (they bake addresses in).
  template <class B>
  void grow(B& b, std::size_t n) {
    const void* before = b.data();
    b.reserve(std::max<std::size_t>(n, 1));
    if (b.data() != before) ++gen_;
  }
  void reserve_buffers(const plan::ForwardPlan& fp, const Layout& lay) {
    const std::size_t d = c_.dim, qd = std::size_t(c_.n_heads) * c_.head_dim(), hid = c_.hidden_dim;
    const std::size_t width = qd + 2 * std::size_t(c_.kv_dim()), n = std::size_t(lay.rows[0]);
    for (auto* b : {&top_, &dx_, &dx2_, &dh_}) grow(*b, std::max<std::size_t>(n, std::size_t(lay.answers)) * d);
    grow(dxT_, n * d);
    grow(dact_, n * hid);
    grow(dgu_, n * 2 * hid);
    grow(datt_, n * qd);
    grow(dqkv_, n * width);
    grow(dsum_, n * c_.n_heads);
    grow(colpart_, std::size_t(cuda::kernel::kColChunks) * std::max(width, d));
    const std::size_t a = std::size_t(lay.answers);
    grow(xa_, a * d);
    grow(inva_, a);
    grow(ha_, a * d);
    grow(logits_, a * c_.vocab_size);
    grow(dlogits_, a * c_.vocab_size);
    grow(loss_rows_, a);
    for (int l = 0; l < c_.n_layers; ++l) {
      const std::size_t r = std::size_t(lay.rows[fp.layer_phase[l]]);
      Saved& S = layers_[l];
      for (auto* b : {&S.x, &S.x1}) grow(*b, r * d);
      for (auto* b : {&S.inv1, &S.inv2}) grow(*b, r);
      grow(S.lse, r * c_.n_heads);
      for (auto* b : {&S.h1, &S.h2}) grow(*b, r * d);
      grow(S.qkv, r * width);
      grow(S.att, r * qd);
      grow(S.gu, r * 2 * hid);
      grow(S.act, r * hid);
    }
  }

  void forward(const plan::ForwardPlan& fp, const Layout& lay) {
    namespace k = cuda::kernel;
    const cudaStream_t s = stream();
    const int d = c_.dim, hd = c_.head_dim(), nh = c_.n_heads, nkv = c_.n_kv_heads, hid = c_.hidden_dim;
    const int qd = nh * hd, kvd = nkv * hd, width = qd + 2 * kvd, answers = lay.answers;
    const int n0 = lay.rows[0];
    k::embed_train<<<k::grid_for(Index{n0} * d), k::kThreads, 0, s>>>(ints(i_source_), p_.data() + emb_off_, n0, d,
                                                                       c_.vocab_size, top_.data());
    EARN_CUDA_CHECK_LAUNCH();
    for (int l = 0; l < c_.n_layers; ++l) {
      const int ph = fp.layer_phase[l], n = ph_[ph].rows;
      Saved& S = layers_[l];
      const LayerOffsets& o = loff_[l];
      if (fp.gathers_before(l))
        k::gather_rows<float><<<k::grid_for(Index{n} * d), k::kThreads, 0, s>>>(top_.data(), ints(ph_[ph].keep), n, d,
                                                                                 S.x.data());
      else
        EARN_CUDA_CHECK(cudaMemcpyAsync(S.x.data(), top_.data(), std::size_t(n) * d * 4, cudaMemcpyDeviceToDevice, s));
      EARN_CUDA_CHECK_LAUNCH();
      k::rmsnorm_save<T><<<n, 256, 0, s>>>(S.x.data(), p_.data() + o.attn_norm, c_.norm_eps, d, S.h1.data(),
                                           S.inv1.data());
      EARN_CUDA_CHECK_LAUNCH();
      cuda::linear<T, T>(blas_.get(), S.h1.data(), w_.data() + o.wq, S.qkv.data(), n, d, width);
      const float* bias = c_.qkv_bias ? p_.data() + o.bq : nullptr;
      k::bias_rope<T><<<k::grid_for(Index{n} * (nh + nkv) * (hd / 2)), k::kThreads, 0, s>>>(
          S.qkv.data(), bias, ints(ph_[ph].pos), n, nh, nkv, hd, c_.rope_theta,
          c_.rope_style == RopeStyle::kInterleaved ? 1 : 0, 0);
      EARN_CUDA_CHECK_LAUNCH();
      mark("forward: gather, norm, qkv gemm, rope");
      // Padding rows belong to no segment: their attention output must be zero (the attention writes segments only).
      EARN_CUDA_CHECK(cudaMemsetAsync(S.att.data(), 0, std::size_t(n) * qd * sizeof(T), s));
      schedule_.visit(l, [&]<class L>(const L& layer) {
        attention(attention::LayerMask<typename L::policy>{layer.rule, l}, ph, lay, S, /*backward=*/false);
      });
      mark("forward: attention");
      EARN_CUDA_CHECK(cudaMemcpyAsync(S.x1.data(), S.x.data(), std::size_t(n) * d * 4, cudaMemcpyDeviceToDevice, s));
      cuda::linear<T, float>(blas_.get(), S.att.data(), w_.data() + o.wo, S.x1.data(), n, qd, d, 1.0f);
      k::rmsnorm_save<T><<<n, 256, 0, s>>>(S.x1.data(), p_.data() + o.ffn_norm, c_.norm_eps, d, S.h2.data(),
                                           S.inv2.data());
      EARN_CUDA_CHECK_LAUNCH();
      cuda::linear<T, T>(blas_.get(), S.h2.data(), w_.data() + o.w1, S.gu.data(), n, d, 2 * hid);
      if (sizeof(T) == 2 && hid % 8 == 0)
        k::swiglu_vec8<T><<<k::grid_for(Index{n} * hid / 8), k::kThreads, 0, s>>>(S.gu.data(), n, hid, S.act.data());
      else
        k::swiglu<T><<<k::grid_for(Index{n} * hid), k::kThreads, 0, s>>>(S.gu.data(), n, hid, S.act.data());
      EARN_CUDA_CHECK_LAUNCH();
      // The layer's output: x1 + act w2^T, into top_ (the next layer's gather source or input).
      EARN_CUDA_CHECK(cudaMemcpyAsync(top_.data(), S.x1.data(), std::size_t(n) * d * 4, cudaMemcpyDeviceToDevice, s));
      cuda::linear<T, float>(blas_.get(), S.act.data(), w_.data() + o.w2, top_.data(), n, hid, d, 1.0f);
      mark("forward: wo gemm, norm, mlp gemms");
    }
    // Final norm and classifier on the answer rows only; the loss and d loss / d logits.
    k::gather_rows<float><<<k::grid_for(Index{answers} * d), k::kThreads, 0, s>>>(top_.data(), ints(i_answers_),
                                                                                  answers, d, xa_.data());
    EARN_CUDA_CHECK_LAUNCH();
    k::rmsnorm_save<T><<<answers, 256, 0, s>>>(xa_.data(), p_.data() + final_norm_off_, c_.norm_eps, d, ha_.data(),
                                               inva_.data());
    EARN_CUDA_CHECK_LAUNCH();
    cuda::linear<T, float>(blas_.get(), ha_.data(), w_.data() + cls_off_, logits_.data(), answers, d, c_.vocab_size);
    k::cross_entropy<T><<<answers, 256, 0, s>>>(logits_.data(), ints(i_targets_), c_.vocab_size, inv_norm(),
                                                loss_rows_.data(), dlogits_.data());
    EARN_CUDA_CHECK_LAUNCH();
    k::sum_in_order<<<1, 1, 0, s>>>(loss_rows_.data(), answers, inv_norm(), loss_now_.data());
    EARN_CUDA_CHECK_LAUNCH();
    mark("forward: final norm, classifier, loss");
  }

  // A layer's attention over phase `ph`: the tensor-core kernels once per length bucket up to the phase's longest
  // segment, or the CUDA-core kernels once over every segment.
  template <class Policy>
  void attention(const attention::LayerMask<Policy>& mask, int ph, const Layout& lay, Saved& S, bool backward) {
    cuda::TrainAttentionArgs<T> a = attn_args(ph, lay, S);
    if constexpr (attention::has_kind_rule<Policy>()) a.pos = ints(ph_[ph].packed);  // see TrainAttentionArgs::pos
    const int longest = lay.max_n[ph];
    if (tc_on_ && cuda::train_attention_tc<T>(c_.head_dim(), longest, smem_limit_)) {
      for (int b = 0; b * kBucket < longest; ++b) {
        a.bucket = ints(ph_[ph].buckets + b * (1 + lay.nseg));
        a.max_n = (b + 1) * kBucket;
        if (backward) cuda::train_attention_backward<Policy, T>(stream(), a, true, mask);
        else cuda::train_attention_forward<Policy, T>(stream(), a, true, mask);
      }
    } else if (backward) {
      cuda::train_attention_backward<Policy, T>(stream(), a, false, mask);
    } else {
      cuda::train_attention_forward<Policy, T>(stream(), a, false, mask);
    }
  }

  cuda::TrainAttentionArgs<T> attn_args(int ph, const Layout& lay, Saved& S) {
    cuda::TrainAttentionArgs<T> a;
    a.qkv = S.qkv.data();
    a.pos = ints(ph_[ph].pos);
    a.segs = reinterpret_cast<const cuda::TrainSegment*>(ints(ph_[ph].segs));
    a.nseg = lay.nseg;
    a.max_n = lay.max_n[ph];
    a.nh = c_.n_heads;
    a.nkv = c_.n_kv_heads;
    a.hd = c_.head_dim();
    a.out = S.att.data();
    a.lse = S.lse.data();
    a.dout = datt_.data();
    a.dqkv = dqkv_.data();
    a.dsum = dsum_.data();
    return a;
  }

  // dst += column sums of the RMSNorm gain gradient: sum over rows of dy x inv.
  void norm_gain_grad(const float* dy, const float* x, const float* inv, int rows, float* dst) {
    namespace k = cuda::kernel;
    const int d = c_.dim;
    k::colsum_norm_partial<<<dim3((d + 255) / 256, k::kColChunks), 256, 0, stream()>>>(dy, x, inv, rows, d,
                                                                                      colpart_.data());
    k::colsum_finish<<<(d + 255) / 256, 256, 0, stream()>>>(colpart_.data(), d, dst);
    EARN_CUDA_CHECK_LAUNCH();
  }

  void to_storage(const float* src, std::size_t n, T* dst) {
    cuda::kernel::convert<T><<<cuda::kernel::grid_for(Index(n)), cuda::kernel::kThreads, 0, stream()>>>(
        src, static_cast<long long>(n), dst);
    EARN_CUDA_CHECK_LAUNCH();
  }

  void backward(const plan::ForwardPlan& fp, const Layout& lay) {
    namespace k = cuda::kernel;
    const cudaStream_t s = stream();
    const int d = c_.dim, hd = c_.head_dim(), nh = c_.n_heads, nkv = c_.n_kv_heads, hid = c_.hidden_dim;
    const int qd = nh * hd, kvd = nkv * hd, width = qd + 2 * kvd, answers = lay.answers;
    float* dcls = g_.data() + cls_off_;
    // Classifier and final norm.
    cuda::linear_dx<T, float>(blas_.get(), dlogits_.data(), w_.data() + cls_off_, dh_.data(), answers, d, c_.vocab_size);
    cuda::linear_dw<T>(blas_.get(), dlogits_.data(), ha_.data(), dcls, answers, d, c_.vocab_size);
    k::rmsnorm_backward<<<answers, 256, 0, s>>>(xa_.data(), p_.data() + final_norm_off_, inva_.data(), dh_.data(),
                                                nullptr, d, dx2_.data());
    EARN_CUDA_CHECK_LAUNCH();
    norm_gain_grad(dh_.data(), xa_.data(), inva_.data(), answers, g_.data() + final_norm_off_);
    const int top = ph_[fp.layer_phase.back()].rows;
    EARN_CUDA_CHECK(cudaMemsetAsync(dx_.data(), 0, std::size_t(top) * d * 4, s));
    k::scatter_rows<<<k::grid_for(Index{answers} * d), k::kThreads, 0, s>>>(dx2_.data(), ints(i_answers_), answers, d,
                                                                           dx_.data());
    EARN_CUDA_CHECK_LAUNCH();
    mark("backward: classifier, final norm");
    // dx_ and dx2_ trade places at gathers; the graph bakes in whichever pointer each launch sees.
    float* dx = dx_.data();
    float* dx_other = dx2_.data();
    for (int l = c_.n_layers - 1; l >= 0; --l) {
      const int ph = fp.layer_phase[l], n = ph_[ph].rows;
      Saved& S = layers_[l];
      const LayerOffsets& o = loff_[l];
      const float* g1 = p_.data() + o.attn_norm;
      const float* g2 = p_.data() + o.ffn_norm;
      // MLP: out = x1 + w2 (silu(w1 h2) * w3 h2)
      to_storage(dx, std::size_t(n) * d, dxT_.data());
      cuda::linear_dx<T, T>(blas_.get(), dxT_.data(), w_.data() + o.w2, dact_.data(), n, hid, d);
      cuda::linear_dw<T>(blas_.get(), dxT_.data(), S.act.data(), g_.data() + o.w2, n, hid, d);
      k::swiglu_backward<T><<<k::grid_for(Index{n} * hid), k::kThreads, 0, s>>>(S.gu.data(), dact_.data(), n, hid,
                                                                               dgu_.data());
      EARN_CUDA_CHECK_LAUNCH();
      cuda::linear_dx<T, float>(blas_.get(), dgu_.data(), w_.data() + o.w1, dh_.data(), n, d, 2 * hid);
      cuda::linear_dw<T>(blas_.get(), dgu_.data(), S.h2.data(), g_.data() + o.w1, n, d, 2 * hid);
      k::rmsnorm_backward<<<n, 256, 0, s>>>(S.x1.data(), g2, S.inv2.data(), dh_.data(), dx, d, dx);
      EARN_CUDA_CHECK_LAUNCH();
      norm_gain_grad(dh_.data(), S.x1.data(), S.inv2.data(), n, g_.data() + o.ffn_norm);
      // Attention: x1 = x + wo att
      to_storage(dx, std::size_t(n) * d, dxT_.data());
      cuda::linear_dx<T, T>(blas_.get(), dxT_.data(), w_.data() + o.wo, datt_.data(), n, qd, d);
      cuda::linear_dw<T>(blas_.get(), dxT_.data(), S.att.data(), g_.data() + o.wo, n, qd, d);
      mark("backward: mlp gemms, norm, wo gemms");
      EARN_CUDA_CHECK(cudaMemsetAsync(dqkv_.data(), 0, std::size_t(n) * width * sizeof(T), s));  // padding rows: 0
      schedule_.visit(l, [&]<class L>(const L& layer) {
        attention(attention::LayerMask<typename L::policy>{layer.rule, l}, ph, lay, S, /*backward=*/true);
      });
      mark("backward: attention");
      k::bias_rope<T><<<k::grid_for(Index{n} * (nh + nkv) * (hd / 2)), k::kThreads, 0, s>>>(
          dqkv_.data(), nullptr, ints(ph_[ph].pos), n, nh, nkv, hd, c_.rope_theta,
          c_.rope_style == RopeStyle::kInterleaved ? 1 : 0, 1);
      EARN_CUDA_CHECK_LAUNCH();
      if (c_.qkv_bias) {
        k::colsum_partial<T><<<dim3((width + 255) / 256, k::kColChunks), 256, 0, s>>>(dqkv_.data(), n, width, width,
                                                                                      colpart_.data());
        k::colsum_finish<<<(width + 255) / 256, 256, 0, s>>>(colpart_.data(), width, g_.data() + o.bq);
        EARN_CUDA_CHECK_LAUNCH();
      }
      cuda::linear_dx<T, float>(blas_.get(), dqkv_.data(), w_.data() + o.wq, dh_.data(), n, d, width);
      cuda::linear_dw<T>(blas_.get(), dqkv_.data(), S.h1.data(), g_.data() + o.wq, n, d, width);
      k::rmsnorm_backward<<<n, 256, 0, s>>>(S.x.data(), g1, S.inv1.data(), dh_.data(), dx, d, dx);
      EARN_CUDA_CHECK_LAUNCH();
      norm_gain_grad(dh_.data(), S.x.data(), S.inv1.data(), n, g_.data() + o.attn_norm);
      if (fp.gathers_before(l)) {  // rows that left the stream here get no gradient from above
        const int below = ph_[ph - 1].rows;
        EARN_CUDA_CHECK(cudaMemsetAsync(dx_other, 0, std::size_t(below) * d * 4, s));
        k::scatter_rows<<<k::grid_for(Index{n} * d), k::kThreads, 0, s>>>(dx, ints(ph_[ph].keep), n, d, dx_other);
        EARN_CUDA_CHECK_LAUNCH();
        std::swap(dx, dx_other);
      }
      mark("backward: rope, bias, qkv gemms, norm, scatter");
    }
    // Token and register rows of the embedding table.
    k::embedding_backward<<<lay.rows[0], 256, 0, s>>>(dx, ints(i_ids_), ints(i_off_), ints(i_rows_of_),
                                                      ints(i_n_ids_), d, g_.data() + emb_off_);
    EARN_CUDA_CHECK_LAUNCH();
    mark("backward: embeddings");
  }

  // Profiling: an event at each mark; the GPU time since the previous mark is that phase's.
  void mark(const char* name) {
    if (!prof_on_) return;
    marks_.emplace_back(name, std::make_unique<cuda::Event>());
    marks_.back().second->record(stream());
  }
  void add(const std::string& name, double ms) {
    for (auto& [n, v] : prof_)
      if (n == name) {
        v += ms;
        return;
      }
    prof_.emplace_back(name, ms);
  }
  void add_host(const char* name, std::chrono::steady_clock::time_point t0) {
    if (prof_on_) add(name, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
  }
  void flush_marks() {
    for (std::size_t i = 1; i < marks_.size(); ++i)
      add(marks_[i].first, cuda::Event::elapsed_ms(*marks_[i - 1].second, *marks_[i].second));
    marks_.clear();
  }

  struct Pending {
    plan::ForwardPlan fp;
    Layout lay;
  };
  std::optional<Pending> pending_;  // prepared, not yet launched
  struct PhaseInts {
    int pos = 0, packed = 0, keep = -1, segs = 0, buckets = 0;  // offsets into the uploaded integers
    int rows = 0, real = 0;            // padded and real rows
  };
  struct LayerOffsets {
    std::size_t attn_norm = 0, wq = 0, bq = 0, wo = 0, ffn_norm = 0, w1 = 0, w2 = 0;
  };

  ModelConfig c_;
  Schedule schedule_;
  AdamWOptions opt_;
  int rp_, rs_;
  std::vector<TensorSlot> table_;
  std::size_t total_ = 0;
  cuda::Stream stream_;
  cuda::BlasHandle blas_;
  std::size_t smem_limit_ = 0;
  bool tc_on_ = true;
  bool prof_on_ = false;
  std::vector<std::pair<std::string, double>> prof_;
  std::vector<std::pair<const char*, std::unique_ptr<cuda::Event>>> marks_;
  long long t_ = 0;
  int micro_ = 0;
  long long layer_rows_ = 0;
  cuda::DeviceBuffer<float> p_, g_, m_, v_;  // [total] master weights, gradients, moments
  cuda::DeviceBuffer<T> w_;                  // [total] compute copy
  std::vector<cuda::kernel::Piece> pieces_host_;
  cuda::DeviceBuffer<cuda::kernel::Piece> pieces_;
  cuda::DeviceBuffer<float> partial_;
  cuda::DeviceBuffer<cuda::kernel::AdamTensor> adam_;
  cuda::DeviceBuffer<double> losses_, loss_rows_;
  std::vector<Saved> layers_;
  std::vector<int> ints_host_;
  // Pinned staging of the plan's integers, double-buffered (upload_plan).
  struct Pinned {
    int* p = nullptr;
    std::size_t cap = 0;
    cuda::Event copied;
    Pinned() = default;
    Pinned(const Pinned&) = delete;
    Pinned& operator=(const Pinned&) = delete;
    ~Pinned() {
      if (p) cudaFreeHost(p);  // a destructor must not throw
    }
  };
  Pinned pinned_[2];
  int pinned_next_ = 0;
  cuda::DeviceBuffer<int> ints_;
  std::vector<PhaseInts> ph_;
  int i_source_ = 0, i_answers_ = 0, i_targets_ = 0, i_ids_ = 0, i_off_ = 0, i_rows_of_ = 0, i_n_ids_ = 0;
  int i_inv_norm_ = 0;
  std::size_t emb_off_ = 0, final_norm_off_ = 0, cls_off_ = 0;
  std::vector<LayerOffsets> loff_;
  bool graphs_on_ = true;
  long long gen_ = 0;          // bumped whenever a buffer moves: graphs bake addresses in
  cuda::GraphCache graphs_{64};
  cuda::DeviceBuffer<char> blas_ws_;
  cuda::DeviceBuffer<double> loss_now_;
  cuda::DeviceBuffer<float> top_, dx_, dx2_, dh_, dsum_, colpart_, xa_, inva_, logits_;
  cuda::DeviceBuffer<T> dxT_, dact_, dgu_, datt_, dqkv_, ha_, dlogits_;
};

}  // namespace earn::train
