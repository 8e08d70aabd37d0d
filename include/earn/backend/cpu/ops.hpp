// earn/backend/cpu/ops.hpp - the CPU backend's arithmetic: linear layers, RMSNorm, RoPE, SwiGLU, attention.
//
// Templated on the scalar: fp32 for inference and training, fp64 for the trainer's gradient checks (the same code).
// Threading is OpenMP where the build has it (earn::earn links OpenMP::OpenMP_CXX when found); without it every
// loop runs serially and the results are the same.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "earn/attention/policy.hpp"
#include "earn/backend/cpu/gemm.hpp"
#include "earn/core/config.hpp"
#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"

namespace earn::cpu {

/// ys[m] [T, out_m] = x [T, in] * ws[m]^T for every m, with each w [out, in] as checkpoints store it: products that
/// share their input (q, k, v; the gate and up projections) in one pass.
/// fp32 with AVX2 + FMA (gemm::kAvailable) and x in row-major memory: earn's tiled kernel (earn/backend/cpu/gemm.hpp)
/// at every row count. Otherwise many rows (prefill): one Eigen GEMM per product (Eigen threads it); few rows
/// (decode): Eigen's GEMV over each thread's share (Eigen does not thread its GEMV).
/// Shares: the output features of all the products, taken as one list, are split into one contiguous range per
/// thread inside a single parallel region: each thread streams its own rows of the weights once, the threads get
/// equal shares however the products' sizes fall, and one fork / join serves every product of the list.
template <class X, class T, std::size_t N>
inline void linear_multi(const X& x, const std::array<const MatrixT<T>*, N>& ws, const std::array<MatrixT<T>*, N>& ys) {
  Index total_rows = 0, total_size = 0;
  for (std::size_t m = 0; m < N; ++m) {
    ys[m]->resize(x.rows(), ws[m]->rows());
    total_rows += ws[m]->rows();
    total_size += ws[m]->size();
  }
  constexpr bool kTiled = gemm::kAvailable && std::is_same_v<T, float> &&
                          std::is_same_v<typename X::Scalar, float> && bool(X::IsRowMajor) &&
                          bool(X::Flags & Eigen::DirectAccessBit);
  if (!kTiled && x.rows() > 16) {
    for (std::size_t m = 0; m < N; ++m) ys[m]->noalias() = x * ws[m]->transpose();
    return;
  }
  // Rows [r0, r1) of the concatenated outputs: the pieces of each product that fall in the range.
  const auto run = [&](Index r0, Index r1) {
    if (r0 >= r1) return;
    [[maybe_unused]] gemm::Panels* panels = nullptr;
    if constexpr (kTiled) {  // x packed once per thread for all its products (into the thread's own cache: a shared
                             // buffer, each thread packing half, ran no faster)
      panels = &gemm::thread_panels();
      panels->pack(x.data(), x.outerStride(), x.rows(), x.cols());
    }
    Index base = 0;
    for (std::size_t m = 0; m < N; ++m) {
      const Index n = ws[m]->rows(), a = std::max(r0 - base, Index{0}), b = std::min(r1 - base, n);
      if (a < b) {
        if constexpr (kTiled)
          gemm::product_columns({.x = x.data(), .ldx = x.outerStride(), .w = ws[m]->data(), .ldw = ws[m]->cols(),
                                 .y = ys[m]->data(), .ldy = ys[m]->cols(), .m = x.rows(), .k = x.cols()},
                                *panels, a, b);
        else
          ys[m]->middleCols(a, b - a).noalias() = x * ws[m]->middleRows(a, b - a).transpose();
      }
      base += n;
    }
  };
  // Threads pay from ~128 K multiply-adds on: below that one fork / join costs more than the products.
  [[maybe_unused]] const bool big = total_size * x.rows() >= (Index{1} << 15);
#ifdef _OPENMP
  if (big && omp_get_max_threads() > 1 && !omp_in_parallel()) {
    // Ranges rounded to whole tiles of the packed kernel (whole vector lanes of Eigen's dot products): at 512
    // outputs, units of 4 tiles gave one thread 13 % more work than the other.
    constexpr Index g = kTiled ? gemm::kTileCols : 8;
#pragma omp parallel
    {
      const Index nt = omp_get_num_threads(), t = omp_get_thread_num();
      const auto edge = [&](Index i) { return i >= nt ? total_rows : std::min(total_rows, (total_rows * i / nt) / g * g); };
      run(edge(t), edge(t + 1));
    }
    return;
  }
#endif
  run(0, total_rows);
}

/// y [T, out] = x [T, in] * w^T, with w [out, in] as checkpoints store it (linear_multi of one product).
template <class X, class T>
inline void linear(const X& x, const MatrixT<T>& w, MatrixT<T>& y) {
  linear_multi<X, T, 1>(x, {&w}, {&y});
}

/// Rows `idx` of x, in order: the residual stream after a policy drops rows.
template <class T>
inline MatrixT<T> gather_rows(const MatrixT<T>& x, std::span<const int> idx) {
  MatrixT<T> out(static_cast<Index>(idx.size()), x.cols());
  for (std::size_t i = 0; i < idx.size(); ++i) out.row(Index(i)) = x.row(idx[i]);
  return out;
}

/// out = x * rsqrt(mean(x^2) + eps) * g, row by row (the order of llama2.c and Hugging Face: scale, then gain).
/// inv (when given) receives each row's rsqrt(mean(x^2) + eps) [rows], which the backward pass needs.
template <class X, class T>
inline void rmsnorm(const X& x, const VectorT<T>& g, float eps, MatrixT<T>& out, VectorT<T>* inv = nullptr) {
  out.resize(x.rows(), x.cols());
  if (inv) inv->resize(x.rows());
  for (Index i = 0; i < x.rows(); ++i) {
    const T ms = x.row(i).squaredNorm() / static_cast<T>(x.cols());
    const T r = T(1) / std::sqrt(ms + T(eps));
    out.row(i) = (x.row(i) * r).cwiseProduct(g.transpose());
    if (inv) (*inv)[i] = r;
  }
}

/// cos/sin of every (position, frequency) pair one forward pass needs: [T, head_dim/2] each, in scalar S.
template <class S>
struct BasicRopeTable {
  MatrixT<S> cos, sin;
  BasicRopeTable(std::span<const int> positions, int head_dim, float theta)
      : cos(positions.size(), head_dim / 2), sin(positions.size(), head_dim / 2) {
    for (int i = 0; i < head_dim / 2; ++i) {
      // In S throughout, as both references compute it in float: inv_freq = 1 / theta^(2i/d), angle = pos * inv_freq.
      const S inv_freq = S(1) / std::pow(S(theta), static_cast<S>(2 * i) / static_cast<S>(head_dim));
      for (std::size_t t = 0; t < positions.size(); ++t) {
        const S angle = static_cast<S>(positions[t]) * inv_freq;
        cos(Index(t), i) = std::cos(angle);
        sin(Index(t), i) = std::sin(angle);
      }
    }
  }
};
using RopeTable = BasicRopeTable<float>;

/// Rotate every head of x [T, heads*head_dim] in place by the table's angles; inverse = true rotates back by the
/// same angles (the transpose of the rotation: RoPE's backward pass).
template <class S>
inline void apply_rope(MatrixT<S>& x, int heads, int head_dim, const BasicRopeTable<S>& table, RopeStyle style,
                       bool inverse = false) {
  const int half = head_dim / 2;
  const S sign = inverse ? S(-1) : S(1);
  // One loop per style, so that each vectorises; rows in parallel when there are many (a decode step's 160 beams).
  [[maybe_unused]] const bool big = x.size() >= (Index{1} << 16);
#pragma omp parallel for schedule(static) if (big)
  for (Index t = 0; t < x.rows(); ++t) {
    S* row = x.row(t).data();
    const S* cs = table.cos.row(t).data();
    const S* sn = table.sin.row(t).data();
    for (int h = 0; h < heads; ++h) {
      S* v = row + Index{h} * head_dim;
      if (style == RopeStyle::kRotateHalf) {  // Hugging Face's rotate_half: dimension i pairs with i + d/2
        for (int i = 0; i < half; ++i) {
          const S c = cs[i], s = sign * sn[i], a = v[i], b = v[i + half];
          v[i] = a * c - b * s;
          v[i + half] = a * s + b * c;
        }
      } else {  // llama2.c / Meta: interleaved pairs (2i, 2i + 1)
        for (int i = 0; i < half; ++i) {
          const S c = cs[i], s = sign * sn[i], a = v[2 * i], b = v[2 * i + 1];
          v[2 * i] = a * c - b * s;
          v[2 * i + 1] = a * s + b * c;
        }
      }
    }
  }
}

/// a <- silu(a) * b, elementwise (SwiGLU's gate). Row by row (a row's values do not depend on its neighbours),
/// rows in parallel when there are many.
template <class T>
inline void swiglu(MatrixT<T>& a, const MatrixT<T>& b) {
  [[maybe_unused]] const bool big = a.size() >= (Index{1} << 16);
#pragma omp parallel for schedule(static) if (big)
  for (Index i = 0; i < a.rows(); ++i)
    a.row(i) = a.row(i).array() / (T(1) + (-a.row(i).array()).exp()) * b.row(i).array();
}

/// Softmax of s in place over its visible entries; masked entries hold -inf and become 0.
/// A row with every key masked yields all zeros (its attention output is 0) instead of NaN.
template <class S>
inline void masked_softmax(S&& s) {
  using T = typename std::decay_t<S>::Scalar;
  const T m = s.maxCoeff();
  if (m == -std::numeric_limits<T>::infinity()) {
    s.setZero();
    return;
  }
  s = (s.array() - m).exp();
  s /= s.sum();
}

/// No observer: attention_prefill keeps no probabilities.
struct NoProbs {
  template <class M>
  void operator()(int /*head*/, const M& /*probs*/) const {}
};

/// Rows of one user as attention sees them: positions and kinds (kinds matter to policies with a kind rule).
struct AttnRows {
  std::span<const int> pos;
  std::span<const RowKind> kind;
};

/// Prefill attention for one user: queries q [T, n_heads*hd] of rows `qr` over keys/values k, v [S, kv_dim] of rows
/// `kr`, visibility from the layer's mask (attention::LayerMask: the policy's value and the layer; positions, and
/// kinds when the policy has a kind rule). Writes out [T, n_heads*hd] (a matrix or a block of one, already that
/// size). Heads run in parallel; each is two GEMMs over its [T, S] scores. `observe(h, probs)` sees every head's
/// probabilities [T, S] after the softmax (the one observation point of scores: the trainer keeps them for its
/// backward pass), called from the head's thread. The mask is built once for all heads unless the policy's answer
/// can depend on the head (a where rule), then once per head.
template <class Policy, class QM, class KM, class OM, class Observe = NoProbs>
inline void attention_prefill(const QM& q, AttnRows qr, const KM& k, const KM& v, AttnRows kr, int n_heads,
                              int n_kv_heads, int hd, OM&& out, Observe&& observe = {},
                              const attention::LayerMask<Policy>& mask = {}) {
  using S = typename std::decay_t<QM>::Scalar;
  using BoolMatrix = Eigen::Matrix<bool, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
  const Index T = q.rows(), S_ = k.rows();
  const int group = n_heads / n_kv_heads;
  const S scale = S(1) / std::sqrt(static_cast<S>(hd));
  constexpr bool kinds = attention::has_kind_rule<Policy>();
  if constexpr (kinds) {
    if (Index(qr.kind.size()) != T || Index(kr.kind.size()) != S_)
      throw ConfigError("attention: policy " + std::string(Policy::name) + " has a kind rule; pass the rows' kinds");
  }
  auto fill = [&](int h, BoolMatrix& visible) {
    visible.resize(T, S_);
    for (Index i = 0; i < T; ++i)
      for (Index j = 0; j < S_; ++j) {
        if constexpr (kinds)
          visible(i, j) = mask(h, qr.pos[i], kr.pos[j], qr.kind[i], kr.kind[j]);
        else
          visible(i, j) = mask(h, qr.pos[i], kr.pos[j]);
      }
  };
  constexpr bool per_head = attention::LayerMask<Policy>::per_head;
  BoolMatrix shared;
  if constexpr (!per_head) fill(0, shared);
  [[maybe_unused]] const bool big = T * S_ * Index{n_heads} * hd >= (Index{1} << 18);
#pragma omp parallel for schedule(dynamic) if (big)
  for (int h = 0; h < n_heads; ++h) {
    const int kvh = h / group;
    BoolMatrix own;
    if constexpr (per_head) fill(h, own);
    const BoolMatrix& visible = per_head ? own : shared;
    MatrixT<S> s = q.middleCols(Index{h} * hd, hd) * k.middleCols(Index{kvh} * hd, hd).transpose();
    for (Index i = 0; i < T; ++i) {
      auto row = s.row(i);
      for (Index j = 0; j < S_; ++j) row[j] = visible(i, j) ? row[j] * scale : -std::numeric_limits<S>::infinity();
      masked_softmax(row);
    }
    out.middleCols(Index{h} * hd, hd).noalias() = s * v.middleCols(Index{kvh} * hd, hd);
    observe(h, s);
  }
}

/// The same over positions alone, for a policy without a kind rule.
template <class Policy, class QM, class KM, class OM, class Observe = NoProbs>
inline void attention_prefill(const QM& q, std::span<const int> q_pos, const KM& k, const KM& v,
                              std::span<const int> k_pos, int n_heads, int n_kv_heads, int hd, OM&& out,
                              Observe&& observe = {}, const attention::LayerMask<Policy>& mask = {}) {
  static_assert(!attention::has_kind_rule<Policy>(), "earn: this policy has a kind rule; pass cpu::AttnRows with kinds");
  attention_prefill<Policy>(q, AttnRows{q_pos, {}}, k, v, AttnRows{k_pos, {}}, n_heads, n_kv_heads, hd,
                            std::forward<OM>(out), std::forward<Observe>(observe), mask);
}

/// Decode attention for one query row q [n_heads*hd] at q_pos over two key segments (a user's shared prefix
/// and this row's own generated keys), as if they were concatenated, masked by the layer's `mask`. out [n_heads*hd].
/// prefix_probs, when given, receives the probabilities of the prefix keys, [n_heads, ka.rows()].
/// Called outside any parallel region with a long context, the heads are split over the threads; every head's
/// arithmetic is the same either way.
template <class Policy, class KA, class KB>
inline void attention_decode(const Vector& q, int q_pos, const KA& ka, const KA& va, std::span<const int> ka_pos,
                             const KB& kb, const KB& vb, int kb_pos0, int n_heads, int n_kv_heads, int hd,
                             Vector& out, const attention::LayerMask<Policy>& mask = {},
                             float* prefix_probs = nullptr) {
  const Index A = ka.rows(), B = kb.rows();
  const int group = n_heads / n_kv_heads;
  const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  out.resize(Index{n_heads} * hd);
  const auto head = [&](int h, Vector& s) {
    const int kvh = h / group;
    const auto qh = q.segment(Index{h} * hd, hd);
    s.head(A).noalias() = ka.middleCols(Index{kvh} * hd, hd) * qh;
    s.tail(B).noalias() = kb.middleCols(Index{kvh} * hd, hd) * qh;
    for (Index j = 0; j < A; ++j) s[j] = mask(h, q_pos, ka_pos[j]) ? s[j] * scale : kNegInf;
    for (Index j = 0; j < B; ++j) s[A + j] = mask(h, q_pos, kb_pos0 + int(j)) ? s[A + j] * scale : kNegInf;
    masked_softmax(s);
    if (prefix_probs) std::copy(s.data(), s.data() + A, prefix_probs + Index{h} * A);
    out.segment(Index{h} * hd, hd).noalias() = va.middleCols(Index{kvh} * hd, hd).transpose() * s.head(A);
    out.segment(Index{h} * hd, hd).noalias() += vb.middleCols(Index{kvh} * hd, hd).transpose() * s.tail(B);
  };
#ifdef _OPENMP
  // From ~32 K multiply-adds per K and per V pass (a 15M model's 6 heads of 48 from ~114 keys on): with warm caches
  // the split was 1.45x faster at 125 keys and 10 % slower at 64 (a throwaway harness, 2 threads).
  // omp_get_level, not omp_in_parallel: inside the engine's row loop when its `if` is false (an inactive region), a
  // team here would be a nested one, made afresh on every call (7x slower decode when tried).
  if ((A + B) * Index{n_heads} * hd >= (Index{1} << 15) && n_heads > 1 && omp_get_max_threads() > 1 &&
      omp_get_level() == 0) {
#pragma omp parallel
    {
      Vector s(A + B);
#pragma omp for schedule(static)
      for (int h = 0; h < n_heads; ++h) head(h, s);
    }
    return;
  }
#endif
  Vector s(A + B);
  for (int h = 0; h < n_heads; ++h) head(h, s);
}

}  // namespace earn::cpu
