// Torch-free launch functions of the cosine_distance CUDA kernels (cosine_distance_kernels.cu);
// the torch-facing side is cosine_distance_cuda.cpp. Semantics: csrc/ops.cpp.
//
// A (..., D, ...) tensor with D at `dim` is seen as (outer, D, inner); row (o, i) is row
// o * inner + i of distance / row_stats. Inputs have unit stride along D when inner == 1 and
// along inner otherwise (the launcher copies any other layout to contiguous first).
// Launches go to `stream`; each function returns the first CUDA error (cudaGetLastError()).
#pragma once

#include "common/cuda_types.h"

namespace pycosdist::cuda {

struct RowsShape { int64_t outer, size, inner; };  // (outer, D, inner)
struct RowsStrides { int64_t outer, size; };       // element strides of an input on (outer, D, inner)
struct GradStrides { int64_t outer, inner; };      // grad_distance on (outer, inner); {0, 0}: expanded scalar

// Opmath elements of scratch memory the forward ops need for `shape` on the current device
// (0 when none): the column kernels split a long D over several blocks when (outer, inner)
// alone cannot fill the GPU, and add the blocks' partial sums in a second, fixed-order pass.
cudaError_t cosine_distance_workspace(RowsShape shape, int64_t* elems);

// distance: (outer * inner) = 1 - cos; row_stats: (outer * inner, 3) = [cos, 1/max(|s|,eps), 1/max(|t|,eps)].
// workspace: cosine_distance_workspace(shape) elements (may be null when that is 0).
template <typename T>
cudaError_t cosine_distance_forward(const T* student, RowsStrides student_strides, const T* teacher,
                                    RowsStrides teacher_strides, RowsShape shape, double eps,
                                    opmath_t<T>* distance, opmath_t<T>* row_stats, opmath_t<T>* workspace,
                                    cudaStream_t stream);

// grad_student (and grad_teacher unless null): contiguous (outer, D, inner).
template <typename T>
cudaError_t cosine_distance_backward(const opmath_t<T>* grad_distance, GradStrides grad_strides, const T* student,
                                     RowsStrides student_strides, const T* teacher, RowsStrides teacher_strides,
                                     const opmath_t<T>* row_stats, RowsShape shape, double eps, T* grad_student,
                                     T* grad_teacher, cudaStream_t stream);

// distance as the forward, and in the same pass over student and teacher the gradients of
// grad_scale * sum(distance): grad_student unless null, grad_teacher unless null, both
// contiguous (outer, D, inner), computed in opmath and rounded once to T.
template <typename T>
cudaError_t cosine_distance_forward_with_grad(const T* student, RowsStrides student_strides, const T* teacher,
                                              RowsStrides teacher_strides, RowsShape shape, double eps,
                                              double grad_scale, opmath_t<T>* distance, T* grad_student,
                                              T* grad_teacher, opmath_t<T>* workspace, cudaStream_t stream);

}  // namespace pycosdist::cuda
