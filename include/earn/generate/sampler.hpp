// earn/generate/sampler.hpp - choosing the next token from logits: greedy, temperature, nucleus (top-p).
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"

namespace earn {

/// Index of the largest logit; the first one on ties (as llama2.c's argmax). NaNs never win, except that a NaN first
/// logit is returned, as a plain loop comparing against it returns it.
/// 16 lanes each keep their own maximum and its first index, then the lanes meet, ties to the lowest index: the same
/// answer as the plain loop, without its chain through the best value's load (~8 cycles a logit: 73 us of a 32000-
/// token vocabulary, 4 % of a 15M model's decode step).
template <class V>
inline int argmax(const V& logits) {
  const Index n = logits.size();
  if (n == 0) throw RangeError("argmax of empty logits");
  if (std::isnan(static_cast<float>(logits[0]))) return 0;
  constexpr int L = 16;
  float bv[L];
  Index bi[L];
  for (int j = 0; j < L; ++j) bv[j] = -std::numeric_limits<float>::infinity(), bi[j] = -1;
  const auto visit = [&](Index i, int j) {
    const float x = static_cast<float>(logits[i + j]);
    const bool gt = x > bv[j];
    bv[j] = gt ? x : bv[j];
    bi[j] = gt ? i + j : bi[j];
  };
  Index i = 0;
  for (; i + L <= n; i += L)
    for (int j = 0; j < L; ++j) visit(i, j);
  for (int j = 0; i + j < n; ++j) visit(i, j);
  int best = -1;
  for (int j = 0; j < L; ++j)
    if (bi[j] >= 0 && (best < 0 || bv[j] > bv[best] || (bv[j] == bv[best] && bi[j] < bi[best]))) best = j;
  return best < 0 ? 0 : static_cast<int>(bi[best]);  // no lane moved: every logit is -inf or NaN, the first wins
}

/// Seeded sampler: temperature 0 is greedy; otherwise softmax(logits / temperature), restricted to the smallest
/// set of most probable tokens whose mass reaches top_p (1 = no restriction).
class Sampler {
 public:
  Sampler(float temperature, float top_p, std::uint64_t seed) : temperature_(temperature), top_p_(top_p), rng_(seed) {
    if (!(temperature >= 0.0f)) throw ConfigError("sampler: temperature must be >= 0");
    if (!(top_p > 0.0f && top_p <= 1.0f)) throw ConfigError("sampler: top_p must be in (0, 1]");
  }

  template <class V>
  int operator()(const V& logits) {
    if (temperature_ == 0.0f) return argmax(logits);
    const Index n = logits.size();
    std::vector<float> p(n);
    const float m = logits.maxCoeff();
    double sum = 0;
    for (Index i = 0; i < n; ++i) sum += p[i] = std::exp((logits[i] - m) / temperature_);
    for (auto& x : p) x = static_cast<float>(x / sum);
    const float coin = rng_.uniform();
    if (top_p_ >= 1.0f) {  // plain sampling: walk the CDF
      float cdf = 0;
      for (Index i = 0; i < n; ++i)
        if (coin < (cdf += p[i])) return static_cast<int>(i);
      return static_cast<int>(n - 1);  // rounding left the CDF a hair under 1
    }
    std::vector<int> order(n);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    float mass = 0;
    std::size_t last = 0;
    for (; last < order.size(); ++last)
      if ((mass += p[order[last]]) >= top_p_) break;
    last = std::min(last, order.size() - 1);
    const float r = coin * mass;
    float cdf = 0;
    for (std::size_t j = 0; j <= last; ++j)
      if (r < (cdf += p[order[j]])) return order[j];
    return order[last];
  }

 private:
  float temperature_, top_p_;
  Rng rng_;
};

}  // namespace earn
