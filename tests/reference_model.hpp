// tests/reference_model.hpp - a naive, independent forward pass of the whole sequence with explicit per-layer
// masks: the reference the engines are tested against. Plain loops in double; no Eigen products, no caches.
#pragma once

#include <cmath>
#include <type_traits>
#include <vector>

#include "earn/model/weights.hpp"

namespace earn::test {

/// Row roles of the reference's input sequence.
enum class RefKind { kRegister, kPrompt, kGenerated };

using Mat = std::vector<std::vector<double>>;  // [rows][cols]

/// n token ids drawn uniformly from [0, vocab) by a seeded generator: fresh inputs for every comparison.
inline std::vector<int> random_tokens(int n, int vocab, std::uint64_t seed) {
  Rng rng(seed);
  std::vector<int> t(n);
  for (auto& x : t) x = static_cast<int>(rng.next_u64() % std::uint64_t(vocab));
  return t;
}

inline std::vector<double> ref_matvec(const Matrix& w, const std::vector<double>& x) {
  std::vector<double> y(w.rows(), 0.0);
  for (Index o = 0; o < w.rows(); ++o) {
    double s = 0;
    for (Index i = 0; i < w.cols(); ++i) s += double(w(o, i)) * x[i];
    y[o] = s;
  }
  return y;
}

inline std::vector<double> ref_rmsnorm(const std::vector<double>& x, const Vector& g, double eps) {
  double ss = 0;
  for (double v : x) ss += v * v;
  const double inv = 1.0 / std::sqrt(ss / double(x.size()) + eps);
  std::vector<double> y(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) y[i] = x[i] * inv * g[Index(i)];
  return y;
}

inline void ref_rope(std::vector<double>& v, int heads, int hd, int pos, double theta, RopeStyle style) {
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < hd / 2; ++i) {
      const double freq = 1.0 / std::pow(theta, double(2 * i) / hd);
      const double c = std::cos(pos * freq), s = std::sin(pos * freq);
      const int a = h * hd + (style == RopeStyle::kInterleaved ? 2 * i : i);
      const int b = h * hd + (style == RopeStyle::kInterleaved ? 2 * i + 1 : i + hd / 2);
      const double x0 = v[a], x1 = v[b];
      v[a] = x0 * c - x1 * s;
      v[b] = x0 * s + x1 * c;
    }
}

/// No probability hook: reference_logits keeps nothing.
struct NoRefProbs {
  void operator()(int /*layer*/, int /*row*/, int /*head*/, const std::vector<double>& /*p*/) const {}
};

/// Runs rows `input` (embeddings [n][dim]) at positions 0..n-1 through every layer. `allowed(l, q, k)` is the
/// explicit mask: may row q attend to row k in layer l (or `allowed(l, q, h, k)`, per query head h). Rows are
/// computed in order within a layer, so a mask may decide row q's keys from the probabilities of rows before it. Returns the final hidden rows after the final norm's
/// classifier: logits [n][vocab]. `on_probs(l, q, h, p)` sees row q's attention probabilities p [n] (0 where masked)
/// of head h in layer l.
template <class Mask, class OnProbs = NoRefProbs>
Mat reference_logits(const ModelWeights& w, const Mat& input, Mask allowed, OnProbs on_probs = {}) {
  const ModelConfig& c = w.config;
  const int n = static_cast<int>(input.size()), hd = c.head_dim(), group = c.n_heads / c.n_kv_heads;
  Mat x = input;
  for (int l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[l];
    Mat q(n), k(n), v(n);
    for (int t = 0; t < n; ++t) {
      auto h = ref_rmsnorm(x[t], lw.attn_norm, c.norm_eps);
      q[t] = ref_matvec(lw.wq, h);
      k[t] = ref_matvec(lw.wk, h);
      v[t] = ref_matvec(lw.wv, h);
      if (c.qkv_bias) {
        for (std::size_t i = 0; i < q[t].size(); ++i) q[t][i] += lw.bq[Index(i)];
        for (std::size_t i = 0; i < k[t].size(); ++i) k[t][i] += lw.bk[Index(i)];
        for (std::size_t i = 0; i < v[t].size(); ++i) v[t][i] += lw.bv[Index(i)];
      }
      ref_rope(q[t], c.n_heads, hd, t, c.rope_theta, c.rope_style);
      ref_rope(k[t], c.n_kv_heads, hd, t, c.rope_theta, c.rope_style);
    }
    for (int t = 0; t < n; ++t) {
      std::vector<double> att(std::size_t(c.n_heads) * hd, 0.0);
      for (int h = 0; h < c.n_heads; ++h) {
        const int kvh = h / group;
        std::vector<double> s(n, -INFINITY);
        double m = -INFINITY;
        for (int j = 0; j < n; ++j) {
          if constexpr (std::is_invocable_v<Mask, int, int, int, int>) {  // a per-head mask (l, q, head, k)
            if (!allowed(l, t, h, j)) continue;
          } else if (!allowed(l, t, j)) {
            continue;
          }
          double d = 0;
          for (int i = 0; i < hd; ++i) d += q[t][h * hd + i] * k[j][kvh * hd + i];
          s[j] = d / std::sqrt(double(hd));
          m = std::max(m, s[j]);
        }
        double z = 0;
        for (int j = 0; j < n; ++j) z += s[j] == -INFINITY ? 0.0 : std::exp(s[j] - m);
        std::vector<double> probs(n, 0.0);
        for (int j = 0; j < n; ++j) {
          if (s[j] == -INFINITY) continue;
          const double p = probs[j] = std::exp(s[j] - m) / z;
          for (int i = 0; i < hd; ++i) att[h * hd + i] += p * v[j][kvh * hd + i];
        }
        on_probs(l, t, h, probs);
      }
      auto o = ref_matvec(lw.wo, att);
      for (int i = 0; i < c.dim; ++i) x[t][i] += o[i];
      auto h2 = ref_rmsnorm(x[t], lw.ffn_norm, c.norm_eps);
      auto g = ref_matvec(lw.w1, h2), u = ref_matvec(lw.w3, h2);
      for (std::size_t i = 0; i < g.size(); ++i) g[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
      auto d = ref_matvec(lw.w2, g);
      for (int i = 0; i < c.dim; ++i) x[t][i] += d[i];
    }
  }
  Mat logits(n);
  for (int t = 0; t < n; ++t) logits[t] = ref_matvec(w.classifier(), ref_rmsnorm(x[t], w.final_norm, c.norm_eps));
  return logits;
}

/// Embedding rows of [R_prefix; prompt; R_suffix; generated] and each row's role.
inline Mat reference_input(const ModelWeights& w, const std::vector<int>& prompt, const std::vector<int>& generated,
                           std::vector<RefKind>& kinds) {
  Mat rows;
  kinds.clear();
  auto push = [&](const auto& row, RefKind kind) {
    rows.emplace_back(row.data(), row.data() + row.size());
    kinds.push_back(kind);
  };
  for (Index i = 0; i < w.registers.prefix.rows(); ++i) push(Vector(w.registers.prefix.row(i).transpose()), RefKind::kRegister);
  for (int t : prompt) push(Vector(w.tok_embeddings.row(t).transpose()), RefKind::kPrompt);
  for (Index i = 0; i < w.registers.suffix.rows(); ++i) push(Vector(w.registers.suffix.row(i).transpose()), RefKind::kRegister);
  for (int t : generated) push(Vector(w.tok_embeddings.row(t).transpose()), RefKind::kGenerated);
  return rows;
}

/// EARN's semantics as an explicit mask: causal everywhere; from layer k on, prompt keys are invisible.
/// (Prompt rows still get computed here; their outputs are discarded by the caller.)
inline auto earn_mask(int k, const std::vector<RefKind>& kinds) {
  return [k, &kinds](int l, int q, int key) {
    if (key > q) return false;
    if (l >= k && kinds[key] == RefKind::kPrompt) return false;
    return true;
  };
}

}  // namespace earn::test
