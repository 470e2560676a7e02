// Device building blocks of the row kernels (cosine distance, fused LIB + cosine loss):
// fp32/fp64 accumulation, 16-byte packed loads, row-group reductions, launch heuristics.
// Torch-free; nvcc only.
//
// Row kernels use blocks of kThreads threads split into groups of `group_threads` threads
// (a power of two, 1 to kThreads), one row per group: a sub-warp group for short rows (every
// lane keeps a pack: fp32 D=64 takes 16 lanes), a warp for the usual D of a latent (a few
// hundred), several warps when rows are few (fill the GPU) or very long (shorter loops).
//
// Each row is read in three parts so that one misaligned row does not cost the whole tensor
// its packed loads: a scalar head up to the first 16-byte boundary, a body of VEC-element
// packs, a scalar tail. Student and teacher rows must reach that boundary after the same number
// of elements (they do for rows of equal strides); a row where they do not is read scalar.
// Gradient outputs in another phase than their inputs are stored element by element.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common/cuda_types.h"

namespace pycosdist::cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
// Resident blocks per SM the row kernels ask ptxas for (__launch_bounds__): at most 64 registers
// a thread. Without it, nvcc 13 caps the fused forward + gradient kernels at 48 registers and
// spills; half occupancy with 16-byte loads in flight is plenty for a streaming kernel.
constexpr int kRowMinBlocks = 4;

// Elements per 16-byte memory instruction.
template <typename T> __host__ __device__ constexpr int pack_width() { return 16 / int(sizeof(T)); }

// VEC consecutive elements, loaded / stored by one instruction (VEC * sizeof(T) <= 16 bytes).
template <typename T, int VEC> struct alignas(sizeof(T) * VEC) Pack { T v[VEC]; };

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// from_acc<T>(x): x rounded to T (once, from the fp32 / fp64 value: no intermediate rounding).
template <typename T> __device__ __forceinline__ T from_acc(opmath_t<T> x) { return x; }
template <> __device__ __forceinline__ __half from_acc<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Sums a, b, c over each row group of group_threads threads; every thread of the group gets
// the sums. All threads of the block must call it: groups of more than a warp sync the block.
template <typename A>
__device__ __forceinline__ void group_sum3(A& a, A& b, A& c, int group_threads, A* smem /* [3 * kWarps] */) {
  // Lanes xor off < group_threads stay inside a sub-warp group; the whole warp takes part.
  for (int off = min(group_threads, 32) / 2; off > 0; off >>= 1) {
    a += __shfl_xor_sync(0xffffffffu, a, off);
    b += __shfl_xor_sync(0xffffffffu, b, off);
    c += __shfl_xor_sync(0xffffffffu, c, off);
  }
  if (group_threads <= 32) return;
  const int warps_per_row = group_threads / 32;
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

// Elements of x before its first (VEC * sizeof(X))-byte boundary.
template <int VEC, typename X>
__device__ __forceinline__ int head_elems(const X* x) {
  constexpr std::uintptr_t bytes = std::uintptr_t(VEC) * sizeof(X);
  const std::uintptr_t a = reinterpret_cast<std::uintptr_t>(x);
  return int(((bytes - a % bytes) % bytes) / sizeof(X));
}

// One row of D elements: [0, head) scalar, then `packs` packs of VEC, then a scalar tail.
struct RowSpan { int64_t head, packs; };

// The split of a row whose inputs are s and t.
template <int VEC, typename S, typename T>
__device__ __forceinline__ RowSpan row_span(const S* s, const T* t, int64_t D) {
  if (VEC == 1) return {0, D};
  const int h = head_elems<VEC>(s);
  if (head_elems<VEC>(t) != h || h >= D) return {D, 0};  // all scalar
  return {h, (D - h) / VEC};
}

// This thread's share of <s, t>, |s|^2, |t|^2 over one unit-stride row split by `sp`:
// lane, lane + nthreads, ... of the head, of the packs and of the tail.
template <int VEC, typename S, typename T, typename A>
__device__ __forceinline__ void row_partial_sums(const S* s, const T* t, RowSpan sp, int64_t D, int lane,
                                                 int nthreads, A& dot, A& ss, A& tt) {
  auto add = [&](A x, A y) {
    dot += x * y;
    ss += x * x;
    tt += y * y;
  };
  for (int64_t k = lane; k < sp.head; k += nthreads) add(to_acc(s[k]), to_acc(t[k]));
  const S* sb = s + sp.head;
  const T* tb = t + sp.head;
#pragma unroll 4
  for (int64_t p = lane; p < sp.packs; p += nthreads) {
    const Pack<S, VEC> ps = *reinterpret_cast<const Pack<S, VEC>*>(sb + p * VEC);
    const Pack<T, VEC> pt = *reinterpret_cast<const Pack<T, VEC>*>(tb + p * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) add(to_acc(ps.v[j]), to_acc(pt.v[j]));
  }
  for (int64_t k = sp.head + sp.packs * VEC + lane; k < D; k += nthreads) add(to_acc(s[k]), to_acc(t[k]));
}

// Whether the outputs gs, gt (null: absent) of a row split by `sp` (from its inputs) can be
// stored in packs too: they reach a 16-byte boundary after the same sp.head elements.
template <int VEC, typename G>
__device__ __forceinline__ bool packed_outputs(RowSpan sp, const G* gs, const G* gt) {
  return (gs == nullptr || head_elems<VEC>(gs) == sp.head) && (gt == nullptr || head_elems<VEC>(gt) == sp.head);
}

// One unit-stride row (split by `sp`, from s and t: the same assignment as row_partial_sums) of
// gs = a t + b s (unless gs is null) and gt = a s + c t (unless gt is null). The loads follow sp;
// the stores are packs when packed_out (see packed_outputs), element by element otherwise (e.g.
// contiguous gradients of misaligned input rows). gs may alias s: each element is read before it
// is written by the same thread. Not unrolled: streaming needs no more loads in flight per warp,
// and unrolling makes ptxas spill the 16-bit packs on sm_90.
template <int VEC, typename S, typename T, typename G, typename A>
__device__ __forceinline__ void row_grads(const S* s, const T* t, G* gs, G* gt, RowSpan sp, bool packed_out,
                                          int64_t D, int lane, int nthreads, A a, A b, A c) {
  auto put = [&](int64_t k, A x, A y) {
    if (gs != nullptr) gs[k] = from_acc<G>(a * y + b * x);
    if (gt != nullptr) gt[k] = from_acc<G>(a * x + c * y);
  };
  for (int64_t k = lane; k < sp.head; k += nthreads) put(k, to_acc(s[k]), to_acc(t[k]));
  const int64_t h = sp.head;
#pragma unroll 1
  for (int64_t p = lane; p < sp.packs; p += nthreads) {
    const int64_t k = h + p * VEC;
    const Pack<S, VEC> ps = *reinterpret_cast<const Pack<S, VEC>*>(s + k);
    const Pack<T, VEC> pt = *reinterpret_cast<const Pack<T, VEC>*>(t + k);
    if (!packed_out) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) put(k + j, to_acc(ps.v[j]), to_acc(pt.v[j]));
      continue;
    }
    if (gs != nullptr) {
      Pack<G, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = from_acc<G>(a * to_acc(pt.v[j]) + b * to_acc(ps.v[j]));
      *reinterpret_cast<Pack<G, VEC>*>(gs + k) = out;
    }
    if (gt != nullptr) {
      Pack<G, VEC> out;
#pragma unroll
      for (int j = 0; j < VEC; ++j) out.v[j] = from_acc<G>(a * to_acc(ps.v[j]) + c * to_acc(pt.v[j]));
      *reinterpret_cast<Pack<G, VEC>*>(gt + k) = out;
    }
  }
  for (int64_t k = h + sp.packs * VEC + lane; k < D; k += nthreads) put(k, to_acc(s[k]), to_acc(t[k]));
}

// A row's cosine and inverse clamped norms (the op's row_stats).
template <typename A> struct CosineRow { A cos, inv_s, inv_t; };

// max(n, eps) exactly as std::max (the CPU kernel's): a NaN norm stays NaN.
template <typename A> __device__ __forceinline__ A clamp_norm(A n, A eps) { return n < eps ? eps : n; }

template <typename A>
__device__ __forceinline__ CosineRow<A> cosine_row(A dot, A ss, A tt, A eps) {
  const A inv_s = A(1) / clamp_norm(sqrt(ss), eps);
  const A inv_t = A(1) / clamp_norm(sqrt(tt), eps);
  return {dot * inv_s * inv_t, inv_s, inv_t};
}

// g * d(1 - cos)/ds = a t + b s and g * d(1 - cos)/dt = a s + c t. A row whose norm was
// clamped (1/max(|x|, eps) >= 1/eps, both computed in opmath as in the CPU kernel) gets no
// gradient through its norm, so a zero row gets a finite one.
template <typename A> struct GradCoefs { A a, b, c; };

template <typename A>
__device__ __forceinline__ GradCoefs<A> cosine_grad_coefs(A g, const CosineRow<A>& r, A eps) {
  const A inv_eps = A(1) / eps;
  return {-g * r.inv_s * r.inv_t, r.inv_s >= inv_eps ? A(0) : g * r.cos * r.inv_s * r.inv_s,
          r.inv_t >= inv_eps ? A(0) : g * r.cos * r.inv_t * r.inv_t};
}

// ---- host side: launch heuristics ----

// The current device's SM count, asked of the driver once per device (launch heuristics run on
// every call of every op).
inline cudaError_t current_sm_count(int* count) {
  constexpr int kMaxDevices = 64;
  static int cached[kMaxDevices] = {};  // 0: not asked yet; a benign race writes the same value
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  if (device < kMaxDevices && cached[device] > 0) {
    *count = cached[device];
    return cudaSuccess;
  }
  err = cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
  if (err == cudaSuccess && device < kMaxDevices) cached[device] = *count;
  return err;
}

// Threads per row group (a power of two, 1 to kThreads): the smallest that gives every lane of
// a warp-or-smaller group a pack, then more while each thread keeps at least one pack and either
// the rows cannot fill the GPU (2048 resident threads per SM) or a thread would loop over more
// than 64 packs.
inline int pick_group_threads(int64_t rows, int64_t D, int vec, int sm_count) {
  const int64_t packs = (D + vec - 1) / vec;
  const int64_t resident = int64_t(sm_count) * 2048;
  int g = 1;
  while (g < 32 && g < packs) g *= 2;
  while (g < kThreads && packs > g && (rows * g < resident || packs > int64_t(64) * g)) g *= 2;
  return g;
}

// Blocks for a grid-stride loop over rows: enough for every row group, at most 32 per SM.
inline unsigned row_blocks(int64_t rows, int group_threads, int sm_count) {
  const int64_t rows_per_block = kThreads / group_threads;
  return unsigned(std::min<int64_t>((rows + rows_per_block - 1) / rows_per_block, int64_t(sm_count) * 32));
}

}  // namespace pycosdist::cuda
