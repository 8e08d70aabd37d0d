# The usage requirements of earn::cuda, one definition for the build tree (EarnCuda.cmake) and for an installed
# earn (earnConfig.cmake, `find_package(earn COMPONENTS cuda)`): the CUDA runtime and cuBLAS, C++20 for nvcc as a
# flag (CMake releases older than nvcc 13 do not know its cuda_std_20 feature) and --expt-relaxed-constexpr (the
# attention policies' constexpr hooks, visible and keeps, are called from kernels).
function(earn_cuda_usage target)
  target_link_libraries(${target} INTERFACE earn::earn CUDA::cudart CUDA::cublas CUDA::cublasLt)
  target_compile_options(${target} INTERFACE $<$<COMPILE_LANGUAGE:CUDA>:-std=c++20 --expt-relaxed-constexpr>)
endfunction()
