// earn/backend/cpu/engine.hpp - earn::Engine<Schedule, Cpu>: prefill and decode on the host with Eigen.
#pragma once

#include <algorithm>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "earn/attention/observer.hpp"
#include "earn/attention/row_kind.hpp"
#include "earn/backend/cpu/huge_pages.hpp"
#include "earn/backend/cpu/kv_store.hpp"
#include "earn/backend/cpu/ops.hpp"
#include "earn/backend/cpu/press.hpp"
#include "earn/backend/cpu/tag.hpp"
#include "earn/core/error.hpp"
#include "earn/model/engine_fwd.hpp"
#include "earn/model/weights.hpp"
#include "earn/plan/forward.hpp"

namespace earn {

/// Per-layer KV caches and bookkeeping of one decoding session on the host: a batch of users, each with its
/// prompt cached once, and decode rows (beams) that each hold only their generated tokens.
class CpuState : public detail::RowBook {
 public:
  CpuState() = default;

  /// Decode rows and the user each belongs to; rows of one user share its prompt KV. Resets generated tokens.
  void set_rows(std::span<const int> row_user) { assign_rows(row_user); }

  /// Beam reordering: new row i continues old row parent[i] (user and generated KV follow the parent).
  void reorder(std::span<const int> parent) {
    std::vector<int> users = reordered_users(parent);
    for (auto& layer : layers_) layer.reorder(parent, gen_len_);
    row_user_ = std::move(users);
  }

  /// Attention observer of every later prefill (nullptr: none, and nothing is paid for it). Not owned: it must
  /// outlive the prefills it watches. Decode steps are not observed.
  void observe(attention::Observer* observer) { observer_ = observer; }
  attention::Observer* observer() const { return observer_; }

  const kv::Store<Cpu>& layer_cache(int l) const { return layers_.at(l); }
  int n_layers() const { return static_cast<int>(layers_.size()); }

  /// Bytes of K and V held now: every user's prefix rows plus every row's generated rows, over all layers.
  Index kv_bytes() const {
    return kv_rows_held(layers_) * 2 * kv_dim_ * Index{sizeof(float)};
  }
  /// Bytes of K and V held now by layer `l`'s cache alone (early layers: prompt + registers + generated rows;
  /// late layers: registers + generated rows).
  Index layer_kv_bytes(int l) const {
    return kv_rows_held(std::span<const kv::Store<Cpu>>(&layers_.at(l), 1)) * 2 * kv_dim_ * Index{sizeof(float)};
  }
  /// Bytes reserved for K and V over all layers.
  Index kv_capacity_bytes() const {
    Index f = 0;
    for (const auto& layer : layers_) f += layer.capacity_floats();
    return f * Index{sizeof(float)};
  }

 private:
  template <class, class>
  friend class Engine;
  int kv_dim_ = 0;
  std::vector<kv::Store<Cpu>> layers_;
  attention::Observer* observer_ = nullptr;
  // A decode step's activations, kept between steps: a beam search's steps have the same rows, so they reuse the
  // memory instead of allocating (and page-faulting) ~10 buffers of up to a few MB per layer and step.
  struct Scratch {
    Matrix x, h, q, k, v, att, tmp, gate, up;
  } scratch_;
};

/// The CPU engine. Keeps a reference to the weights, which must outlive it.
/// \code
///   earn::ModelWeights w = earn::random_weights(cfg);
///   earn::Engine<earn::EarnSchedule> engine(w, earn::EarnSchedule{6});
///   auto st = engine.make_state({.max_users = 1, .max_rows = 20, .max_prompt = 512, .max_new_tokens = 4});
///   earn::Vector logits = engine.prefill(st, 0, prompt);
/// \endcode
template <class Schedule>
class Engine<Schedule, Cpu> {
  static_assert(::earn::Schedule<Schedule>,
                "earn: Engine's first argument must be a schedule (schedule/split.hpp: Split, Uniform, PerLayer)");

 public:
  using schedule_type = Schedule;
  using backend_type = Cpu;
  using State = CpuState;

  explicit Engine(const ModelWeights& w, Schedule schedule = Schedule{}) : w_(w), schedule_(schedule) {
    w_.validate();
    schedule_.validate(w_.config.n_layers, w_.registers.count());
    cpu::advise_huge_pages(w_);  // decode streams every weight each token: 2 MiB pages spare the TLB (huge_pages.hpp)
  }
  Engine(ModelWeights&&, Schedule = Schedule{}) = delete;  // the engine keeps a reference: no temporaries

  const ModelConfig& config() const { return w_.config; }
  const ModelWeights& weights() const { return w_; }
  const Schedule& schedule() const { return schedule_; }
  int registers() const { return w_.registers.count(); }

  /// A state with caches sized by `o`; late layers reserve registers only, never prompt-sized blocks.
  State make_state(StateOptions o) const {
    const ModelConfig& c = w_.config;
    o = detail::resolve_state_options(o, c, registers());
    State st;
    st.init_rows(o);
    st.kv_dim_ = c.kv_dim();
    st.layers_.reserve(c.n_layers);
    for (int l = 0; l < c.n_layers; ++l) {
      const Index cap = detail::layer_prefix_capacity(schedule_, l, c.n_layers, o, registers());
      st.layers_.emplace_back(cap, o.max_users, o.max_rows, o.max_new_tokens, c.kv_dim());
    }
    return st;
  }

  /// Prefill user `user` with [R_prefix; tokens; R_suffix]. Returns logits [vocab] predicting the first generated
  /// token, read at the last row that reaches the final layer (the last suffix register; the last prefix register
  /// when r_s = 0 and k < L; the last prompt token for a dense model). Ends any decoding in progress.
  Vector prefill(State& st, int user, std::span<const int> tokens) const {
    const int users[1] = {user};
    const std::vector<int> prompts[1] = {std::vector<int>(tokens.begin(), tokens.end())};
    plan::ForwardPlan fp;
    return logits(run_prefill(st, users, prompts, fp, /*readout_only=*/true)).row(0).transpose();
  }

  /// Like prefill, but logits [rows, vocab] for every row that reaches the final layer (all rows when dense).
  Matrix prefill_all_logits(State& st, int user, std::span<const int> tokens) const {
    const int users[1] = {user};
    const std::vector<int> prompts[1] = {std::vector<int>(tokens.begin(), tokens.end())};
    plan::ForwardPlan fp;
    return logits(run_prefill(st, users, prompts, fp));
  }

  /// Prefill several users in one pass (their rows share every GEMM): logits [users, vocab], row i predicting
  /// user users[i]'s first generated token. Ends any decoding in progress.
  Matrix prefill_batch(State& st, std::span<const int> users, std::span<const std::vector<int>> prompts) const {
    plan::ForwardPlan fp;
    return logits(run_prefill(st, users, prompts, fp, /*readout_only=*/true));
  }

  /// One decode step: tokens[i] is fed to decode row i (see State::set_rows). Returns logits [rows, vocab].
  Matrix decode(State& st, std::span<const int> tokens) const {
    const ModelConfig& c = w_.config;
    const int rows = st.rows();
    st.check_decode_step(tokens, c.vocab_size);
    std::vector<int> pos(rows);
    for (int i = 0; i < rows; ++i) pos[i] = st.decode_position(i);
    const cpu::RopeTable rope(pos, c.head_dim(), c.rope_theta);
    auto& sc = st.scratch_;  // plain references: clang 14 cannot capture a structured binding in a lambda
    Matrix &x = sc.x, &h = sc.h, &q = sc.q, &k = sc.k, &v = sc.v, &att = sc.att, &tmp = sc.tmp, &gate = sc.gate,
           &up = sc.up;
    x.resize(rows, c.dim);
    for (int i = 0; i < rows; ++i) x.row(i) = w_.tok_embeddings.row(tokens[i]);
    att.resize(rows, Index{c.n_heads} * c.head_dim());
    for (int l = 0; l < c.n_layers; ++l) {
      schedule_.visit(l, [&]<class L>(const L& layer) {
        using P = typename L::policy;
        const attention::LayerMask<P> mask{layer.rule, l};
        const LayerWeights& lw = w_.layers[l];
        kv::Store<Cpu>& store = st.layers_[l];
        qkv(lw, x, rope, h, q, k, v);
        const int g = st.gen_len_;
        for (int i = 0; i < rows; ++i) {
          store.gen_k_row(i, g) = k.row(i);
          store.gen_v_row(i, g) = v.row(i);
        }
        // A press evicting during decode (kv/press.hpp, step 4) scores the prefix keys by this step's probabilities.
        bool evicting = false;
        if constexpr (kv::is_pressed<typename L::cache>())
          for (int i = 0; i < rows; ++i) evicting = evicting || store.press_rule(st.row_user_[i]).evict;
        const Index stride = evicting ? store.prefix_capacity() * c.n_heads : 0;
        std::vector<float> probs(static_cast<std::size_t>(Index{rows} * stride));
        const auto attend = [&](int i) {
          const int u = st.row_user_[i];
          Vector qi = q.row(i).transpose(), out;
          cpu::attention_decode<P>(qi, pos[i], store.prefix_k(u), store.prefix_v(u), store.prefix_positions(u),
                                   store.gen_k(i, g + 1), store.gen_v(i, g + 1), st.input_len_[u], c.n_heads,
                                   c.n_kv_heads, c.head_dim(), out, mask,
                                   evicting ? probs.data() + Index{i} * stride : nullptr);
          att.row(i) = out.transpose();
        };
        // Rows in parallel when there are enough of them (two chunks at least) and each has a long prefix to read;
        // claimed in small chunks, as users' prefixes differ in length (a static split gave one thread the users with
        // long histories). Otherwise rows one after another, outside any parallel region, so that attention_decode
        // may split a long row's heads over the threads (a single decoded row, as in `generate`).
        const bool by_rows = rows >= 8 && Index{rows} * (store.prefix_capacity() + g) * c.kv_dim() >= (Index{1} << 16);
        if (by_rows) {
#pragma omp parallel for schedule(dynamic, 4)
          for (int i = 0; i < rows; ++i) attend(i);
        } else {
          for (int i = 0; i < rows; ++i) attend(i);
        }
        if (evicting)
          cpu::evict_after_step(store, st.row_user_, probs, stride, g + 1, c.n_heads, c.n_kv_heads, c.head_dim());
        residual_and_mlp(lw, att, x, h, tmp, gate, up);
      });
    }
    ++st.gen_len_;
    return logits(x);
  }

 private:
  // h = norm(x); q, k, v projections with biases, RoPE applied to q and k.
  void qkv(const LayerWeights& lw, const Matrix& x, const cpu::RopeTable& rope, Matrix& h, Matrix& q, Matrix& k,
           Matrix& v) const {
    const ModelConfig& c = w_.config;
    cpu::rmsnorm(x, lw.attn_norm, c.norm_eps, h);
    cpu::linear_multi<Matrix, float, 3>(h, {&lw.wq, &lw.wk, &lw.wv}, {&q, &k, &v});
    if (c.qkv_bias) {
      q.rowwise() += lw.bq.transpose();
      k.rowwise() += lw.bk.transpose();
      v.rowwise() += lw.bv.transpose();
    }
    cpu::apply_rope(q, c.n_heads, c.head_dim(), rope, c.rope_style);
    cpu::apply_rope(k, c.n_kv_heads, c.head_dim(), rope, c.rope_style);
  }

  // x += att * wo^T; x += w2 (silu(w1 n(x)) * w3 n(x)).
  void residual_and_mlp(const LayerWeights& lw, const Matrix& att, Matrix& x, Matrix& h, Matrix& tmp, Matrix& gate,
                        Matrix& up) const {
    cpu::linear(att, lw.wo, tmp);
    x += tmp;
    cpu::rmsnorm(x, lw.ffn_norm, w_.config.norm_eps, h);
    cpu::linear_multi<Matrix, float, 2>(h, {&lw.w1, &lw.w3}, {&gate, &up});
    cpu::swiglu(gate, up);
    cpu::linear(gate, lw.w2, tmp);
    x += tmp;
  }

  template <class X>
  Matrix logits(const X& x) const {
    Matrix h, out;
    cpu::rmsnorm(x, w_.final_norm, w_.config.norm_eps, h);
    cpu::linear(h, w_.classifier(), out);
    return out;
  }

  // Plans the prefill of `prompts` for `users` and runs every layer over the planned rows, caching each layer's
  // rows of every user; returns the residual rows of the top phase [fp.top().size(), dim]. readout_only: only the
  // rows read out are wanted: the last layer still computes every row's attention (its cache, a press's scores and
  // an observer see all of them, exactly as without it), but only the readout rows pass its output projection and
  // MLP (the other rows' outputs would reach nothing: llama.cpp skips them the same way), and the result holds just
  // those rows, row s being sequence s's readout.
  Matrix run_prefill(State& st, std::span<const int> users, std::span<const std::vector<int>> prompts,
                     plan::ForwardPlan& fp, bool readout_only = false) const {
    const ModelConfig& c = w_.config;
    st.check_prefill(users, prompts, c.vocab_size);
    const RegisterWeights& reg = w_.registers;
    const int rp = static_cast<int>(reg.prefix.rows()), rs = static_cast<int>(reg.suffix.rows());
    fp = State::prefill_plan(schedule_, c.n_layers, rp, rs, prompts);
    detail::check_press_rules(schedule_, fp);
    attention::Observer* const obs = st.observer_;
    const int sample0 = obs ? detail::begin_observing(*obs, fp, c.n_layers, c.n_heads) : 0;  // checks it first
    st.begin_prefill(users, fp);

    const plan::RowSet& in = fp.input();
    Matrix x(in.size(), c.dim);
    for (int i = 0; i < in.size(); ++i) {
      const int src = fp.source[i];
      x.row(i) = src >= 0 ? w_.tok_embeddings.row(src) : src >= -rp ? reg.prefix.row(-src - 1)
                                                                   : reg.suffix.row(-src - 1 - rp);
    }
    Matrix h, q, k, v, att, tmp, gate, up;
    std::optional<cpu::RopeTable> rope;
    for (int l = 0; l < c.n_layers; ++l) {
      if (fp.gathers_before(l) || !rope) {  // the policy's dropped rows leave the residual stream here
        if (fp.gathers_before(l)) x = cpu::gather_rows(x, fp.phases[fp.layer_phase[l]].keep);
        rope.emplace(fp.layer_rows(l).pos, c.head_dim(), c.rope_theta);
      }
      const plan::RowSet& rows = fp.layer_rows(l);
      schedule_.visit(l, [&]<class L>(const L& layer) {
        using P = typename L::policy;
        const attention::LayerMask<P> mask{layer.rule, l};
        const LayerWeights& lw = w_.layers[l];
        kv::Store<Cpu>& store = st.layers_[l];
        qkv(lw, x, *rope, h, q, k, v);
        att.resize(x.rows(), Index{c.n_heads} * c.head_dim());
        for (int s = 0; s < rows.segments(); ++s) {
          const int u = users[s], off = rows.seg_off[s], n = rows.seg_n[s];
          const std::span<const int> pos(rows.pos.data() + off, static_cast<std::size_t>(n));
          const attention::ObservedSegment seg = detail::observed_segment(fp, l, s, sample0 + s, u, mask);
          const bool watch = obs && obs->wants_layer(l);
          // The keys are the user's rows of this layer; the cache then keeps them all, or what a press chooses.
          const auto ks = k.middleRows(off, n), vs = v.middleRows(off, n);
          constexpr bool pressed = kv::is_pressed<typename L::cache>();
          kv::PressRule rule;
          if constexpr (pressed) rule = kv::rule_of(layer.layout.press, l, c.n_layers, n, rp, rs);  // checked before
          std::optional<cpu::PressScores> scores;
          if (pressed) scores.emplace(rule, n, c.n_heads, c.n_kv_heads);
          const cpu::AttnRows ar{pos, {rows.kind.data() + off, static_cast<std::size_t>(n)}};
          cpu::attention_prefill<P>(q.middleRows(off, n), ar, ks, vs, ar, c.n_heads, c.n_kv_heads, c.head_dim(),
                                    att.middleRows(off, n), [&](int head, const auto& probs) {
                                      if (watch) obs->observe(seg, head, probs);
                                      if (scores) scores->add(head, probs);
                                    }, mask);
          if (scores) {
            const cpu::PressedRows kept = cpu::press_rows(rule, *scores, ks, vs, pos, c.n_kv_heads, c.head_dim());
            store.write_prefix(u, kept.k, kept.v, kept.pos, kept.head_pos);
            if (rule.evict) store.set_eviction(u, rule, kept.head_score);
          } else {
            store.write_prefix(u, ks, vs, pos);
          }
        }
        if (readout_only && l == c.n_layers - 1) {  // only the readout rows go on (see above)
          x = cpu::gather_rows(x, fp.readout);
          att = cpu::gather_rows(att, fp.readout);
        }
        residual_and_mlp(lw, att, x, h, tmp, gate, up);
      });
    }
    return x;
  }

  const ModelWeights& w_;
  Schedule schedule_;
};

}  // namespace earn
