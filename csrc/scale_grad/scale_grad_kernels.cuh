// Torch-free launcher of scale_grad_'s CUDA kernel (scale_grad_kernels.cu); the torch-facing
// side is scale_grad_cuda.cpp.
#pragma once

#include "common/cuda_types.h"

namespace pycosdist::cuda {

// x[0:n] *= *factor, contiguous, read on the device: a factor of exactly 1 returns at once in
// every block (no pass over x, no host synchronization).
template <typename T>
cudaError_t scale_unless_one(T* x, int64_t n, const opmath_t<T>* factor, cudaStream_t stream);

}  // namespace pycosdist::cuda
