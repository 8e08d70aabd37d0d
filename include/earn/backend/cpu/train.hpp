// earn/backend/cpu/train.hpp - a training step's forward (with saved activations) and backward pass on the host.
//
// Runs exactly what a plan::ForwardPlan says, the same plan the engines run: input rows [R_p; prompt; R_s; fed],
// each layer over its phase's rows (EARN's late layers over registers and fed rows only, so they cost less here
// too), attention per sequence under the layer policy's visibility (its attention::LayerMask: positions, kinds,
// layer and head), the classifier on the answer rows only. Teacher forcing: the answer's first F tokens are fed, and
// its F + 1 tokens are the targets of the readout row and the F fed rows. Loss: next-token cross-entropy over the answer tokens, summed and divided by `norm`
// (the effective batch's answer tokens, so micro-batches accumulate to the batch mean).
// Scalar T: float to train, double for finite-difference gradient checks (tests/test_train_grad.cpp).
#pragma once

#include <cmath>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "earn/backend/cpu/backward.hpp"
#include "earn/backend/cpu/ops.hpp"
#include "earn/core/error.hpp"
#include "earn/model/weights.hpp"
#include "earn/plan/forward.hpp"

namespace earn::cpu {

/// Activations of one forward pass that its backward pass reads.
template <class T>
struct TrainTape {
  struct Layer {
    MatrixT<T> x;                    ///< [n, dim] residual entering the layer (after any row gather)
    VectorT<T> inv1, inv2;           ///< [n] rsqrt(mean square) of x and of x1
    MatrixT<T> h1;                   ///< [n, dim] attention-norm output
    MatrixT<T> q, k, v;              ///< [n, qd], [n, kvd], [n, kvd], biases added, q and k rotated
    std::vector<MatrixT<T>> probs;   ///< [segments * n_heads] of [n_s, n_s]: attention probabilities
    MatrixT<T> att;                  ///< [n, qd] attention output
    MatrixT<T> x1;                   ///< [n, dim] residual after attention
    MatrixT<T> h2;                   ///< [n, dim] MLP-norm output
    MatrixT<T> gate, up, act;        ///< [n, hidden]: w1 h2, w3 h2, silu(gate) * up
  };
  std::vector<Layer> layers;
  std::vector<int> answer_rows;  ///< rows of the top phase scored, sequence by sequence
  MatrixT<T> xa;                 ///< [answers, dim] residual of those rows
  VectorT<T> inva;               ///< [answers]
  MatrixT<T> ha;                 ///< [answers, dim] final-norm output
  MatrixT<T> dlogits;            ///< [answers, vocab] d loss / d logits: (softmax - onehot) / norm
};

/// Cross-entropy of the answer rows' logits [answers, vocab] against `targets`: returns sum(-log p) and sets
/// dlogits = (softmax - onehot) / norm. The log-sum-exp runs in double.
template <class T>
inline double cross_entropy(const MatrixT<T>& logits, std::span<const int> targets, double norm, MatrixT<T>& dlogits) {
  dlogits.resize(logits.rows(), logits.cols());
  double loss = 0;
  for (Index i = 0; i < logits.rows(); ++i) {
    const T m = logits.row(i).maxCoeff();
    const double sum = (logits.row(i).array() - m).exp().template cast<double>().sum();
    const double lse = double(m) + std::log(sum);
    loss += lse - double(logits(i, targets[i]));
    dlogits.row(i) = ((logits.row(i).array().template cast<double>() - lse).exp() / norm).template cast<T>();
    dlogits(i, targets[i]) -= T(1.0 / norm);
  }
  return loss;
}

/// Forward pass of plan `fp` under `schedule` with weights `w`, keeping what backward needs in `tape`. targets:
/// one token per answer row (fp.all_answer_rows() order). Returns sum(-log p(target)) / norm. The logits of the
/// answer rows are left in `logits` when given ([answers, vocab]).
template <class T, class Schedule>
double train_forward(const BasicModelWeights<T>& w, const Schedule& schedule, const plan::ForwardPlan& fp,
                     std::span<const int> targets, double norm, TrainTape<T>& tape, MatrixT<T>* logits = nullptr) {
  const ModelConfig& c = w.config;
  const int hd = c.head_dim(), H = c.n_heads, rp = static_cast<int>(w.registers.prefix.rows());
  const plan::RowSet& in = fp.input();
  tape.answer_rows = fp.all_answer_rows();
  if (targets.size() != tape.answer_rows.size())
    throw ConfigError("train: " + std::to_string(targets.size()) + " targets for " +
                      std::to_string(tape.answer_rows.size()) + " answer rows");
  if (fp.n_layers() != c.n_layers) throw ConfigError("train: the plan's layer count differs from the model's");
  for (int t : targets)
    if (t < 0 || t >= c.vocab_size)
      throw RangeError("train: target token " + std::to_string(t) + " is outside the vocabulary [0, " +
                       std::to_string(c.vocab_size) + ")");
  MatrixT<T> x(in.size(), c.dim);
  for (int i = 0; i < in.size(); ++i) {
    const int src = fp.source[i];
    if (src >= c.vocab_size) throw RangeError("train: token " + std::to_string(src) + " is outside the vocabulary");
    x.row(i) = src >= 0 ? w.tok_embeddings.row(src) : src >= -rp ? w.registers.prefix.row(-src - 1)
                                                                : w.registers.suffix.row(-src - 1 - rp);
  }
  tape.layers.resize(c.n_layers);
  std::optional<BasicRopeTable<T>> rope;
  MatrixT<T> tmp;
  for (int l = 0; l < c.n_layers; ++l) {
    if (fp.gathers_before(l)) x = gather_rows(x, fp.phases[fp.layer_phase[l]].keep);
    if (fp.gathers_before(l) || !rope) rope.emplace(fp.layer_rows(l).pos, hd, c.rope_theta);
    const plan::RowSet& rows = fp.layer_rows(l);
    const BasicLayerWeights<T>& lw = w.layers[l];
    auto& L = tape.layers[l];
    L.x = x;
    rmsnorm(x, lw.attn_norm, c.norm_eps, L.h1, &L.inv1);
    linear(L.h1, lw.wq, L.q);
    linear(L.h1, lw.wk, L.k);
    linear(L.h1, lw.wv, L.v);
    if (c.qkv_bias) {
      L.q.rowwise() += lw.bq.transpose();
      L.k.rowwise() += lw.bk.transpose();
      L.v.rowwise() += lw.bv.transpose();
    }
    apply_rope(L.q, H, hd, *rope, c.rope_style);
    apply_rope(L.k, c.n_kv_heads, hd, *rope, c.rope_style);
    L.att.resize(x.rows(), Index{H} * hd);
    L.probs.assign(static_cast<std::size_t>(rows.segments()) * H, MatrixT<T>());
    schedule.visit(l, [&]<class Ly>(const Ly& layer) {
      using P = typename Ly::policy;
      const attention::LayerMask<P> mask{layer.rule, l};
      for (int s = 0; s < rows.segments(); ++s) {
        const int off = rows.seg_off[s], n = rows.seg_n[s];
        const std::span<const int> pos(rows.pos.data() + off, static_cast<std::size_t>(n));
        MatrixT<T>* keep = L.probs.data() + std::size_t(s) * H;
        const AttnRows ar{pos, {rows.kind.data() + off, static_cast<std::size_t>(n)}};
        attention_prefill<P>(L.q.middleRows(off, n), ar, L.k.middleRows(off, n), L.v.middleRows(off, n), ar, H,
                             c.n_kv_heads, hd, L.att.middleRows(off, n),
                             [keep](int h, const MatrixT<T>& p) { keep[h] = p; }, mask);
      }
    });
    linear(L.att, lw.wo, tmp);
    L.x1 = x + tmp;
    rmsnorm(L.x1, lw.ffn_norm, c.norm_eps, L.h2, &L.inv2);
    linear(L.h2, lw.w1, L.gate);
    linear(L.h2, lw.w3, L.up);
    L.act = L.gate;
    swiglu(L.act, L.up);
    linear(L.act, lw.w2, tmp);
    x = L.x1 + tmp;
  }
  tape.xa = gather_rows(x, tape.answer_rows);
  rmsnorm(tape.xa, w.final_norm, c.norm_eps, tape.ha, &tape.inva);
  MatrixT<T> lg;
  linear(tape.ha, w.classifier(), lg);
  const double loss = cross_entropy(lg, targets, norm, tape.dlogits);
  if (logits) *logits = std::move(lg);
  return loss / norm;
}

/// Backward pass of the forward that filled `tape`: adds every parameter's gradient into `grad` (same shapes as
/// `w`; registers and the embedding rows of the tokens used included).
template <class T, class Schedule>
void train_backward(const BasicModelWeights<T>& w, const Schedule& schedule, const plan::ForwardPlan& fp,
                    const TrainTape<T>& tape, BasicModelWeights<T>& grad) {
  (void)schedule;  // the plan already holds every row decision; the policy's mask is in the saved probabilities
  const ModelConfig& c = w.config;
  const int hd = c.head_dim(), H = c.n_heads, KV = c.n_kv_heads, group = H / KV;
  const int rp = static_cast<int>(w.registers.prefix.rows());
  const T scale = T(1) / std::sqrt(static_cast<T>(hd));

  // Classifier and final norm, then the answer rows' gradients into the top phase's rows.
  MatrixT<T> dha;
  MatrixT<T>& dcls = c.tied_embeddings ? grad.tok_embeddings : grad.lm_head;
  linear_backward(tape.ha, w.classifier(), tape.dlogits, dha, dcls);
  MatrixT<T> dxa;
  rmsnorm_backward(tape.xa, w.final_norm, tape.inva, dha, dxa, grad.final_norm);
  MatrixT<T> dx = MatrixT<T>::Zero(fp.top().size(), c.dim);
  for (std::size_t i = 0; i < tape.answer_rows.size(); ++i) dx.row(tape.answer_rows[i]) += dxa.row(Index(i));

  MatrixT<T> dact, dgate, dup, dh, dx1, datt, dq, dk, dv, tmp;
  for (int l = c.n_layers - 1; l >= 0; --l) {
    const auto& L = tape.layers[l];
    const BasicLayerWeights<T>& lw = w.layers[l];
    BasicLayerWeights<T>& g = grad.layers[l];
    const plan::RowSet& rows = fp.layer_rows(l);
    // x_out = x1 + w2 (silu(w1 h2) * w3 h2), h2 = norm(x1)
    linear_backward(L.act, lw.w2, dx, dact, g.w2);
    swiglu_backward(L.gate, L.up, dact, dgate, dup);
    linear_backward(L.h2, lw.w1, dgate, dh, g.w1);
    linear_backward(L.h2, lw.w3, dup, dh, g.w3, nullptr, /*add_dx=*/true);
    rmsnorm_backward(L.x1, lw.ffn_norm, L.inv2, dh, tmp, g.ffn_norm);
    dx1 = dx + tmp;
    // x1 = x + wo att
    linear_backward(L.att, lw.wo, dx1, datt, g.wo);
    dq.setZero(L.q.rows(), L.q.cols());
    dk.setZero(L.k.rows(), L.k.cols());
    dv.setZero(L.v.rows(), L.v.cols());
    const int tasks = rows.segments() * KV;
    // Each (segment, kv head) writes its own rows and columns of dq, dk, dv: no two tasks touch one element.
#pragma omp parallel for schedule(dynamic) if (tasks > 1 && L.q.size() >= (Index{1} << 14))
    for (int t = 0; t < tasks; ++t) {
      const int s = t / KV, kvh = t % KV, off = rows.seg_off[s], n = rows.seg_n[s];
      const Index qc = Index{kvh} * group * hd, kc = Index{kvh} * hd;
      attention_backward_group<T>(L.probs.data() + std::size_t(s) * H + std::size_t(kvh) * group, group, hd, scale,
                                  L.q.block(off, qc, n, Index{group} * hd), L.k.block(off, kc, n, hd),
                                  L.v.block(off, kc, n, hd), datt.block(off, qc, n, Index{group} * hd),
                                  dq.block(off, qc, n, Index{group} * hd), dk.block(off, kc, n, hd),
                                  dv.block(off, kc, n, hd));
    }
    // RoPE's adjoint is the rotation back by the same angles.
    const BasicRopeTable<T> rope(rows.pos, hd, c.rope_theta);
    apply_rope(dq, H, hd, rope, c.rope_style, /*inverse=*/true);
    apply_rope(dk, KV, hd, rope, c.rope_style, /*inverse=*/true);
    const bool bias = c.qkv_bias;
    linear_backward(L.h1, lw.wq, dq, dh, g.wq, bias ? &g.bq : nullptr);
    linear_backward(L.h1, lw.wk, dk, dh, g.wk, bias ? &g.bk : nullptr, true);
    linear_backward(L.h1, lw.wv, dv, dh, g.wv, bias ? &g.bv : nullptr, true);
    rmsnorm_backward(L.x, lw.attn_norm, L.inv1, dh, tmp, g.attn_norm);
    dx = dx1 + tmp;
    if (fp.gathers_before(l)) {  // rows that left the stream here get no gradient from above
      const plan::Phase& ph = fp.phases[fp.layer_phase[l]];
      MatrixT<T> below = MatrixT<T>::Zero(fp.phases[fp.layer_phase[l] - 1].rows.size(), c.dim);
      for (std::size_t i = 0; i < ph.keep.size(); ++i) below.row(ph.keep[i]) += dx.row(Index(i));
      dx.swap(below);
    }
  }
  // Embeddings: token rows and registers receive their input rows' gradients.
  for (int i = 0; i < fp.input().size(); ++i) {
    const int src = fp.source[i];
    if (src >= 0)
      grad.tok_embeddings.row(src) += dx.row(i);
    else if (src >= -rp)
      grad.registers.prefix.row(-src - 1) += dx.row(i);
    else
      grad.registers.suffix.row(-src - 1 - rp) += dx.row(i);
  }
}

}  // namespace earn::cpu
