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
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
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
    if (micro_ >= kMaxMicro) throw ConfigError("train: more than " + std::to_string(kMaxMicro) + " micro-batches in one step");
    const plan::ForwardPlan fp = plan::plan_forward(schedule_, c_.n_layers, rp_, rs_, seqs);
    const std::vector<int> answers = fp.all_answer_rows();
    if (targets.size() != answers.size())
      throw ConfigError("train: " + std::to_string(targets.size()) + " targets for " + std::to_string(answers.size()) +
                        " answer rows");
    for (int t : targets)
      if (t < 0 || t >= c_.vocab_size) throw RangeError("train: target token " + std::to_string(t) + " is outside the vocabulary");
    for (int s : fp.source)
      if (s >= c_.vocab_size) throw RangeError("train: token " + std::to_string(s) + " is outside the vocabulary");
    if (!(norm > 0)) throw ConfigError("train: the loss normaliser must be positive");
    upload_plan(fp, answers, targets);
    forward(fp, norm);
    backward(fp);
    ++micro_;
    layer_rows_ = 0;
    for (int l = 0; l < fp.n_layers(); ++l) layer_rows_ += fp.layer_rows(l).size();
  }

  /// Ends an optimizer step (as CpuStep::apply): NumericError naming the tensor when a gradient or the loss is not
  /// finite; otherwise clip, AdamW at `lr`, zero the gradients. Returns the step's loss and gradient norm.
  StepResult apply(double lr) {
    namespace k = cuda::kernel;
    const int np = static_cast<int>(pieces_host_.size());
    k::piece_sumsq<<<np, 256, 0, stream()>>>(g_.data(), pieces_.data(), partial_.data());
    EARN_CUDA_CHECK_LAUNCH();
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
    micro_ = 0;
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

  // The micro-batch's integer arrays in one upload: input sources, per phase positions and keeps and segments, the
  // answer rows and targets, the embedding CSR.
  void upload_plan(const plan::ForwardPlan& fp, const std::vector<int>& answers, std::span<const int> targets) {
    ints_host_.clear();
    auto add = [&](const auto& v) {
      const int at = static_cast<int>(ints_host_.size());
      ints_host_.insert(ints_host_.end(), v.begin(), v.end());
      return at;
    };
    i_source_ = add(fp.source);
    ph_.assign(fp.phases.size(), {});
    for (std::size_t p = 0; p < fp.phases.size(); ++p) {
      const plan::RowSet& r = fp.phases[p].rows;
      ph_[p].pos = add(r.pos);
      ph_[p].keep = p == 0 ? -1 : add(fp.phases[p].keep);
      std::vector<int> segs;
      int max_n = 0;
      for (int s = 0; s < r.segments(); ++s) {
        segs.push_back(r.seg_off[s]);
        segs.push_back(r.seg_n[s]);
        max_n = std::max(max_n, r.seg_n[s]);
      }
      ph_[p].segs = add(segs);
      ph_[p].nseg = r.segments();
      ph_[p].max_n = max_n;
      ph_[p].rows = r.size();
    }
    i_answers_ = add(answers);
    i_targets_ = add(targets);
    // Embedding CSR: each distinct table row (token t, or register j at vocab + j) and the input rows using it.
    const int n_in = fp.input().size();
    std::vector<int> id_of(n_in), order(n_in);
    for (int i = 0; i < n_in; ++i) id_of[i] = fp.source[i] >= 0 ? fp.source[i] : c_.vocab_size + (-fp.source[i] - 1);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return id_of[a] < id_of[b]; });
    std::vector<int> ids, off;
    for (int k = 0; k < n_in; ++k)
      if (k == 0 || id_of[order[k]] != id_of[order[k - 1]]) {
        ids.push_back(id_of[order[k]]);
        off.push_back(k);
      }
    off.push_back(n_in);
    n_ids_ = static_cast<int>(ids.size());
    i_ids_ = add(ids);
    i_off_ = add(off);
    i_rows_of_ = add(order);
    ints_.reserve(ints_host_.size());
    EARN_CUDA_CHECK(cudaMemcpyAsync(ints_.data(), ints_host_.data(), ints_host_.size() * sizeof(int),
                                    cudaMemcpyHostToDevice, stream()));  // pageable: the host copy is done on return
  }
  const int* ints(int at) const { return ints_.data() + at; }

  // Scratch grown to the micro-batch's largest needs.
  void reserve_scratch(int max_rows, int answers) {
    const std::size_t n = std::size_t(std::max(max_rows, 1)), d = c_.dim, qd = std::size_t(c_.n_heads) * c_.head_dim();
    const std::size_t width = qd + 2 * std::size_t(c_.kv_dim()), hid = c_.hidden_dim;
    for (auto* b : {&dx_, &dx2_, &dh_}) b->reserve(n * d);
    dxT_.reserve(n * std::max(d, qd));
    dact_.reserve(n * hid);
    dgu_.reserve(n * 2 * hid);
    datt_.reserve(n * qd);
    dqkv_.reserve(n * width);
    dsum_.reserve(n * c_.n_heads);
    colpart_.reserve(std::size_t(cuda::kernel::kColChunks) * std::max(width, d));
    const std::size_t a = std::size_t(std::max(answers, 1));
    xa_.reserve(a * d);
    inva_.reserve(a);
    ha_.reserve(a * d);
    logits_.reserve(a * c_.vocab_size);
    dlogits_.reserve(a * c_.vocab_size);
    loss_rows_.reserve(a);
    top_.reserve(n * d);
  }

  template <class B>
  static void grow(B& b, std::size_t n) {
    b.reserve(std::max<std::size_t>(n, 1));
  }

  void forward(const plan::ForwardPlan& fp, double norm) {
    namespace k = cuda::kernel;
    const cudaStream_t s = stream();
    const int d = c_.dim, hd = c_.head_dim(), nh = c_.n_heads, nkv = c_.n_kv_heads, hid = c_.hidden_dim;
    const int qd = nh * hd, kvd = nkv * hd, width = qd + 2 * kvd;
    const int answers = static_cast<int>(fp.all_answer_rows().size());
    reserve_scratch(fp.input().size(), answers);
    const std::size_t emb = offset("tok_embeddings");
    // Input rows: token rows from the fp32 table, registers from the rows after it.
    const int n0 = fp.input().size();
    grow(top_, std::size_t(n0) * d);
    k::embed<float><<<k::grid_for(Index{n0} * d), k::kThreads, 0, s>>>(ints(i_source_), p_.data() + emb,
                                                                        p_.data() + emb + std::size_t(c_.vocab_size) * d,
                                                                        n0, d, top_.data());
    EARN_CUDA_CHECK_LAUNCH();
    for (int l = 0; l < c_.n_layers; ++l) {
      const int ph = fp.layer_phase[l], n = ph_[ph].rows;
      Saved& S = layers_[l];
      grow(S.x, std::size_t(n) * d);
      if (fp.gathers_before(l))
        k::gather_rows<float><<<k::grid_for(Index{n} * d), k::kThreads, 0, s>>>(top_.data(), ints(ph_[ph].keep), n, d,
                                                                                 S.x.data());
      else
        EARN_CUDA_CHECK(cudaMemcpyAsync(S.x.data(), top_.data(), std::size_t(n) * d * 4, cudaMemcpyDeviceToDevice, s));
      EARN_CUDA_CHECK_LAUNCH();
      for (auto* b : {&S.inv1, &S.inv2}) grow(*b, n);
      grow(S.lse, std::size_t(n) * nh);
      grow(S.x1, std::size_t(n) * d);
      grow(S.h1, std::size_t(n) * d);
      grow(S.h2, std::size_t(n) * d);
      grow(S.qkv, std::size_t(n) * width);
      grow(S.att, std::size_t(n) * qd);
      grow(S.gu, std::size_t(n) * 2 * hid);
      grow(S.act, std::size_t(n) * hid);
      const float* g1 = p_.data() + layer_offset(l, "attn_norm");
      const float* g2 = p_.data() + layer_offset(l, "ffn_norm");
      k::rmsnorm_save<T><<<n, 256, 0, s>>>(S.x.data(), g1, c_.norm_eps, d, S.h1.data(), S.inv1.data());
      EARN_CUDA_CHECK_LAUNCH();
      cuda::linear<T, T>(blas_.get(), S.h1.data(), w_.data() + layer_offset(l, "wq"), S.qkv.data(), n, d, width);
      const float* bias = c_.qkv_bias ? p_.data() + layer_offset(l, "bq") : nullptr;
      k::bias_rope<T><<<k::grid_for(Index{n} * (nh + nkv) * (hd / 2)), k::kThreads, 0, s>>>(
          S.qkv.data(), bias, ints(ph_[ph].pos), n, nh, nkv, hd, c_.rope_theta,
          c_.rope_style == RopeStyle::kInterleaved ? 1 : 0, 0);
      EARN_CUDA_CHECK_LAUNCH();
      schedule_.visit(l, [&]<class L>(L) {
        cuda::train_attention_forward<typename L::policy, T>(s, attn_args(ph, S), tc(ph));
      });
      EARN_CUDA_CHECK(cudaMemcpyAsync(S.x1.data(), S.x.data(), std::size_t(n) * d * 4, cudaMemcpyDeviceToDevice, s));
      cuda::linear<T, float>(blas_.get(), S.att.data(), w_.data() + layer_offset(l, "wo"), S.x1.data(), n, qd, d, 1.0f);
      k::rmsnorm_save<T><<<n, 256, 0, s>>>(S.x1.data(), g2, c_.norm_eps, d, S.h2.data(), S.inv2.data());
      EARN_CUDA_CHECK_LAUNCH();
      cuda::linear<T, T>(blas_.get(), S.h2.data(), w_.data() + layer_offset(l, "w1"), S.gu.data(), n, d, 2 * hid);
      k::swiglu<T><<<k::grid_for(Index{n} * hid), k::kThreads, 0, s>>>(S.gu.data(), n, hid, S.act.data());
      EARN_CUDA_CHECK_LAUNCH();
      // The layer's output: x1 + act w2^T, into top_ (the next layer's gather source or input).
      EARN_CUDA_CHECK(cudaMemcpyAsync(top_.data(), S.x1.data(), std::size_t(n) * d * 4, cudaMemcpyDeviceToDevice, s));
      cuda::linear<T, float>(blas_.get(), S.act.data(), w_.data() + layer_offset(l, "w2"), top_.data(), n, hid, d, 1.0f);
    }
    // Final norm and classifier on the answer rows only; the loss and d loss / d logits.
    k::gather_rows<float><<<k::grid_for(Index{answers} * d), k::kThreads, 0, s>>>(top_.data(), ints(i_answers_),
                                                                                  answers, d, xa_.data());
    EARN_CUDA_CHECK_LAUNCH();
    k::rmsnorm_save<T><<<answers, 256, 0, s>>>(xa_.data(), p_.data() + offset("final_norm"), c_.norm_eps, d,
                                               ha_.data(), inva_.data());
    EARN_CUDA_CHECK_LAUNCH();
    cuda::linear<T, float>(blas_.get(), ha_.data(), classifier(), logits_.data(), answers, d, c_.vocab_size);
    k::cross_entropy<T><<<answers, 256, 0, s>>>(logits_.data(), ints(i_targets_), c_.vocab_size,
                                                static_cast<float>(1.0 / norm), loss_rows_.data(), dlogits_.data());
    EARN_CUDA_CHECK_LAUNCH();
    k::sum_in_order<<<1, 1, 0, s>>>(loss_rows_.data(), answers, 1.0 / norm, losses_.data(), micro_);
    EARN_CUDA_CHECK_LAUNCH();
  }

  const T* classifier() const {
    return w_.data() + offset(c_.tied_embeddings ? "tok_embeddings" : "lm_head");
  }
  float* classifier_grad() { return g_.data() + offset(c_.tied_embeddings ? "tok_embeddings" : "lm_head"); }

  bool tc(int ph) const { return tc_on_ && cuda::train_attention_tc<T>(c_.head_dim(), ph_[ph].max_n, smem_limit_); }

  cuda::TrainAttentionArgs<T> attn_args(int ph, Saved& S) {
    cuda::TrainAttentionArgs<T> a;
    a.qkv = S.qkv.data();
    a.pos = ints(ph_[ph].pos);
    a.segs = reinterpret_cast<const cuda::TrainSegment*>(ints(ph_[ph].segs));
    a.nseg = ph_[ph].nseg;
    a.max_n = ph_[ph].max_n;
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

  void backward(const plan::ForwardPlan& fp) {
    namespace k = cuda::kernel;
    const cudaStream_t s = stream();
    const int d = c_.dim, hd = c_.head_dim(), nh = c_.n_heads, nkv = c_.n_kv_heads, hid = c_.hidden_dim;
    const int qd = nh * hd, kvd = nkv * hd, width = qd + 2 * kvd;
    const int answers = static_cast<int>(fp.all_answer_rows().size());
    // Classifier and final norm.
    cuda::linear_dx<T, float>(blas_.get(), dlogits_.data(), classifier(), dh_.data(), answers, d, c_.vocab_size);
    cuda::linear_dw<T>(blas_.get(), dlogits_.data(), ha_.data(), classifier_grad(), answers, d, c_.vocab_size);
    k::rmsnorm_backward<<<answers, 256, 0, s>>>(xa_.data(), p_.data() + offset("final_norm"), inva_.data(), dh_.data(),
                                                nullptr, d, dx2_.data());
    EARN_CUDA_CHECK_LAUNCH();
    norm_gain_grad(dh_.data(), xa_.data(), inva_.data(), answers, g_.data() + offset("final_norm"));
    const int n_top = fp.top().size();
    EARN_CUDA_CHECK(cudaMemsetAsync(dx_.data(), 0, std::size_t(n_top) * d * 4, s));
    k::scatter_rows<<<k::grid_for(Index{answers} * d), k::kThreads, 0, s>>>(dx2_.data(), ints(i_answers_), answers, d,
                                                                           dx_.data());
    EARN_CUDA_CHECK_LAUNCH();
    for (int l = c_.n_layers - 1; l >= 0; --l) {
      const int ph = fp.layer_phase[l], n = ph_[ph].rows;
      Saved& S = layers_[l];
      auto W = [&](const char* what) { return w_.data() + layer_offset(l, what); };
      auto G = [&](const char* what) { return g_.data() + layer_offset(l, what); };
      const float* g1 = p_.data() + layer_offset(l, "attn_norm");
      const float* g2 = p_.data() + layer_offset(l, "ffn_norm");
      // MLP: out = x1 + w2 (silu(w1 h2) * w3 h2)
      to_storage(dx_.data(), std::size_t(n) * d, dxT_.data());
      cuda::linear_dx<T, T>(blas_.get(), dxT_.data(), W("w2"), dact_.data(), n, hid, d);
      cuda::linear_dw<T>(blas_.get(), dxT_.data(), S.act.data(), G("w2"), n, hid, d);
      k::swiglu_backward<T><<<k::grid_for(Index{n} * hid), k::kThreads, 0, s>>>(S.gu.data(), dact_.data(), n, hid,
                                                                               dgu_.data());
      EARN_CUDA_CHECK_LAUNCH();
      cuda::linear_dx<T, float>(blas_.get(), dgu_.data(), W("w1"), dh_.data(), n, d, 2 * hid);
      cuda::linear_dw<T>(blas_.get(), dgu_.data(), S.h2.data(), G("w1"), n, d, 2 * hid);
      k::rmsnorm_backward<<<n, 256, 0, s>>>(S.x1.data(), g2, S.inv2.data(), dh_.data(), dx_.data(), d, dx_.data());
      EARN_CUDA_CHECK_LAUNCH();
      norm_gain_grad(dh_.data(), S.x1.data(), S.inv2.data(), n, G("ffn_norm"));
      // Attention: x1 = x + wo att
      to_storage(dx_.data(), std::size_t(n) * d, dxT_.data());
      cuda::linear_dx<T, T>(blas_.get(), dxT_.data(), W("wo"), datt_.data(), n, qd, d);
      cuda::linear_dw<T>(blas_.get(), dxT_.data(), S.att.data(), G("wo"), n, qd, d);
      schedule_.visit(l, [&]<class L>(L) {
        cuda::train_attention_backward<typename L::policy, T>(s, attn_args(ph, S), tc(ph));
      });
      k::bias_rope<T><<<k::grid_for(Index{n} * (nh + nkv) * (hd / 2)), k::kThreads, 0, s>>>(
          dqkv_.data(), nullptr, ints(ph_[ph].pos), n, nh, nkv, hd, c_.rope_theta,
          c_.rope_style == RopeStyle::kInterleaved ? 1 : 0, 1);
      EARN_CUDA_CHECK_LAUNCH();
      if (c_.qkv_bias) {
        k::colsum_partial<T><<<dim3((width + 255) / 256, k::kColChunks), 256, 0, s>>>(dqkv_.data(), n, width, width,
                                                                                      colpart_.data());
        k::colsum_finish<<<(width + 255) / 256, 256, 0, s>>>(colpart_.data(), width, G("bq"));
        EARN_CUDA_CHECK_LAUNCH();
      }
      cuda::linear_dx<T, float>(blas_.get(), dqkv_.data(), W("wq"), dh_.data(), n, d, width);
      cuda::linear_dw<T>(blas_.get(), dqkv_.data(), S.h1.data(), G("wq"), n, d, width);
      k::rmsnorm_backward<<<n, 256, 0, s>>>(S.x.data(), g1, S.inv1.data(), dh_.data(), dx_.data(), d, dx_.data());
      EARN_CUDA_CHECK_LAUNCH();
      norm_gain_grad(dh_.data(), S.x.data(), S.inv1.data(), n, G("attn_norm"));
      if (fp.gathers_before(l)) {  // rows that left the stream here get no gradient from above
        const int below = ph_[ph - 1].rows;
        EARN_CUDA_CHECK(cudaMemsetAsync(dx2_.data(), 0, std::size_t(below) * d * 4, s));
        k::scatter_rows<<<k::grid_for(Index{n} * d), k::kThreads, 0, s>>>(dx_.data(), ints(ph_[ph].keep), n, d,
                                                                         dx2_.data());
        EARN_CUDA_CHECK_LAUNCH();
        std::swap(dx_, dx2_);
      }
    }
    // Token and register rows of the embedding table.
    k::embedding_backward<<<n_ids_, 256, 0, s>>>(dx_.data(), ints(i_ids_), ints(i_off_), ints(i_rows_of_), d,
                                                 g_.data() + offset("tok_embeddings"));
    EARN_CUDA_CHECK_LAUNCH();
  }

  struct PhaseInts {
    int pos = 0, keep = -1, segs = 0, nseg = 0, max_n = 0, rows = 0;
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
  cuda::DeviceBuffer<int> ints_;
  std::vector<PhaseInts> ph_;
  int i_source_ = 0, i_answers_ = 0, i_targets_ = 0, i_ids_ = 0, i_off_ = 0, i_rows_of_ = 0, n_ids_ = 0;
  cuda::DeviceBuffer<float> top_, dx_, dx2_, dh_, dsum_, colpart_, xa_, inva_, logits_;
  cuda::DeviceBuffer<T> dxT_, dact_, dgu_, datt_, dqkv_, ha_, dlogits_;
};

}  // namespace earn::train
