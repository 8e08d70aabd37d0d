// tests/engine_checks.hpp - what the engine tests against the naive reference share (doctest): a small GQA model
// shape and the logits comparison.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "earn/core/config.hpp"
#include "earn/core/tensor.hpp"

namespace earn::test {

/// 6 query heads over 2 KV heads, 4 layers: small enough for the double-precision reference.
inline ModelConfig small_config(RopeStyle style = RopeStyle::kRotateHalf, bool bias = false) {
  ModelConfig c;
  c.dim = 48;
  c.hidden_dim = 70;
  c.n_layers = 4;
  c.n_heads = 6;
  c.n_kv_heads = 2;
  c.vocab_size = 97;
  c.max_seq_len = 128;
  c.rope_theta = 5000.0f;
  c.rope_style = style;
  c.qkv_bias = bias;
  c.tied_embeddings = false;
  return c;
}

/// Relative error of a logit row: max |got - want| over max(1, max |want|) (the logits' own scale) <= tol; NaN fails.
inline void check_close(const Vector& got, const std::vector<double>& want, double tol, const char* what) {
  REQUIRE(got.size() == Index(want.size()));
  double err = 0, scale = 1;
  for (Index i = 0; i < got.size(); ++i) {
    REQUIRE(std::isfinite(got[i]));
    err = std::max(err, std::abs(double(got[i]) - want[i]));
    scale = std::max(scale, std::abs(want[i]));
  }
  const double worst = err / scale;
  INFO(what << ": worst relative error " << worst);
  CHECK(worst <= tol);
}

}  // namespace earn::test
