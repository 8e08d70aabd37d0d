// earn/backend/cuda/common.cuh - what every CUDA part of earn shares: the error type and checks, owning device
// buffers, the storage-type traits of the dtype tags, and the cuBLAS handle.
#pragma once

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstddef>
#include <initializer_list>
#include <string>
#include <utility>
#include <mutex>
#include <vector>

#include "earn/backend/cuda/tag.hpp"
#include "earn/core/error.hpp"

namespace earn {

/// A CUDA runtime or cuBLAS call failed (or a kernel launch was refused); the message names the call, the source
/// line and the library's reason. Errors of kernels already running surface at the next checked call.
class CudaError : public Error {
 public:
  using Error::Error;
};

namespace cuda::detail {
inline void check(cudaError_t e, const char* expr, const char* file, int line) {
  if (e != cudaSuccess)
    throw CudaError(std::string(file) + ":" + std::to_string(line) + ": " + expr + ": " + cudaGetErrorName(e) +
                    " (" + cudaGetErrorString(e) + ")");
}
inline void check(cublasStatus_t s, const char* expr, const char* file, int line) {
  if (s != CUBLAS_STATUS_SUCCESS)
    throw CudaError(std::string(file) + ":" + std::to_string(line) + ": " + expr + ": " + cublasGetStatusName(s) +
                    " (" + cublasGetStatusString(s) + ")");
}
}  // namespace cuda::detail

}  // namespace earn

/// Throw earn::CudaError when a cudaError_t or cublasStatus_t expression is not success.
#define EARN_CUDA_CHECK(expr) ::earn::cuda::detail::check((expr), #expr, __FILE__, __LINE__)
/// After a kernel launch: a refused launch (bad configuration, no device) becomes earn::CudaError.
#define EARN_CUDA_CHECK_LAUNCH() EARN_CUDA_CHECK(cudaGetLastError())

namespace earn::cuda {

/// Storage type and cuBLAS data type of a dtype tag.
template <class DType>
struct DTypeTraits;
template <>
struct DTypeTraits<dtype::F32> {
  using type = float;
  static constexpr cudaDataType_t blas = CUDA_R_32F;
};
template <>
struct DTypeTraits<dtype::Bf16> {
  using type = __nv_bfloat16;
  static constexpr cudaDataType_t blas = CUDA_R_16BF;
};
template <>
struct DTypeTraits<dtype::F16> {
  using type = __half;
  static constexpr cudaDataType_t blas = CUDA_R_16F;
};
/// The element type stored for dtype tag `DType`.
template <class DType>
using storage_t = typename DTypeTraits<DType>::type;

/// cuBLAS data type of a storage type.
template <class T>
constexpr cudaDataType_t blas_type() {
  if constexpr (std::is_same_v<T, float>) return CUDA_R_32F;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return CUDA_R_16BF;
  else return CUDA_R_16F;
}

__host__ __device__ inline float to_float(float x) { return x; }
__host__ __device__ inline float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__host__ __device__ inline float to_float(__half x) { return __half2float(x); }

/// Round-to-nearest-even conversion from float to a storage type.
template <class T>
__host__ __device__ inline T from_float(float x) {
  if constexpr (std::is_same_v<T, float>) return x;
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return __float2half_rn(x);
}

/// Owning device allocation of `n` elements (plain cudaMalloc: no managed memory). Move-only.
template <class T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(std::size_t n) { reserve(n); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : p_(std::exchange(o.p_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      release();
      p_ = std::exchange(o.p_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  ~DeviceBuffer() { release(); }

  /// Make room for at least `n` elements; a growing buffer loses its contents (scratch use).
  void reserve(std::size_t n) {
    if (n <= n_) return;
    release();
    if (n == 0) return;
    void* p = nullptr;
    EARN_CUDA_CHECK(cudaMalloc(&p, n * sizeof(T)));
    p_ = static_cast<T*>(p);
    n_ = n;
  }
  /// Fill every byte with `byte` (0xFF poisons floats, bf16 and fp16 alike with NaN).
  void fill_bytes(int byte, cudaStream_t stream) {
    if (n_) EARN_CUDA_CHECK(cudaMemsetAsync(p_, byte, n_ * sizeof(T), stream));
  }
  T* data() { return p_; }
  const T* data() const { return p_; }
  std::size_t size() const { return n_; }
  bool empty() const { return n_ == 0; }

 private:
  void release() noexcept {
    if (p_) cudaFree(p_);  // a destructor must not throw; a failing free leaves nothing to recover
    p_ = nullptr;
    n_ = 0;
  }
  T* p_ = nullptr;
  std::size_t n_ = 0;
};

/// Move-only owner of one CUDA / cuBLAS handle H, released with Destroy: the base of BlasHandle, Event, Stream and
/// LtHandle (blas.cuh), whose constructors create the handle.
template <class H, auto Destroy>
class OwnedHandle {
 public:
  OwnedHandle() = default;
  OwnedHandle(const OwnedHandle&) = delete;
  OwnedHandle& operator=(const OwnedHandle&) = delete;
  OwnedHandle(OwnedHandle&& o) noexcept : h_(std::exchange(o.h_, nullptr)) {}
  OwnedHandle& operator=(OwnedHandle&& o) noexcept {
    std::swap(h_, o.h_);
    return *this;
  }
  ~OwnedHandle() {
    if (h_) Destroy(h_);
  }
  H get() const { return h_; }

 protected:
  H h_ = nullptr;
};

namespace detail {
// cuBLAS handles go back to a process-wide pool instead of being destroyed: cublasDestroy synchronises the device,
// and a decoding state that ends on one thread would then invalidate the decode-graph capture of a state on another
// (compute-sanitizer showed it: "operation not permitted when stream is capturing" from cublasDestroy). Each state
// binds its stream and workspace to its handle before every call, so a handle keeps nothing of its last owner that
// matters. The pool's handles are destroyed at exit.
class BlasPool {
 public:
  static BlasPool& get() {
    static BlasPool pool;
    return pool;
  }
  // A handle of the current device (a handle belongs to the device it was made on).
  cublasHandle_t acquire() {
    int dev = 0;
    EARN_CUDA_CHECK(cudaGetDevice(&dev));
    {
      std::lock_guard<std::mutex> lock(m_);
      for (std::size_t i = free_.size(); i-- > 0;)
        if (free_[i].first == dev) {
          cublasHandle_t h = free_[i].second;
          free_.erase(free_.begin() + static_cast<std::ptrdiff_t>(i));
          return h;
        }
    }
    cublasHandle_t h = nullptr;
    EARN_CUDA_CHECK(cublasCreate(&h));
    std::lock_guard<std::mutex> lock(m_);
    device_of_.push_back({h, dev});
    return h;
  }
  void release(cublasHandle_t h) noexcept {
    try {
      std::lock_guard<std::mutex> lock(m_);
      int dev = 0;
      for (const auto& [hh, d] : device_of_)
        if (hh == h) dev = d;
      free_.push_back({dev, h});
    } catch (...) {
      cublasDestroy(h);  // no room in the pool: destroy it after all
    }
  }
  ~BlasPool() {
    for (const auto& [dev, h] : free_) cublasDestroy(h);
  }

 private:
  std::mutex m_;
  std::vector<std::pair<int, cublasHandle_t>> free_;       // (device, handle) ready for a new owner
  std::vector<std::pair<cublasHandle_t, int>> device_of_;  // every handle the pool made, and its device
};
inline void release_blas(cublasHandle_t h) { BlasPool::get().release(h); }
}  // namespace detail

/// Owning cuBLAS handle, from and back to a process-wide pool (detail::BlasPool). Move-only.
class BlasHandle : public OwnedHandle<cublasHandle_t, detail::release_blas> {
 public:
  BlasHandle() { h_ = detail::BlasPool::get().acquire(); }
};

/// Owning CUDA event (timing enabled). Move-only.
class Event : public OwnedHandle<cudaEvent_t, cudaEventDestroy> {
 public:
  Event() { EARN_CUDA_CHECK(cudaEventCreate(&h_)); }
  void record(cudaStream_t s) { EARN_CUDA_CHECK(cudaEventRecord(h_, s)); }
  /// Milliseconds from a to b, once b has completed (waits for it).
  static float elapsed_ms(const Event& a, const Event& b) {
    EARN_CUDA_CHECK(cudaEventSynchronize(b.h_));
    float ms = 0.0f;
    EARN_CUDA_CHECK(cudaEventElapsedTime(&ms, a.h_, b.h_));
    return ms;
  }
};

/// Owning non-blocking CUDA stream. Move-only.
class Stream : public OwnedHandle<cudaStream_t, cudaStreamDestroy> {
 public:
  Stream() { EARN_CUDA_CHECK(cudaStreamCreateWithFlags(&h_, cudaStreamNonBlocking)); }
  void synchronize() const { EARN_CUDA_CHECK(cudaStreamSynchronize(h_)); }
};

/// Number of CUDA devices, 0 when there is none or no driver (never throws: callers decide to skip).
inline int device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no device" error
    return 0;
  }
  return n;
}

namespace kernel {

/// Programmatic dependent launch (sm_90): a kernel launched with the programmatic-serialization attribute may start
/// while the kernel before it in the stream still runs; it waits here until that kernel has finished and its
/// writes are visible. Launched the ordinary way, this returns at once.
__device__ inline void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
/// Lets the next kernel in the stream, when it was launched as a programmatic dependent, start now (once every
/// block of this grid has said so) instead of when this grid ends. Safe anywhere: that kernel still waits in
/// pdl_wait() for this grid to finish before it touches memory. A kernel launched the ordinary way ignores it.
__device__ inline void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}

}  // namespace kernel

/// kern<<<grid, block, smem, s>>>(args...) with launch attributes (a cluster shape, programmatic serialization).
template <class... P, class... A>
void launch_with(std::initializer_list<cudaLaunchAttribute> attrs, void (*kern)(P...), dim3 grid, dim3 block,
                 std::size_t smem, cudaStream_t s, A&&... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute a[2];
  if (attrs.size() > 2) throw CudaError("launch_with: at most 2 launch attributes");
  std::copy(attrs.begin(), attrs.end(), a);
  cfg.attrs = a;
  cfg.numAttrs = static_cast<unsigned>(attrs.size());
  EARN_CUDA_CHECK(cudaLaunchKernelEx(&cfg, kern, std::forward<A>(args)...));
}

/// The attribute that makes a launch a programmatic dependent of the kernel before it in the stream.
inline cudaLaunchAttribute pdl_attribute() {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  return attr;
}

/// kern<<<grid, block, smem, s>>>(args...); with pdl, as a programmatic dependent launch: the kernel may start
/// while the previous kernel in the stream finishes, so it must call kernel::pdl_wait() before it reads or writes
/// anything that kernel touches (above).
template <class... P, class... A>
void launch(bool pdl, void (*kern)(P...), dim3 grid, dim3 block, std::size_t smem, cudaStream_t s, A&&... args) {
  if (!pdl) {
    kern<<<grid, block, smem, s>>>(std::forward<A>(args)...);
    EARN_CUDA_CHECK_LAUNCH();
    return;
  }
  launch_with({pdl_attribute()}, kern, grid, block, smem, s, std::forward<A>(args)...);
}

/// Opts kernel Fn into `bytes` of dynamic shared memory (above the default 48 KB) on the current device, once per
/// device: the attribute belongs to the device's context, so a process that launches on several GPUs sets it on each.
template <auto Fn>
void allow_dynamic_smem(std::size_t bytes) {
  static std::atomic<unsigned long long> done{0};  // bit d: device d (devices 64 and up: set on every call)
  int dev = 0;
  EARN_CUDA_CHECK(cudaGetDevice(&dev));
  const unsigned long long bit = dev < 64 ? 1ULL << dev : 0;
  if (bit != 0 && (done.load(std::memory_order_acquire) & bit) != 0) return;
  EARN_CUDA_CHECK(cudaFuncSetAttribute(Fn, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  done.fetch_or(bit, std::memory_order_release);
}

/// Multiprocessors of the current device (sizes the split of flash-decoding).
inline int sm_count() {
  int dev = 0, n = 0;
  EARN_CUDA_CHECK(cudaGetDevice(&dev));
  EARN_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  return n;
}

/// Executable CUDA graphs of launch sequences that repeat (a decode step of one shape), keyed by everything the
/// sequence bakes into its launches: shapes, device pointers, the engine. A key seen before replays its graph;
/// a new key captures the sequence from `record` on the stream, then launches it. Keeps the last `capacity` graphs
/// (16 by default).
class GraphCache {
 public:
  static constexpr std::size_t kMax = 16;
  GraphCache() = default;
  explicit GraphCache(std::size_t capacity) : capacity_(capacity < 1 ? 1 : capacity) {}
  GraphCache(const GraphCache&) = delete;
  GraphCache& operator=(const GraphCache&) = delete;
  GraphCache(GraphCache&& o) noexcept : entries_(std::move(o.entries_)), capacity_(o.capacity_), eager_(o.eager_) {
    o.entries_.clear();
  }
  GraphCache& operator=(GraphCache&& o) noexcept {
    std::swap(entries_, o.entries_);
    std::swap(capacity_, o.capacity_);
    std::swap(eager_, o.eager_);
    return *this;
  }
  ~GraphCache() { clear(); }

  template <class Record>
  void run(std::vector<long long> key, cudaStream_t s, Record&& record) {
    for (auto& e : entries_)
      if (e.key == key) {
        EARN_CUDA_CHECK(cudaGraphLaunch(e.exec, s));
        return;
      }
    cudaGraph_t graph = nullptr;
    EARN_CUDA_CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
    bool lost = false;  // the capture was invalidated from outside this thread
    try {
      record();
    } catch (...) {
      cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
      lost = cudaStreamIsCapturing(s, &status) == cudaSuccess && status == cudaStreamCaptureStatusInvalidated;
      if (cudaStreamEndCapture(s, &graph) == cudaSuccess && graph) cudaGraphDestroy(graph);
      cudaGetLastError();  // the failed capture's error is the exception in flight, not the next call's
      if (!lost) throw;
    }
    if (!lost) {
      const cudaError_t end = cudaStreamEndCapture(s, &graph);
      lost = end == cudaErrorStreamCaptureInvalidated;
      if (lost) cudaGetLastError();
      else EARN_CUDA_CHECK(end);
    }
    if (lost) {
      // Another thread's device-wide synchronisation (a cudaFree, a synchronous copy) during the capture invalidates
      // it even in thread-local mode (test_cuda_threads aborted in most runs before this): nothing was launched, so
      // the step runs eagerly instead, and the next step of this shape tries to capture again.
      ++eager_;
      record();
      return;
    }
    cudaGraphExec_t exec = nullptr;
    const cudaError_t e = cudaGraphInstantiate(&exec, graph, 0);
    cudaGraphDestroy(graph);
    EARN_CUDA_CHECK(e);
    if (entries_.size() >= capacity_) {
      cudaGraphExecDestroy(entries_.front().exec);
      entries_.erase(entries_.begin());
    }
    entries_.push_back({std::move(key), exec});
    EARN_CUDA_CHECK(cudaGraphLaunch(exec, s));
  }
  std::size_t size() const { return entries_.size(); }
  /// Steps launched eagerly because their capture was invalidated by another thread.
  std::size_t eager_steps() const { return eager_; }
  void clear() noexcept {
    for (auto& e : entries_) cudaGraphExecDestroy(e.exec);
    entries_.clear();
  }

 private:
  struct Entry {
    std::vector<long long> key;
    cudaGraphExec_t exec;
  };
  std::vector<Entry> entries_;
  std::size_t capacity_ = kMax;
  std::size_t eager_ = 0;
};

}  // namespace earn::cuda
