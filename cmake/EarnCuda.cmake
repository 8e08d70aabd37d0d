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
include(earnCudaUsage)
earn_cuda_usage(earn_cuda)
message(STATUS "earn: CUDA backend on (nvcc ${CMAKE_CUDA_COMPILER_VERSION}, architectures ${CMAKE_CUDA_ARCHITECTURES})")
