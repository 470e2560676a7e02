// Torch-free types shared by the CUDA kernels (.cu, compiled by nvcc) and their torch-facing
// launchers (*_cuda.cpp, compiled by the host compiler): the two sides meet only through
// raw pointers, sizes, strides and a cudaStream_t.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <cstdint>

namespace pycosdist::cuda {

// Accumulation ("opmath") type: float for float / half / bfloat16, double for double.
template <typename T> struct OpMath { using type = float; };
template <> struct OpMath<double> { using type = double; };
template <typename T> using opmath_t = typename OpMath<T>::type;

}  // namespace pycosdist::cuda
