// earn/backend/cuda/tag.hpp - the CUDA backend tags. Portable C++: naming a tag pulls in no CUDA header;
// the specializations that use them live in earn/backend/cuda/*.cuh and need nvcc (include earn/cuda.cuh).
//
//   earn::Engine<Schedule, earn::Cuda>       fp32 weights and activations (parity tests against the CPU)
//   earn::Engine<Schedule, earn::CudaBf16>   bf16 weights, KV cache and GEMM inputs; fp32 accumulation
//   earn::Engine<Schedule, earn::CudaF16>    the same in fp16
#pragma once

#include <type_traits>

namespace earn {

/// Element types the CUDA backend stores weights, KV cache and GEMM inputs in. Accumulation is always fp32.
namespace dtype {
/// IEEE single precision.
struct F32 {
  static constexpr const char* name = "f32";
  static constexpr int bytes = 4;
};
/// bfloat16: fp32's exponent range, 8 bits of mantissa.
struct Bf16 {
  static constexpr const char* name = "bf16";
  static constexpr int bytes = 2;
};
/// IEEE half precision.
struct F16 {
  static constexpr const char* name = "f16";
  static constexpr int bytes = 2;
};
}  // namespace dtype

/// Backend tag: run on an NVIDIA GPU (cuBLAS GEMMs, earn's kernels) with storage type `DType`.
template <class DType>
struct CudaT {
  static_assert(std::is_same_v<DType, dtype::F32> || std::is_same_v<DType, dtype::Bf16> ||
                    std::is_same_v<DType, dtype::F16>,
                "earn: CudaT<DType> takes earn::dtype::F32, earn::dtype::Bf16 or earn::dtype::F16");
  using dtype_type = DType;
  static constexpr const char* name = "cuda";
};

/// The fp32 CUDA backend.
using Cuda = CudaT<dtype::F32>;
/// bf16 storage, fp32 accumulation.
using CudaBf16 = CudaT<dtype::Bf16>;
/// fp16 storage, fp32 accumulation.
using CudaF16 = CudaT<dtype::F16>;

}  // namespace earn
