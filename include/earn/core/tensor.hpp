// earn/core/tensor.hpp - the dense CPU containers earn uses (Eigen, row-major like every checkpoint format).
#pragma once

#include <Eigen/Core>
#include <cstdint>

namespace earn {

/// Row-major matrix of scalar T: [rows, cols], rows are tokens or output features.
template <class T>
using MatrixT = Eigen::Matrix<T, Eigen::Dynamic, Eigen::Dynamic, Eigen::RowMajor>;
/// Column vector of scalar T.
template <class T>
using VectorT = Eigen::Matrix<T, Eigen::Dynamic, 1>;
/// Row-major float matrix: [rows, cols], rows are tokens or output features.
using Matrix = MatrixT<float>;
/// Float column vector.
using Vector = VectorT<float>;
/// Signed index type for sizes and offsets.
using Index = std::int64_t;

/// Deterministic, platform-independent generator (splitmix64) for random models and sampling.
class Rng {
 public:
  explicit Rng(std::uint64_t seed) : state_(seed) {}
  std::uint64_t next_u64() {
    std::uint64_t z = (state_ += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
  }
  /// Uniform in [0, 1) with 24 random bits, exactly representable as float.
  float uniform() { return static_cast<float>(next_u64() >> 40) * (1.0f / 16777216.0f); }
  /// Uniform in [-a, a).
  float symmetric(float a) { return (2.0f * uniform() - 1.0f) * a; }

 private:
  std::uint64_t state_;
};

}  // namespace earn
