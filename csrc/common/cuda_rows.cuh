// Device building blocks of the row kernels (cosine distance, fused LIB + cosine loss):
// fp32/fp64 accumulation, 16-byte packed loads, row-group reductions, launch heuristics.
// Torch-free; nvcc only.
//
// Row kernels use blocks of kThreads threads split into groups of `warps_per_row` warps,
// one row per group: a warp per row for the usual D of a latent (a few hundred), more
// warps when rows are few (fill the GPU) or very long (shorter serial loops).
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/cuda_types.h"

namespace pycosdist::cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// Elements per 16-byte memory instruction.
template <typename T> constexpr int pack_width() { return 16 / int(sizeof(T)); }

// VEC consecutive elements, loaded / stored by one instruction (VEC * sizeof(T) <= 16 bytes).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// from_acc<T>(x): x rounded to T.
template <typename T> __device__ __forceinline__ T from_acc(opmath_t<T> x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sums a, b, c over each row group (warps_per_row warps); every thread of the group gets the
// sums. All threads of the block must call it: with warps_per_row > 1 it syncs the block.
template <typename A>
__device__ __forceinline__ void group_sum3(A& a, A& b, A& c, int warps_per_row, A* smem /* [3 * kWarps] */) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
    c += __shfl_xor_sync(0xffffffffu, c, off);
  }
  if (warps_per_row == 1) return;
  const int warp = threadIdx.x / 32;
  if (threadIdx.x % 32 == 0) {
    smem[warp] = a;
    smem[kWarps + warp] = b;
    smem[2 * kWarps + warp] = c;
  }
  __syncthreads();
  const int first = warp - warp % warps_per_row;
  a = b = c = A(0);
  for (int w = first; w < first + warps_per_row; ++w) {  // same order in every thread: identical sums
    a += smem[w];
    b += smem[kWarps + w];
    c += smem[2 * kWarps + w];
  }
  __syncthreads();  // smem is reused by the next row
}

// This thread's share of <s, t>, |s|^2, |t|^2 over one row with unit stride: packs
// lane, lane + nthreads, ... (VEC > 1 needs 16-byte aligned rows and D % VEC == 0).
template <int VEC, typename T, typename A>
__device__ __forceinline__ void row_partial_sums(const T* s, const T* t, int64_t D, int lane, int nthreads,
                                                 A& dot, A& ss, A& tt) {
#pragma unroll 4
  for (int64_t k = int64_t(lane) * VEC; k < D; k += int64_t(nthreads) * VEC) {
    const Pack<T, VEC> ps = *reinterpret_cast<const Pack<T, VEC>*>(s + k);
    const Pack<T, VEC> pt = *reinterpret_cast<const Pack<T, VEC>*>(t + k);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const A x = to_acc(ps.v[j]), y = to_acc(pt.v[j]);
      dot += x * y;
      ss += x * x;
      tt += y * y;
    }
  }
}

// One row with unit stride of gs = a t + b s and, if gt, gt = a s + c t (same pack
// assignment as row_partial_sums). gs may alias s: each element is read before it is written
// by the same thread. Not unrolled: streaming needs no more loads in flight per warp, and
// unrolling makes ptxas spill the 16-bit packs on sm_90.
template <int VEC, typename T, typename A>
__device__ __forceinline__ void row_grads(const T* s, const T* t, T* gs, T* gt, int64_t D, int lane, int nthreads,
                                          A a, A b, A c) {
#pragma unroll 1
  for (int64_t k = int64_t(lane) * VEC; k < D; k += int64_t(nthreads) * VEC) {
    const Pack<T, VEC> ps = *reinterpret_cast<const Pack<T, VEC>*>(s + k);
    const Pack<T, VEC> pt = *reinterpret_cast<const Pack<T, VEC>*>(t + k);
    Pack<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) out.v[j] = from_acc<T>(a * to_acc(pt.v[j]) + b * to_acc(ps.v[j]));
    *reinterpret_cast<Pack<T, VEC>*>(gs + k) = out;
    if (gt != nullptr) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = from_acc<T>(a * to_acc(ps.v[j]) + c * to_acc(pt.v[j]));
      *reinterpret_cast<Pack<T, VEC>*>(gt + k) = out;
    }
  }
}

// A row's cosine and inverse clamped norms (the op's row_stats).
template <typename A> struct CosineRow { A cos, inv_s, inv_t; };

template <typename A>
__device__ __forceinline__ CosineRow<A> cosine_row(A dot, A ss, A tt, A eps) {
  const A ns = sqrt(ss), nt = sqrt(tt);
  // Written as clamp_min is: a NaN norm stays NaN.
  const A inv_s = A(1) / (ns < eps ? eps : ns);
  const A inv_t = A(1) / (nt < eps ? eps : nt);
  return {dot * inv_s * inv_t, inv_s, inv_t};
}

// g * d(1 - cos)/ds = a t + b s and g * d(1 - cos)/dt = a s + c t. A row whose norm was
// clamped (its 1/max(|x|, eps) equals 1/eps, computed the same way) gets no gradient
// through its norm, so a zero row gets a finite one.
template <typename A> struct GradCoefs { A a, b, c; };

template <typename A>
__device__ __forceinline__ GradCoefs<A> cosine_grad_coefs(A g, const CosineRow<A>& r, A eps) {
  const A inv_eps = A(1) / eps;
  return {-g * r.inv_s * r.inv_t, r.inv_s < inv_eps ? g * r.cos * r.inv_s * r.inv_s : A(0),
          r.inv_t < inv_eps ? g * r.cos * r.inv_t * r.inv_t : A(0)};
}

// ---- host side: launch heuristics ----

inline cudaError_t current_sm_count(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
}

inline bool aligned16(const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 16 == 0; }

// Warps per row (1, 2, 4 or 8): more only while each lane keeps at least one pack, and
// either the rows cannot fill the GPU (64 resident warps per SM) or a lane would loop over
// more than 64 packs.
inline int pick_warps_per_row(int64_t rows, int64_t packs_per_row, int sm_count) {
  const int64_t resident_warps = int64_t(sm_count) * 64;
  int w = 1;
  while (w < kWarps && packs_per_row > 32 * w && (rows * w < resident_warps || packs_per_row > 32 * 64 * w)) w *= 2;
  return w;
}

// Blocks for a grid-stride loop over rows: enough for every row group, at most 32 per SM.
inline unsigned row_blocks(int64_t rows, int warps_per_row, int sm_count) {
  const int64_t rows_per_block = kWarps / warps_per_row;
  return unsigned(std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, int64_t(sm_count) * 32));
}

}  // namespace pycosdist::cuda
