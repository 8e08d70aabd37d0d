// Host <-> device copies for the CUDA tests (blocking; every call checked).
#pragma once

#include <algorithm>
#include <cstddef>
#include <vector>

#include "earn/backend/cuda/common.cuh"

namespace earn::test {

/// A device copy of v (an empty v gets a one-element buffer, so data() is never null).
template <class X>
cuda::DeviceBuffer<X> upload(const std::vector<X>& v) {
  cuda::DeviceBuffer<X> b;
  b.reserve(std::max<std::size_t>(v.size(), 1));
  if (!v.empty()) EARN_CUDA_CHECK(cudaMemcpy(b.data(), v.data(), v.size() * sizeof(X), cudaMemcpyHostToDevice));
  return b;
}

/// The first n elements of b on the host.
template <class X>
std::vector<X> download(const cuda::DeviceBuffer<X>& b, std::size_t n) {
  std::vector<X> v(n);
  if (n != 0) EARN_CUDA_CHECK(cudaMemcpy(v.data(), b.data(), n * sizeof(X), cudaMemcpyDeviceToHost));
  return v;
}

}  // namespace earn::test
