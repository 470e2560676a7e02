// scale_grad_ CUDA kernel: the one-pass losses' backward scales a gradient computed in the
// forward by the upstream scalar, which is usually exactly 1 (loss.backward()). The scalar is
// on the device; reading it there skips the pass without a host synchronization.
#include "common/cuda_rows.cuh"
#include "scale_grad/scale_grad_kernels.cuh"

namespace pycosdist::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kThreads) scale_kernel(T* __restrict__ x, int64_t n, const opmath_t<T>* factor) {
  using A = opmath_t<T>;
  constexpr int V = pack_width<T>();
  const A f = *factor;
  if (f == A(1)) return;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t head = head_elems<V>(x) < n ? head_elems<V>(x) : n;
  const int64_t packs = (n - head) / V;
  if (first < head) x[first] = from_acc<T>(to_acc(x[first]) * f);
  T* body = x + head;
  for (int64_t p = first; p < packs; p += stride) {
    Pack<T, V> v = reinterpret_cast<Pack<T, V>*>(body)[p];
#pragma unroll
    for (int j = 0; j < V; ++j) v.v[j] = from_acc<T>(to_acc(v.v[j]) * f);
    reinterpret_cast<Pack<T, V>*>(body)[p] = v;
  }
  for (int64_t k = head + packs * V + first; k < n; k += stride) x[k] = from_acc<T>(to_acc(x[k]) * f);
}

}  // namespace

template <typename T>
cudaError_t scale_unless_one(T* x, int64_t n, const opmath_t<T>* factor, cudaStream_t stream) {
  if (n == 0) return cudaSuccess;
  int sms = 0;
  if (cudaError_t err = current_sm_count(&sms); err != cudaSuccess) return err;
  const int64_t packs = (n + pack_width<T>() - 1) / pack_width<T>();
  const unsigned blocks = unsigned(std::min<int64_t>((packs + kThreads - 1) / kThreads, int64_t(sms) * 8));
  scale_kernel<T><<<blocks, kThreads, 0, stream>>>(x, n, factor);
  return cudaGetLastError();
}

template cudaError_t scale_unless_one<float>(float*, int64_t, const float*, cudaStream_t);
template cudaError_t scale_unless_one<double>(double*, int64_t, const double*, cudaStream_t);
template cudaError_t scale_unless_one<__half>(__half*, int64_t, const float*, cudaStream_t);
template cudaError_t scale_unless_one<__nv_bfloat16>(__nv_bfloat16*, int64_t, const float*, cudaStream_t);

}  // namespace pycosdist::cuda
