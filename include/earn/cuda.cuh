// earn/cuda.cuh - the umbrella header of earn's CUDA side (needs nvcc): everything of earn/earn.hpp plus the
// CUDA backend, so earn::Engine<Schedule, earn::Cuda> (or CudaBf16, CudaF16) and its state are defined.
//
//   #include "earn/cuda.cuh"
//   earn::Engine<earn::EarnSchedule, earn::CudaBf16> gpu(weights, earn::EarnSchedule{6});
#pragma once

#ifndef __CUDACC__
#error "earn/cuda.cuh needs nvcc (a .cu translation unit); CPU-only code includes earn/earn.hpp"
#endif

#include "earn/backend/cuda/common.cuh"
#include "earn/backend/cuda/engine.cuh"
#include "earn/backend/cuda/kv_store.cuh"
#include "earn/backend/cuda/tag.hpp"
#include "earn/backend/cuda/weights.cuh"
#include "earn/earn.hpp"
