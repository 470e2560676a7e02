// Host emulation for scripts/cuda_emulation/run.sh (no GPU needed; slow: a std::thread per CUDA thread).
// Host emulation of the few CUDA device features the kernels use: one std::thread per CUDA thread,
// blocks run one after another, __syncthreads = block barrier, __shfl_xor_sync via per-warp slots.
#pragma once
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <algorithm>
#include <array>
#include <barrier>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>
#undef __shared__
#define __shared__ static
#undef __global__
#define __global__
#define __launch_bounds__(...)
namespace emu {
inline thread_local dim3 tid, bid;
inline dim3 gdim, bdim;
inline int sms = 2;
inline std::unique_ptr<std::barrier<>> block_bar;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
inline std::vector<std::array<double, 32>> slots;
inline long launches = 0;
template <typename F, typename... Args>
void launch(dim3 g, dim3 b, F f, Args... args) {
  ++launches;
  gdim = g; bdim = b;
  const int n = b.x * b.y * b.z;
  for (unsigned z = 0; z < g.z; ++z) for (unsigned y = 0; y < g.y; ++y) for (unsigned x = 0; x < g.x; ++x) {
    block_bar = std::make_unique<std::barrier<>>(n);
    const int warps = (n + 31) / 32;
    warp_bar.clear();
    for (int w = 0; w < warps; ++w) warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32, n - 32 * w)));
    slots.assign(warps, {});
    std::vector<std::thread> ts;
    for (int t = 0; t < n; ++t) {
      ts.emplace_back([=] {
        tid = dim3(t % b.x, (t / b.x) % b.y, t / (b.x * b.y));
        bid = dim3(x, y, z);
        f(args...);
        block_bar->arrive_and_drop();
        warp_bar[t / 32]->arrive_and_drop();
      });
    }
    for (auto& th : ts) th.join();
  }
}
inline int linear() { return tid.x + bdim.x * (tid.y + bdim.y * tid.z); }
}  // namespace emu
#define threadIdx emu::tid
#define blockIdx emu::bid
#define gridDim emu::gdim
#define blockDim emu::bdim
inline void __syncthreads() { emu::block_bar->arrive_and_wait(); }
template <typename V> V __shfl_xor_sync(unsigned, V v, int off) {
  const int t = emu::linear(), w = t / 32, lane = t % 32;
  emu::slots[w][lane] = double(v);
  emu::warp_bar[w]->arrive_and_wait();
  const V r = V(emu::slots[w][lane ^ off]);
  emu::warp_bar[w]->arrive_and_wait();
  return r;
}
#include <cmath>
using std::sqrt;
using std::min;
using std::max;
#define cudaGetDevice(p) (*(p) = 0, cudaSuccess)
#define cudaDeviceGetAttribute(c, a, d) (*(c) = emu::sms, cudaSuccess)
#define cudaGetLastError() cudaSuccess
