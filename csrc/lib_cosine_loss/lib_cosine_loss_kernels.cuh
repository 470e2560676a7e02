// Torch-free launch function of the fused LIB + cosine loss's row kernel
// (lib_cosine_loss_kernels.cu). The chunk loop and its GEMMs: lib_cosine_loss_cuda.cpp.
#pragma once

#include "common/cuda_types.h"

namespace pycosdist::cuda {

// For one chunk of rows of p = LIB(student), kept in opmath (float32 for half inputs), against
// the teacher (T):
//   distance[r] = 1 - cos(p_r, t_r)                                    (skipped if distance is null)
//   with compute_grad, p_r is overwritten in place by dL/dp_r (opmath) for L = sum_r g_r * distance_r,
//   g_r = grad_scale * grad_distance[r * grad_stride] (grad_distance null: g_r = grad_scale).
//   bias (D), unless null, is first added to every row of projected (in place);
//   grad_copy (rows, D) contiguous, unless null, receives dL/dp rounded to T (with compute_grad).
//   projected: (rows, D) contiguous; teacher: (rows, D) contiguous; distance: (rows).
// Returns the launch's cudaGetLastError().
template <typename T>
cudaError_t lib_cosine_rows(opmath_t<T>* projected, const T* teacher, int64_t rows, int64_t D, double eps,
                            opmath_t<T>* distance, const opmath_t<T>* grad_distance, int64_t grad_stride,
                            double grad_scale, bool compute_grad, const opmath_t<T>* bias, T* grad_copy,
                            cudaStream_t stream);

}  // namespace pycosdist::cuda
