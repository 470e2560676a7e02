// cosine_distance CUDA kernels: each input element is read once by the forward and once by
// the backward, accumulating in fp32 (fp64 for double).
//
// Two layouts (see cosine_distance_kernels.cuh):
//  - inner == 1 ("rows"): a group of warps per row (common/cuda_rows.cuh), 16-byte loads
//    when the rows allow them, warp-shuffle reductions;
//  - inner > 1 ("cols"): a (bx, by) block, threads along x take consecutive rows (o, i) so
//    that a warp's loads along the unit-stride inner axis coalesce, threads along y split D;
//    the forward reduces over y in shared memory.
#include <climits>

#include "common/cuda_rows.cuh"
#include "cosine_distance/cosine_distance_kernels.cuh"

namespace pycosdist::cuda {
namespace {

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    forward_rows_kernel(const T* __restrict__ s, int64_t s_row_stride, const T* __restrict__ t, int64_t t_row_stride,
                        int64_t rows, int64_t D, opmath_t<T> eps, opmath_t<T>* __restrict__ distance,
                        opmath_t<T>* __restrict__ row_stats, int warps_per_row) {
  using A = opmath_t<T>;
  __shared__ A smem[3 * kWarps];
  const int group_threads = 32 * warps_per_row, rows_per_block = kWarps / warps_per_row;
  const int group = threadIdx.x / group_threads, lane = threadIdx.x % group_threads;
  // The loop bound is the same for the whole block: group_sum3 may synchronize it.
  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < rows;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = first + group;
    A dot = 0, ss = 0, tt = 0;
    if (r < rows) row_partial_sums<VEC>(s + r * s_row_stride, t + r * t_row_stride, D, lane, group_threads, dot, ss, tt);
    group_sum3(dot, ss, tt, warps_per_row, smem);
    if (r < rows && lane == 0) {
      const CosineRow<A> c = cosine_row(dot, ss, tt, eps);
      distance[r] = A(1) - c.cos;
      row_stats[3 * r] = c.cos;
      row_stats[3 * r + 1] = c.inv_s;
      row_stats[3 * r + 2] = c.inv_t;
    }
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    backward_rows_kernel(const opmath_t<T>* __restrict__ grad, int64_t grad_stride, const T* __restrict__ s,
                         int64_t s_row_stride, const T* __restrict__ t, int64_t t_row_stride,
                         const opmath_t<T>* __restrict__ row_stats, int64_t rows, int64_t D, opmath_t<T> eps,
                         T* __restrict__ gs, T* __restrict__ gt, int warps_per_row) {
  using A = opmath_t<T>;
  const int group_threads = 32 * warps_per_row, rows_per_block = kWarps / warps_per_row;
  const int group = threadIdx.x / group_threads, lane = threadIdx.x % group_threads;
  for (int64_t r = int64_t(blockIdx.x) * rows_per_block + group; r < rows; r += int64_t(gridDim.x) * rows_per_block) {
    const CosineRow<A> c{row_stats[3 * r], row_stats[3 * r + 1], row_stats[3 * r + 2]};
    const GradCoefs<A> k = cosine_grad_coefs(grad[r * grad_stride], c, eps);
    row_grads<VEC>(s + r * s_row_stride, t + r * t_row_stride, gs + r * D, gt != nullptr ? gt + r * D : gt, D, lane,
                   group_threads, k.a, k.b, k.c);
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_cols_kernel(const T* __restrict__ s, RowsStrides s_st, const T* __restrict__ t, RowsStrides t_st,
                        RowsShape shape, opmath_t<T> eps, opmath_t<T>* __restrict__ distance,
                        opmath_t<T>* __restrict__ row_stats) {
  using A = opmath_t<T>;
  __shared__ A smem[3][kThreads];
  const int bx = blockDim.x, by = blockDim.y, id = threadIdx.y * bx + threadIdx.x;
  const int64_t i = int64_t(blockIdx.x) * bx + threadIdx.x;
  for (int64_t o = blockIdx.y; o < shape.outer; o += gridDim.y) {  // same bound for the whole block
    A dot = 0, ss = 0, tt = 0;
    if (i < shape.inner) {
      const T* sp = s + o * s_st.outer + i;
      const T* tp = t + o * t_st.outer + i;
      for (int64_t k = threadIdx.y; k < shape.size; k += by) {
        const A x = to_acc(sp[k * s_st.size]), y = to_acc(tp[k * t_st.size]);
        dot += x * y;
        ss += x * x;
        tt += y * y;
      }
    }
    smem[0][id] = dot;
    smem[1][id] = ss;
    smem[2][id] = tt;
    __syncthreads();
    for (int h = by / 2; h > 0; h /= 2) {  // by is a power of two
      if (int(threadIdx.y) < h) {
        smem[0][id] += smem[0][id + h * bx];
        smem[1][id] += smem[1][id + h * bx];
        smem[2][id] += smem[2][id + h * bx];
      }
      __syncthreads();
    }
    if (threadIdx.y == 0 && i < shape.inner) {
      const int64_t r = o * shape.inner + i;
      const CosineRow<A> c = cosine_row(smem[0][id], smem[1][id], smem[2][id], eps);
      distance[r] = A(1) - c.cos;
      row_stats[3 * r] = c.cos;
      row_stats[3 * r + 1] = c.inv_s;
      row_stats[3 * r + 2] = c.inv_t;
    }
    __syncthreads();  // smem is rewritten for the next o
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_cols_kernel(const opmath_t<T>* __restrict__ grad, GradStrides g_st, const T* __restrict__ s,
                         RowsStrides s_st, const T* __restrict__ t, RowsStrides t_st,
                         const opmath_t<T>* __restrict__ row_stats, RowsShape shape, opmath_t<T> eps,
                         T* __restrict__ gs, T* __restrict__ gt) {
  using A = opmath_t<T>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= shape.inner) return;
  for (int64_t o = blockIdx.y; o < shape.outer; o += gridDim.y) {
    const int64_t r = o * shape.inner + i;
    const CosineRow<A> c{row_stats[3 * r], row_stats[3 * r + 1], row_stats[3 * r + 2]};
    const GradCoefs<A> k = cosine_grad_coefs(grad[o * g_st.outer + i * g_st.inner], c, eps);
    const T* sp = s + o * s_st.outer + i;
    const T* tp = t + o * t_st.outer + i;
    const int64_t out = o * shape.size * shape.inner + i;  // outputs are contiguous (outer, D, inner)
    for (int64_t d = threadIdx.y; d < shape.size; d += blockDim.y) {
      const A x = to_acc(sp[d * s_st.size]), y = to_acc(tp[d * t_st.size]);
      gs[out + d * shape.inner] = from_acc<T>(k.a * y + k.b * x);
      if (gt != nullptr) gt[out + d * shape.inner] = from_acc<T>(k.a * x + k.c * y);
    }
  }
}

// Block (bx, by): bx = the smallest power of two >= inner, at most 32; by = kThreads / bx.
// Grid: x over inner (checked against the 2^31 - 1 limit), y over outer (grid-stride past 65535).
bool cols_launch_shape(const RowsShape& shape, dim3& grid, dim3& block) {
  int bx = 1;
  while (bx < 32 && bx < shape.inner) bx *= 2;
  const int64_t gx = (shape.inner + bx - 1) / bx;
  if (gx > INT_MAX) return false;
  block = dim3(unsigned(bx), unsigned(kThreads / bx));
  grid = dim3(unsigned(gx), unsigned(std::min<int64_t>(shape.outer, 65535)));
  return true;
}

// Rows of `p` (row stride `row_stride`) can be read in 16-byte packs of VEC elements.
template <int VEC>
bool packable(const void* p, int64_t row_stride, const RowsShape& shape) {
  return shape.size % VEC == 0 && aligned16(p) && (shape.outer == 1 || row_stride % VEC == 0);
}

}  // namespace

template <typename T>
cudaError_t cosine_distance_forward(const T* student, RowsStrides student_strides, const T* teacher,
                                    RowsStrides teacher_strides, RowsShape shape, double eps,
                                    opmath_t<T>* distance, opmath_t<T>* row_stats, cudaStream_t stream) {
  using A = opmath_t<T>;
  if (shape.outer == 0 || shape.inner == 0) return cudaSuccess;
  if (shape.inner > 1) {
    dim3 grid, block;
    if (!cols_launch_shape(shape, grid, block)) return cudaErrorInvalidConfiguration;
    forward_cols_kernel<T><<<grid, block, 0, stream>>>(student, student_strides, teacher, teacher_strides, shape,
                                                       A(eps), distance, row_stats);
    return cudaGetLastError();
  }
  int sms = 0;
  if (cudaError_t err = current_sm_count(&sms); err != cudaSuccess) return err;
  constexpr int V = pack_width<T>();
  const bool packed = packable<V>(student, student_strides.outer, shape) &&
                      packable<V>(teacher, teacher_strides.outer, shape);
  const int w = pick_warps_per_row(shape.outer, packed ? shape.size / V : shape.size, sms);
  const unsigned blocks = row_blocks(shape.outer, w, sms);
  if (packed) {
    forward_rows_kernel<T, V><<<blocks, kThreads, 0, stream>>>(student, student_strides.outer, teacher,
                                                               teacher_strides.outer, shape.outer, shape.size, A(eps),
                                                               distance, row_stats, w);
  } else {
    forward_rows_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(student, student_strides.outer, teacher,
                                                               teacher_strides.outer, shape.outer, shape.size, A(eps),
                                                               distance, row_stats, w);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t cosine_distance_backward(const opmath_t<T>* grad_distance, GradStrides grad_strides, const T* student,
                                     RowsStrides student_strides, const T* teacher, RowsStrides teacher_strides,
                                     const opmath_t<T>* row_stats, RowsShape shape, double eps, T* grad_student,
                                     T* grad_teacher, cudaStream_t stream) {
  using A = opmath_t<T>;
  if (shape.outer == 0 || shape.inner == 0 || shape.size == 0) return cudaSuccess;
  if (shape.inner > 1) {
    dim3 grid, block;
    if (!cols_launch_shape(shape, grid, block)) return cudaErrorInvalidConfiguration;
    backward_cols_kernel<T><<<grid, block, 0, stream>>>(grad_distance, grad_strides, student, student_strides, teacher,
                                                        teacher_strides, row_stats, shape, A(eps), grad_student,
                                                        grad_teacher);
    return cudaGetLastError();
  }
  int sms = 0;
  if (cudaError_t err = current_sm_count(&sms); err != cudaSuccess) return err;
  constexpr int V = pack_width<T>();
  const bool packed = packable<V>(student, student_strides.outer, shape) &&
                      packable<V>(teacher, teacher_strides.outer, shape) &&
                      packable<V>(grad_student, shape.size, shape) &&
                      (grad_teacher == nullptr || packable<V>(grad_teacher, shape.size, shape));
  const int w = pick_warps_per_row(shape.outer, packed ? shape.size / V : shape.size, sms);
  const unsigned blocks = row_blocks(shape.outer, w, sms);
  if (packed) {
    backward_rows_kernel<T, V><<<blocks, kThreads, 0, stream>>>(
        grad_distance, grad_strides.outer, student, student_strides.outer, teacher, teacher_strides.outer, row_stats,
        shape.outer, shape.size, A(eps), grad_student, grad_teacher, w);
  } else {
    backward_rows_kernel<T, 1><<<blocks, kThreads, 0, stream>>>(
        grad_distance, grad_strides.outer, student, student_strides.outer, teacher, teacher_strides.outer, row_stats,
        shape.outer, shape.size, A(eps), grad_student, grad_teacher, w);
  }
  return cudaGetLastError();
}

#define PYCOSDIST_INSTANTIATE(T)                                                                                \
  template cudaError_t cosine_distance_forward<T>(const T*, RowsStrides, const T*, RowsStrides, RowsShape,     \
                                                  double, opmath_t<T>*, opmath_t<T>*, cudaStream_t);            \
  template cudaError_t cosine_distance_backward<T>(const opmath_t<T>*, GradStrides, const T*, RowsStrides,     \
                                                   const T*, RowsStrides, const opmath_t<T>*, RowsShape, double, \
                                                   T*, T*, cudaStream_t);
PYCOSDIST_INSTANTIATE(float)
PYCOSDIST_INSTANTIATE(double)
PYCOSDIST_INSTANTIATE(__half)
PYCOSDIST_INSTANTIATE(__nv_bfloat16)
#undef PYCOSDIST_INSTANTIATE

}  // namespace pycosdist::cuda
