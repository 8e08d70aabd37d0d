// bench/cuda/common.cuh - what the GPU benchmark programs share: list arguments, the Llama-7B configuration, event
// timing and the card's measured floors (copy bandwidth, bf16 GEMM rate).
#pragma once

#include <algorithm>
#include <sstream>
#include <string>
#include <vector>

#include "earn/core/config.hpp"
#include "earn/cuda.cuh"

namespace earn::bench {

/// "1,4,32" -> {1, 4, 32}.
inline std::vector<int> parse_list(const char* s) {
  std::vector<int> v;
  std::stringstream ss(s);
  std::string item;
  while (std::getline(ss, item, ',')) v.push_back(std::stoi(item));
  return v;
}

/// Llama-7B dimensions (hidden 4096, FFN 11008, 32 heads, untied head) with `layers` layers and `vocab` ids.
inline ModelConfig llama7b_config(int layers, int vocab) {
  ModelConfig c;
  c.dim = 4096;
  c.hidden_dim = 11008;
  c.n_layers = layers;
  c.n_heads = 32;
  c.n_kv_heads = 32;
  c.vocab_size = vocab;
  c.max_seq_len = 1024;
  c.tied_embeddings = false;
  return c;
}

inline float median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Event timer on one stream.
struct Timer {
  cuda::Event a, b;
  void start(cudaStream_t s) { a.record(s); }
  float stop(cudaStream_t s) {
    b.record(s);
    return cuda::Event::elapsed_ms(a, b);
  }
};

// Copy bandwidth (bytes read + written per second) of a large device-to-device copy.
inline double measure_bandwidth() {
  const std::size_t n = std::size_t(2) << 30;  // 2 GiB each way
  cuda::DeviceBuffer<char> src(n), dst(n);
  EARN_CUDA_CHECK(cudaMemset(src.data(), 1, n));
  cuda::Stream s;
  Timer t;
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    t.start(s.get());
    EARN_CUDA_CHECK(cudaMemcpyAsync(dst.data(), src.data(), n, cudaMemcpyDeviceToDevice, s.get()));
    const float m = t.stop(s.get());
    if (i >= 2) ms.push_back(m);
  }
  return 2.0 * double(n) / (median(ms) * 1e-3);
}

// bf16 GEMM rate (FLOP/s) of an 8192^3 product on random data, fp32 accumulation, through cuBLAS. Burst: the
// median of 10 products timed one by one (each ~1.3 ms); sustained: 150 products back to back in one timing
// (~0.2 s, as long as a B = 32 prefill), where the card's power and clock limits show.
struct GemmRate {
  double burst, sustained;
};
inline GemmRate measure_gemm_rate() {
  const int n = 8192;
  cuda::DeviceBuffer<__nv_bfloat16> a(std::size_t(n) * n), b(std::size_t(n) * n), c(std::size_t(n) * n);
  cuda::kernel::fill_uniform<__nv_bfloat16><<<4096, 256>>>(a.data(), Index{n} * n, 1, 0.0f, 1.0f);
  cuda::kernel::fill_uniform<__nv_bfloat16><<<4096, 256>>>(b.data(), Index{n} * n, 2, 0.0f, 1.0f);
  EARN_CUDA_CHECK_LAUNCH();
  cuda::BlasHandle h;
  cuda::Stream s;
  EARN_CUDA_CHECK(cublasSetStream(h.get(), s.get()));
  Timer t;
  std::vector<float> ms;
  for (int i = 0; i < 12; ++i) {
    t.start(s.get());
    cuda::linear<__nv_bfloat16, __nv_bfloat16>(h.get(), a.data(), b.data(), c.data(), n, n, n);
    const float m = t.stop(s.get());
    if (i >= 2) ms.push_back(m);
  }
  const double flop = 2.0 * double(n) * n * n;
  constexpr int kBackToBack = 150;
  t.start(s.get());
  for (int i = 0; i < kBackToBack; ++i)
    cuda::linear<__nv_bfloat16, __nv_bfloat16>(h.get(), a.data(), b.data(), c.data(), n, n, n);
  const float total = t.stop(s.get());
  return {flop / (median(ms) * 1e-3), kBackToBack * flop / (total * 1e-3)};
}

}  // namespace earn::bench
