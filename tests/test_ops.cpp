// The CPU's linear layers (cpu::linear, cpu::linear_multi and the tiled fp32 kernel of earn/backend/cpu/gemm.hpp
// behind them) against naive double-precision loops, over shapes that hit every edge of the tiles and blocks.
#include <doctest/doctest.h>

#include <array>
#include <cmath>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "earn/backend/cpu/ops.hpp"
#include "support.hpp"

using namespace earn;

namespace {

MatrixT<float> random_matrix(Index rows, Index cols, std::uint64_t seed) {
  Rng rng(seed);
  MatrixT<float> m(rows, cols);
  for (Index i = 0; i < m.size(); ++i) m.data()[i] = rng.symmetric(1);
  return m;
}

// y[i, j] = sum_k x[i, k] w[j, k] in double, and the bound fp32 rounding can reach: K ulps of sum_k |x w|.
template <class X>
void check_against_naive(const X& x, const MatrixT<float>& w, const MatrixT<float>& y) {
  REQUIRE(y.rows() == x.rows());
  REQUIRE(y.cols() == w.rows());
  for (Index i = 0; i < x.rows(); ++i)
    for (Index j = 0; j < w.rows(); ++j) {
      double ref = 0, mag = 0;
      for (Index k = 0; k < x.cols(); ++k) {
        ref += double(x(i, k)) * double(w(j, k));
        mag += std::abs(double(x(i, k)) * double(w(j, k)));
      }
      const double bound = 1e-7 * double(x.cols()) * mag + 1e-30;
      if (std::abs(double(y(i, j)) - ref) > bound) {
        CAPTURE(i);
        CAPTURE(j);
        CHECK(double(y(i, j)) == doctest::Approx(ref).epsilon(0));
        return;
      }
    }
}

void set_threads([[maybe_unused]] int n) {
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
}

}  // namespace

TEST_CASE("cpu::linear = the naive product at every tile, block and thread edge") {
  // M: the dot rows (1-3), then packed panels: one 8-wide panel (4-8), 16-wide ones with an 8-wide last (9, 17, 21,
  // 24, 33, 67; with AVX-512 pairs of 16-wide panels, a single one after pairs in 53); K: under one vector, not a
  // multiple of 8, one and several depth passes (512) with a tail; N: below, at and past the column tile (6, or 8
  // with AVX-512) and the column block (96), uneven thread shares.
  const std::vector<Index> ms = {1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 21, 24, 33, 53, 67};
  const std::vector<Index> ks = {1, 5, 8, 13, 64, 512, 515, 1100};
  const std::vector<Index> ns = {1, 2, 3, 4, 23, 24, 25, 50, 97};
  for (int threads : {1, 2}) {
    set_threads(threads);
    for (Index m : ms)
      for (Index k : ks)
        for (Index n : ns) {
          if (m * k * n > 4'000'000) continue;
          CAPTURE(threads);
          CAPTURE(m);
          CAPTURE(k);
          CAPTURE(n);
          const auto x = random_matrix(m, k, 11 + m), w = random_matrix(n, k, 97 + n);
          MatrixT<float> y;
          cpu::linear(x, w, y);
          check_against_naive(x, w, y);
        }
  }
  set_threads(2);
}

TEST_CASE("cpu::linear_multi: products of different sizes in one pass, input rows with a stride") {
  for (int threads : {1, 2}) {
    set_threads(threads);
    CAPTURE(threads);
    const MatrixT<float> wide = random_matrix(37, 300, 5);
    const auto x = wide.block(3, 7, 33, 260);  // row stride 300, not 260: the kernel reads x in place
    const auto wq = random_matrix(200, 260, 6), wk = random_matrix(49, 260, 7), wv = random_matrix(1, 260, 8);
    MatrixT<float> q, k, v;
    cpu::linear_multi<decltype(x), float, 3>(x, {&wq, &wk, &wv}, {&q, &k, &v});
    check_against_naive(x, wq, q);
    check_against_naive(x, wk, k);
    check_against_naive(x, wv, v);
  }
  set_threads(2);
}

TEST_CASE("cpu::linear: a row's result does not depend on the rows beside it or on the thread count") {
  if (!cpu::gemm::kAvailable) {
    MESSAGE("skipped: this build has no AVX2 + FMA, so linear runs Eigen's GEMM (no such guarantee)");
    return;
  }
  const auto x = random_matrix(45, 1030, 21), w = random_matrix(130, 1030, 22);
  set_threads(2);
  MatrixT<float> all, part, serial;
  cpu::linear(x, w, all);
  set_threads(1);
  cpu::linear(x, w, serial);
  set_threads(2);
  CHECK(all == serial);
  // Any batch above the dot rows' count (packed panels of 16 or 8, at any offset) gives the same bits per row.
  for (Index n : {cpu::gemm::kDotRows + 1, Index{9}, Index{17}, Index{30}})
    for (Index i = 0; i + n <= x.rows(); i += 7) {
      const MatrixT<float> rows = x.middleRows(i, n);
      cpu::linear(rows, w, part);
      CAPTURE(n);
      CAPTURE(i);
      CHECK(part == all.middleRows(i, n));
    }
  // Batches of up to kDotRows rows (the dot rows) agree with each other.
  MatrixT<float> one;
  for (Index n = 2; n <= cpu::gemm::kDotRows; ++n) {
    const MatrixT<float> rows = x.topRows(n);
    cpu::linear(rows, w, part);
    for (Index i = 0; i < n; ++i) {
      const MatrixT<float> row = x.row(i);
      cpu::linear(row, w, one);
      CAPTURE(n);
      CAPTURE(i);
      CHECK(one.row(0) == part.row(i));
    }
  }
}
