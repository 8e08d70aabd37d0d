// earn/backend/cuda/kv_store.cuh - device storage of one layer's KV cache (prefix per user, generated per row).
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/kernels.cuh"
#include "earn/core/tensor.hpp"
#include "earn/kv/layout.hpp"
#include "earn/kv/press.hpp"

namespace earn::kv {

/// One layer's cache on the device, in storage type T. K rows are stored after RoPE, so decode never re-rotates
/// them. The prefix block of a user is written by prefill and read by every decode row (beam) of that user.
template <class DType>
class Store<CudaT<DType>> {
 public:
  using T = cuda::storage_t<DType>;

  Store() = default;
  /// `prefix_capacity` rows per user; `max_new` generated rows per decode row.
  Store(Index prefix_capacity, int max_users, int max_rows, int max_new, int kv_dim)
      : prefix_capacity_(prefix_capacity), max_users_(max_users), max_rows_(max_rows), max_new_(max_new),
        kv_dim_(kv_dim), prefix_len_(max_users, 0), rule_(max_users) {
    const std::size_t pre = std::size_t(prefix_capacity) * max_users * kv_dim;
    const std::size_t gen = std::size_t(max_rows) * max_new * kv_dim;
    prefix_k_.reserve(pre);
    prefix_v_.reserve(pre);
    prefix_pos_.reserve(std::size_t(prefix_capacity) * max_users);
    gen_k_.reserve(gen);
    gen_v_.reserve(gen);
  }

  Index prefix_capacity() const { return prefix_capacity_; }
  int max_new() const { return max_new_; }
  int kv_dim() const { return kv_dim_; }
  int prefix_len(int user) const { return prefix_len_.at(user); }

  /// [prefix_capacity, kv_dim] device blocks of a user's prefix K / V and its [prefix_capacity] key positions.
  T* prefix_k(int user) { return prefix_k_.data() + std::size_t(user) * prefix_capacity_ * kv_dim_; }
  T* prefix_v(int user) { return prefix_v_.data() + std::size_t(user) * prefix_capacity_ * kv_dim_; }
  const T* prefix_k(int user) const { return prefix_k_.data() + std::size_t(user) * prefix_capacity_ * kv_dim_; }
  const T* prefix_v(int user) const { return prefix_v_.data() + std::size_t(user) * prefix_capacity_ * kv_dim_; }
  const int* prefix_positions(int user) const { return prefix_pos_.data() + std::size_t(user) * prefix_capacity_; }
  /// Base of the whole prefix storage [max_users * prefix_capacity, kv_dim]; user u's block starts at row
  /// u * prefix_capacity.
  T* prefix_k_base() { return prefix_k_.data(); }
  T* prefix_v_base() { return prefix_v_.data(); }
  int* prefix_pos_base() { return prefix_pos_.data(); }
  /// Generated K / V: [max_rows * max_new, kv_dim], row r's step g at r * max_new + g.
  T* gen_k() { return gen_k_.data(); }
  T* gen_v() { return gen_v_.data(); }
  const T* gen_k() const { return gen_k_.data(); }
  const T* gen_v() const { return gen_v_.data(); }

  /// Record that prefill wrote `rows` prefix rows for `user` (the kernel wrote the numbers).
  void set_prefix_len(int user, int rows) {
    if (rows > prefix_capacity_)
      throw RangeError("kv cache: " + std::to_string(rows) + " prefix rows exceed the layer's capacity of " +
                       std::to_string(prefix_capacity_));
    prefix_len_.at(user) = rows;
  }

  /// A pressed layer evicting during decode (kv::PressRule::evict, evict.cuh): each user's rule (host; evict false
  /// for the others) and, per prefix row and KV head, its position and accumulated score ([max_users * capacity,
  /// nkv], reserved by the first evicting prefill).
  void set_press_rule(int user, const kv::PressRule& rule) { rule_.at(user) = rule; }
  const kv::PressRule& press_rule(int user) const { return rule_.at(user); }
  void reserve_eviction(int n_kv_heads) {
    const std::size_t n = std::size_t(prefix_capacity_) * max_users_ * n_kv_heads;
    if (head_pos_.size() < n) head_pos_.reserve(n), score_.reserve(n);
  }
  int* head_pos_base() { return head_pos_.data(); }
  double* score_base() { return score_.data(); }

  /// Poison every cached number with NaN, so a read of a row nobody wrote shows up in the outputs (tests).
  void poison(cudaStream_t stream) {
    prefix_k_.fill_bytes(0xFF, stream);
    prefix_v_.fill_bytes(0xFF, stream);
    gen_k_.fill_bytes(0xFF, stream);
    gen_v_.fill_bytes(0xFF, stream);
  }

  /// Elements reserved by this layer (prefix blocks of every user + generated blocks), K and V.
  Index capacity_elements() const {
    return 2 * (prefix_capacity_ * max_users_ + Index{max_rows_} * max_new_) * kv_dim_;
  }

 private:
  Index prefix_capacity_ = 0;
  int max_users_ = 0, max_rows_ = 0, max_new_ = 0, kv_dim_ = 0;
  cuda::DeviceBuffer<T> prefix_k_, prefix_v_;  // [max_users * prefix_capacity, kv_dim]
  cuda::DeviceBuffer<int> prefix_pos_;         // [max_users * prefix_capacity]: position of each prefix row
  std::vector<int> prefix_len_;                // per user: rows written (host mirror)
  std::vector<kv::PressRule> rule_;            // per user: the press rule of an evicting layer (host)
  cuda::DeviceBuffer<int> head_pos_;           // [max_users * prefix_capacity, nkv] of an evicting layer
  cuda::DeviceBuffer<double> score_;           // the same, accumulated scores
  cuda::DeviceBuffer<T> gen_k_, gen_v_;        // [max_rows * max_new, kv_dim]
};

/// Beam reordering of every layer's generated KV at once: new row i continues old row parent[i] (`parent` a device
/// array of `rows` entries), the first `gen_len` generated rows of each layer's K and V move. The 2 x layers
/// buffers go in groups that fit `scratch` (grown up to max_scratch_bytes, at least one buffer), each group
/// one gather into scratch and one scatter back: two launches per group, not four per layer (a B = 1 step
/// moves ~1 MB per layer, so the launches were the cost). `ptrs` receives the buffers' device addresses.
inline constexpr std::size_t kReorderScratchBytes = std::size_t(256) << 20;

template <class DType>
void reorder_generated(std::vector<Store<CudaT<DType>>>& layers, const int* parent, int rows, int gen_len,
                       cuda::DeviceBuffer<void*>& ptrs, cuda::DeviceBuffer<cuda::storage_t<DType>>& scratch,
                       cudaStream_t stream, std::size_t max_scratch_bytes = kReorderScratchBytes) {
  using T = cuda::storage_t<DType>;
  if (gen_len == 0 || layers.empty()) return;
  const int kvd = layers.front().kv_dim(), max_new = layers.front().max_new();
  std::vector<void*> bufs;
  for (auto& l : layers) {
    if (l.kv_dim() != kvd || l.max_new() != max_new) throw ConfigError("kv cache: layers of different shapes");
    bufs.push_back(l.gen_k());
    bufs.push_back(l.gen_v());
  }
  ptrs.reserve(bufs.size());
  EARN_CUDA_CHECK(cudaMemcpyAsync(ptrs.data(), bufs.data(), bufs.size() * sizeof(void*), cudaMemcpyHostToDevice, stream));
  const std::size_t per_buf = std::size_t(rows) * gen_len * kvd;  // elements moved per buffer
  const int nbufs = static_cast<int>(bufs.size());
  const int group = static_cast<int>(std::clamp<std::size_t>(max_scratch_bytes / (per_buf * sizeof(T)), 1, nbufs));
  scratch.reserve(per_buf * group);
  namespace kk = cuda::kernel;
  // Rows of 16-byte multiples move as uint4 (8 bf16 per thread and index computation, not 1).
  auto move = [&]<class E>(E* scratch_e, int width) {
    E* const* p = reinterpret_cast<E* const*>(ptrs.data());
    for (int b0 = 0; b0 < nbufs; b0 += group) {
      const int nb = std::min(group, nbufs - b0);
      const unsigned grid = kk::grid_for(static_cast<long long>(nb) * rows * gen_len * width);
      kk::gather_generated<E><<<grid, kk::kThreads, 0, stream>>>(p + b0, nb, parent, rows, gen_len, max_new, width,
                                                                 scratch_e);
      EARN_CUDA_CHECK_LAUNCH();
      kk::scatter_generated<E><<<grid, kk::kThreads, 0, stream>>>(scratch_e, p + b0, nb, rows, gen_len, max_new, width);
      EARN_CUDA_CHECK_LAUNCH();
    }
  };
  if ((std::size_t(kvd) * sizeof(T)) % sizeof(uint4) == 0)
    move(reinterpret_cast<uint4*>(scratch.data()), static_cast<int>(std::size_t(kvd) * sizeof(T) / sizeof(uint4)));
  else
    move(scratch.data(), kvd);
}

}  // namespace earn::kv
