// The fused LIB + cosine loss's row kernel: per row of a chunk, the cosine distance between
// p = LIB(student) (opmath: float32 for half inputs, so that dL/dp, which carries 1/N for
// 'mean', does not flush to zero in float16) and the teacher (its own dtype) and, in the same
// launch, dL/dp written over p. The second pass re-reads the row right after the first, from
// L1 / L2 (a chunk is sized to stay in L2). Reuses the cosine_distance building blocks
// (common/cuda_rows.cuh); packs hold 16 bytes of p and as many elements of the teacher.
#include "common/cuda_rows.cuh"
#include "lib_cosine_loss/lib_cosine_loss_kernels.cuh"

namespace pycosdist::cuda {
namespace {

// p is read and then written in place, hence not __restrict__.
template <typename T>
__global__ void __launch_bounds__(kThreads, kRowMinBlocks)
    lib_cosine_rows_kernel(opmath_t<T>* p, const T* __restrict__ t, int64_t rows, int64_t D, opmath_t<T> eps,
                           opmath_t<T>* __restrict__ distance, const opmath_t<T>* __restrict__ grad,
                           int64_t grad_stride, opmath_t<T> grad_scale, bool compute_grad, int group_threads) {
  using A = opmath_t<T>;
  constexpr int V = pack_width<A>();
  __shared__ A smem[3 * kWarps];
  const int rows_per_block = kThreads / group_threads;
  const int group = threadIdx.x / group_threads, lane = threadIdx.x % group_threads;
  // The loop bound is the same for the whole block: group_sum3 may synchronize it.
  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < rows;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = first + group;
    A* pr = p + (r < rows ? r : 0) * D;
    const T* tr = t + (r < rows ? r : 0) * D;
    const RowSpan sp = row_span<V>(pr, tr, D);
    A dot = 0, ss = 0, tt = 0;
    if (r < rows) row_partial_sums<V>(pr, tr, sp, D, lane, group_threads, dot, ss, tt);
    group_sum3(dot, ss, tt, group_threads, smem);  // every lane of the group gets the sums
    if (r >= rows) continue;
    const CosineRow<A> c = cosine_row(dot, ss, tt, eps);
    if (distance != nullptr && lane == 0) distance[r] = A(1) - c.cos;
    if (compute_grad) {
      const A g = grad != nullptr ? grad_scale * grad[r * grad_stride] : grad_scale;
      const GradCoefs<A> k = cosine_grad_coefs(g, c, eps);
      // dL/dp over p (same span: p is its own output), no teacher gradient.
      row_grads<V>(pr, tr, pr, static_cast<A*>(nullptr), sp, true, D, lane, group_threads, k.a, k.b, A(0));
    }
  }
}

}  // namespace

template <typename T>
cudaError_t lib_cosine_rows(opmath_t<T>* projected, const T* teacher, int64_t rows, int64_t D, double eps,
                            opmath_t<T>* distance, const opmath_t<T>* grad_distance, int64_t grad_stride,
                            double grad_scale, bool compute_grad, cudaStream_t stream) {
  using A = opmath_t<T>;
  if (rows == 0) return cudaSuccess;
  int sms = 0;
  if (cudaError_t err = current_sm_count(&sms); err != cudaSuccess) return err;
  const int g = pick_group_threads(rows, D, pack_width<A>(), sms);
  lib_cosine_rows_kernel<T><<<row_blocks(rows, g, sms), kThreads, 0, stream>>>(
      projected, teacher, rows, D, A(eps), distance, grad_distance, grad_stride, A(grad_scale), compute_grad, g);
  return cudaGetLastError();
}

#define PYCOSDIST_INSTANTIATE(T)                                                                              \
  template cudaError_t lib_cosine_rows<T>(opmath_t<T>*, const T*, int64_t, int64_t, double, opmath_t<T>*,    \
                                          const opmath_t<T>*, int64_t, double, bool, cudaStream_t);
PYCOSDIST_INSTANTIATE(float)
PYCOSDIST_INSTANTIATE(double)
PYCOSDIST_INSTANTIATE(__half)
PYCOSDIST_INSTANTIATE(__nv_bfloat16)
#undef PYCOSDIST_INSTANTIATE

}  // namespace pycosdist::cuda
