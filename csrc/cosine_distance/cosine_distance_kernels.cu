// cosine_distance CUDA kernels: each input element is read once by the forward and once by
// the backward, or once in all by the forward with gradients (the mean / sum loss under
// autograd: the gradient pass re-reads the row the group has just reduced, from L1 / L2);
// accumulation in fp32 (fp64 for double).
//
// Two layouts (see cosine_distance_kernels.cuh):
//  - inner == 1 ("rows"): a group of threads per row (common/cuda_rows.cuh), 16-byte loads
//    for the aligned body of every row, shuffle reductions;
//  - inner > 1 ("cols"): a (bx, by, splits) grid of (bx, by) blocks; threads along x take
//    consecutive rows (o, i) so that a warp's loads along the unit-stride inner axis coalesce,
//    threads along y split D, reduced in shared memory. When (outer, inner) is too small to
//    fill the GPU (e.g. (70000, 3) with dim=0), D is also split over `splits` blocks along z,
//    whose partial sums a second kernel adds in a fixed order (deterministic).
#include <climits>

#include "common/cuda_rows.cuh"
#include "cosine_distance/cosine_distance_kernels.cuh"

namespace pycosdist::cuda {
namespace {

// ---------------------------------------------------------------- rows (inner == 1)

// distance (and row_stats unless null) of every row; with gs or gt, the gradients of
// grad_scale * sum(distance) in the same pass (outputs contiguous (rows, D)); kGrad: gs or gt
// is set (a separate instantiation keeps the plain forward's registers low).
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kThreads, kRowMinBlocks)
    rows_kernel(const T* __restrict__ s, int64_t s_row_stride, const T* __restrict__ t, int64_t t_row_stride,
                int64_t rows, int64_t D, opmath_t<T> eps, opmath_t<T>* __restrict__ distance,
                opmath_t<T>* __restrict__ row_stats, T* __restrict__ gs, T* __restrict__ gt, opmath_t<T> grad_scale,
                int group_threads) {
  using A = opmath_t<T>;
  constexpr int V = pack_width<T>();
  __shared__ A smem[3 * kWarps];
  const int rows_per_block = kThreads / group_threads;
  const int group = threadIdx.x / group_threads, lane = threadIdx.x % group_threads;
  // The loop bound is the same for the whole block: group_sum3 may synchronize it.
  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < rows;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = first + group;
    const T* sr = s + (r < rows ? r : 0) * s_row_stride;
    const T* tr = t + (r < rows ? r : 0) * t_row_stride;
    const RowSpan sp = row_span<V>(sr, tr, D);
    A dot = 0, ss = 0, tt = 0;
    if (r < rows) row_partial_sums<V>(sr, tr, sp, D, lane, group_threads, dot, ss, tt);
    group_sum3(dot, ss, tt, group_threads, smem);  // every lane of the group gets the sums
    if (r >= rows) continue;
    const CosineRow<A> c = cosine_row(dot, ss, tt, eps);
    if (lane == 0) {
      distance[r] = A(1) - c.cos;
      if (row_stats != nullptr) {
        row_stats[3 * r] = c.cos;
        row_stats[3 * r + 1] = c.inv_s;
        row_stats[3 * r + 2] = c.inv_t;
      }
    }
    if (kGrad) {
      const GradCoefs<A> k = cosine_grad_coefs(grad_scale, c, eps);
      T* gsr = gs != nullptr ? gs + r * D : nullptr;
      T* gtr = gt != nullptr ? gt + r * D : nullptr;
      row_grads<V>(sr, tr, gsr, gtr, sp, packed_outputs<V>(sp, gsr, gtr), D, lane, group_threads, k.a, k.b, k.c);
    }
  }
}

// The with-gradient forward for rows held in registers: every row aligned to 16 bytes with
// no head or tail (D % VEC == 0, aligned row starts, contiguous aligned outputs), and at most
// K packs per lane. Each element of student and teacher is loaded once, reduced, and the
// gradients are written from the registers: 3 * N * D elements of memory traffic, the least
// a one-pass loss can move (rows_kernel<T, true> re-reads each row from L1 / L2).
template <typename T, int K>
__global__ void __launch_bounds__(kThreads, 2)
    rows_grad_cached_kernel(const T* __restrict__ s, int64_t s_row_stride, const T* __restrict__ t,
                            int64_t t_row_stride, int64_t rows, int64_t D, opmath_t<T> eps,
                            opmath_t<T>* __restrict__ distance, T* __restrict__ gs, T* __restrict__ gt,
                            opmath_t<T> grad_scale, int group_threads) {
  using A = opmath_t<T>;
  constexpr int V = pack_width<T>();
  using P = Pack<T, V>;
  __shared__ A smem[3 * kWarps];
  const int rows_per_block = kThreads / group_threads;
  const int group = threadIdx.x / group_threads, lane = threadIdx.x % group_threads;
  const int64_t packs = D / V;
  for (int64_t first = int64_t(blockIdx.x) * rows_per_block; first < rows;
       first += int64_t(gridDim.x) * rows_per_block) {
    const int64_t r = first + group;
    P ps[K], pt[K];
    A dot = 0, ss = 0, tt = 0;
    if (r < rows) {
      const P* sr = reinterpret_cast<const P*>(s + r * s_row_stride);
      const P* tr = reinterpret_cast<const P*>(t + r * t_row_stride);
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const int64_t p = lane + int64_t(j) * group_threads;
        if (p < packs) {
          ps[j] = sr[p];
          pt[j] = tr[p];
        }
      }
#pragma unroll
      for (int j = 0; j < K; ++j) {
        if (lane + int64_t(j) * group_threads < packs) {
#pragma unroll
          for (int v = 0; v < V; ++v) {
            const A x = to_acc(ps[j].v[v]), y = to_acc(pt[j].v[v]);
            dot += x * y;
            ss += x * x;
            tt += y * y;
          }
        }
      }
    }
    group_sum3(dot, ss, tt, group_threads, smem);
    if (r >= rows) continue;
    const CosineRow<A> c = cosine_row(dot, ss, tt, eps);
    if (lane == 0) distance[r] = A(1) - c.cos;
    const GradCoefs<A> k = cosine_grad_coefs(grad_scale, c, eps);
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int64_t p = lane + int64_t(j) * group_threads;
      if (p >= packs) continue;
      if (gs != nullptr) {
        P out;
#pragma unroll
        for (int v = 0; v < V; ++v) out.v[v] = from_acc<T>(k.a * to_acc(pt[j].v[v]) + k.b * to_acc(ps[j].v[v]));
        reinterpret_cast<P*>(gs + r * D)[p] = out;
      }
      if (gt != nullptr) {
        P out;
#pragma unroll
        for (int v = 0; v < V; ++v) out.v[v] = from_acc<T>(k.a * to_acc(ps[j].v[v]) + k.c * to_acc(pt[j].v[v]));
        reinterpret_cast<P*>(gt + r * D)[p] = out;
      }
    }
  }
}

// Whether every row of (rows, D) at p with `row_stride` starts on a 16-byte boundary.
template <typename T>
bool rows_aligned(const T* p, int64_t row_stride) {
  return p == nullptr || (reinterpret_cast<std::uintptr_t>(p) % 16 == 0 && (row_stride * sizeof(T)) % 16 == 0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads, kRowMinBlocks)
    backward_rows_kernel(const opmath_t<T>* __restrict__ grad, int64_t grad_stride, const T* __restrict__ s,
                         int64_t s_row_stride, const T* __restrict__ t, int64_t t_row_stride,
                         const opmath_t<T>* __restrict__ row_stats, int64_t rows, int64_t D, opmath_t<T> eps,
                         T* __restrict__ gs, T* __restrict__ gt, int group_threads) {
  using A = opmath_t<T>;
  constexpr int V = pack_width<T>();
  const int rows_per_block = kThreads / group_threads;
  const int group = threadIdx.x / group_threads, lane = threadIdx.x % group_threads;
  for (int64_t r = int64_t(blockIdx.x) * rows_per_block + group; r < rows; r += int64_t(gridDim.x) * rows_per_block) {
    const CosineRow<A> c{row_stats[3 * r], row_stats[3 * r + 1], row_stats[3 * r + 2]};
    const GradCoefs<A> k = cosine_grad_coefs(grad[r * grad_stride], c, eps);
    const T* sr = s + r * s_row_stride;
    const T* tr = t + r * t_row_stride;
    T* gsr = gs + r * D;
    T* gtr = gt != nullptr ? gt + r * D : nullptr;
    const RowSpan sp = row_span<V>(sr, tr, D);
    row_grads<V>(sr, tr, gsr, gtr, sp, packed_outputs<V>(sp, gsr, gtr), D, lane, group_threads, k.a, k.b, k.c);
  }
}

// ---------------------------------------------------------------- cols (inner > 1)

// Block (bx, by): bx = the smallest power of two >= inner, at most 32; by = kThreads / bx.
// Grid: x over inner (checked against the 2^31 - 1 limit), y over outer (grid-stride past
// 65535), z over `splits` stretches of split_len elements of D.
struct ColsPlan {
  dim3 grid, block;
  int64_t splits = 1, split_len = 0;
};

bool plan_cols(const RowsShape& shape, int sm_count, ColsPlan& p) {
  int bx = 1;
  while (bx < 32 && bx < shape.inner) bx *= 2;
  const int by = kThreads / bx;
  const int64_t gx = (shape.inner + bx - 1) / bx;
  if (gx > INT_MAX) return false;
  const int64_t gy = std::min<int64_t>(shape.outer, 65535);
  // Split D while the grid is under 4 blocks per SM, each thread keeping >= 16 elements per stretch.
  const int64_t blocks = gx * gy, target = int64_t(4) * sm_count;
  int64_t splits = 1;
  if (blocks < target) {
    splits = std::min<int64_t>({(target + blocks - 1) / blocks, shape.size / (16 * int64_t(by)), 65535});
    splits = std::max<int64_t>(splits, 1);
  }
  p.split_len = (shape.size + splits - 1) / splits;
  p.splits = p.split_len > 0 ? (shape.size + p.split_len - 1) / p.split_len : 1;  // no empty stretch
  p.block = dim3(unsigned(bx), unsigned(by));
  p.grid = dim3(unsigned(gx), unsigned(gy), unsigned(p.splits));
  return true;
}

// Sums over D (or over stretch blockIdx.z of it). Without `partial`: distance and row_stats
// (unless null) and, with gs or gt, the gradients of grad_scale * sum(distance) from a second
// walk over the same elements by the same threads. With `partial` (splits > 1): the stretch's
// three sums go to partial[(z * rows + r) * 3 + {0, 1, 2}].
template <typename T>
__global__ void __launch_bounds__(kThreads)
    forward_cols_kernel(const T* __restrict__ s, RowsStrides s_st, const T* __restrict__ t, RowsStrides t_st,
                        RowsShape shape, int64_t split_len, opmath_t<T> eps, opmath_t<T>* __restrict__ distance,
                        opmath_t<T>* __restrict__ row_stats, opmath_t<T>* __restrict__ partial,
                        T* __restrict__ gs, T* __restrict__ gt, opmath_t<T> grad_scale) {
  using A = opmath_t<T>;
  __shared__ A smem[3][kThreads];
  const int bx = blockDim.x, by = blockDim.y, id = threadIdx.y * bx + threadIdx.x;
  const int64_t i = int64_t(blockIdx.x) * bx + threadIdx.x;
  const int64_t d0 = int64_t(blockIdx.z) * split_len, d1 = d0 + split_len < shape.size ? d0 + split_len : shape.size;
  const int64_t rows = shape.outer * shape.inner;
  for (int64_t o = blockIdx.y; o < shape.outer; o += gridDim.y) {  // same bound for the whole block
    const T* sp = s + o * s_st.outer + i;
    const T* tp = t + o * t_st.outer + i;
    A dot = 0, ss = 0, tt = 0;
    if (i < shape.inner) {
      for (int64_t k = d0 + threadIdx.y; k < d1; k += by) {
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
    const int64_t r = o * shape.inner + i;
    if (i < shape.inner) {
      const int col = threadIdx.x;  // row y = 0 of smem holds the totals of column col
      if (partial != nullptr) {
        if (threadIdx.y == 0) {
          A* out = partial + (int64_t(blockIdx.z) * rows + r) * 3;
          out[0] = smem[0][col], out[1] = smem[1][col], out[2] = smem[2][col];
        }
      } else {
        const CosineRow<A> c = cosine_row(smem[0][col], smem[1][col], smem[2][col], eps);
        if (threadIdx.y == 0) {
          distance[r] = A(1) - c.cos;
          if (row_stats != nullptr) {
            row_stats[3 * r] = c.cos;
            row_stats[3 * r + 1] = c.inv_s;
            row_stats[3 * r + 2] = c.inv_t;
          }
        }
        if (gs != nullptr || gt != nullptr) {
          const GradCoefs<A> k = cosine_grad_coefs(grad_scale, c, eps);
          const int64_t out = o * shape.size * shape.inner + i;  // outputs are contiguous (outer, D, inner)
          for (int64_t d = threadIdx.y; d < shape.size; d += by) {
            const A x = to_acc(sp[d * s_st.size]), y = to_acc(tp[d * t_st.size]);
            if (gs != nullptr) gs[out + d * shape.inner] = from_acc<T>(k.a * y + k.b * x);
            if (gt != nullptr) gt[out + d * shape.inner] = from_acc<T>(k.a * x + k.c * y);
          }
        }
      }
    }
    __syncthreads();  // smem is rewritten for the next o
  }
}

// Adds the `splits` partial sums of every row in stretch order, then distance and row_stats.
template <typename A>
__global__ void __launch_bounds__(kThreads)
    finish_split_kernel(const A* __restrict__ partial, int64_t splits, int64_t rows, A eps, A* __restrict__ distance,
                        A* __restrict__ row_stats) {
  for (int64_t r = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; r < rows; r += int64_t(gridDim.x) * blockDim.x) {
    A dot = 0, ss = 0, tt = 0;
    for (int64_t z = 0; z < splits; ++z) {
      const A* p = partial + (z * rows + r) * 3;
      dot += p[0], ss += p[1], tt += p[2];
    }
    const CosineRow<A> c = cosine_row(dot, ss, tt, eps);
    distance[r] = A(1) - c.cos;
    row_stats[3 * r] = c.cos;
    row_stats[3 * r + 1] = c.inv_s;
    row_stats[3 * r + 2] = c.inv_t;
  }
}

// Gradients from row_stats: g_r = grad[o * g_st.outer + i * g_st.inner], or grad_scale when
// grad is null. gs and gt may each be null.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    backward_cols_kernel(const opmath_t<T>* __restrict__ grad, GradStrides g_st, opmath_t<T> grad_scale,
                         const T* __restrict__ s, RowsStrides s_st, const T* __restrict__ t, RowsStrides t_st,
                         const opmath_t<T>* __restrict__ row_stats, RowsShape shape, opmath_t<T> eps,
                         T* __restrict__ gs, T* __restrict__ gt) {
  using A = opmath_t<T>;
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= shape.inner) return;
  for (int64_t o = blockIdx.y; o < shape.outer; o += gridDim.y) {
    const int64_t r = o * shape.inner + i;
    const CosineRow<A> c{row_stats[3 * r], row_stats[3 * r + 1], row_stats[3 * r + 2]};
    const A g = grad != nullptr ? grad[o * g_st.outer + i * g_st.inner] : grad_scale;
    const GradCoefs<A> k = cosine_grad_coefs(g, c, eps);
    const T* sp = s + o * s_st.outer + i;
    const T* tp = t + o * t_st.outer + i;
    const int64_t out = o * shape.size * shape.inner + i;  // outputs are contiguous (outer, D, inner)
    for (int64_t d = int64_t(blockIdx.z) * blockDim.y + threadIdx.y; d < shape.size;
         d += int64_t(gridDim.z) * blockDim.y) {
      const A x = to_acc(sp[d * s_st.size]), y = to_acc(tp[d * t_st.size]);
      if (gs != nullptr) gs[out + d * shape.inner] = from_acc<T>(k.a * y + k.b * x);
      if (gt != nullptr) gt[out + d * shape.inner] = from_acc<T>(k.a * x + k.c * y);
    }
  }
}

// ---------------------------------------------------------------- launches

template <typename T>
cudaError_t launch_rows(const T* s, int64_t s_stride, const T* t, int64_t t_stride, const RowsShape& shape, double eps,
                        opmath_t<T>* distance, opmath_t<T>* row_stats, T* gs, T* gt, double grad_scale,
                        cudaStream_t stream) {
  using A = opmath_t<T>;
  int sms = 0;
  if (cudaError_t err = current_sm_count(&sms); err != cudaSuccess) return err;
  const int g = pick_group_threads(shape.outer, shape.size, pack_width<T>(), sms);
  const unsigned blocks = row_blocks(shape.outer, g, sms);
  const int64_t packs_per_lane = (shape.size / pack_width<T>() + g - 1) / g;
  const bool cacheable = (gs != nullptr || gt != nullptr) && row_stats == nullptr &&
                         shape.size % pack_width<T>() == 0 && rows_aligned(s, s_stride) &&
                         rows_aligned(t, t_stride) && rows_aligned(gs, shape.size) && rows_aligned(gt, shape.size);
  if (cacheable && packs_per_lane <= 4) {
    rows_grad_cached_kernel<T, 4><<<blocks, kThreads, 0, stream>>>(s, s_stride, t, t_stride, shape.outer, shape.size,
                                                                    A(eps), distance, gs, gt, A(grad_scale), g);
    return cudaGetLastError();
  }
  if constexpr (sizeof(T) >= 4) {  // not instantiated for 16-bit types: 8 of their packs spill on sm_90
    if (cacheable && packs_per_lane <= 8) {
      rows_grad_cached_kernel<T, 8><<<blocks, kThreads, 0, stream>>>(s, s_stride, t, t_stride, shape.outer,
                                                                      shape.size, A(eps), distance, gs, gt,
                                                                      A(grad_scale), g);
      return cudaGetLastError();
    }
  }
  if (gs != nullptr || gt != nullptr) {
    rows_kernel<T, true><<<blocks, kThreads, 0, stream>>>(s, s_stride, t, t_stride, shape.outer, shape.size, A(eps),
                                                          distance, row_stats, gs, gt, A(grad_scale), g);
  } else {
    rows_kernel<T, false><<<blocks, kThreads, 0, stream>>>(s, s_stride, t, t_stride, shape.outer, shape.size, A(eps),
                                                           distance, row_stats, gs, gt, A(grad_scale), g);
  }
  return cudaGetLastError();
}

// The column forward: one kernel, or with D split, the partial sums, their fixed-order sum,
// and (with gs or gt) the gradient kernel reading the row stats. row_stats may be null only
// when the plan has a single stretch (the with-grad op then keeps them in the workspace).
template <typename T>
cudaError_t launch_cols(const T* s, RowsStrides s_st, const T* t, RowsStrides t_st, const RowsShape& shape,
                        double eps, opmath_t<T>* distance, opmath_t<T>* row_stats, opmath_t<T>* workspace, T* gs,
                        T* gt, double grad_scale, cudaStream_t stream) {
  using A = opmath_t<T>;
  int sms = 0;
  if (cudaError_t err = current_sm_count(&sms); err != cudaSuccess) return err;
  ColsPlan p;
  if (!plan_cols(shape, sms, p)) return cudaErrorInvalidConfiguration;
  if (p.splits == 1) {
    forward_cols_kernel<T><<<p.grid, p.block, 0, stream>>>(s, s_st, t, t_st, shape, p.split_len, A(eps), distance,
                                                           row_stats, nullptr, gs, gt, A(grad_scale));
    return cudaGetLastError();
  }
  if (workspace == nullptr) return cudaErrorInvalidValue;
  const int64_t rows = shape.outer * shape.inner;
  A* stats = row_stats != nullptr ? row_stats : workspace + p.splits * rows * 3;
  forward_cols_kernel<T><<<p.grid, p.block, 0, stream>>>(s, s_st, t, t_st, shape, p.split_len, A(eps), nullptr,
                                                         nullptr, workspace, nullptr, nullptr, A(0));
  const unsigned blocks = unsigned(std::min<int64_t>((rows + kThreads - 1) / kThreads, int64_t(sms) * 32));
  finish_split_kernel<A><<<blocks, kThreads, 0, stream>>>(workspace, p.splits, rows, A(eps), distance, stats);
  if (gs != nullptr || gt != nullptr) {
    backward_cols_kernel<T><<<p.grid, p.block, 0, stream>>>(nullptr, GradStrides{0, 0}, A(grad_scale), s, s_st, t,
                                                            t_st, stats, shape, A(eps), gs, gt);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t cosine_distance_workspace(RowsShape shape, int64_t* elems) {
  *elems = 0;
  if (shape.outer == 0 || shape.inner <= 1) return cudaSuccess;
  int sms = 0;
  if (cudaError_t err = current_sm_count(&sms); err != cudaSuccess) return err;
  ColsPlan p;
  if (!plan_cols(shape, sms, p)) return cudaErrorInvalidConfiguration;
  // Partial sums of every stretch, and the row stats of the with-grad op.
  if (p.splits > 1) *elems = (p.splits + 1) * shape.outer * shape.inner * 3;
  return cudaSuccess;
}

template <typename T>
cudaError_t cosine_distance_forward(const T* student, RowsStrides student_strides, const T* teacher,
                                    RowsStrides teacher_strides, RowsShape shape, double eps,
                                    opmath_t<T>* distance, opmath_t<T>* row_stats, opmath_t<T>* workspace,
                                    cudaStream_t stream) {
  if (shape.outer == 0 || shape.inner == 0) return cudaSuccess;
  if (shape.inner > 1) {
    return launch_cols<T>(student, student_strides, teacher, teacher_strides, shape, eps, distance, row_stats,
                          workspace, nullptr, nullptr, 0.0, stream);
  }
  return launch_rows<T>(student, student_strides.outer, teacher, teacher_strides.outer, shape, eps, distance,
                        row_stats, nullptr, nullptr, 0.0, stream);
}

template <typename T>
cudaError_t cosine_distance_forward_with_grad(const T* student, RowsStrides student_strides, const T* teacher,
                                              RowsStrides teacher_strides, RowsShape shape, double eps,
                                              double grad_scale, opmath_t<T>* distance, T* grad_student,
                                              T* grad_teacher, opmath_t<T>* workspace, cudaStream_t stream) {
  if (shape.outer == 0 || shape.inner == 0) return cudaSuccess;
  if (shape.size == 0) grad_student = grad_teacher = nullptr;  // nothing to write
  if (shape.inner > 1) {
    return launch_cols<T>(student, student_strides, teacher, teacher_strides, shape, eps, distance, nullptr,
                          workspace, grad_student, grad_teacher, grad_scale, stream);
  }
  return launch_rows<T>(student, student_strides.outer, teacher, teacher_strides.outer, shape, eps, distance, nullptr,
                        grad_student, grad_teacher, grad_scale, stream);
}

template <typename T>
cudaError_t cosine_distance_backward(const opmath_t<T>* grad_distance, GradStrides grad_strides, const T* student,
                                     RowsStrides student_strides, const T* teacher, RowsStrides teacher_strides,
                                     const opmath_t<T>* row_stats, RowsShape shape, double eps, T* grad_student,
                                     T* grad_teacher, cudaStream_t stream) {
  using A = opmath_t<T>;
  if (shape.outer == 0 || shape.inner == 0 || shape.size == 0) return cudaSuccess;
  int sms = 0;
  if (cudaError_t err = current_sm_count(&sms); err != cudaSuccess) return err;
  if (shape.inner > 1) {
    ColsPlan p;
    if (!plan_cols(shape, sms, p)) return cudaErrorInvalidConfiguration;
    backward_cols_kernel<T><<<p.grid, p.block, 0, stream>>>(grad_distance, grad_strides, A(1), student,
                                                            student_strides, teacher, teacher_strides, row_stats,
                                                            shape, A(eps), grad_student, grad_teacher);
    return cudaGetLastError();
  }
  const int g = pick_group_threads(shape.outer, shape.size, pack_width<T>(), sms);
  backward_rows_kernel<T><<<row_blocks(shape.outer, g, sms), kThreads, 0, stream>>>(
      grad_distance, grad_strides.outer, student, student_strides.outer, teacher, teacher_strides.outer, row_stats,
      shape.outer, shape.size, A(eps), grad_student, grad_teacher, g);
  return cudaGetLastError();
}

#define PYCOSDIST_INSTANTIATE(T)                                                                                    \
  template cudaError_t cosine_distance_forward<T>(const T*, RowsStrides, const T*, RowsStrides, RowsShape,         \
                                                  double, opmath_t<T>*, opmath_t<T>*, opmath_t<T>*, cudaStream_t);  \
  template cudaError_t cosine_distance_forward_with_grad<T>(const T*, RowsStrides, const T*, RowsStrides,          \
                                                            RowsShape, double, double, opmath_t<T>*, T*, T*,       \
                                                            opmath_t<T>*, cudaStream_t);                           \
  template cudaError_t cosine_distance_backward<T>(const opmath_t<T>*, GradStrides, const T*, RowsStrides,         \
                                                   const T*, RowsStrides, const opmath_t<T>*, RowsShape, double,   \
                                                   T*, T*, cudaStream_t);
PYCOSDIST_INSTANTIATE(float)
PYCOSDIST_INSTANTIATE(double)
PYCOSDIST_INSTANTIATE(__half)
PYCOSDIST_INSTANTIATE(__nv_bfloat16)
#undef PYCOSDIST_INSTANTIATE

}  // namespace pycosdist::cuda
