# earn's CUDA backend: the INTERFACE target earn::cuda (earn::earn + the CUDA runtime and cuBLAS).
# Included by the top-level CMakeLists.txt when EARN_ENABLE_CUDA is ON or AUTO. AUTO (the default when earn is
# the top-level project) turns the backend on iff a CUDA compiler is found; a consumer gets it only by asking.
include_guard(GLOBAL)

if(EARN_ENABLE_CUDA STREQUAL "AUTO")
  include(CheckLanguage)
  check_language(CUDA)
  if(NOT CMAKE_CUDA_COMPILER)
    message(STATUS "earn: no CUDA compiler found, the CUDA backend is off (EARN_ENABLE_CUDA=AUTO)")
    return()
  endif()
endif()

# sm_90 machine code (H100 / H200) plus sm_90 PTX that newer GPUs compile at load time.
if(NOT DEFINED CMAKE_CUDA_ARCHITECTURES)
  set(CMAKE_CUDA_ARCHITECTURES "90-real;90-virtual")
endif()
enable_language(CUDA)
find_package(CUDAToolkit REQUIRED)

add_library(earn_cuda INTERFACE)
add_library(earn::cuda ALIAS earn_cuda)
target_link_libraries(earn_cuda INTERFACE earn::earn CUDA::cudart CUDA::cublas CUDA::cublasLt)
# C++20 as a flag: CMake releases older than nvcc 13 do not know its cuda_std_20 feature. The attention
# policies' constexpr hooks (visible, keeps) are called from kernels, hence --expt-relaxed-constexpr.
target_compile_options(earn_cuda INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr>)
message(STATUS "earn: CUDA backend on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
