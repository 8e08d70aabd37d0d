// earn/generate/sampler.hpp - choosing the next token from logits: greedy, temperature, nucleus (top-p).
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "earn/core/error.hpp"
#include "earn/core/tensor.hpp"

namespace earn {

/// Index of the largest logit; the first one on ties (as llama2.c's argmax).
template <class V>
inline int argmax(const V& logits) {
  if (logits.size() == 0) throw RangeError("argmax of empty logits");
  int best = 0;
  for (Index i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[best]) best = static_cast<int>(i);
  return best;
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
