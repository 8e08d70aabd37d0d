// earn/backend/cuda/tag.hpp - the CUDA backend tag. Portable C++: naming the tag pulls in no CUDA header;
// the specializations that use it live in earn/backend/cuda/*.cuh and need nvcc (include earn/cuda.cuh).
#pragma once

namespace earn {

/// Backend tag: run on an NVIDIA GPU (cuBLAS GEMMs, earn's kernels). Defined by earn/cuda.cuh.
struct Cuda {
  static constexpr const char* name = "cuda";
};

}  // namespace earn
