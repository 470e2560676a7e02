// The fused LIB + cosine loss's row kernel: per row of a chunk, the cosine distance between
// p = LIB(student) (opmath: float32 for half inputs, so that dL/dp, which carries 1/N for
// 'mean', does not flush to zero in float16) and the teacher (its own dtype) and, in the same
// launch, dL/dp written over p. The second pass re-reads the row right after the first, from
// L1 / L2. Optionally, in the same launch: the folded bias added to p first (the bfloat16 path's
// GEMM has no bias epilogue) and dL/dp also written in T (the bfloat16 operand of the gradient
// GEMMs), which saves the launcher an add and a conversion pass per chunk. Reuses the cosine_distance building blocks
// (common/cuda_rows.cuh); packs hold 16 bytes of p and as many elements of the teacher.
#include "common/cuda_rows.cuh"
#include "lib_cosine_loss/lib_cosine_loss_kernels.cuh"

namespace pycosdist::cuda {
namespace {

// Calls f(k) for each element k of a row split by `sp` that this lane owns in row_partial_sums
// and row_grads (head, packs, tail): a lane only ever reads back its own writes, so the
// element-wise steps below need no synchronization with the row's other lanes.
template <int VEC, typename F>
__device__ __forceinline__ void for_owned(RowSpan sp, int64_t D, int lane, int nthreads, F f) {
  for (int64_t k = lane; k < sp.head; k += nthreads) f(k);
  for (int64_t q = lane; q < sp.packs; q += nthreads) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) f(sp.head + q * VEC + j);
  }
  for (int64_t k = sp.head + sp.packs * VEC + lane; k < D; k += nthreads) f(k);
}

// p is read and then written in place, hence not __restrict__.
template <typename T>
__global__ void __launch_bounds__(kThreads, kRowMinBlocks)
    lib_cosine_rows_kernel(opmath_t<T>* p, const T* __restrict__ t, int64_t rows, int64_t D, opmath_t<T> eps,
                           opmath_t<T>* __restrict__ distance, const opmath_t<T>* __restrict__ grad,
                           int64_t grad_stride, opmath_t<T> grad_scale, bool compute_grad,
                           const opmath_t<T>* __restrict__ bias, T* __restrict__ grad_copy, int group_threads) {
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
    if (r < rows && bias != nullptr) for_owned<V>(sp, D, lane, group_threads, [&](int64_t k) { pr[k] += bias[k]; });
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
      if (grad_copy != nullptr) {
        T* cr = grad_copy + r * D;
        for_owned<V>(sp, D, lane, group_threads, [&](int64_t j) { cr[j] = from_acc<T>(pr[j]); });
      }
    }
  }
}

}  // namespace

template <typename T>
cudaError_t lib_cosine_rows(opmath_t<T>* projected, const T* teacher, int64_t rows, int64_t D, double eps,
                            opmath_t<T>* distance, const opmath_t<T>* grad_distance, int64_t grad_stride,
                            double grad_scale, bool compute_grad, const opmath_t<T>* bias, T* grad_copy,
                            cudaStream_t stream) {
  using A = opmath_t<T>;
  if (rows == 0) return cudaSuccess;
  int sms = 0;
  if (cudaError_t err = current_sm_count(&sms); err != cudaSuccess) return err;
  const int g = pick_group_threads(rows, D, pack_width<A>(), sms);
  lib_cosine_rows_kernel<T><<<row_blocks(rows, g, sms), kThreads, 0, stream>>>(
      projected, teacher, rows, D, A(eps), distance, grad_distance, grad_stride, A(grad_scale), compute_grad, bias,
      grad_copy, g);
  return cudaGetLastError();
}

#define PYCOSDIST_INSTANTIATE(T)                                                                              \
  template cudaError_t lib_cosine_rows<T>(opmath_t<T>*, const T*, int64_t, int64_t, double, opmath_t<T>*,    \
                                          const opmath_t<T>*, int64_t, double, bool, const opmath_t<T>*, T*,   \
                                          cudaStream_t);
PYCOSDIST_INSTANTIATE(float)
PYCOSDIST_INSTANTIATE(double)
PYCOSDIST_INSTANTIATE(__half)
PYCOSDIST_INSTANTIATE(__nv_bfloat16)
#undef PYCOSDIST_INSTANTIATE

}  // namespace pycosdist::cuda
