// The fused LIB + cosine loss's row kernel: per row of a chunk, the cosine distance between
// p = LIB(student) and the teacher and, in the same launch, dL/dp written over p. The
// second pass re-reads the row right after the first, from L1/L2 (a chunk is sized to stay
// in L2). Reuses the cosine_distance building blocks (common/cuda_rows.cuh).
#include "common/cuda_rows.cuh"
#include "lib_cosine_loss/lib_cosine_loss_kernels.cuh"

namespace pycosdist::cuda {
namespace {

// p is read and then written in place, hence not __restrict__.
template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    lib_cosine_rows_kernel(T* p, const T* __restrict__ t, int64_t rows, int64_t D, opmath_t<T> eps,
                           opmath_t<T>* __restrict__ distance, const opmath_t<T>* __restrict__ grad,
                           int64_t grad_stride, opmath_t<T> grad_scale, bool compute_grad, int warps_per_row) {
  using A = opmath_t<T>;
  __shared__ A smem[3 * kWarps];
  const int group_threads = 32 * warps_per_row, rows_per_block = kWarps / warps_per_row;
  const int group = threadIdx.x / group_threads, lane = threadIdx.x % group_threads;
  // The loop bound is the same for the whole block: group_sum3 may synchronize it.
  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < rows;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = first + group;
    A dot = 0, ss = 0, tt = 0;
    if (r < rows) row_partial_sums<VEC>(p + r * D, t + r * D, D, lane, group_threads, dot, ss, tt);
    group_sum3(dot, ss, tt, warps_per_row, smem);  // every lane of the group gets the sums
    if (r >= rows) continue;
    const CosineRow<A> c = cosine_row(dot, ss, tt, eps);
    if (distance != nullptr && lane == 0) distance[r] = A(1) - c.cos;
    if (compute_grad) {
      const A g = grad != nullptr ? grad_scale * grad[r * grad_stride] : grad_scale;
      const GradCoefs<A> k = cosine_grad_coefs(g, c, eps);
      row_grads<VEC>(p + r * D, t + r * D, p + r * D, static_cast<T*>(nullptr), D, lane, group_threads, k.a, k.b,
                     A(0));
    }
  }
}

}  // namespace

template <typename T>
cudaError_t lib_cosine_rows(T* projected, const T* teacher, int64_t rows, int64_t D, double eps,
                            opmath_t<T>* distance, const opmath_t<T>* grad_distance, int64_t grad_stride,
                            double grad_scale, bool compute_grad, cudaStream_t stream) {
  using A = opmath_t<T>;
  if (rows == 0) return cudaSuccess;
  int sms = 0;
  if (cudaError_t err = current_sm_count(&sms); err != cudaSuccess) return err;
  constexpr int V = pack_width<T>();
  const bool packed = D % V == 0 && aligned16(projected) && aligned16(teacher);
  const int w = pick_warps_per_row(rows, packed ? D / V : D, sms);
  const unsigned blocks = row_blocks(rows, w, sms);
  if (packed) {
    lib_cosine_rows_kernel<T, V><<<blocks, kThreads, 0, stream>>>(projected, teacher, rows, D, A(eps), distance,
                                                                  grad_distance, grad_stride, A(grad_scale),
                                                                  compute_grad, w);
  } else {
    lib_cosine_rows_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(projected, teacher, rows, D, A(eps), distance,
                                                                  grad_distance, grad_stride, A(grad_scale),
                                                                  compute_grad, w);
  }
  return cudaGetLastError();
}

#define PYCOSDIST_INSTANTIATE(T)                                                                       \
  template cudaError_t lib_cosine_rows<T>(T*, const T*, int64_t, int64_t, double, opmath_t<T>*,       \
                                          const opmath_t<T>*, int64_t, double, bool, cudaStream_t);
PYCOSDIST_INSTANTIATE(float)
PYCOSDIST_INSTANTIATE(double)
PYCOSDIST_INSTANTIATE(__half)
PYCOSDIST_INSTANTIATE(__nv_bfloat16)
#undef PYCOSDIST_INSTANTIATE

}  // namespace pycosdist::cuda
