// Glue of the torch-facing CUDA launchers (*_cuda.cpp, host compiler): c10 scalar types to
// their CUDA twins, raw pointers, the current stream. Kernel code stays in torch-free .cu files.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "common/cuda_types.h"

namespace pycosdist {

template <typename T> struct CudaScalar { using type = T; };
template <> struct CudaScalar<c10::Half> { using type = __half; };
template <> struct CudaScalar<c10::BFloat16> { using type = __nv_bfloat16; };
template <typename T> using cuda_scalar_t = typename CudaScalar<T>::type;

template <typename T> const T* const_ptr(const at::Tensor& t) { return static_cast<const T*>(t.const_data_ptr()); }
template <typename T> T* mut_ptr(const at::Tensor& t) { return static_cast<T*>(t.mutable_data_ptr()); }

// The stream of the device made current by the caller's CUDAGuard.
inline cudaStream_t current_cuda_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

}  // namespace pycosdist
