// The tensor-core flash attention kernels (flash_attention.cuh: prefill / final output; decode_attention.cuh:
// split-key partials + the generated-key combine) against a naive host attention in double with an explicit mask,
// on random bf16 / fp16 Q, K, V: head sizes 16 / 64 / 128, GQA, segment lengths around the 64-row tiles, key
// positions with gaps (EARN's late layers keep registers at 0 and P + 1), policies whose masks are not causal
// triangles and rows that see no key at all (they must come out 0). Outputs start as NaN, so an element no
// kernel wrote fails; NaN never passes. Bound: per (row, head), ||got - want|| / max(||want||, 1e-3) <= 2e-2.
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cuda/device_io.cuh"
#include "earn/cuda.cuh"

using namespace earn;
using earn::test::download;
using earn::test::upload;

TYPE_TO_STRING(__nv_bfloat16);  // short test names (tools/gpu.sh racecheck: -tc='*bfloat16*')
TYPE_TO_STRING(__half);

namespace {

// Keys at positions that are not multiples-of-5-plus-3 and not in the future: holes inside every tile.
struct Strided {
  static constexpr bool visible(int q, int k) { return k <= q && k % 5 != 3; }
};
// Strictly earlier keys only: the row at the smallest position sees nothing.
struct StrictPast {
  static constexpr bool visible(int q, int k) { return k < q; }
};

template <class P>
bool visible_host(int q, int k) {
  return P::visible(q, k);
}

template <class T>
std::vector<T> to_device_type(const std::vector<float>& v) {
  std::vector<T> r(v.size());
  for (std::size_t i = 0; i < v.size(); ++i) r[i] = cuda::from_float<T>(v[i]);
  return r;
}

struct SegSpec {
  int nq, S;
  std::vector<int> kpos;  // [S]
  std::vector<int> qpos;  // [nq]
};

// A prefill segment: n rows at positions `pos`, each a query and a key.
SegSpec prefill_seg(std::vector<int> pos) { return {int(pos.size()), int(pos.size()), pos, pos}; }

// One attention problem: segments, random Q (rows x nh x hd), prefix K / V per segment, generated K / V per row.
template <class T>
struct Problem {
  int nh, nkv, hd, G, max_new = 4;
  std::vector<SegSpec> spec;
  std::vector<float> q, k, v, gk, gv;  // values already rounded to T
  std::vector<int> seg_k0;             // first key row of each segment in k / v
  int rows = 0;

  Problem(int nh_, int nkv_, int hd_, int G_, std::vector<SegSpec> s, unsigned seed, int max_new_ = 4)
      : nh(nh_), nkv(nkv_), hd(hd_), G(G_), max_new(max_new_), spec(std::move(s)) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> nd(0.0f, 1.0f);
    auto rnd = [&](std::size_t n, float scale) {
      std::vector<float> r(n);
      for (auto& x : r) x = cuda::to_float(cuda::from_float<T>(scale * nd(rng)));
      return r;
    };
    int keys = 0;
    for (const auto& sg : spec) {
      seg_k0.push_back(keys);
      keys += sg.S;
      rows += sg.nq;
    }
    // Scale 1.5 on Q: softmax(q.k / sqrt(hd)) then spans a few units, neither uniform nor one-hot.
    q = rnd(std::size_t(rows) * nh * hd, 1.5f);
    k = rnd(std::size_t(keys) * nkv * hd, 1.0f);
    v = rnd(std::size_t(keys) * nkv * hd, 1.0f);
    gk = rnd(std::size_t(rows) * max_new * nkv * hd, 1.0f);
    gv = rnd(std::size_t(rows) * max_new * nkv * hd, 1.0f);
  }

  // Naive attention of row r (in segment s) and head h, double precision, explicit mask.
  template <class Policy>
  std::vector<double> reference(int s, int r_in_seg, int r, int h) const {
    const SegSpec& sg = spec[s];
    const int kvh = h / (nh / nkv), qp = sg.qpos[r_in_seg];
    const int gen_pos0 = sg.kpos.empty() ? 0 : sg.kpos.back() + 1;
    const double scale = 1.0 / std::sqrt(double(hd));
    std::vector<double> logit, weight;
    std::vector<const float*> vals;
    const float* qv = &q[(std::size_t(r) * nh + h) * hd];
    for (int j = 0; j < sg.S; ++j) {
      if (!visible_host<Policy>(qp, sg.kpos[j])) continue;
      const float* kv = &k[(std::size_t(seg_k0[s] + j) * nkv + kvh) * hd];
      double d = 0;
      for (int i = 0; i < hd; ++i) d += double(qv[i]) * kv[i];
      logit.push_back(d * scale);
      vals.push_back(&v[(std::size_t(seg_k0[s] + j) * nkv + kvh) * hd]);
    }
    for (int g = 0; g < G; ++g) {
      if (!visible_host<Policy>(qp, gen_pos0 + g)) continue;
      const float* kv = &gk[((std::size_t(r) * max_new + g) * nkv + kvh) * hd];
      double d = 0;
      for (int i = 0; i < hd; ++i) d += double(qv[i]) * kv[i];
      logit.push_back(d * scale);
      vals.push_back(&gv[((std::size_t(r) * max_new + g) * nkv + kvh) * hd]);
    }
    std::vector<double> out(hd, 0.0);
    if (logit.empty()) return out;  // sees nothing: 0
    double mx = logit[0], z = 0;
    for (double x : logit) mx = std::max(mx, x);
    for (double x : logit) z += std::exp(x - mx);
    for (std::size_t j = 0; j < logit.size(); ++j) {
      const double p = std::exp(logit[j] - mx) / z;
      for (int i = 0; i < hd; ++i) out[i] += p * vals[j][i];
    }
    return out;
  }

  // Runs the kernels (decode when G > 0 or `partial`) and compares every (row, head). Returns the worst error.
  template <class Policy>
  double run(bool decode, cuda::FlashSplit split = {}, bool auto_split = true) {
    const std::vector<T> got = outputs<Policy>(decode, split, auto_split);
    double worst = 0;
    int r = 0, bad = 0, zero_rows = 0;
    for (std::size_t s = 0; s < spec.size(); ++s)
      for (int i = 0; i < spec[s].nq; ++i, ++r)
        for (int h = 0; h < nh; ++h) {
          const std::vector<double> want = reference<Policy>(int(s), i, r, h);
          double d2 = 0, w2 = 0;
          bool finite = true;
          for (int e = 0; e < hd; ++e) {
            const double g = cuda::to_float(got[(std::size_t(r) * nh + h) * hd + e]);
            finite &= std::isfinite(g);
            d2 += (g - want[e]) * (g - want[e]);
            w2 += want[e] * want[e];
          }
          if (w2 == 0) ++zero_rows;
          const double err = finite ? std::sqrt(d2) / std::max(std::sqrt(w2), 1e-3) : INFINITY;
          if (!(err <= 2e-2) && bad++ < 5) MESSAGE("segment " << s << " row " << i << " head " << h << ": error " << err);
          worst = std::max(worst, err);
        }
    CHECK(bad == 0);
    CHECK(worst <= 2e-2);
    MESSAGE(std::string(decode ? "decode" : "prefill") << " hd " << hd << " nh " << nh << "/" << nkv << ": worst " << worst
                                            << ", rows that see nothing " << zero_rows / nh);
    return worst;
  }

  // The kernels' output [rows, nh * hd] (poisoned with NaN before the launch).
  template <class Policy>
  std::vector<T> outputs(bool decode, cuda::FlashSplit split = {}, bool auto_split = true) {
    const int qd = nh * hd, kvd = nkv * hd;
    auto dq = upload(to_device_type<T>(q)), dk = upload(to_device_type<T>(k)), dv = upload(to_device_type<T>(v));
    auto dgk = upload(to_device_type<T>(gk)), dgv = upload(to_device_type<T>(gv));
    std::vector<int> pos, kpos, row_seg, row_src;
    int max_nq = 0, max_s = 0;
    for (std::size_t s = 0; s < spec.size(); ++s) {
      for (int i = 0; i < spec[s].nq; ++i) {
        pos.push_back(spec[s].qpos[i]);
        row_seg.push_back(int(s));
        row_src.push_back(int(row_src.size()));
      }
      kpos.insert(kpos.end(), spec[s].kpos.begin(), spec[s].kpos.end());
      max_nq = std::max(max_nq, spec[s].nq);
      max_s = std::max(max_s, spec[s].S);
    }
    auto dpos = upload(pos), dkpos = upload(kpos), dseg = upload(row_seg), dsrc = upload(row_src);
    std::vector<cuda::Segment> segs(spec.size());
    int q_off = 0;
    for (std::size_t s = 0; s < spec.size(); ++s) {
      segs[s].q_off = q_off;
      segs[s].nq = spec[s].nq;
      segs[s].S = spec[s].S;
      segs[s].G = decode ? G : 0;
      segs[s].gen_pos0 = spec[s].kpos.empty() ? 0 : spec[s].kpos.back() + 1;
      segs[s].kpos = dkpos.data() + seg_k0[s];
      segs[s].pk = dk.data() + std::size_t(seg_k0[s]) * kvd;
      segs[s].pv = dv.data() + std::size_t(seg_k0[s]) * kvd;
      q_off += spec[s].nq;
    }
    auto dsegs = upload(segs);
    cuda::DeviceBuffer<T> out;
    out.reserve(std::size_t(rows) * qd);
    out.fill_bytes(0xFF, nullptr);  // NaN in bf16 and fp16
    cuda::Stream stream;
    if (decode) {
      if (auto_split) split = cuda::decode_split(max_s, nh, int(spec.size()), cuda::sm_count());
      cuda::DeviceBuffer<float> ws;
      ws.reserve(cuda::decode_workspace(rows, nh, hd, split.chunks));
      ws.fill_bytes(0xFF, stream.get());
      cuda::decode_attention<Policy, T>(stream.get(), dq.data(), dgk.data(), dgv.data(), dsrc.data(), dseg.data(),
                                        dsegs.data(), int(spec.size()), max_nq, dpos.data(), rows, nh, nkv, hd, G,
                                        max_new, split, ws.data(), out.data());
      EARN_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    } else {
      cuda::FlashArgs<T> fa;
      fa.q = dq.data();
      fa.segs = dsegs.data();
      fa.nseg = int(spec.size());
      fa.pos = dpos.data();
      fa.out = out.data();
      fa.nh = nh;
      fa.nkv = nkv;
      fa.hd = hd;
      fa.max_nq = max_nq;
      cuda::flash_attention<Policy, false>(stream.get(), fa);
      EARN_CUDA_CHECK(cudaStreamSynchronize(stream.get()));
    }
    return download(out, std::size_t(rows) * qd);
  }
};

std::vector<int> iota_pos(int n, int step = 1, int start = 0) {
  std::vector<int> p(n);
  for (int i = 0; i < n; ++i) p[i] = start + i * step;
  return p;
}

bool have_gpu() { return cuda::device_count() > 0; }

}  // namespace

TEST_CASE_TEMPLATE("flash prefill attention equals a naive masked attention", T, __nv_bfloat16, __half) {
  REQUIRE(have_gpu());
  SUBCASE("causal, head 128, segments of 1 / 63 / 64 / 65 / 130 rows, EARN late-layer registers at 0 and P + 1") {
    std::vector<SegSpec> s = {prefill_seg(iota_pos(1)), prefill_seg(iota_pos(63)), prefill_seg(iota_pos(64)),
                              prefill_seg(iota_pos(65)), prefill_seg(iota_pos(130)), prefill_seg({0, 301})};
    Problem<T>(4, 4, 128, 0, s, 1).template run<attention::DenseCausal>(false);
  }
  SUBCASE("GQA 8/2 heads of 64, strided mask, positions with gaps") {
    std::vector<SegSpec> s = {prefill_seg(iota_pos(200, 2)), prefill_seg(iota_pos(7, 3, 5))};
    Problem<T>(8, 2, 64, 0, s, 2).template run<Strided>(false);
  }
  SUBCASE("head 16, 2/1 heads, strictly-past mask: row 0 sees nothing and gets 0") {
    std::vector<SegSpec> s = {prefill_seg(iota_pos(70)), prefill_seg(iota_pos(1))};
    Problem<T>(2, 1, 16, 0, s, 3).template run<StrictPast>(false);
  }
  SUBCASE("causal over shuffled positions with gaps: tiles classified by their smallest / largest positions") {
    // DenseCausal declares attention::is_causal, so the kernel decides a tile's visibility from the block's
    // smallest and largest query positions and each key's; rows and keys out of order must not fool it.
    std::vector<int> pos = iota_pos(150, 3, 1);
    std::mt19937 rng(17);
    std::shuffle(pos.begin(), pos.end(), rng);
    std::vector<SegSpec> s = {prefill_seg(pos), prefill_seg({40, 2, 7})};
    Problem<T>(2, 2, 64, 0, s, 5).template run<attention::DenseCausal>(false);
  }
  SUBCASE("head 32, register-only policy over register rows") {
    std::vector<SegSpec> s = {prefill_seg({0, 1, 98, 99}), prefill_seg({0, 40})};
    Problem<T>(4, 4, 32, 0, s, 4).template run<attention::RegisterOnly>(false);
  }
}

TEST_CASE_TEMPLATE("flash-decoding (split-key partials + generated keys) equals a naive masked attention", T,
                   __nv_bfloat16, __half) {
  REQUIRE(have_gpu());
  auto beams = [](int S, int nq, int G) {  // nq beams of a user after a prompt of S rows, G - 1 tokens generated
    SegSpec sg{nq, S, iota_pos(S), std::vector<int>(nq, S + G - 1)};
    return sg;
  };
  SUBCASE("head 128, 20 beams over 514 / 2 / 130 keys, 3 generated keys, split sized for the device") {
    Problem<T>(4, 4, 128, 3, {beams(514, 20, 3), beams(2, 20, 3), beams(130, 20, 3)}, 5)
        .template run<attention::DenseCausal>(true);
  }
  SUBCASE("the same with one 64-key chunk per block (many partials) and with one chunk for all keys") {
    Problem<T> p(4, 4, 128, 3, {beams(514, 20, 3), beams(2, 20, 3), beams(130, 20, 3)}, 6);
    p.template run<attention::DenseCausal>(true, {9, 64}, false);
    p.template run<attention::DenseCausal>(true, {1, 576}, false);
  }
  SUBCASE("GQA 8/2 heads of 64, strided mask, 70 beams (two query tiles), 1 generated key") {
    Problem<T>(8, 2, 64, 1, {beams(300, 70, 1), beams(65, 3, 1)}, 7).template run<Strided>(true);
  }
  SUBCASE("head 16, register-only prefix of 2 keys at 0 and P + 1, 4 generated keys: direct and through a flash pass") {
    SegSpec sg{5, 2, {0, 200}, std::vector<int>(5, 204)};
    Problem<T> p(2, 2, 16, 4, {sg}, 8);
    p.template run<attention::RegisterOnly>(true);  // decode_split: no flash pass (2 keys)
    p.template run<attention::RegisterOnly>(true, {1, 64}, false);
  }
  SUBCASE("direct (no flash pass): head 128 GQA 8/2, prefixes of 16, 1 and 7 keys, strided mask, 3 generated keys") {
    Problem<T> p(8, 2, 128, 3, {beams(16, 20, 3), beams(1, 4, 3), beams(7, 9, 3)}, 9);
    p.template run<Strided>(true);
    p.template run<attention::DenseCausal>(true, {0, 0}, false);
    p.template run<attention::DenseCausal>(true, {1, 64}, false);  // the flash pass on the same problem
    Problem<T>(4, 4, 64, 2, {beams(0, 3, 2), beams(3, 2, 2)}, 10).template run<attention::DenseCausal>(true);  // no prefix
  }
  SUBCASE("direct, 4-key form (what decode_split gives for <= 4 keys): prefixes of 0-4 keys; a longer one gets NaN") {
    CHECK(cuda::decode_split(2, 32, 1, 132).chunks == 0);
    CHECK(cuda::decode_split(2, 32, 1, 132).chunk_keys == 4);
    CHECK(cuda::decode_split(5, 32, 1, 132).chunk_keys == cuda::kernel::kDecDirectKeys);
    CHECK(cuda::decode_split(17, 32, 1, 132).chunks > 0);
    Problem<T>(8, 2, 128, 3, {beams(4, 20, 3), beams(1, 4, 3), beams(0, 2, 3)}, 11).template run<Strided>(true);
    Problem<T> p(4, 4, 128, 2, {beams(2, 3, 2), beams(5, 4, 2)}, 12);
    const std::vector<T> got = p.template outputs<attention::DenseCausal>(true, {0, 4}, false);
    const std::size_t first = std::size_t(3) * 4 * 128;  // the second segment's rows
    int nan_first = 0, nan_second = 0;
    for (std::size_t i = 0; i < got.size(); ++i)
      (i < first ? nan_first : nan_second) += std::isnan(cuda::to_float(got[i])) ? 1 : 0;
    CHECK(nan_first == 0);
    CHECK(nan_second == int(got.size() - first));
  }
  SUBCASE("up to 8 new tokens (the combine pass's 8-key form): 7 generated keys, chunked, direct 4 and 16 keys") {
    Problem<T> p(4, 2, 128, 7, {beams(130, 6, 7), beams(3, 5, 7)}, 13, 8);
    p.template run<attention::DenseCausal>(true);  // flash pass + combine
    Problem<T> d(4, 2, 64, 7, {beams(3, 6, 7), beams(12, 5, 7)}, 14, 8);
    d.template run<Strided>(true);                 // direct, 16-key form
    d.template run<Strided>(true, {0, 4}, false);  // > 4 new tokens: a 4-key split still takes the 16-key form
  }
}

TEST_CASE("flash attention refuses shapes it does not take") {
  REQUIRE(have_gpu());
  cuda::FlashArgs<__nv_bfloat16> fa;
  fa.nseg = 1;
  fa.max_nq = 1;
  fa.nh = 4;
  fa.nkv = 4;
  fa.hd = 48;
  CHECK_THROWS_AS((cuda::flash_attention<attention::DenseCausal, false>(nullptr, fa)), ConfigError);
  fa.hd = 64;
  fa.nkv = 3;
  CHECK_THROWS_AS((cuda::flash_attention<attention::DenseCausal, false>(nullptr, fa)), ConfigError);
  fa.nkv = 4;
  fa.chunk_keys = 100;
  CHECK_THROWS_AS((cuda::flash_attention<attention::DenseCausal, true>(nullptr, fa)), ConfigError);
  CHECK_FALSE(cuda::flash_supported<float>(64));
  CHECK(cuda::flash_supported<__half>(128));
  // Decode: more generated keys than the cache holds (the combine pass keeps max_new of them in registers), or
  // more new tokens than it takes, throw before any launch.
  using T = __nv_bfloat16;
  auto decode = [](int G, int max_new) {
    cuda::decode_attention<attention::DenseCausal, T>(nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr,
                                                      1, 1, nullptr, 1, 4, 4, 64, G, max_new, {0, 4}, nullptr, nullptr);
  };
  CHECK_THROWS_AS(decode(5, 4), ConfigError);
  CHECK_THROWS_AS(decode(-1, 4), ConfigError);
  CHECK_THROWS_AS(decode(3, 9), ConfigError);
}
