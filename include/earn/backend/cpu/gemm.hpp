// earn/backend/cpu/gemm.hpp - the CPU's fp32 product y = x w^T with x [M, K] and w [N, K] both row-major, the
// layout of every linear layer (checkpoints store w [out, in]), without copying the weights.
//
// Why not Eigen's GEMM: it packs w (the larger operand) on every call, a full read and write of the weights that
// costs as much as the arithmetic at the row counts of the recommendation loop (20-160 decode rows, 40-800 prefill
// rows; gemm_pack_lhs was 20 % of `evaluate`'s time), and it does not thread below ~20 rows. Here only x, the
// small operand, is ever copied:
//  - M > kDotRows: x is packed once per call and thread (8 x 8 blocks transposed in registers) into panels of 16
//    rows stored k-major (two 8-lane vectors per k; a last panel of at most 8 rows is 8 wide). A 16 x 6 tile keeps
//    12 accumulators along M: per k it loads two panel vectors and broadcasts one weight of each of 6 rows of w
//    straight from the weights, 12 FMAs (the BLIS / OpenBLAS Haswell shape). With AVX-512 a pair of 16-row panels
//    meets 8 rows of w instead (32 x 8: 16 accumulators of 16 lanes, each weight broadcast from memory inside its
//    FMAs): on a machine whose FMA units are 2 x 256 bits (AMD Zen 4) the arithmetic rate is the same, but half the
//    instructions per FMA lift a warm tile from 91-93 % of the FMA peak to 99 %, and the products of the rec model's
//    shapes with cold weights 10-20 % (2-core AMD EPYC Zen 4). Blocks: kColBlock outputs of w stay in
//    L2 while every panel passes over them, kDepth values of K per pass keep a panel in L1 (longer rows add their
//    passes into y). 96 x 512 ran 5-7 % faster than 192 x 256 and 10-20 % faster than 128-deep passes at the rec
//    model's shapes (2-core AMD EPYC).
//  - M <= kDotRows (one decode row of `generate`): nothing to amortise a copy over, and w comes from memory, so
//    each row of w is one sequential stream of dot products against the few rows of x (4 accumulators of 8 lanes
//    along K per row of x): 1.3-1.6x the bandwidth of three interleaved row streams or Eigen's GEMV on a
//    32000 x 288 classifier (2-core AMD EPYC).
// Determinism: a row's result depends on K and the kernel its row count selects, never on its neighbours, the
// tile it fell in or the thread count; every M above kDotRows gives the same bits for the same row (batched and
// one-by-one prefills of longer prompts agree exactly). Available with AVX2 + FMA (kAvailable); other builds use
// Eigen (earn/backend/cpu/ops.hpp decides). The naive reference is tests/test_ops.cpp.
#pragma once

#include <algorithm>
#include <array>
#include <utility>
#include <vector>

#include <Eigen/Core>

#include "earn/core/tensor.hpp"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define EARN_CPU_GEMM_AVX2 1
#if defined(__AVX512F__)
#define EARN_CPU_GEMM_AVX512 1
#endif
#endif

namespace earn::cpu::gemm {

#ifdef EARN_CPU_GEMM_AVX2
inline constexpr bool kAvailable = true;
#else
inline constexpr bool kAvailable = false;
#endif

inline constexpr Index kDotRows = 3;     ///< up to this many rows of x: dot products along K, no packing
inline constexpr Index kPanelRows = 16;  ///< rows of x per packed panel (two vectors of 8)
#ifdef EARN_CPU_GEMM_AVX512
inline constexpr int kTileCols = 8;      ///< outputs per tile of the packed kernel (16-lane tiles: 32 x 8)
#else
inline constexpr int kTileCols = 6;      ///< outputs per tile of the packed kernel (8-lane tiles: 16 x 6)
#endif
inline constexpr Index kColBlock = 96;   ///< outputs whose weights every panel passes over (L2)
inline constexpr Index kDepth = 512;     ///< values of K per pass (a panel of 16 rows: 32 KB, L1)

/// Operands of one product: x [M, K] with row stride ldx, w [N, K] with row stride ldw, y [M, N] with row stride ldy.
struct Operands {
  const float* x;
  Index ldx;
  const float* w;
  Index ldw;
  float* y;
  Index ldy;
  Index m, k;
};

#ifdef EARN_CPU_GEMM_AVX2
namespace detail {

// r[i][j] <- r[j][i]: an 8 x 8 block transposed in registers (unpack, shuffle, then swap 128-bit halves).
inline void transpose8x8(__m256 r[8]) {
  __m256 t[8];
#pragma GCC unroll 4
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
#pragma GCC unroll 2
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x20);
    t[i + 4] = _mm256_permute2f128_ps(r[i], r[i + 4], 0x31);
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = t[i];
}

// dst[j * ldd + i] = src[i * lds + j] for i, j < 8 (packing x into panels).
inline void transpose8(const float* src, Index lds, float* dst, Index ldd) {
  __m256 r[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(src + i * lds);
  transpose8x8(r);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) _mm256_storeu_ps(dst + i * ldd, r[i]);
}

}  // namespace detail
#endif

/// x packed in panels for the products of one thread (reused across calls: the buffer only grows).
class Panels {
 public:
  /// Packs x [m, k] (row stride ldx) when m > kDotRows; otherwise leaves the panels empty (the dot rows read x).
  void pack(const float* x, Index ldx, Index m, Index k) {
    rows_ = m;
    if (m <= kDotRows) return;
    buf_.resize(static_cast<std::size_t>(((m + kPanelRows - 1) / kPanelRows) * kPanelRows * k));
    for (Index r = 0; r < m; r += kPanelRows) {
      const Index width = width_at(r);
      pack_one(x + r * ldx, ldx, std::min(width, m - r), width, k, buf_.data() + r * k);
    }
  }
  bool packed() const { return rows_ > kDotRows; }
  /// Panel width at row r: 16, or 8 for a last panel of at most 8 rows.
  Index width_at(Index r) const { return rows_ - r > kPanelRows / 2 ? kPanelRows : kPanelRows / 2; }
  const float* panel(Index r, Index k) const { return buf_.data() + r * k; }

 private:
  // One panel: rows [0, rm) of x (the rest zeros) stored k-major, `width` values per k. Groups of 8 whole rows are
  // moved as 8 x 8 blocks transposed in registers; a group with missing rows and the last k % 8 values one by one.
  static void pack_one(const float* x, Index ldx, Index rm, Index width, Index k, float* p) {
    for (Index g = 0; g < width; g += 8) {
      Index kk = 0;
#ifdef EARN_CPU_GEMM_AVX2
      if (g + 8 <= rm)
        for (; kk + 8 <= k; kk += 8) detail::transpose8(x + g * ldx + kk, ldx, p + kk * width + g, width);
#endif
      for (Index c = kk; c < k; ++c)
        for (Index i = g; i < g + 8; ++i) p[c * width + i] = i < rm ? x[i * ldx + c] : 0.0f;
    }
  }
  std::vector<float, Eigen::aligned_allocator<float>> buf_;
  Index rows_ = 0;
};

/// The calling thread's panels (one buffer per thread, kept for its lifetime).
inline Panels& thread_panels() {
  thread_local Panels panels;
  return panels;
}

#ifdef EARN_CPU_GEMM_AVX2
namespace detail {

// y[0, N) (=, or += when Accumulate) the first N <= 4 lanes of v.
template <int N, bool Accumulate>
inline void store_lanes4(float* y, __m128 v) {
  if constexpr (N == 4) {
    if constexpr (Accumulate) v = _mm_add_ps(_mm_loadu_ps(y), v);
    _mm_storeu_ps(y, v);
  } else if constexpr (N >= 2) {
    if constexpr (Accumulate) v = _mm_add_ps(_mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(y))), v);
    _mm_storel_pi(reinterpret_cast<__m64*>(y), v);
    if constexpr (N == 3) store_lanes4<1, Accumulate>(y + 2, _mm_movehl_ps(v, v));
  } else if constexpr (N == 1) {
    if constexpr (Accumulate) v = _mm_add_ss(_mm_load_ss(y), v);
    _mm_store_ss(y, v);
  }
}
// y[0, N) (=, or +=) the first N <= 8 lanes of v.
template <int N, bool Accumulate>
inline void store_lanes(float* y, __m256 v) {
  store_lanes4<std::min(N, 4), Accumulate>(y, _mm256_castps256_ps128(v));
  if constexpr (N > 4) store_lanes4<N - 4, Accumulate>(y + 4, _mm256_extractf128_ps(v, 1));
}

// r[j] holds output j of 8 rows (j < NR): transposed, the first `rows` rows' NR outputs stored at y, y + ldy, ...
template <int NR, bool Accumulate>
inline void store_block8(__m256 r[8], float* y, Index ldy, int rows) {
  transpose8x8(r);
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i)
    if (i < rows) store_lanes<NR, Accumulate>(y + i * ldy, r[i]);
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// The tiles keep their accumulators in one flat array with every loop unrolled, so that GCC holds them in
// registers (a 2-D array of vectors was stored back to the stack on every k).

// Dot rows: y[i, n] (=, or += when Accumulate) sum_k x[i, k] w[n, k] for i < RM and every n in [0, N): one row of
// w at a time (one sequential stream, which the prefetcher serves best when w comes from memory), U = 4
// accumulators per row of x along K for the FMA latency.
template <int RM, bool Accumulate>
inline void dot_rows(const float* x, Index ldx, const float* w, Index ldw, float* y, Index ldy, Index N, Index K) {
  constexpr int U = 4;
  for (Index n = 0; n < N; ++n) {
    const float* wr = w + n * ldw;
    __m256 acc[RM * U];
#pragma GCC unroll 16
    for (int t = 0; t < RM * U; ++t) acc[t] = _mm256_setzero_ps();
    Index k = 0;
    for (; k + 8 * U <= K; k += 8 * U) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u) {
        const __m256 b = _mm256_loadu_ps(wr + k + 8 * u);
#pragma GCC unroll 4
        for (int i = 0; i < RM; ++i) acc[i * U + u] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + k + 8 * u), b, acc[i * U + u]);
      }
    }
    for (; k + 8 <= K; k += 8) {
      const __m256 b = _mm256_loadu_ps(wr + k);
#pragma GCC unroll 4
      for (int i = 0; i < RM; ++i) acc[i * U] = _mm256_fmadd_ps(_mm256_loadu_ps(x + i * ldx + k), b, acc[i * U]);
    }
#pragma GCC unroll 4
    for (int i = 0; i < RM; ++i) {
      float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[i * U], acc[i * U + 1]), _mm256_add_ps(acc[i * U + 2], acc[i * U + 3])));
      for (Index t = k; t < K; ++t) s += x[i * ldx + t] * wr[t];
      float& out = y[i * ldy + n];
      out = Accumulate ? out + s : s;
    }
  }
}

// Panel tiles: V vectors of 8 rows (panel p, k-major, 8V wide) times NR rows of w, the first rm rows stored.
template <int V, int NR, bool Accumulate>
inline void panel_tile(const float* p, const float* w, Index ldw, float* y, Index ldy, int rm, Index K) {
  __m256 acc[V * NR];
#pragma GCC unroll 16
  for (int t = 0; t < V * NR; ++t) acc[t] = _mm256_setzero_ps();
  for (Index k = 0; k < K; ++k) {
    __m256 a[V];
#pragma GCC unroll 2
    for (int v = 0; v < V; ++v) a[v] = _mm256_loadu_ps(p + k * 8 * V + 8 * v);  // aligned unless Eigen's alignment is lowered
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m256 b = _mm256_broadcast_ss(w + j * ldw + k);
#pragma GCC unroll 2
      for (int v = 0; v < V; ++v) acc[j * V + v] = _mm256_fmadd_ps(a[v], b, acc[j * V + v]);
    }
  }
  // Each vector of 8 rows: its NR column accumulators transposed into row vectors, NR lanes stored per row.
#pragma GCC unroll 2
  for (int v = 0; v < V; ++v) {
    __m256 r[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) r[j] = j < NR ? acc[j * V + v] : _mm256_setzero_ps();
    store_block8<NR, Accumulate>(r, y + 8 * v * ldy, ldy, rm - 8 * v);
  }
}

#ifdef EARN_CPU_GEMM_AVX512
// 16-lane tiles (AVX-512): P panels of 16 rows (P = 2: a pair, the second at p + ps), one 16-lane vector per panel
// and k, times NR rows of w, each weight broadcast from memory into its FMAs (2P + 1 instructions per k and row of w
// against the 8-lane tile's 3 + 3: on a 2 x 256-bit FMA machine the same arithmetic rate with half the
// instructions, 99 % of the FMA peak in L1 against 91-93 % for the 16 x 6 tile, 2-core AMD EPYC). Every output is
// the same chain of FMAs over k as in panel_tile, so the bits are the same. Epilogue: each 16-lane accumulator is two
// 8-lane halves, transposed 8 x 8 with the other outputs' halves and stored as row pieces.
// Lanes [8h, 8h + 8) of v (the masked form: GCC 12's unmasked extracts, casts included, trip -Wuninitialized).
inline __m256 half8(__m512 v, int h) {
  const __m512d d = _mm512_castps_pd(v);
  return _mm256_castpd_ps(h ? _mm512_maskz_extractf64x4_pd(0xF, d, 1) : _mm512_maskz_extractf64x4_pd(0xF, d, 0));
}

template <int P, int NR, bool Accumulate>
inline void panel_tile16(const float* p, Index ps, const float* w, Index ldw, float* y, Index ldy, int rm, Index K) {
  __m512 acc[P * NR];
#pragma GCC unroll 16
  for (int t = 0; t < P * NR; ++t) acc[t] = _mm512_setzero_ps();
  for (Index k = 0; k < K; ++k) {
    __m512 a[P];
#pragma GCC unroll 2
    for (int v = 0; v < P; ++v) a[v] = _mm512_loadu_ps(p + v * ps + k * 16);
#pragma GCC unroll 8
    for (int j = 0; j < NR; ++j) {
      const __m512 b = _mm512_set1_ps(w[j * ldw + k]);
#pragma GCC unroll 2
      for (int v = 0; v < P; ++v) acc[j * P + v] = _mm512_fmadd_ps(a[v], b, acc[j * P + v]);
    }
  }
#pragma GCC unroll 4
  for (int h = 0; h < 2 * P; ++h) {  // rows 8h .. 8h + 7 of the tile: half h % 2 of panel h / 2's accumulators
    __m256 r[8];
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j)
      r[j] = j < NR ? half8(acc[j * P + h / 2], h % 2) : _mm256_setzero_ps();
    store_block8<NR, Accumulate>(r, y + 8 * h * ldy, ldy, rm - 8 * h);
  }
}

template <bool Accumulate>
using Panel16Fn = void (*)(const float*, Index, const float*, Index, float*, Index, int, Index);

template <bool A, int P, int... NR>
constexpr std::array<Panel16Fn<A>, sizeof...(NR)> panel16_row(std::integer_sequence<int, NR...>) {
  return {panel_tile16<P, NR + 1, A>...};
}
// The 16-lane tile for P panels of 16 rows and nr <= kTileCols outputs.
template <bool A>
inline Panel16Fn<A> panel16_for(int panels, Index nr) {
  using Cols = std::make_integer_sequence<int, kTileCols>;
  static constexpr std::array<std::array<Panel16Fn<A>, kTileCols>, 2> table = {panel16_row<A, 1>(Cols{}),
                                                                               panel16_row<A, 2>(Cols{})};
  return table[panels - 1][nr - 1];
}
#endif

template <bool Accumulate>
using PanelFn = void (*)(const float*, const float*, Index, float*, Index, int, Index);

template <bool A, int V, int... NR>
constexpr std::array<PanelFn<A>, sizeof...(NR)> panel_row(std::integer_sequence<int, NR...>) {
  return {panel_tile<V, NR + 1, A>...};
}

// Dot rows for rm <= kDotRows rows of x.
template <bool A>
inline void dot_rows_for(Index rm, const float* x, Index ldx, const float* w, Index ldw, float* y, Index ldy, Index N,
                         Index K) {
  static_assert(kDotRows == 3, "one case per row count");
  if (rm == 1) dot_rows<1, A>(x, ldx, w, ldw, y, ldy, N, K);
  else if (rm == 2) dot_rows<2, A>(x, ldx, w, ldw, y, ldy, N, K);
  else dot_rows<3, A>(x, ldx, w, ldw, y, ldy, N, K);
}
// The panel tile for a panel of `width` rows and nr <= kTileCols outputs.
template <bool A>
inline PanelFn<A> panel_for(Index width, Index nr) {
  using Cols = std::make_integer_sequence<int, kTileCols>;
#ifdef EARN_CPU_GEMM_AVX512  // 16-row panels take the 16-lane tiles: only an 8-row last panel comes here
  static constexpr std::array<PanelFn<A>, kTileCols> row = panel_row<A, 1>(Cols{});
  return width == 8 ? row[nr - 1] : nullptr;
#else
  static constexpr std::array<std::array<PanelFn<A>, kTileCols>, 2> table = {panel_row<A, 1>(Cols{}),
                                                                             panel_row<A, 2>(Cols{})};
  return table[width / 8 - 1][nr - 1];
#endif
}

}  // namespace detail
#endif

/// Outputs [n0, n1) of y = x w^T (all M rows): one thread's share of a product. `panels` holds x packed by
/// Panels::pack (or nothing, for M <= kDotRows). Callers check kAvailable.
inline void product_columns([[maybe_unused]] const Operands& p, [[maybe_unused]] const Panels& panels,
                            [[maybe_unused]] Index n0, [[maybe_unused]] Index n1) {
#ifdef EARN_CPU_GEMM_AVX2
  if (!panels.packed()) {  // x's few rows (at most 3 x 16 KB of K = 4096) stay in L1 while w streams by
    detail::dot_rows_for<false>(p.m, p.x, p.ldx, p.w + n0 * p.ldw, p.ldw, p.y + n0, p.ldy, n1 - n0, p.k);
    return;
  }
  for (Index nb = n0; nb < n1; nb += kColBlock) {
    const Index ne = std::min(nb + kColBlock, n1);
    for (Index kb = 0; kb < p.k; kb += kDepth) {
      const Index kl = std::min(kDepth, p.k - kb);
      for (Index r = 0; r < p.m; r += kPanelRows) {
        const Index width = panels.width_at(r);
        const float* pp = panels.panel(r, p.k) + kb * width;
#ifdef EARN_CPU_GEMM_AVX512
        if (width == kPanelRows) {  // a pair of 16-row panels when the next is 16 wide too, else one
          const int np = r + kPanelRows < p.m && panels.width_at(r + kPanelRows) == kPanelRows ? 2 : 1;
          const int rm = static_cast<int>(std::min(np * kPanelRows, p.m - r));
          for (Index n = nb; n < ne; n += kTileCols) {
            const Index nr = std::min<Index>(kTileCols, ne - n);
            const float* wp = p.w + n * p.ldw + kb;
            float* yp = p.y + r * p.ldy + n;
            if (kb == 0)
              detail::panel16_for<false>(np, nr)(pp, kPanelRows * p.k, wp, p.ldw, yp, p.ldy, rm, kl);
            else
              detail::panel16_for<true>(np, nr)(pp, kPanelRows * p.k, wp, p.ldw, yp, p.ldy, rm, kl);
          }
          r += (np - 1) * kPanelRows;
          continue;
        }
#endif
        const int rm = static_cast<int>(std::min(width, p.m - r));
        for (Index n = nb; n < ne; n += kTileCols) {
          const Index nr = std::min<Index>(kTileCols, ne - n);
          const float* wp = p.w + n * p.ldw + kb;
          float* yp = p.y + r * p.ldy + n;
          if (kb == 0)
            detail::panel_for<false>(width, nr)(pp, wp, p.ldw, yp, p.ldy, rm, kl);
          else
            detail::panel_for<true>(width, nr)(pp, wp, p.ldw, yp, p.ldy, rm, kl);
        }
      }
    }
  }
#endif
}

}  // namespace earn::cpu::gemm
