// bench/cuda/bench_cuda_attention.cu - Google Benchmark microbenchmarks of the CUDA backend's attention call
// (earn::cuda::attention: batched cuBLAS Q K^T / P V over each user's prefix, generated-key kernels, the
// policy-masked softmax) against the tensor-core flash kernels ("_flash": flash_attention.cuh for prefill,
// flash-decoding of decode_attention.cuh for decode) at Llama-7B head shapes (32 heads of 128, bf16), timed with
// CUDA events (manual time):
//   prefill      B users x (P + 2) rows, causal over their own rows (DenseCausal)
//   decode_dense B users x 20 beams, each beam over its user's P + 2 cached rows + G generated keys
//   decode_reg   the same beams in a late EARN layer: prefix = the 2 registers (RegisterOnly), + G generated
// Counters: FLOP and bytes of the useful work (causal pairs only; prompt KV read once per user), as rates.
// Without a CUDA device it prints "skipped: no CUDA device" and exits 0.
//
//   bench_cuda_attention [--benchmark_filter=decode] [any Google Benchmark flag]
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <vector>

#include "earn/cuda.cuh"

using namespace earn;

namespace {

using T = __nv_bfloat16;
constexpr int kHeads = 32, kHeadDim = 128, kBeam = 20, kMaxNew = 4, kRegisters = 2;

template <class X>
void fill(cuda::DeviceBuffer<X>& b, unsigned long long seed) {
  cuda::kernel::fill_uniform<X><<<1024, 256>>>(b.data(), static_cast<long long>(b.size()), seed, 0.0f, 1.0f);
  EARN_CUDA_CHECK_LAUNCH();
}

// One attention call's operands on the device: `users` users with S cached prefix rows each, nq query rows per
// user (nq = S in prefill), G generated keys per row (decode).
struct Problem {
  int users, S, nq, G, rows;
  cuda::FlashSplit split;
  std::size_t scores = 0;
  cuda::DeviceBuffer<T> q, pk, pv, gk, gv, probs, out;
  cuda::DeviceBuffer<float> score_buf;
  cuda::DeviceBuffer<int> ints, kpos;
  cuda::DeviceBuffer<cuda::Segment> segs;
  cuda::DeviceBuffer<void*> ptrs;
  std::vector<cuda::AttentionGroup> groups;
  cuda::AttentionArgs<T> args;

  // depth > 0: the flash-decoding split aims at that many blocks per multiprocessor (the engine's default: 4).
  Problem(int users_, int S_, int nq_, int G_, int depth = 4)
      : users(users_), S(S_), nq(nq_), G(G_), rows(users_ * nq_) {
    const int qd = kHeads * kHeadDim, kvd = qd;
    q.reserve(std::size_t(rows) * qd);
    out.reserve(std::size_t(rows) * qd);
    pk.reserve(std::size_t(users) * S * kvd);
    pv.reserve(std::size_t(users) * S * kvd);
    gk.reserve(std::size_t(rows) * kMaxNew * kvd);
    gv.reserve(std::size_t(rows) * kMaxNew * kvd);
    fill(q, 1), fill(pk, 2), fill(pv, 3), fill(gk, 4), fill(gv, 5);
    std::vector<int> kp(std::size_t(users) * S);
    for (std::size_t i = 0; i < kp.size(); ++i) kp[i] = static_cast<int>(i % S);
    kpos.reserve(kp.size());
    EARN_CUDA_CHECK(cudaMemcpy(kpos.data(), kp.data(), kp.size() * sizeof(int), cudaMemcpyHostToDevice));

    std::vector<cuda::Segment> sg(users);
    std::vector<int> pos(rows), row_seg(rows), row_src(rows);
    long long off = 0;
    for (int u = 0; u < users; ++u) {
      sg[u].q_off = u * nq;
      sg[u].nq = nq;
      sg[u].S = S;
      sg[u].G = G;
      sg[u].ld = cuda::score_ld(S, G);
      sg[u].gen_pos0 = S;
      sg[u].score_off = off;
      sg[u].kpos = kpos.data() + std::size_t(u) * S;
      sg[u].pk = pk.data() + std::size_t(u) * S * kvd;
      sg[u].pv = pv.data() + std::size_t(u) * S * kvd;
      off += static_cast<long long>(kHeads) * nq * sg[u].ld;
      for (int j = 0; j < nq; ++j) {
        const int r = u * nq + j;
        pos[r] = G > 0 ? S + G - 1 : j;  // decode: the newest position; prefill: the row's own
        row_seg[r] = u;
        row_src[r] = r;
      }
    }
    scores = static_cast<std::size_t>(off);
    split = cuda::flash_split(S, kHeads, users, cuda::sm_count(), depth);
    score_buf.reserve(std::max(scores, cuda::decode_workspace(rows, kHeads, kHeadDim, split.chunks)));
    probs.reserve(scores);
    std::vector<int> all(pos);
    all.insert(all.end(), row_seg.begin(), row_seg.end());
    all.insert(all.end(), row_src.begin(), row_src.end());
    ints.reserve(all.size());
    EARN_CUDA_CHECK(cudaMemcpy(ints.data(), all.data(), all.size() * sizeof(int), cudaMemcpyHostToDevice));
    segs.reserve(sg.size());
    EARN_CUDA_CHECK(cudaMemcpy(segs.data(), sg.data(), sg.size() * sizeof(cuda::Segment), cudaMemcpyHostToDevice));

    const int entries = users * kHeads;
    std::vector<void*> p(6 * std::size_t(entries));
    for (int u = 0; u < users; ++u)
      cuda::attention_ptrs<T>(p.data(), entries, u * kHeads, sg[u], pk.data() + std::size_t(u) * S * kvd,
                              pv.data() + std::size_t(u) * S * kvd, q.data(), score_buf.data(), probs.data(),
                              out.data(), kHeads, kHeads, kHeadDim);
    ptrs.reserve(p.size());
    EARN_CUDA_CHECK(cudaMemcpy(ptrs.data(), p.data(), p.size() * sizeof(void*), cudaMemcpyHostToDevice));
    groups = {{S, nq, entries, 0}};

    args.q = q.data();
    args.gen_k = gk.data();
    args.gen_v = gv.data();
    args.scores = score_buf.data();
    args.probs = probs.data();
    args.out = out.data();
    args.pos = ints.data();
    args.row_seg = ints.data() + rows;
    args.row_src = G > 0 ? ints.data() + 2 * rows : nullptr;
    args.segs = segs.data();
    args.ptrs = ptrs.data();
    args.entries = entries;
    args.groups = groups.data();
    args.n_groups = 1;
    args.rows = rows;
    args.nh = kHeads;
    args.nkv = kHeads;
    args.hd = kHeadDim;
    args.G = G;
    args.max_new = kMaxNew;
  }
};

// The call under test: the cuBLAS path (attention.cuh) or the flash kernels (flash_attention.cuh in prefill,
// decode_attention.cuh in decode).
template <class Policy, bool kFused>
void call(cublasHandle_t h, cudaStream_t s, Problem& p) {
  const auto& a = p.args;
  if constexpr (kFused) {
    if (a.G > 0) {
      cuda::decode_attention<Policy, T>(s, a.q, a.gen_k, a.gen_v, a.row_src, a.row_seg, a.segs, p.users, p.nq, a.pos,
                                        a.rows, a.nh, a.nkv, a.hd, a.G, a.max_new, p.split, p.score_buf.data(),
                                        p.out.data());
    } else {
      cuda::FlashArgs<T> fa;
      fa.q = a.q;
      fa.segs = a.segs;
      fa.nseg = p.users;
      fa.pos = a.pos;
      fa.out = p.out.data();
      fa.nh = a.nh;
      fa.nkv = a.nkv;
      fa.hd = a.hd;
      fa.max_nq = p.nq;
      cuda::flash_attention<Policy, false>(s, fa);
    }
  } else {
    cuda::attention<Policy, T>(h, s, p.args);
  }
}

template <class Policy, bool kFused = false>
void run(benchmark::State& state, Problem& p, double flop, double bytes) {
  cuda::BlasHandle h;
  cuda::Stream s;
  EARN_CUDA_CHECK(cublasSetStream(h.get(), s.get()));
  cuda::Event a, b;
  for (int i = 0; i < 3; ++i) call<Policy, kFused>(h.get(), s.get(), p);  // warm-up: cuBLAS heuristics
  for (auto _ : state) {
    a.record(s.get());
    call<Policy, kFused>(h.get(), s.get(), p);
    b.record(s.get());
    state.SetIterationTime(cuda::Event::elapsed_ms(a, b) * 1e-3);
  }
  state.counters["FLOP"] = benchmark::Counter(flop, benchmark::Counter::kIsIterationInvariantRate);
  state.counters["bytes"] = benchmark::Counter(bytes, benchmark::Counter::kIsIterationInvariantRate);
  // fp32 scores + probs written and read by the cuBLAS path; the flash kernels keep them on chip.
  state.counters["score_MB"] = kFused ? 0.0 : double(p.scores) * (4 + sizeof(T)) / 1e6;
}

constexpr double kQd = double(kHeads) * kHeadDim, kRowKV = 2.0 * kQd * sizeof(T);  // K + V bytes of one row

template <bool kFused>
void prefill(benchmark::State& state) {
  const int B = static_cast<int>(state.range(0)), n = static_cast<int>(state.range(1)) + kRegisters;
  Problem p(B, n, n, 0);
  const double flop = 4.0 * kQd * (double(n) * (n + 1) / 2) * B;
  const double bytes = double(B) * n * (2 * kQd * sizeof(T) + kRowKV);  // q read, out written, K/V read
  run<attention::DenseCausal, kFused>(state, p, flop, bytes);
}

template <bool kFused>
void decode_dense(benchmark::State& state) {
  const int B = static_cast<int>(state.range(0)), S = static_cast<int>(state.range(1)) + kRegisters;
  const int G = static_cast<int>(state.range(2));
  Problem p(B, S, kBeam, G, state.range(3) > 0 ? int(state.range(3)) : 4);
  state.counters["chunks"] = p.split.chunks;
  const double R = double(B) * kBeam;
  const double flop = 4.0 * kQd * R * (S + G);
  const double bytes = double(B) * S * kRowKV + R * G * kRowKV + R * 2 * kQd * sizeof(T);
  run<attention::DenseCausal, kFused>(state, p, flop, bytes);
}

// kDirect: the split the engine takes for register-only prefixes (decode_split: no flash pass, the combine pass
// scores the 2 register keys itself); else the flash pass over one 64-key tile, then the combine.
template <bool kFused, bool kDirect = false>
void decode_register(benchmark::State& state) {
  const int B = static_cast<int>(state.range(0)), G = static_cast<int>(state.range(1));
  Problem p(B, kRegisters, kBeam, G);
  if (kDirect) p.split = cuda::decode_split(kRegisters, kHeads, B, cuda::sm_count());
  const double R = double(B) * kBeam;
  const double flop = 4.0 * kQd * R * (kRegisters + G);
  const double bytes = double(B) * kRegisters * kRowKV + R * G * kRowKV + R * 2 * kQd * sizeof(T);
  run<attention::RegisterOnly, kFused>(state, p, flop, bytes);
}

}  // namespace

int main(int argc, char** argv) {
  benchmark::Initialize(&argc, argv);
  if (cuda::device_count() == 0) {
    std::printf("skipped: no CUDA device\n");
    return 0;
  }
  for (int B : {1, 4, 32})
    for (int P : {256, 512}) {
      benchmark::RegisterBenchmark("prefill", prefill<false>)->Args({B, P})->ArgNames({"B", "P"})->UseManualTime()
          ->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark("prefill_flash", prefill<true>)->Args({B, P})->ArgNames({"B", "P"})
          ->UseManualTime()->Unit(benchmark::kMicrosecond);
      benchmark::RegisterBenchmark("decode_dense", decode_dense<false>)->Args({B, P, 2, 0})->ArgNames({"B", "P", "G", "depth"})
          ->UseManualTime()->Unit(benchmark::kMicrosecond);
      for (int depth : {4})  // 8, 16, 32 measured slower at B = 32 (more partials to write and combine)
        benchmark::RegisterBenchmark("decode_dense_flash", decode_dense<true>)->Args({B, P, 2, depth})
            ->ArgNames({"B", "P", "G", "depth"})->UseManualTime()->Unit(benchmark::kMicrosecond);
    }
  for (int B : {1, 4, 32}) {
    benchmark::RegisterBenchmark("decode_register", decode_register<false>)->Args({B, 2})->ArgNames({"B", "G"})
        ->UseManualTime()->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark("decode_register_flash", decode_register<true>)->Args({B, 2})
        ->ArgNames({"B", "G"})->UseManualTime()->Unit(benchmark::kMicrosecond);
    benchmark::RegisterBenchmark("decode_register_direct", decode_register<true, true>)->Args({B, 2})
        ->ArgNames({"B", "G"})->UseManualTime()->Unit(benchmark::kMicrosecond);
  }
  try {
    benchmark::RunSpecifiedBenchmarks();
  } catch (const earn::Error& e) {
    std::fprintf(stderr, "error: %s\n", e.what());
    return 1;
  }
  benchmark::Shutdown();
  return 0;
}
