// earn/backend/cpu/backward.hpp - the CPU backend's backward arithmetic: the adjoint of every op in ops.hpp that a
// training step runs (RMSNorm, linear, SwiGLU, attention over one segment; RoPE's adjoint is apply_rope(inverse)).
//
// Conventions: d<name> is d loss / d <name>; functions that produce a parameter gradient ADD into it (gradients
// accumulate over micro-batches); input gradients are written (=) unless the name says add. Scalar T as in ops.hpp.
#pragma once

#include <cmath>
#include <type_traits>

#include "earn/core/tensor.hpp"

namespace earn::cpu {

/// RMSNorm y = x * r * g, r = rsqrt(mean(x^2) + eps) per row (inv = r as the forward saved it):
///   dx = r (dy . g) - x r^3 / d * sum(dy . g . x),   dg += sum over rows of dy . x r.
template <class T>
inline void rmsnorm_backward(const MatrixT<T>& x, const VectorT<T>& g, const VectorT<T>& inv, const MatrixT<T>& dy,
                             MatrixT<T>& dx, VectorT<T>& dg) {
  const Index n = x.rows(), d = x.cols();
  dx.resize(n, d);
  VectorT<T> dg_acc = VectorT<T>::Zero(d);
  for (Index i = 0; i < n; ++i) {
    const T r = inv[i];
    const auto dyg = dy.row(i).cwiseProduct(g.transpose());
    const T dot = dyg.dot(x.row(i));
    dx.row(i) = r * dyg - (r * r * r * dot / static_cast<T>(d)) * x.row(i);
    dg_acc += (dy.row(i).cwiseProduct(x.row(i)) * r).transpose();
  }
  dg += dg_acc;
}

/// Linear y = x w^T (+ b): dx = dy w (written, or added when add_dx), dw += dy^T x, db += column sums of dy.
template <class T>
inline void linear_backward(const MatrixT<T>& x, const MatrixT<T>& w, const MatrixT<T>& dy, MatrixT<T>& dx,
                            MatrixT<T>& dw, std::type_identity_t<VectorT<T>>* db = nullptr, bool add_dx = false) {
  if (add_dx)
    dx.noalias() += dy * w;
  else
    dx.noalias() = dy * w;
  dw.noalias() += dy.transpose() * x;
  if (db) *db += dy.colwise().sum().transpose();
}

/// SwiGLU a = silu(gate) * up: d gate = da . up . sig (1 + gate (1 - sig)), d up = da . silu(gate), sig = sigmoid(gate).
template <class T>
inline void swiglu_backward(const MatrixT<T>& gate, const MatrixT<T>& up, const MatrixT<T>& da, MatrixT<T>& dgate,
                            MatrixT<T>& dup) {
  const auto sig = (T(1) / (T(1) + (-gate.array()).exp())).eval();
  dup = (da.array() * gate.array() * sig).matrix();
  dgate = (da.array() * up.array() * sig * (T(1) + gate.array() * (T(1) - sig))).matrix();
}

/// One (segment, kv head) of attention's backward pass. For each query head h of the kv head's group, with P_h the
/// saved probabilities [n, n] (0 where masked), Q_h, K, V [n, hd] and dO_h [n, hd]:
///   dP = dO_h V^T,  dV += P_h^T dO_h,  dS = P_h . (dP - rowsum(dP . P_h)) * scale,  dQ_h = dS K,  dK += dS^T Q_h.
/// q / dq hold the group's heads side by side [n, group * hd]; k, v, dk, dv are the kv head's columns [n, hd].
template <class T>
inline void attention_backward_group(const MatrixT<T>* probs, int group, int hd, T scale, const auto& q,
                                     const auto& k, const auto& v, const auto& dout, auto&& dq, auto&& dk,
                                     auto&& dv) {
  for (int g = 0; g < group; ++g) {
    const MatrixT<T>& p = probs[g];
    const auto qh = q.middleCols(Index{g} * hd, hd);
    const auto doh = dout.middleCols(Index{g} * hd, hd);
    MatrixT<T> dp = doh * v.transpose();
    dv.noalias() += p.transpose() * doh;
    const VectorT<T> row_dot = (dp.array() * p.array()).rowwise().sum();
    MatrixT<T> ds = (p.array() * (dp.array().colwise() - row_dot.array())).matrix() * scale;
    dq.middleCols(Index{g} * hd, hd).noalias() = ds * k;
    dk.noalias() += ds.transpose() * qh;
  }
}

}  // namespace earn::cpu
