// tests/cuda/compare.cuh - what the CUDA engine tests compare with: weights rounded to the GPU's storage type, and
// logits against the CPU engine's (doctest).
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "earn/cuda.cuh"

namespace earn::test {

/// 4 query heads over 2 KV heads of size 16, 4 layers: the presses' and the observer's GPU tests.
inline ModelConfig gqa_config() {
  ModelConfig c;
  c.dim = 64;
  c.hidden_dim = 96;
  c.n_layers = 4;
  c.n_heads = 4;
  c.n_kv_heads = 2;
  c.vocab_size = 101;
  c.max_seq_len = 128;
  c.rope_theta = 5000.0f;
  c.tied_embeddings = false;
  return c;
}

// Round every parameter to the GPU's storage type, so both engines compute with the same weights.
template <class D>
void round_to(ModelWeights& w) {
  using T = earn::cuda::storage_t<D>;
  auto r = [](auto& m) {
    for (Index i = 0; i < m.size(); ++i) m.data()[i] = earn::cuda::to_float(earn::cuda::from_float<T>(m.data()[i]));
  };
  r(w.tok_embeddings);
  r(w.lm_head);
  r(w.registers.prefix);
  r(w.registers.suffix);
  for (auto& l : w.layers) {
    r(l.wq), r(l.wk), r(l.wv), r(l.wo), r(l.w1), r(l.w2), r(l.w3);
  }
}

// fp32: |got - want| <= 1e-4 max(1, |want|) for every element. bf16 / fp16: per logits row,
// ||got - want|| / ||want|| <= 2e-2 (storage rounding of every activation is ~2^-9 / 2^-12 per element, so the
// norm-wise error is the meaningful one). NaN fails either way. Returns the worst error seen.
template <class D>
double check_close(const Matrix& got, const Matrix& want, const char* what) {
  REQUIRE(got.rows() == want.rows());
  REQUIRE(got.cols() == want.cols());
  constexpr bool exact = std::is_same_v<D, dtype::F32>;
  const double tol = exact ? 1e-4 : 2e-2;
  double worst = 0;
  bool finite = true;
  for (Index r = 0; r < got.rows(); ++r) {
    double diff2 = 0, ref2 = 0;
    for (Index i = 0; i < got.cols(); ++i) {
      const double g = got(r, i), w = want(r, i);
      if (!std::isfinite(g)) finite = false;
      if (exact) worst = std::max(worst, std::abs(g - w) / std::max(1.0, std::abs(w)));
      diff2 += (g - w) * (g - w);
      ref2 += w * w;
    }
    if (!exact) worst = std::max(worst, std::sqrt(diff2 / std::max(ref2, 1e-30)));
  }
  INFO(what << ": worst relative error " << worst);
  CHECK(finite);
  CHECK(worst <= tol);
  return worst;
}

}  // namespace earn::test
