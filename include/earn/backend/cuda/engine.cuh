// earn/backend/cuda/engine.cuh - earn::Engine<Schedule, CudaT<DType>>: the CPU engine's API on an NVIDIA GPU.
//
// Switching backends is the template argument only:
//   earn::Engine<earn::EarnSchedule>                  the CPU engine
//   earn::Engine<earn::EarnSchedule, earn::Cuda>      this one, fp32
//   earn::Engine<earn::EarnSchedule, earn::CudaBf16>  this one, bf16 storage with fp32 accumulation
//
// One forward pass: embed -> per layer [RMSNorm -> fused QKV GEMM -> bias + RoPE + KV store -> attention ->
// Wo GEMM accumulating into the residual -> RMSNorm -> fused gate/up GEMM -> SwiGLU -> W2 GEMM accumulating into
// the residual] -> final norm -> classifier GEMM. Attention runs per user segment, the layer policy's `visible`
// hook masking keys by position: in bf16 / fp16 by the tensor-core flash kernels (flash_attention.cuh; decode as
// flash-decoding, decode_attention.cuh), in fp32 (and with use_flash_attention(false)) as two batched cuBLAS
// GEMMs (Q K^T over the user's cached prefix, P V) around a softmax kernel. In decode the beams of a user are one
// segment, so its prompt K/V is read once per step for all of them; each beam's generated keys are its own. Rows
// the policy drops (EARN's late layers drop prompt rows) leave the residual stream by a row gather, as in the CPU
// engine.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <cmath>
#include <memory>
#include <numeric>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#include "earn/attention/row_kind.hpp"
#include "earn/backend/cuda/attention.cuh"
#include "earn/backend/cuda/blas.cuh"
#include "earn/backend/cuda/bulk_gemm.cuh"
#include "earn/backend/cuda/decode_attention.cuh"
#include "earn/backend/cuda/evict.cuh"
#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"
#include "earn/backend/cuda/kv_store.cuh"
#include "earn/backend/cuda/observe.cuh"
#include "earn/backend/cuda/press.cuh"
#include "earn/backend/cuda/stream_gemm.cuh"
#include "earn/backend/cuda/weights.cuh"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"
#include "earn/model/engine_fwd.hpp"
#include "earn/model/weights.hpp"

namespace earn {

namespace cuda {
/// Logits left on the device: [rows, cols] fp32, row-major; valid until the next call on the same state.
struct DeviceLogits {
  const float* data = nullptr;  ///< [rows, cols]
  int rows = 0;
  int cols = 0;
};
}  // namespace cuda

/// Per-layer device KV caches, scratch and bookkeeping of one decoding session: a batch of users, each with its
/// prompt cached once, and decode rows (beams) that each hold only their generated tokens. Owns the CUDA stream
/// its work runs on.
template <class DType>
class CudaState : public detail::RowBook {
 public:
  using T = cuda::storage_t<DType>;
  CudaState() = default;

  /// Decode rows and the user each belongs to; rows of one user share its prompt KV. Resets generated tokens.
  void set_rows(std::span<const int> row_user) { assign_rows(row_user); }

  /// Beam reordering: new row i continues old row parent[i] (user and generated KV follow the parent).
  void reorder(std::span<const int> parent) {
    std::vector<int> users = reordered_users(parent);
    if (gen_len_ > 0) {
      const int n = static_cast<int>(parent.size());
      parent_.reserve(parent.size());
      EARN_CUDA_CHECK(cudaMemcpyAsync(parent_.data(), parent.data(), parent.size() * sizeof(int),
                                      cudaMemcpyHostToDevice, stream()));
      kv::reorder_generated(layers_, parent_.data(), n, gen_len_, reorder_ptrs_, reorder_scratch_, stream());
    }
    row_user_ = std::move(users);
  }

  const kv::Store<CudaT<DType>>& layer_cache(int l) const { return layers_.at(l); }
  int n_layers() const { return static_cast<int>(layers_.size()); }
  cudaStream_t stream() const { return stream_.get(); }

  /// Attention observer of every later prefill (nullptr: none, and nothing is paid for it), as CpuState::observe.
  /// On the GPU it gets reduced statistics only (observe.cuh: computed on the device, no probabilities stored);
  /// an observer that records whole rows is refused (ConfigError) at the prefill: record them with the CPU engine.
  void observe(attention::Observer* observer) { observer_ = observer; }
  attention::Observer* observer() const { return observer_; }
  /// Wait for every call issued on this state.
  void synchronize() const { stream_.synchronize(); }

  /// Bytes of K and V held now: every user's prefix rows plus every row's generated rows, over all layers.
  Index kv_bytes() const {
    return kv_rows_held(layers_) * 2 * kv_dim_ * Index{sizeof(T)};
  }
  /// Bytes of K and V held now by layer `l`'s cache alone (early layers: prompt + registers + generated rows;
  /// late layers: registers + generated rows).
  Index layer_kv_bytes(int l) const {
    return kv_rows_held(std::span<const kv::Store<CudaT<DType>>>(&layers_.at(l), 1)) * 2 * kv_dim_ * Index{sizeof(T)};
  }
  /// Bytes reserved for K and V over all layers.
  Index kv_capacity_bytes() const {
    Index e = 0;
    for (const auto& layer : layers_) e += layer.capacity_elements();
    return e * Index{sizeof(T)};
  }

  /// Tests: fill the KV cache with NaN now, and every scratch and output buffer with NaN before each call, so an
  /// element that a kernel should have written but did not shows up as NaN in the results.
  /// Decode steps replay CUDA graphs (one per step shape, captured on first use; default on). Off: every step
  /// launches its ~14 kernels per layer one by one.
  void use_graphs(bool on) {
    graphs_on_ = on;
    if (!on) graphs_.clear();
  }
  bool graphs() const { return graphs_on_; }
  /// bf16 / fp16 attention through the tensor-core flash kernels (flash_attention.cuh; default on): prefill, and
  /// decode as flash-decoding (decode_attention.cuh) when max_new_tokens <= 8. Off: the cuBLAS path (batched
  /// Q K^T, softmax, P V) that fp32 always takes. For comparisons and as the tests' second reference.
  void use_flash_attention(bool on) { flash_on_ = on; }
  bool flash_attention() const { return flash_on_; }
  /// bf16 / fp16 GEMMs of at most 8 rows (EARN's register-only late layers of up to 4 users, a small batch's
  /// logits) through earn's weight-streaming kernel (stream_gemm.cuh) instead of cuBLAS. Default off: alone it is
  /// 1.04-1.15x faster than cuBLAS at 2-8 rows on an H200, but whole prefills measured no faster (level within
  /// 2%; bench/README.md), so it stays a switch for experiments and comparisons.
  void use_stream_gemm(bool on) { stream_gemm_on_ = on; }
  bool stream_gemm() const { return stream_gemm_on_; }
  /// bf16 / fp16 GEMMs of at most 32 rows (a user's 20 beams, late layers, small logits) through the tensor-map
  /// ring kernel (bulk_gemm.cuh) instead of cuBLAS (or stream_gemm); it takes precedence over use_stream_gemm.
  /// Default off: alone it is level with cuBLAS (0.96-1.07x at 2-32 rows on an H200, two calls), in the engine 13-16 %
  /// slower over B = 1 decode steps (bench/README.md); a switch for experiments. With use_pdl it is launched as a
  /// programmatic dependent that asks for its first weights while the kernel before it runs.
  void use_bulk_gemm(bool on) { bulk_gemm_on_ = on; }
  bool bulk_gemm() const { return bulk_gemm_on_; }
  /// Launch earn's kernels in a layer (rmsnorm, the RoPE / KV-store step, flash attention and the decode combine,
  /// swiglu; bulk_gemm when on) as programmatic dependent launches, so each is placed while the kernel before it
  /// drains (sm_90; the kernels wait for its results before touching memory, so the logits are bit-identical either
  /// way). Default on: B = 1 2-3.5 % faster on an H200, B = 4 up to 1.5 %, B = 32 level within noise
  /// (bench/README.md). Off: every kernel waits for the previous one to end.
  void use_pdl(bool on) { pdl_on_ = on; }
  bool pdl() const { return pdl_on_; }
  /// GEMM shapes (per row count) that Engine::tune_gemms gave a cuBLASLt algorithm; forget them all.
  std::size_t tuned_gemms() const { return tuned_.size(); }
  void clear_tuned_gemms() {
    tuned_.clear();
    ++tune_gen_;
  }
  /// Decode graphs held (tests: a repeated step shape replays instead of capturing again).
  std::size_t graph_count() const { return graphs_.size(); }
  /// Decode steps launched eagerly because another thread invalidated their graph capture (see GraphCache::run).
  std::size_t eager_steps() const { return graphs_.eager_steps(); }

  void enable_poison() {
    for (auto& layer : layers_) layer.poison(stream());
    poison_ = true;
  }

 private:
  template <class, class>
  friend class Engine;

  // Grow the scratch for a call of `rows` residual rows, `scores` attention scores and `out_rows` logit rows.
  void reserve(const ModelConfig& c, std::size_t rows, std::size_t scores, std::size_t out_rows) {
    const std::size_t qd = std::size_t(c.n_heads) * c.head_dim(), width = qd + 2 * std::size_t(c.kv_dim());
    rows = std::max<std::size_t>(rows, 1);
    x_.reserve(rows * c.dim);
    x2_.reserve(rows * c.dim);
    h_.reserve(rows * c.dim);
    qkv_.reserve(rows * width);
    q_.reserve(rows * qd);
    att_.reserve(rows * qd);
    gu_.reserve(rows * 2 * std::size_t(c.hidden_dim));
    act_.reserve(rows * std::size_t(c.hidden_dim));
    scores_.reserve(std::max<std::size_t>(scores, 1));
    if constexpr (!std::is_same_v<T, float>) probs_.reserve(std::max<std::size_t>(scores, 1));
    logits_.reserve(std::max<std::size_t>(out_rows, 1) * c.vocab_size);
    if (poison_) {
      for (auto* b : {&x_, &x2_, &scores_, &logits_}) b->fill_bytes(0xFF, stream());
      for (auto* b : {&h_, &qkv_, &gu_, &q_, &att_, &act_, &probs_}) b->fill_bytes(0xFF, stream());
    }
  }
  T* probs() {
    if constexpr (std::is_same_v<T, float>) return scores_.data();  // softmax runs in place
    else return probs_.data();
  }

  int kv_dim_ = 0;
  std::vector<kv::Store<CudaT<DType>>> layers_;
  attention::Observer* observer_ = nullptr;
  cuda::DeviceBuffer<int2> obs_rows_;    // the observed query rows of one layer: (segment, row in it)
  cuda::DeviceBuffer<float4> obs_out_;   // their statistics per head
  bool poison_ = false;
  bool graphs_on_ = true;
  bool flash_on_ = true;
  bool stream_gemm_on_ = false;
  bool bulk_gemm_on_ = false;
  bool pdl_on_ = true;
  cuda::Stream stream_;
  cuda::GraphCache graphs_;  // decode steps (see use_graphs)
  // Scratch, grown on demand: x/x2 the fp32 residual stream [rows, dim]; h the normalised rows [rows, dim];
  // qkv [rows, qd + 2 kv_dim] and gu [rows, 2 hidden] GEMM outputs; q, att [rows, qd]; act [rows, hidden];
  // scores / probs per attention call; logits [out_rows, vocab].
  cuda::DeviceBuffer<float> x_, x2_, scores_, logits_;
  cuda::DeviceBuffer<T> h_, qkv_, gu_, q_, att_, act_, probs_, reorder_scratch_;
  cuda::DeviceBuffer<int> ints_, parent_;
  // Pressed layers of a prefill (press.cuh): the layer's full K / V / positions [rows, kv_dim], the scores, the
  // kept rows, and the press segments and scored query rows of every pressed layer.
  cuda::DeviceBuffer<T> press_k_, press_v_;
  cuda::DeviceBuffer<int> press_pos_, press_idx_;
  cuda::DeviceBuffer<float> press_scores_, press_partial_;
  cuda::DeviceBuffer<cuda::PressSeg> press_segs_;
  cuda::DeviceBuffer<int2> press_qrows_;
  cuda::DeviceBuffer<cuda::Segment> segs_;
  cuda::DeviceBuffer<void*> ptrs_, reorder_ptrs_;
  cuda::DeviceBuffer<char> blas_ws_;  // cuBLAS workspace of this state's calls (graph capture needs one we own)
  // This state's cuBLAS handle, made and bound to its stream and workspace by Engine::bind_blas: a handle holds one
  // stream, so a handle shared by the engine was rebound from const methods when two states ran on two threads.
  // Declared after the stream and workspace, so it is destroyed before them.
  std::optional<cuda::BlasHandle> blas_;
  // Engine::tune_gemms: products (model GEMM g at `rows` rows) that run with a chosen cuBLASLt algorithm;
  // tune_gen_ counts changes (a graph key part: captured launches bake the algorithm in).
  std::vector<cuda::TunedGemm> tuned_;
  long long tune_gen_ = 0;
};

/// The CUDA engine. Copies the weights to the device (the host weights may go away afterwards), or shares one
/// device copy with other engines (several schedules over one 7B model).
/// \code
///   earn::Engine<earn::EarnSchedule, earn::CudaBf16> engine(host_weights, earn::EarnSchedule{6});
///   auto st = engine.make_state({.max_users = 32, .max_rows = 640, .max_prompt = 512, .max_new_tokens = 4});
///   earn::Matrix first = engine.prefill_batch(st, users, prompts);  // [users, vocab]
/// \endcode
template <class Schedule, class DType>
class Engine<Schedule, CudaT<DType>> {
  static_assert(::earn::Schedule<Schedule>,
                "earn: Engine's first argument must be a schedule (schedule/split.hpp: Split, Uniform, PerLayer)");
  static_assert(RequireDeviceUsable<Schedule>::value);  // a readable error for a host-only policy

 public:
  using schedule_type = Schedule;
  using backend_type = CudaT<DType>;
  using State = CudaState<DType>;
  using T = cuda::storage_t<DType>;

  explicit Engine(const ModelWeights& w, Schedule schedule = Schedule{})
      : Engine(std::make_shared<const cuda::DeviceWeights<DType>>(cuda::DeviceWeights<DType>::upload(w)), schedule) {}
  explicit Engine(std::shared_ptr<const cuda::DeviceWeights<DType>> w, Schedule schedule = Schedule{})
      : wp_(std::move(w)), w_(*wp_), schedule_(schedule), id_(next_id()), sms_(cuda::sm_count()) {
    w_.config.validate();
    schedule_.validate(w_.config.n_layers, w_.register_count());
    plan_stream_gemms();
  }

  const ModelConfig& config() const { return w_.config; }
  const cuda::DeviceWeights<DType>& device_weights() const { return w_; }
  const Schedule& schedule() const { return schedule_; }
  int registers() const { return w_.register_count(); }

  /// What tune_gemms measured for one GEMM at one row count (microseconds per product, median of its repetitions).
  struct GemmTuning {
    const char* gemm = "";  // qkv, wo, w13, w2, classifier
    int rows = 0;
    float default_us = 0, chosen_us = 0;
    bool lt = false;  // a cuBLASLt algorithm was kept (else cublasGemmEx's default stays)
    int candidates = 0;
  };
  struct TuneOptions {
    int candidates = 8;      // cuBLASLt heuristic algorithms tried per product
    int copies = 4;          // layers whose weights are used in turn, so none stays in L2 between calls
    bool prefer_lt = false;  // tests: keep the fastest cuBLASLt algorithm even when the default is faster
    bool classifier = true;  // false: the four layer products only (row counts the classifier never runs at,
                             // such as prefill's dense rows; spares a logits buffer of that many rows)
  };
  /// Chooses, for each row count in `rows` and each of the model's GEMMs (qkv, wo, w13, w2, classifier), between
  /// cublasGemmEx's default and up to opt.candidates cuBLASLt heuristic algorithms by timing them on this card:
  /// each over the first opt.copies layers' weights in turn (the classifier repeated), on random inputs in the
  /// state's own buffers. From then on this state runs a product whose fastest was a cuBLASLt algorithm with it
  /// (both are fp32-accumulating; the results differ by rounding). The row counts worth tuning are those the
  /// state will run: decode rows (users x beams), late EARN layers' register rows (users x registers), prefill's
  /// logits rows (users), and prefill's dense rows (users x (prompt + registers), with opt.classifier = false).
  /// Overwrites the state's scratch: call it before prefill. bulk_gemm / stream_gemm, when on, still take the
  /// products they take.
  std::vector<GemmTuning> tune_gemms(State& st, std::span<const int> rows, TuneOptions opt = {}) const {
    const ModelConfig& c = w_.config;
    static constexpr const char* kNames[kGemms] = {"qkv", "wo", "w13", "w2", "classifier"};
    if (opt.candidates < 1 || opt.copies < 1) throw ConfigError("tune_gemms: candidates and copies must be >= 1");
    std::vector<GemmTuning> report;
    bind_blas(st);
    cuda::Event e0, e1;
    for (const int r : rows) {
      if (r < 1) throw ConfigError("tune_gemms: row counts must be >= 1, got " + std::to_string(r));
      st.reserve(c, static_cast<std::size_t>(r), 0, opt.classifier ? static_cast<std::size_t>(r) : 1);
      namespace k = cuda::kernel;
      for (auto* b : {&st.h_, &st.att_, &st.act_})  // inputs like a forward pass's (power, hence clocks, depend on data)
        k::fill_uniform<T><<<1024, k::kThreads, 0, st.stream()>>>(b->data(), static_cast<long long>(b->size()), 5, 0.0f, 1.0f);
      EARN_CUDA_CHECK_LAUNCH();
      for (int g = 0; g < (opt.classifier ? kGemms : kHead); ++g) {
        const GemmShape sh = gemm_shape(Gemm(g));
        const bool f32 = g != kQkv && g != kW13;  // wo, w2 add into the residual stream; the classifier's logits
        const float beta = g == kWo || g == kW2 ? 1.0f : 0.0f;
        const T* x = g == kWo ? st.att_.data() : g == kW2 ? st.act_.data() : st.h_.data();
        void* y = g == kQkv ? static_cast<void*>(st.qkv_.data())
                : g == kW13 ? static_cast<void*>(st.gu_.data())
                : g == kHead ? static_cast<void*>(st.logits_.data())
                             : static_cast<void*>(st.x_.data());
        auto weight = [&](int copy) -> const T* {
          if (g == kHead) return w_.classifier();
          const auto& lw = w_.layers[std::min(copy, c.n_layers - 1)];
          return g == kQkv ? lw.wqkv.data() : g == kWo ? lw.wo.data() : g == kW13 ? lw.w13.data() : lw.w2.data();
        };
        cuda::LtProduct product = f32 ? cuda::LtProduct::make<T, float>(r, sh.in, sh.out)
                                      : cuda::LtProduct::make<T, T>(r, sh.in, sh.out);
        // Median over 5 timed rounds (after 2) of one product per copy, in microseconds per product.
        auto time = [&](auto&& one) {
          std::vector<float> ms;
          for (int rep = 0; rep < 7; ++rep) {
            e0.record(st.stream());
            for (int i = 0; i < opt.copies; ++i) one(weight(i));
            e1.record(st.stream());
            if (rep >= 2) ms.push_back(cuda::Event::elapsed_ms(e0, e1));
          }
          std::sort(ms.begin(), ms.end());
          return ms[ms.size() / 2] * 1e3f / static_cast<float>(opt.copies);
        };
        GemmTuning t{kNames[g], r, 0, 0, false, 0};
        t.default_us = time([&](const T* w) {
          if (f32) cuda::linear<T, float>(st.blas_->get(), x, w, static_cast<float*>(y), r, sh.in, sh.out, beta);
          else cuda::linear<T, T>(st.blas_->get(), x, w, static_cast<T*>(y), r, sh.in, sh.out, beta);
        });
        const auto algos = product.candidates(lt_.get(), st.blas_ws_.size(), opt.candidates);
        t.candidates = static_cast<int>(algos.size());
        float best = opt.prefer_lt ? 3.4e38f : t.default_us;
        int chosen = -1;
        for (std::size_t a = 0; a < algos.size(); ++a) {
          const float us = time([&](const T* w) {
            product.run(lt_.get(), algos[a], x, w, y, beta, st.blas_ws_.data(), st.blas_ws_.size(), st.stream());
          });
          if (us < best) best = us, chosen = static_cast<int>(a);
        }
        t.chosen_us = chosen >= 0 ? best : t.default_us;
        t.lt = chosen >= 0;
        for (std::size_t i = 0; i < st.tuned_.size(); ++i)
          if (st.tuned_[i].g == g && st.tuned_[i].rows == r) {
            st.tuned_.erase(st.tuned_.begin() + static_cast<std::ptrdiff_t>(i));
            break;
          }
        if (t.lt) st.tuned_.push_back(cuda::TunedGemm{g, r, std::move(product), algos[chosen]});
        report.push_back(t);
      }
    }
    ++st.tune_gen_;
    st.synchronize();
    return report;
  }

  /// A state with caches sized by `o`; late layers reserve registers only, never prompt-sized blocks.
  State make_state(StateOptions o) const {
    const ModelConfig& c = w_.config;
    o = detail::resolve_state_options(o, c, registers());
    State st;
    st.init_rows(o);
    st.kv_dim_ = c.kv_dim();
    st.layers_.reserve(c.n_layers);
    for (int l = 0; l < c.n_layers; ++l)
      st.layers_.emplace_back(detail::layer_prefix_capacity(schedule_, l, c.n_layers, o, registers()), o.max_users, o.max_rows,
                              o.max_new_tokens, c.kv_dim());
    return st;
  }

  /// Prefill user `user` with [R_prefix; tokens; R_suffix]. Returns logits [vocab] predicting the first generated
  /// token, read at the last row that reaches the final layer (as the CPU engine). Ends any decoding in progress.
  Vector prefill(State& st, int user, std::span<const int> tokens) const {
    const int users[1] = {user};
    const std::vector<int> prompts[1] = {std::vector<int>(tokens.begin(), tokens.end())};
    const Matrix m = to_host(st, run_prefill(st, users, prompts, /*all_rows=*/false));
    return m.row(0).transpose();
  }

  /// Like prefill, but logits [rows, vocab] for every row of the user that reaches the final layer.
  Matrix prefill_all_logits(State& st, int user, std::span<const int> tokens) const {
    const int users[1] = {user};
    const std::vector<int> prompts[1] = {std::vector<int>(tokens.begin(), tokens.end())};
    return to_host(st, run_prefill(st, users, prompts, /*all_rows=*/true));
  }

  /// Prefill several users in one pass (their rows share every GEMM): logits [users, vocab], row i predicting
  /// user users[i]'s first generated token. Ends any decoding in progress.
  Matrix prefill_batch(State& st, std::span<const int> users, std::span<const std::vector<int>> prompts) const {
    return to_host(st, run_prefill(st, users, prompts, false));
  }
  /// prefill_batch, with the logits left on the device (no copy, no synchronisation).
  cuda::DeviceLogits prefill_batch_device(State& st, std::span<const int> users,
                                          std::span<const std::vector<int>> prompts) const {
    return run_prefill(st, users, prompts, false);
  }

  /// One decode step: tokens[i] is fed to decode row i (see State::set_rows). Returns logits [rows, vocab].
  Matrix decode(State& st, std::span<const int> tokens) const { return to_host(st, decode_device(st, tokens)); }

  /// decode, with the logits left on the device (no copy, no synchronisation).
  cuda::DeviceLogits decode_device(State& st, std::span<const int> tokens) const {
    const ModelConfig& c = w_.config;
    const int rows = st.rows();
    st.check_decode_step(tokens, c.vocab_size);
    // Rows sorted by user (stable): each user's beams become one contiguous attention segment.
    std::vector<int> perm(rows), inv(rows);
    std::iota(perm.begin(), perm.end(), 0);
    std::stable_sort(perm.begin(), perm.end(), [&](int a, int b) { return st.row_user_[a] < st.row_user_[b]; });
    for (int r = 0; r < rows; ++r) inv[perm[r]] = r;
    Rows rw;
    rw.m = rows;
    std::vector<int> codes(rows);
    for (int r = 0; r < rows; ++r) {
      const int u = st.row_user_[perm[r]];
      codes[r] = tokens[perm[r]];
      rw.pos.push_back(st.decode_position(perm[r]));
      if (r == 0 || u != rw.seg_user.back()) {
        rw.seg_user.push_back(u);
        rw.seg_off.push_back(r);
        rw.seg_n.push_back(0);
      }
      ++rw.seg_n.back();
      rw.row_seg.push_back(static_cast<int>(rw.seg_user.size()) - 1);
    }
    const int G = st.gen_len_ + 1;
    Plan plan;
    std::vector<std::pair<int, int>> shrink;  // (layer, user) whose prefix loses a row this step
    const int i_codes = plan.add_ints(codes), i_perm = plan.add_ints(perm), i_inv = plan.add_ints(inv);
    const int i_pos = plan.add_ints(rw.pos), i_seg = plan.add_ints(rw.row_seg);
    std::size_t workspace = 0;
    for (int l = 0; l < c.n_layers; ++l) {
      std::vector<cuda::Segment> segs(rw.seg_user.size());
      int max_s = 0;
      for (std::size_t s = 0; s < segs.size(); ++s) {
        const int u = rw.seg_user[s];
        segs[s].q_off = rw.seg_off[s];
        segs[s].nq = rw.seg_n[s];
        segs[s].S = st.layers_[l].prefix_len(u);
        segs[s].G = G;
        segs[s].gen_pos0 = st.input_len_[u];
        segs[s].kpos = st.layers_[l].prefix_positions(u);
        segs[s].pk = st.layers_[l].prefix_k(u);
        segs[s].pv = st.layers_[l].prefix_v(u);
        max_s = std::max(max_s, segs[s].S);
      }
      // A press evicting during decode (kv/press.hpp, step 4): which users drop a row after this step (evict.cuh).
      std::vector<int> ev;
      for (std::size_t s = 0; s < segs.size(); ++s) {
        const int u = rw.seg_user[s];
        const kv::PressRule& r = st.layers_[l].press_rule(u);
        if (!r.evict) continue;
        const std::pair<int, int> range = kv::evict_range(r, segs[s].S, G);
        ev.insert(ev.end(), {static_cast<int>(s), static_cast<int>(u * st.layers_[l].prefix_capacity()), range.first,
                             range.second});
        if (range.first < range.second) shrink.push_back({l, u});
      }
      if (!ev.empty()) evict_smem(st.layers_[l]);  // throws before anything is launched
      plan.evict_n.push_back(static_cast<int>(ev.size() / 4));
      plan.evict_off.push_back(ev.empty() ? 0 : plan.add_ints(ev));
      plan.add_layer(std::move(segs), rw.seg_user, c.n_heads);
      auto& lp = plan.layers.back();
      lp.split = cuda::decode_split(max_s, c.n_heads, lp.nseg, sms_);
      workspace = std::max(workspace, cuda::decode_workspace(rows, c.n_heads, c.head_dim(), lp.split.chunks));
    }
    // The fused path's workspace lives in the score buffer (the cuBLAS path's scores are not used then).
    st.reserve(c, rows, flash(st, true) ? workspace : plan.max_scores, rows);
    plan.upload(st, *this, !flash(st, true));
    bind_blas(st);
    // A step starts by writing x, so which of the two residual buffers is x is free: the lower address, so the
    // graph key does not depend on how many row gathers (buffer swaps) the last prefill made.
    if (std::less<>{}(st.x2_.data(), st.x_.data())) std::swap(st.x_, st.x2_);
    const int* ints = st.ints_.data();
    // Everything below reads its per-step data (tokens, positions, segments, GEMM pointers) from the arrays just
    // uploaded, so a step of the same shape replays one graph: launches baked with these shapes and pointers.
    auto record = [&] {
      embed(st, ints + i_codes, rows);
      for (int l = 0; l < c.n_layers; ++l) {
        schedule_.visit(l, [&]<class L>(const L& ly) {
          const attention::LayerMask<typename L::policy> mask{ly.rule, l};
          layer(mask, st, l, plan, l, rows, ints + i_pos, ints + i_seg, ints + i_perm, G);
          if (plan.evict_n[l] > 0)
            evict(mask, st, l, plan, ints + plan.evict_off[l], plan.evict_n[l], ints + i_pos, ints + i_perm);
        });
      }
      logits(st, ints + i_inv, rows);
    };
    if (st.graphs_on_) st.graphs_.run(graph_key(st, plan, rows), st.stream(), record);
    else record();
    for (const auto& [l, u] : shrink) st.layers_[l].set_prefix_len(u, st.layers_[l].prefix_len(u) - 1);
    ++st.gen_len_;
    return {st.logits_.data(), rows, c.vocab_size};
  }

 private:
  // The rows of one forward pass grouped into per-user segments (host side).
  struct Rows {
    int m = 0;
    std::vector<int> pos, row_seg;               // per row
    std::vector<int> seg_user, seg_off, seg_n;  // per segment
  };

  // Everything a call uploads, built on the host and copied once: row arrays (ints), attention segments and the
  // batched GEMMs' pointer arrays of every layer. Pointers into the state's scratch are set at upload time, when
  // the scratch has its final size: entries hold offsets until then.
  struct Plan {
    struct LayerPlan {
      int seg_off = 0, nseg = 0, ptr_off = 0, entries = 0;
      int max_nq = 0;          // query rows of the largest segment
      cuda::FlashSplit split;  // fused decode attention: how each prefix is split into key chunks
      std::vector<cuda::AttentionGroup> groups;
    };
    std::vector<int> ints;
    std::vector<cuda::Segment> segs;
    std::vector<std::vector<int>> seg_user;  // per layer: user of each segment
    std::vector<LayerPlan> layers;
    std::vector<int> evict_off, evict_n;  // decode, per layer: the users evicting (EvictSegs in ints), how many
    std::size_t max_scores = 0;

    int add_ints(const std::vector<int>& v) {
      const int off = static_cast<int>(ints.size());
      ints.insert(ints.end(), v.begin(), v.end());
      return off;
    }
    // Score strides, offsets and GEMM groups of one attention call.
    void add_layer(std::vector<cuda::Segment> s, const std::vector<int>& users, int heads) {
      LayerPlan lp;
      lp.seg_off = static_cast<int>(segs.size());
      lp.nseg = static_cast<int>(s.size());
      for (const auto& sg : s) lp.max_nq = std::max(lp.max_nq, sg.nq);
      long long off = 0;
      for (auto& sg : s) {
        sg.ld = cuda::score_ld(sg.S, sg.G);
        sg.score_off = off;
        off += static_cast<long long>(heads) * sg.nq * sg.ld;
      }
      max_scores = std::max(max_scores, static_cast<std::size_t>(off));
      // Batched GEMMs need one shape per call: group segments by (S, nq); segments without prefix keys skip them.
      std::vector<int> order(s.size());
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
        return s[a].S != s[b].S ? s[a].S < s[b].S : s[a].nq < s[b].nq;
      });
      int entry = 0;
      for (std::size_t i = 0; i < order.size();) {
        const cuda::Segment& first = s[order[i]];
        std::size_t j = i;
        while (j < order.size() && s[order[j]].S == first.S && s[order[j]].nq == first.nq) ++j;
        if (first.S > 0) {
          lp.groups.push_back({first.S, first.nq, static_cast<int>(j - i) * heads, entry});
          entry += static_cast<int>(j - i) * heads;
        }
        for (std::size_t t = i; t < j; ++t) order_of_entry.push_back(order[t]);
        i = j;
      }
      lp.entries = entry;
      lp.ptr_off = ptr_count;
      ptr_count += 6 * entry;
      layers.push_back(std::move(lp));
      segs.insert(segs.end(), s.begin(), s.end());
      seg_user.push_back(users);
      layer_order.push_back(std::move(order_of_entry));
      order_of_entry.clear();
    }

    // Upload segments, ints and, for the cuBLAS attention path (blas_attention), the batched GEMMs' pointer
    // arrays (one copy each, ordered on the state's stream). The flash kernels read the segments only.
    template <class E>
    void upload(State& st, const E& engine, bool blas_attention) {
      const ModelConfig& c = engine.config();
      std::vector<void*> ptrs(blas_attention ? ptr_count : 0);
      for (std::size_t l = 0; blas_attention && l < layers.size(); ++l) {
        const LayerPlan& lp = layers[l];
        int e = 0;
        for (int si : layer_order[l]) {
          const cuda::Segment& sg = segs[lp.seg_off + si];
          if (sg.S == 0) continue;
          cuda::attention_ptrs<T>(ptrs.data() + lp.ptr_off, lp.entries, e, sg, static_cast<const T*>(sg.pk),
                                  static_cast<const T*>(sg.pv),
                                  st.q_.data(), st.scores_.data(), st.probs(), st.att_.data(), c.n_heads,
                                  c.n_kv_heads, c.head_dim());
          e += c.n_heads;
        }
      }
      st.ints_.reserve(std::max<std::size_t>(ints.size(), 1));
      st.segs_.reserve(std::max<std::size_t>(segs.size(), 1));
      st.ptrs_.reserve(std::max<std::size_t>(ptrs.size(), 1));
      const cudaStream_t s = st.stream();
      EARN_CUDA_CHECK(cudaMemcpyAsync(st.ints_.data(), ints.data(), ints.size() * sizeof(int), cudaMemcpyHostToDevice, s));
      EARN_CUDA_CHECK(cudaMemcpyAsync(st.segs_.data(), segs.data(), segs.size() * sizeof(cuda::Segment),
                                      cudaMemcpyHostToDevice, s));
      if (!ptrs.empty())
        EARN_CUDA_CHECK(cudaMemcpyAsync(st.ptrs_.data(), ptrs.data(), ptrs.size() * sizeof(void*), cudaMemcpyHostToDevice, s));
      // Pageable copies return once the host data is staged, so these vectors may go out of scope.
    }

    std::vector<std::vector<int>> layer_order;  // per layer: segment index of each GEMM entry block
    std::vector<int> order_of_entry;
    int ptr_count = 0;
  };

  // The state's own cuBLAS handle (made on first use) on its stream, with its own workspace: capture into a graph
  // must not depend on cuBLAS allocating one (and cublasSetStream resets the workspace, so both go together).
  // Nothing the engine shares is rebound, so states may run on different threads.
  void bind_blas(State& st) const {
    constexpr std::size_t kWorkspace = std::size_t(32) << 20;
    st.blas_ws_.reserve(kWorkspace);
    if (!st.blas_) st.blas_.emplace();
    EARN_CUDA_CHECK(cublasSetStream(st.blas_->get(), st.stream()));
    EARN_CUDA_CHECK(cublasSetWorkspace(st.blas_->get(), st.blas_ws_.data(), st.blas_ws_.size()));
  }

  // The model's five GEMM shapes; stream_gemm plans are made once per shape.
  enum Gemm { kQkv, kWo, kW13, kW2, kHead, kGemms };
  struct GemmShape {
    int in, out;
  };
  GemmShape gemm_shape(Gemm g) const {
    const ModelConfig& c = w_.config;
    const int qd = c.n_heads * c.head_dim();
    switch (g) {
      case kQkv: return {c.dim, qd + 2 * c.kv_dim()};
      case kWo: return {qd, c.dim};
      case kW13: return {c.dim, 2 * c.hidden_dim};
      case kW2: return {c.hidden_dim, c.dim};
      default: return {c.dim, c.vocab_size};
    }
  }
  void plan_stream_gemms() {
    if constexpr (sizeof(T) == 2) {
      for (int g = 0; g < kGemms; ++g) {
        const GemmShape sh = gemm_shape(Gemm(g));
        if (sh.in % 8 != 0) continue;
        // qkv and w13 write 16-bit outputs, wo / w2 / the classifier fp32 (residual stream, logits).
        stream_plans_[g] = g == kQkv || g == kW13 ? cuda::stream_gemm_plan<T, T>(kStreamRows, sh.in, sh.out, sms_)
                                                  : cuda::stream_gemm_plan<T, float>(kStreamRows, sh.in, sh.out, sms_);
        for (int nt = 1; nt <= 4; ++nt)  // one plan per n-tile count (8 nt rows): the kernels differ in shared memory
          bulk_plans_[g][nt - 1] = g == kQkv || g == kW13 ? cuda::bulk_gemm_plan<T, T>(8 * nt, sh.in, sh.out, sms_)
                                                          : cuda::bulk_gemm_plan<T, float>(8 * nt, sh.in, sh.out, sms_);
      }
    }
  }

  // y [rows, out] = x [rows, in] w^T + beta y: with use_bulk_gemm / use_stream_gemm, earn's few-row kernels (at most
  // 32 / kStreamRows rows); a cuBLASLt algorithm where tune_gemms chose one; cublasGemmEx's default otherwise.
  // stream_gemm takes up to 32 rows, but past 8 it is slower than cuBLAS on an H200 (0.94x over the five Llama-7B
  // shapes at 20 rows, 0.86x at 32: bench_cuda_gemm, bench/README.md).
  static constexpr int kStreamRows = 8;
  template <class TY>
  void gemm(State& st, Gemm g, const T* x, const T* w, TY* y, int rows, float beta = 0.0f) const {
    const GemmShape sh = gemm_shape(g);
    if constexpr (sizeof(T) == 2) {  // fp32 storage always takes cuBLAS
      if (st.bulk_gemm_on_ && cuda::bulk_gemm_supported(x, w, rows, sh.in)) {
        // Weights are never written by the engine's kernels, so a dependent launch may ask for them early.
        cuda::bulk_gemm<T, TY>(st.stream(), bulk_plans_[g][(rows - 1) / 8], x, w, y, rows, sh.in, sh.out, beta,
                               st.pdl_on_);
        return;
      }
    }
    if (st.stream_gemm_on_ && rows <= kStreamRows && cuda::stream_gemm_supported(x, w, rows, sh.in)) {
      cuda::stream_gemm<T, TY>(st.stream(), stream_plans_[g], x, w, y, rows, sh.in, sh.out, beta);
      return;
    }
    for (const auto& t : st.tuned_)
      if (t.g == g && t.rows == rows) {  // tune_gemms chose a cuBLASLt algorithm for this product
        t.product.run(lt_.get(), t.algo, x, w, y, beta, st.blas_ws_.data(), st.blas_ws_.size(), st.stream());
        return;
      }
    cuda::linear<T, TY>(st.blas_->get(), x, w, y, rows, sh.in, sh.out, beta);
  }

  // What a decode step's launches bake in: the engine (weights, schedule), step shape, GEMM groups, every
  // buffer address. Equal keys launch identical work on different uploaded data.
  std::vector<long long> graph_key(const State& st, const Plan& plan, int rows) const {
    auto addr = [](const void* p) { return static_cast<long long>(reinterpret_cast<std::uintptr_t>(p)); };
    std::vector<long long> k{static_cast<long long>(id_), flash(st, true), st.stream_gemm_on_, st.bulk_gemm_on_,
                             st.pdl_on_, st.tune_gen_, rows, st.gen_len_, static_cast<long long>(plan.ints.size()),
                             static_cast<long long>(plan.segs.size()), plan.ptr_count,
                             static_cast<long long>(plan.max_scores)};
    for (const auto& lp : plan.layers) {
      k.insert(k.end(), {lp.seg_off, lp.nseg, lp.ptr_off, lp.entries, lp.max_nq, lp.split.chunks, lp.split.chunk_keys});
      for (const auto& g : lp.groups) k.insert(k.end(), {g.S, g.nq, g.count, g.entry});
    }
    k.insert(k.end(), plan.evict_n.begin(), plan.evict_n.end());
    for (const void* p : {static_cast<const void*>(st.x_.data()), static_cast<const void*>(st.x2_.data()),
                          static_cast<const void*>(st.h_.data()), static_cast<const void*>(st.qkv_.data()),
                          static_cast<const void*>(st.q_.data()), static_cast<const void*>(st.att_.data()),
                          static_cast<const void*>(st.gu_.data()), static_cast<const void*>(st.act_.data()),
                          static_cast<const void*>(st.scores_.data()), static_cast<const void*>(st.probs_.data()),
                          static_cast<const void*>(st.logits_.data()), static_cast<const void*>(st.ints_.data()),
                          static_cast<const void*>(st.segs_.data()), static_cast<const void*>(st.ptrs_.data()),
                          static_cast<const void*>(st.blas_ws_.data())})
      k.push_back(addr(p));
    return k;
  }

  void check_tokens(std::span<const int> tokens) const { detail::check_token_ids(tokens, w_.config.vocab_size); }

  void embed(State& st, const int* codes, int rows) const {
    const int dim = w_.config.dim;
    cuda::kernel::embed<T><<<cuda::kernel::grid_for(Index{rows} * dim), cuda::kernel::kThreads, 0, st.stream()>>>(
        codes, w_.tok_embeddings.data(), w_.registers.data(), rows, dim, st.x_.data());
    EARN_CUDA_CHECK_LAUNCH();
  }

  // x2 = rows idx of x. Prefill then swaps x and x2 (the kept rows become the stream); logits read x2 directly,
  // so a decode step leaves the host-side state unchanged and can be replayed from a graph.
  void gather(State& st, const int* idx, int rows) const {
    const int dim = w_.config.dim;
    cuda::kernel::gather_rows<float><<<cuda::kernel::grid_for(Index{rows} * dim), cuda::kernel::kThreads, 0,
                                       st.stream()>>>(st.x_.data(), idx, rows, dim, st.x2_.data());
    EARN_CUDA_CHECK_LAUNCH();
  }

  void rmsnorm(State& st, const float* x, const float* gain, int rows) const {
    if (rows == 0) return;
    namespace k = cuda::kernel;
    if (const int threads = k::rmsnorm_vec4_threads(w_.config.dim))
      cuda::launch(st.pdl_on_, k::rmsnorm_vec4<T>, rows, threads, 0, st.stream(), x, gain, w_.config.norm_eps,
                   w_.config.dim, st.h_.data());
    else
      cuda::launch(st.pdl_on_, k::rmsnorm<T>, rows, k::kThreads, 0, st.stream(), x, gain, w_.config.norm_eps,
                   w_.config.dim, st.h_.data());
  }

  // One decoder block over `rows` residual rows. row_src (decode) maps a row to its generated-KV block, and G is
  // the number of generated keys each row sees; in prefill row_src is null and K/V go to the users' prefix blocks.
  // A pressed layer of a prefill: its segments and scored rows (device), and the sizes of its kernels.
  struct PressCall {
    const cuda::PressSeg* segs = nullptr;
    const int2* qrows = nullptr;
    int nseg = 0, scored = 0, max_n = 0, max_keep = 0;  // scored: tiles of scored query rows
    std::size_t scores = 0;   // floats of scores
    std::size_t partial = 0;  // floats of press_scores' partial sums
  };

  template <class Policy>
  void layer(const attention::LayerMask<Policy>& mask, State& st, int l, const Plan& plan, int pl, int rows,
             const int* pos, const int* row_seg, const int* row_src, int G, const PressCall* press = nullptr) const {
    const ModelConfig& c = w_.config;
    const cuda::DeviceLayer<DType>& lw = w_.layers[l];
    kv::Store<CudaT<DType>>& store = st.layers_[l];
    const int hd = c.head_dim();
    const cudaStream_t s = st.stream();
    const typename Plan::LayerPlan& lp = plan.layers[pl];
    const cuda::Segment* segs = st.segs_.data() + lp.seg_off;
    namespace k = cuda::kernel;

    rmsnorm(st, st.x_.data(), lw.attn_norm.data(), rows);
    gemm<T>(st, kQkv, st.h_.data(), lw.wqkv.data(), st.qkv_.data(), rows);
    const bool decode = row_src != nullptr;
    const int head_groups = (c.n_heads + c.n_kv_heads + k::kQkvHeads - 1) / k::kQkvHeads;
    // A pressed layer's prefill rows go to the press scratch (segments' slot0 = their first layer row).
    T* k_dst = decode ? store.gen_k() : press ? st.press_k_.data() : store.prefix_k_base();
    T* v_dst = decode ? store.gen_v() : press ? st.press_v_.data() : store.prefix_v_base();
    int* kpos_dst = decode ? nullptr : press ? st.press_pos_.data() : store.prefix_pos_base();
    const float* bias = lw.bqkv.empty() ? nullptr : lw.bqkv.data();
    const int interleaved = c.rope_style == RopeStyle::kInterleaved ? 1 : 0;
    bool rotated = false;
    if constexpr (sizeof(T) == 2) {
      if (k::qkv_post_row_supported<T>(hd)) {  // blocks per row, 16-byte pieces
        const dim3 grid(rows, k::qkv_post_parts(rows, c.n_heads + c.n_kv_heads, hd, sms_));
        cuda::launch(st.pdl_on_, k::qkv_post_row<T>, grid, 128, 0, s, st.qkv_.data(), bias, pos, row_seg, segs,
                     row_src, st.gen_len_, store.max_new(), c.n_heads, c.n_kv_heads, hd, c.rope_theta, interleaved,
                     st.q_.data(), k_dst, v_dst, kpos_dst);
        rotated = true;
      }
    }
    if (!rotated) {
      k::qkv_post<T><<<k::grid_for(Index{rows} * head_groups * (hd / 2)), k::kThreads, 0, s>>>(
          st.qkv_.data(), bias, pos, row_seg, segs, row_src, st.gen_len_, store.max_new(), rows, c.n_heads,
          c.n_kv_heads, hd, c.rope_theta, interleaved, st.q_.data(), k_dst, v_dst, kpos_dst);
    }
    EARN_CUDA_CHECK_LAUNCH();

    if (!flash(st, decode)) {
      attention(mask, st, store, lp, segs, pos, row_seg, row_src, rows, G);
    } else if (decode) {  // flash-decoding: prefix chunks in partial mode, then the rows' own generated keys
      cuda::decode_attention<Policy, T>(s, st.q_.data(), store.gen_k(), store.gen_v(), row_src, row_seg, segs,
                                        lp.nseg, lp.max_nq, pos, rows, c.n_heads, c.n_kv_heads, hd, G,
                                        store.max_new(), lp.split, st.scores_.data(), st.att_.data(), st.pdl_on_,
                                        mask);
    } else {
      cuda::FlashArgs<T> fa;
      fa.q = st.q_.data();
      fa.segs = segs;
      fa.nseg = lp.nseg;
      fa.pos = pos;
      fa.out = st.att_.data();
      fa.nh = c.n_heads;
      fa.nkv = c.n_kv_heads;
      fa.hd = hd;
      fa.max_nq = lp.max_nq;
      fa.pdl = st.pdl_on_;
      cuda::flash_attention<Policy, false>(s, fa, mask);
    }
    if (press) run_press(mask, st, store, *press, pos);

    // x += att Wo^T; x += W2 (silu(W1 n(x)) * W3 n(x)), the residual adds fused into the GEMMs (beta = 1).
    gemm<float>(st, kWo, st.att_.data(), lw.wo.data(), st.x_.data(), rows, 1.0f);
    rmsnorm(st, st.x_.data(), lw.ffn_norm.data(), rows);
    gemm<T>(st, kW13, st.h_.data(), lw.w13.data(), st.gu_.data(), rows);
    if (sizeof(T) == 2 && c.hidden_dim % 8 == 0)
      cuda::launch(st.pdl_on_, k::swiglu_vec8<T>, k::grid_for(Index{rows} * c.hidden_dim / 8), k::kThreads, 0, s,
                   st.gu_.data(), rows, c.hidden_dim, st.act_.data());
    else
      k::swiglu<T><<<k::grid_for(Index{rows} * c.hidden_dim), k::kThreads, 0, s>>>(st.gu_.data(), rows, c.hidden_dim,
                                                                                 st.act_.data());
    EARN_CUDA_CHECK_LAUNCH();
    gemm<float>(st, kW2, st.act_.data(), lw.w2.data(), st.x_.data(), rows, 1.0f);
  }

  // The press of a pressed layer after its prefill attention (press.cuh): scores, selection, gather into the store.
  template <class Policy>
  void run_press(const attention::LayerMask<Policy>& mask, State& st, kv::Store<CudaT<DType>>& store,
                 const PressCall& pc, const int* pos) const {
    const ModelConfig& c = w_.config;
    const cudaStream_t s = st.stream();
    namespace k = cuda::kernel;
    if (pc.scored > 0) {
      EARN_CUDA_CHECK(cudaMemsetAsync(st.press_partial_.data(), 0, pc.partial * sizeof(float), s));
      if (c.head_dim() > 256) throw RangeError("press: the CUDA press scores heads of at most 256 dimensions");
      cuda::allow_dynamic_smem<k::press_scores<Policy, T>>(k::press_scores_smem(256));  // once, for any head size
      const std::size_t smem = k::press_scores_smem(c.head_dim());
      k::press_scores<Policy, T><<<dim3(pc.scored, c.n_heads), 256, smem, s>>>(
          st.q_.data(), st.press_k_.data(), pos, pc.segs, pc.qrows, st.press_partial_.data(), c.n_heads,
          c.n_kv_heads, c.head_dim(), mask);
      EARN_CUDA_CHECK_LAUNCH();
      k::press_reduce<<<dim3(pc.nseg, c.n_kv_heads), 128, 0, s>>>(pc.segs, st.press_partial_.data(), c.n_heads,
                                                                  c.n_kv_heads, st.press_scores_.data());
      EARN_CUDA_CHECK_LAUNCH();
    }
    k::press_select<<<dim3(pc.nseg, c.n_kv_heads), 128, pc.max_n * (sizeof(float) + 1), s>>>(
        pc.segs, st.press_scores_.data(), st.press_idx_.data());
    EARN_CUDA_CHECK_LAUNCH();
    k::press_gather<T><<<dim3(pc.nseg, std::max(pc.max_keep, 1)), 128, 0, s>>>(
        pc.segs, st.press_idx_.data(), st.press_k_.data(), st.press_v_.data(), pos, c.n_kv_heads, c.head_dim(),
        store.prefix_k_base(), store.prefix_v_base(), store.prefix_pos_base(), st.press_scores_.data(),
        store.head_pos_base(), store.score_base());
    EARN_CUDA_CHECK_LAUNCH();
  }

  // Shared memory of evict_scores over layer cache `store`; RangeError past what the kernel is given (decode checks it
  // while planning, before a launch).
  static constexpr std::size_t kEvictMaxSmem = 200 * 1024;
  std::size_t evict_smem(const kv::Store<CudaT<DType>>& store) const {
    const std::size_t smem = cuda::kernel::evict_scores_smem(static_cast<int>(store.prefix_capacity()),
                                                             store.max_new(), w_.config.head_dim());
    if (smem > kEvictMaxSmem)
      throw RangeError("press: eviction during decode on the GPU takes up to ~25000 prefix rows per user");
    return smem;
  }

  // Eviction during decode after layer l's attention (evict.cuh): `n` users' EvictSegs at ev (uploaded ints).
  template <class Policy>
  void evict(const attention::LayerMask<Policy>& mask, State& st, int l, const Plan& plan, const int* ev, int n,
             const int* pos, const int* row_src) const {
    const ModelConfig& c = w_.config;
    kv::Store<CudaT<DType>>& store = st.layers_[l];
    const cuda::Segment* segs = st.segs_.data() + plan.layers[l].seg_off;
    const auto* es = reinterpret_cast<const cuda::EvictSeg*>(ev);
    const cudaStream_t s = st.stream();
    namespace k = cuda::kernel;
    const std::size_t smem = evict_smem(store);
    if (smem > 48 * 1024) cuda::allow_dynamic_smem<k::evict_scores<Policy, T>>(kEvictMaxSmem);
    k::evict_scores<Policy, T><<<dim3(n, c.n_kv_heads), 128, smem, s>>>(
        es, segs, st.q_.data(), store.gen_k(), row_src, pos, c.n_heads, c.n_kv_heads, c.head_dim(), store.max_new(),
        store.score_base(), mask);
    EARN_CUDA_CHECK_LAUNCH();
    k::evict_drop<T><<<dim3(n, c.n_kv_heads), 128, 0, s>>>(es, segs, c.n_kv_heads, c.head_dim(), store.prefix_k_base(),
                                                          store.prefix_v_base(), store.head_pos_base(),
                                                          store.score_base());
    EARN_CUDA_CHECK_LAUNCH();
    k::evict_positions<<<n, 128, 0, s>>>(es, segs, c.n_kv_heads, store.head_pos_base(), store.prefix_pos_base());
    EARN_CUDA_CHECK_LAUNCH();
  }

  // The observer's statistics of layer l (observe.cuh): the rows its reduce query selects in every segment, reduced
  // on the device; each sample's mean over its rows goes to the observer per head. Synchronises the stream.
  template <class Policy>
  void observe_layer(const attention::LayerMask<Policy>& mask, State& st, attention::Observer& obs,
                     const plan::ForwardPlan& fp, int l, const Plan& plan, std::span<const int> users, int sample0,
                     const int* pos) const {
    const ModelConfig& c = w_.config;
    const plan::RowSet& rw = fp.layer_rows(l);
    std::vector<int2> rows;
    std::vector<int> seg_rows(rw.segments(), 0);
    int max_s = 0;
    for (int s = 0; s < rw.segments(); ++s) {
      const attention::ObservedSegment seg =
          detail::observed_segment(fp, l, s, sample0 + s, users[s], mask);
      for (int i : attention::Observer::select(obs.options().reduce, seg)) rows.push_back(make_int2(s, i));
      seg_rows[s] = static_cast<int>(rows.size());
      max_s = std::max(max_s, rw.seg_n[s]);
    }
    if (rows.empty()) return;
    if (max_s > 8192)
      throw RangeError("observer: " + std::to_string(max_s) + " rows of one user at layer " + std::to_string(l) +
                       "; the CUDA observer takes at most 8192");
    st.obs_rows_.reserve(rows.size());
    st.obs_out_.reserve(rows.size() * c.n_heads);
    EARN_CUDA_CHECK(cudaMemcpyAsync(st.obs_rows_.data(), rows.data(), rows.size() * sizeof(int2),
                                    cudaMemcpyHostToDevice, st.stream()));
    const attention::ObserverOptions& o = obs.options();
    const cuda::ObserveParams params{o.head_keys, o.tail_keys, static_cast<float>(o.threshold),
                                     o.density == attention::DensityRule::kAboveUniform ? 1 : 0};
    cuda::kernel::observe_stats<Policy, T>
        <<<dim3(static_cast<unsigned>(rows.size()), c.n_heads), 128, (c.head_dim() + max_s) * sizeof(float),
           st.stream()>>>(st.q_.data(), pos, st.segs_.data() + plan.layers[l].seg_off, st.obs_rows_.data(),
                          c.n_heads, c.n_kv_heads, c.head_dim(), params, st.obs_out_.data(), mask);
    EARN_CUDA_CHECK_LAUNCH();
    std::vector<float4> out(rows.size() * c.n_heads);
    EARN_CUDA_CHECK(cudaMemcpyAsync(out.data(), st.obs_out_.data(), out.size() * sizeof(float4),
                                    cudaMemcpyDeviceToHost, st.stream()));
    st.synchronize();
    for (int s = 0, r0 = 0; s < rw.segments(); r0 = seg_rows[s], ++s) {
      const int n = seg_rows[s] - r0;
      if (n == 0) continue;
      for (int h = 0; h < c.n_heads; ++h) {
        attention::RowStats sum;
        for (int r = r0; r < seg_rows[s]; ++r) {
          const float4 v = out[std::size_t(r) * c.n_heads + h];
          sum += attention::RowStats{v.x, v.y, v.z, v.w};
        }
        obs.accumulate(l, h, sum.scaled(1.0 / n), n);
      }
    }
  }

  // The cuBLAS attention path (prefill, fp32, shapes the fused decode kernel does not take).
  template <class Policy>
  void attention(const attention::LayerMask<Policy>& mask, State& st, kv::Store<CudaT<DType>>& store,
                 const typename Plan::LayerPlan& lp, const cuda::Segment* segs, const int* pos, const int* row_seg,
                 const int* row_src, int rows, int G) const {
    const ModelConfig& c = w_.config;
    cuda::AttentionArgs<T> att;
    att.q = st.q_.data();
    att.gen_k = store.gen_k();
    att.gen_v = store.gen_v();
    att.scores = st.scores_.data();
    att.probs = st.probs();
    att.out = st.att_.data();
    att.pos = pos;
    att.row_seg = row_seg;
    att.row_src = row_src;
    att.segs = segs;
    att.ptrs = st.ptrs_.data() + lp.ptr_off;
    att.entries = lp.entries;
    att.groups = lp.groups.data();
    att.n_groups = static_cast<int>(lp.groups.size());
    att.rows = rows;
    att.nh = c.n_heads;
    att.nkv = c.n_kv_heads;
    att.hd = c.head_dim();
    att.G = G;
    att.max_new = store.max_new();
    cuda::attention<Policy, T>(st.blas_->get(), st.stream(), att, mask);
  }

  // Attention through the flash kernels unless switched off: in prefill wherever they take the storage type and
  // head size; in decode where flash-decoding also takes the state's new tokens (its combine keeps at most 8
  // generated keys per row; more take the cuBLAS path, over the prompt KV the flash prefill wrote).
  bool flash(const State& st, bool decode) const {
    const int hd = w_.config.head_dim();
    return st.flash_on_ && (decode ? cuda::decode_fused_supported<T>(hd, st.opts_.max_new_tokens)
                                   : cuda::flash_supported<T>(hd));
  }

  // Logits of residual rows idx[0..n): final norm, classifier GEMM into the state's logits buffer.
  cuda::DeviceLogits logits(State& st, const int* idx, int n) const {
    const ModelConfig& c = w_.config;
    gather(st, idx, n);
    rmsnorm(st, st.x2_.data(), w_.final_norm.data(), n);
    gemm<float>(st, kHead, st.h_.data(), w_.classifier(), st.logits_.data(), n);
    return {st.logits_.data(), n, c.vocab_size};
  }

  Matrix to_host(State& st, cuda::DeviceLogits d) const {
    Matrix m(d.rows, d.cols);
    EARN_CUDA_CHECK(cudaMemcpyAsync(m.data(), d.data, std::size_t(d.rows) * d.cols * sizeof(float),
                                    cudaMemcpyDeviceToHost, st.stream()));
    st.synchronize();
    return m;
  }

  // Prefill of several users: every layer over their rows at once; logits of each user's last surviving row
  // (all_rows: every surviving row, one user only).
  cuda::DeviceLogits run_prefill(State& st, std::span<const int> users, std::span<const std::vector<int>> prompts,
                                 bool all_rows) const {
    const ModelConfig& c = w_.config;
    st.check_prefill(users, prompts, c.vocab_size);
    const plan::ForwardPlan fp =
        State::prefill_plan(schedule_, c.n_layers, w_.prefix_registers, w_.suffix_registers, prompts);
    detail::check_press_rules(schedule_, fp);
    attention::Observer* const obs = st.observer_;
    if (obs && obs->options().record.kinds != attention::kNoRows)
      throw ConfigError("observer: the CUDA engine reduces attention statistics on the GPU and keeps no probability "
                        "rows; record whole rows with the CPU engine (CpuState::observe)");
    const int sample0 = obs ? detail::begin_observing(*obs, fp, c.n_layers, c.n_heads) : 0;  // checks it first
    st.begin_prefill(users, fp);

    // Upload the plan: input rows (codes), then per phase its rows' positions and segments and the gather from the
    // phase below; per layer its attention segments over its phase's rows of every user.
    Plan plan;
    const int i_codes = plan.add_ints(fp.source);
    struct Phase {
      int rows, i_pos, i_seg, i_gather;  // i_gather < 0: the input phase (no gather)
    };
    std::vector<Phase> phases;
    for (std::size_t p = 0; p < fp.phases.size(); ++p) {
      const plan::RowSet& r = fp.phases[p].rows;
      phases.push_back(Phase{r.size(), plan.add_ints(r.pos), plan.add_ints(r.seg),
                             p == 0 ? -1 : plan.add_ints(fp.phases[p].keep)});
    }
    const std::size_t max_rows = static_cast<std::size_t>(fp.input().size());
    const std::vector<PressCall> press = plan_presses(st, fp, users, max_rows);
    const std::size_t kvd = static_cast<std::size_t>(c.kv_dim());
    for (int l = 0; l < c.n_layers; ++l) {
      const plan::RowSet& rw = fp.layer_rows(l);
      std::vector<cuda::Segment> segs(rw.segments());
      std::vector<int> seg_user(users.begin(), users.end());
      const Index cap = st.layers_[l].prefix_capacity();
      const bool pressed = press[l].nseg > 0;
      for (std::size_t s = 0; s < segs.size(); ++s) {
        const int u = users[s], off = rw.seg_off[s];
        segs[s].q_off = off;
        segs[s].nq = rw.seg_n[s];
        segs[s].S = rw.seg_n[s];
        segs[s].G = 0;
        segs[s].gen_pos0 = st.input_len_[u];
        if (pressed) {  // attention over the scratch; the store gets the kept rows (plan_presses set their count)
          segs[s].slot0 = off;
          segs[s].kpos = st.press_pos_.data() + off;
          segs[s].pk = st.press_k_.data() + off * kvd;
          segs[s].pv = st.press_v_.data() + off * kvd;
        } else {
          st.layers_[l].set_prefix_len(u, rw.seg_n[s]);  // throws when the layer's cache cannot hold the rows
          segs[s].slot0 = static_cast<int>(u * cap);
          segs[s].kpos = st.layers_[l].prefix_positions(u);
          segs[s].pk = st.layers_[l].prefix_k(u);
          segs[s].pv = st.layers_[l].prefix_v(u);
        }
      }
      plan.add_layer(std::move(segs), seg_user, c.n_heads);
    }
    // The rows whose logits are returned: each user's readout row, or every top row of the one user.
    std::vector<int> out = fp.readout;
    if (all_rows) {
      out.resize(fp.top().size());
      std::iota(out.begin(), out.end(), 0);
    }
    const int i_out = plan.add_ints(out);

    st.reserve(c, max_rows, flash(st, false) ? 0 : plan.max_scores, out.size());  // flash: no score matrix
    plan.upload(st, *this, !flash(st, false));
    bind_blas(st);
    const int* ints = st.ints_.data();
    embed(st, ints + i_codes, static_cast<int>(max_rows));
    for (int l = 0; l < c.n_layers; ++l) {
      const Phase& p = phases[fp.layer_phase[l]];
      if (fp.gathers_before(l)) {  // the rows the policy drops leave the residual stream here
        gather(st, ints + p.i_gather, p.rows);
        std::swap(st.x_, st.x2_);
      }
      schedule_.visit(l, [&]<class L>(const L& ly) {
        const attention::LayerMask<typename L::policy> mask{ly.rule, l};
        layer(mask, st, l, plan, l, p.rows, ints + p.i_pos, ints + p.i_seg, nullptr, 0,
              press[l].nseg > 0 ? &press[l] : nullptr);
        if (obs && obs->wants_layer(l)) observe_layer(mask, st, *obs, fp, l, plan, users, sample0, ints + p.i_pos);
      });
    }
    return logits(st, ints + i_out, static_cast<int>(out.size()));
  }

  // The presses of plan fp's pressed layers (kv/press.hpp): each user's rule, kept-row count (set in the store),
  // scored query rows and buffer offsets, uploaded once; the scratch is sized for max_rows rows. nseg = 0 for a
  // layer without a press.
  std::vector<PressCall> plan_presses(State& st, const plan::ForwardPlan& fp, std::span<const int> users,
                                      std::size_t max_rows) const {
    const ModelConfig& c = w_.config;
    std::vector<PressCall> calls(c.n_layers);
    std::vector<cuda::PressSeg> segs;
    std::vector<int2> qrows;
    std::vector<std::pair<int, int>> offsets(c.n_layers, {0, 0});  // per layer: first segment, first scored row
    std::size_t max_scores = 0, max_idx = 0, max_partial = 0;
    const int group = c.n_heads / c.n_kv_heads;
    for (int l = 0; l < c.n_layers; ++l)
      schedule_.visit(l, [&]<class L>(const L& layer) {
        if constexpr (kv::is_pressed<typename L::cache>()) {
          const plan::RowSet& rw = fp.layer_rows(l);
          PressCall& pc = calls[l];
          offsets[l] = {static_cast<int>(segs.size()), static_cast<int>(qrows.size())};
          int score_off = 0, idx_off = 0;
          long long part_off = 0;
          for (int si = 0; si < rw.segments(); ++si) {
            const int n = rw.seg_n[si];
            const kv::PressRule r = kv::rule_of(layer.layout.press, l, c.n_layers, n, fp.prefix_registers, fp.suffix_registers);
            cuda::PressSeg ps;
            ps.row0 = rw.seg_off[si];
            ps.n = n;
            ps.keep = std::min(r.keep, n);
            ps.sinks = r.sinks;
            ps.recent = r.recent;
            ps.pool = r.pool;
            ps.score_off = score_off;
            ps.idx_off = idx_off;
            ps.dst_slot = static_cast<int>(users[si] * st.layers_[l].prefix_capacity());
            ps.evict = r.evict ? 1 : 0;
            st.layers_[l].set_press_rule(users[si], r.evict ? r : kv::PressRule{});
            if (r.evict) st.layers_[l].reserve_eviction(c.n_kv_heads);
            st.layers_[l].set_prefix_len(users[si], ps.keep);  // throws when the cache cannot hold them
            const int rows = kv::scored_rows(r, n);
            ps.scale = static_cast<float>(kv::score_scale(r, n, group));
            // Tiles of scored rows (segment index within the layer, first row): press_scores takes one per block.
            ps.first_scored = n - rows;
            ps.part_off = part_off;
            for (int i = n - rows; i < n; i += cuda::kernel::kPressQueryTile)
              qrows.push_back(make_int2(si, i)), ++pc.scored, ++ps.tiles;
            part_off += static_cast<long long>(ps.tiles) * c.n_heads * n;
            pc.max_n = std::max(pc.max_n, n);
            pc.max_keep = std::max(pc.max_keep, ps.keep);
            score_off += c.n_kv_heads * n;
            idx_off += c.n_kv_heads * ps.keep;
            segs.push_back(ps);
          }
          pc.nseg = rw.segments();
          pc.scores = static_cast<std::size_t>(score_off);
          pc.partial = static_cast<std::size_t>(part_off);
          max_scores = std::max(max_scores, pc.scores);
          max_partial = std::max(max_partial, pc.partial);
          max_idx = std::max(max_idx, static_cast<std::size_t>(idx_off));
        }
      });
    if (segs.empty()) return calls;
    for (const PressCall& pc : calls)  // the kernels' shared memory: the scores of a row, and a segment's pooling
      if (pc.max_n > 8192)
        throw RangeError("press: " + std::to_string(pc.max_n) + " rows of one user at a pressed layer; the CUDA "
                         "press takes at most 8192");
    const std::size_t kvd = static_cast<std::size_t>(c.kv_dim());
    st.press_k_.reserve(max_rows * kvd);
    st.press_v_.reserve(max_rows * kvd);
    st.press_pos_.reserve(max_rows);
    st.press_scores_.reserve(std::max<std::size_t>(max_scores, 1));
    st.press_partial_.reserve(std::max<std::size_t>(max_partial, 1));
    st.press_idx_.reserve(std::max<std::size_t>(max_idx, 1));
    st.press_segs_.reserve(segs.size());
    st.press_qrows_.reserve(std::max<std::size_t>(qrows.size(), 1));
    EARN_CUDA_CHECK(cudaMemcpyAsync(st.press_segs_.data(), segs.data(), segs.size() * sizeof(cuda::PressSeg),
                                    cudaMemcpyHostToDevice, st.stream()));
    if (!qrows.empty())
      EARN_CUDA_CHECK(cudaMemcpyAsync(st.press_qrows_.data(), qrows.data(), qrows.size() * sizeof(int2),
                                      cudaMemcpyHostToDevice, st.stream()));
    for (int l = 0; l < c.n_layers; ++l)
      if (calls[l].nseg > 0) {
        calls[l].segs = st.press_segs_.data() + offsets[l].first;
        calls[l].qrows = st.press_qrows_.data() + offsets[l].second;
      }
    return calls;
  }

  // A process-wide engine number for graph keys (an address could be reused by a later engine).
  static unsigned long long next_id() {
    static std::atomic<unsigned long long> n{0};
    return ++n;
  }

  std::shared_ptr<const cuda::DeviceWeights<DType>> wp_;
  const cuda::DeviceWeights<DType>& w_;
  Schedule schedule_;
  unsigned long long id_;
  int sms_;  // multiprocessors of the device (flash-decoding split, stream_gemm plans)
  cuda::StreamGemmPlan stream_plans_[kGemms] = {};  // per shape, for up to kStreamRows rows (16-bit storage only)
  cuda::BulkGemmPlan bulk_plans_[kGemms][4] = {};    // per shape and n-tile count (1-8, .., 25-32 rows)
  cuda::LtHandle lt_;  // tuned products (tune_gemms); cuBLASLt takes the stream per call, so sharing it is safe
};

}  // namespace earn
