// CPU ops of the fused LIB + cosine distance (contract: csrc/ops.cpp).
//
// The LIB has no activation, so it is folded once per call (csrc/common/lib_fold.h):
// p = W s + b with W = W2 W1 (D_t, D_s), b = W2 b1 + b2, in the opmath dtype. The (N, E) hidden
// activation never exists, and the (N, D_t) projection only one row chunk at a time. Per chunk
// of c rows (s, t: its student / teacher rows):
//   p  = s W^T + b                (c, D_t)  GEMM into pbuf
//   d, dL/dp = cosine_rows(p, t)            one pass per row; dL/dp overwrites p
//   gW += dp^T s, gb += dp^T 1              GEMM / GEMV, accumulating
//   gs[rows] = dp W               (c, D_s)  GEMM into the output rows
// 3 GEMMs of N * D_s * D_t multiply-adds each, about e times fewer FLOPs than the 6 unfolded
// ones (D_t ~ E); the factor gradients then follow from gW, gb by the chain rule
// (lib_fold::unfold_grads: D_s * E * D_t-sized GEMMs, independent of N). For 'mean' / 'sum' the
// gradients of grad_scale * sum(d) come out of the forward and the autograd Function only scales
// them by the upstream scalar; the backward op (reduction='none') recomputes each chunk with
// per-row upstream gradients. Chunks run in parallel, one thread each, every GEMM
// single-threaded (see run_chunks). Half types run everything in float32 ("opmath"): folded
// weights, rows per chunk, accumulators.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "common/lib_fold.h"
#include "lib_cosine_loss/lib_cosine_loss_checks.h"

namespace pycosdist::lib_cosine_loss {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Automatic chunk: a thread's opmath projection rows take about this much (its share of L2), so
// they stay cache-resident between the GEMM that writes them and the ones that read them, while
// the GEMMs stay large enough (hundreds of rows) to run at full speed; and at least a few chunks
// per thread, so that every thread gets about the same work.
constexpr int64_t kChunkBytes = 2 << 20;
constexpr int64_t kMinChunksPerThread = 4;

int64_t chunk_rows(int64_t requested, int64_t n, const lib_projection::Dims& d, int64_t elem_size) {
  int64_t rows = requested;
  if (rows <= 0) {
    rows = kChunkBytes / (std::max<int64_t>(d.d_t, 1) * elem_size);
    rows = std::min(rows, n / (kMinChunksPerThread * at::get_num_threads()));
    rows = std::max<int64_t>(32, rows / 32 * 32);
  }
  return std::max<int64_t>(1, std::min(rows, n));
}

// One row in double: d = 1 - cos(p, t) and, with `grad`, p <- dL/dp for L = g * d. The rescue of
// float32 rows whose sums of squares overflow (entries above ~1e19) or lose precision to
// underflow (entries below ~1e-15): the same values as float64 inputs give.
template <typename T>
T cosine_row_wide(T* p, const T* t, int64_t D, double eps, double g, bool grad) {
  double pt = 0, pp = 0, tt = 0;
  for (int64_t j = 0; j < D; ++j) {
    pt += double(p[j]) * t[j];
    pp += double(p[j]) * p[j];
    tt += double(t[j]) * t[j];
  }
  const double norm_p = std::sqrt(pp);
  const double inv_p = 1 / std::max(norm_p, eps), inv_t = 1 / std::max(std::sqrt(tt), eps);
  const double cos = pt * inv_p * inv_t;
  if (grad) {
    const double a = -g * inv_p * inv_t, b = norm_p >= eps ? g * cos * inv_p * inv_p : 0.0;
    for (int64_t j = 0; j < D; ++j) p[j] = static_cast<T>(b * p[j] + a * t[j]);
  }
  return static_cast<T>(1 - cos);
}

// For each row r of p, t (rows, D), contiguous: dist[r] = 1 - cos(p_r, t_r) (when dist is set).
// With `grad`, p_r is overwritten by dL/dp_r for L = scale[r * scale_stride] * dist[r]:
//   dL/dp = inv_p * (A t + B p),  A = -g inv_t,  B = g cos inv_p,  inv_x = 1 / max(|x|, eps),
// without the B term when |p| < eps (the clamp passes no gradient there, as in autograd).
// Factoring inv_p out keeps A and B near g / |x| (inv_p * inv_t alone underflows for large rows).
// eps = 0 and a zero row give 0 / 0 = NaN, like the float64 reference.
template <typename T>
void cosine_rows(T* p, const T* t, int64_t rows, int64_t D, T eps, const T* scale, int64_t scale_stride, T* dist,
                 bool grad) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  // float32 sums of squares outside [kTiny, max] go to cosine_row_wide.
  constexpr T kTiny = std::is_same_v<T, float> ? T(1e-30) : T(0);
  const auto sum = [](Vec v) { return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, v); };
  for (int64_t r = 0; r < rows; ++r) {
    T* pr = p + r * D;
    const T* tr = t + r * D;
    const T g = grad ? scale[r * scale_stride] : T(0);
    Vec v_pt(T(0)), v_pp(T(0)), v_tt(T(0));
    int64_t j = 0;
    for (; j + W <= D; j += W) {
      const Vec a = Vec::loadu(pr + j), b = Vec::loadu(tr + j);
      v_pt = at::vec::fmadd(a, b, v_pt);
      v_pp = at::vec::fmadd(a, a, v_pp);
      v_tt = at::vec::fmadd(b, b, v_tt);
    }
    T pt = sum(v_pt), pp = sum(v_pp), tt = sum(v_tt);
    for (; j < D; ++j) {
      pt += pr[j] * tr[j];
      pp += pr[j] * pr[j];
      tt += tr[j] * tr[j];
    }
    constexpr T kMax = std::numeric_limits<T>::max();
    if (kTiny > 0 && !(pp >= kTiny && pp <= kMax && tt >= kTiny && tt <= kMax && std::abs(pt) <= kMax)) {
      const T d = cosine_row_wide(pr, tr, D, eps, g, grad);
      if (dist) dist[r] = d;
      continue;
    }
    const T norm_p = std::sqrt(pp);
    const T inv_p = T(1) / std::max(norm_p, eps), inv_t = T(1) / std::max(std::sqrt(tt), eps);
    const T cos = pt * inv_p * inv_t;
    if (dist) dist[r] = T(1) - cos;
    if (!grad) continue;
    const T A = -g * inv_t, B = norm_p >= eps ? g * cos * inv_p : T(0);  // dp = inv_p (A t + B p)
    const Vec va(A), vb(B), vi(inv_p);
    for (j = 0; j + W <= D; j += W) {
      (at::vec::fmadd(vb, Vec::loadu(pr + j), va * Vec::loadu(tr + j)) * vi).store(pr + j);
    }
    for (; j < D; ++j) pr[j] = (B * pr[j] + A * tr[j]) * inv_p;
  }
}

struct Grads {        // of the folded pair, in the opmath dtype
  Tensor s;           // (N, D_s), student dtype; every row written
  Tensor w;           // (D_t, D_s) accumulator, zeroed
  OptTensor b;        // (D_t) accumulator, zeroed, when the folded bias exists
};

// One chunk of c rows from row r0 (see the top of the file). `buf`: this thread's buffers.
struct ChunkBuffers {
  Tensor p, ones, s, t, gs;  // (chunk, D_t), (chunk); half types: (chunk, D_s | D_t | D_s)
};

void run_chunk(int64_t r0, int64_t c, const Tensor& student, const Tensor& teacher, const lib_fold::Folded& f,
               double eps, const Tensor& scale, int64_t scale_stride, Tensor* distance, Grads* grads,
               const ChunkBuffers& buf) {
  const bool cast = student.scalar_type() != f.w.scalar_type();  // half types: rows go through float32 buffers
  Tensor s = student.narrow(0, r0, c), t = teacher.narrow(0, r0, c);  // (c, D_s), (c, D_t)
  if (cast) {
    s = buf.s.narrow(0, 0, c).copy_(s);
    t = buf.t.narrow(0, 0, c).copy_(t);
  }
  Tensor p = buf.p.narrow(0, 0, c);
  at::linear_out(p, s, f.w, f.b);  // addmm_out / mm_out
  AT_DISPATCH_FLOATING_TYPES(f.w.scalar_type(), "lib_cosine_rows", [&] {
    cosine_rows<scalar_t>(p.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), c, p.size(1), static_cast<scalar_t>(eps),
                          scale.data_ptr<scalar_t>() + r0 * scale_stride, scale_stride,
                          distance ? distance->data_ptr<scalar_t>() + r0 : nullptr, grads != nullptr);
  });
  if (!grads) return;
  const Tensor& dp = p;  // (c, D_t)
  grads->w.addmm_(dp.t(), s);
  if (grads->b) grads->b->addmv_(dp.t(), buf.ones.narrow(0, 0, c));
  Tensor gs = grads->s.narrow(0, r0, c);  // (c, D_s)
  if (cast) {
    Tensor gs32 = buf.gs.narrow(0, 0, c);
    gs.copy_(at::mm_out(gs32, dp, f.w));
  } else {
    at::mm_out(gs, dp, f.w);
  }
}

// The chunk loop, parallel over chunks: task k of n_tasks (one per thread) takes chunks k,
// k + n_tasks, ..., runs their GEMMs single-threaded (inside the parallel region) and
// accumulates the weight gradients in its own buffers, summed in task order at the end (a
// fixed schedule: the same thread count gives bitwise the same result). One parallel region
// per call rather than one per GEMM and element-wise pass: on shared cores every region costs
// a scheduler time slice (measured 8x slower on a loaded 2-core machine), and a
// single-threaded GEMM on a cache-sized chunk keeps a core as busy as a big multithreaded one.
//   student: (N, D_s), teacher: (N, D_t), contiguous, input dtype
//   scale:   opmath; row r's upstream gradient is scale[r * scale_stride]
//   distance: (N,) opmath, or nullptr;  grads: nullptr for distances only
void run_chunks(const Tensor& student, const Tensor& teacher, const lib_fold::Folded& f, double eps, int64_t chunk,
                const Tensor& scale, int64_t scale_stride, Tensor* distance, Grads* grads) {
  const int64_t n = student.size(0), n_chunks = (n + chunk - 1) / chunk;
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
  std::vector<Grads> partial;  // task 0 accumulates into `grads` itself
  for (int64_t k = 0; grads && k < n_tasks; ++k) {
    partial.push_back(k == 0 ? *grads
                             : Grads{grads->s, at::zeros_like(grads->w),
                                     grads->b ? OptTensor(at::zeros_like(*grads->b)) : OptTensor()});
  }
  const bool cast = student.scalar_type() != f.w.scalar_type();
  const auto opts = student.options().dtype(f.w.scalar_type());
  const at::ThreadLocalState caller;  // the ATen calls below must see the caller's dispatch state (no autograd)
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard tls(caller);
    for (int64_t task = begin; task < end; ++task) {
      ChunkBuffers buf{at::empty({chunk, f.w.size(0)}, opts)};
      if (grads) buf.ones = at::ones({chunk}, opts);  // bias grads as GEMVs: no temporaries
      if (cast) {
        buf.s = at::empty({chunk, student.size(1)}, opts);
        buf.t = at::empty({chunk, teacher.size(1)}, opts);
        if (grads) buf.gs = at::empty({chunk, student.size(1)}, opts);
      }
      for (int64_t k = task; k < n_chunks; k += n_tasks) {
        run_chunk(k * chunk, std::min(chunk, n - k * chunk), student, teacher, f, eps, scale, scale_stride, distance,
                  grads ? &partial[task] : nullptr, buf);
      }
    }
  });
  for (size_t k = 1; k < partial.size(); ++k) {
    grads->w.add_(partial[k].w);
    if (grads->b) grads->b->add_(*partial[k].b);
  }
}

using Out5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

// Runs the chunks with gradients and maps them back to the factors:
// grad_student, grad_w1, grad_b1, grad_w2, grad_b2 (bias grads empty for a missing bias).
Out5 grads_of(const Tensor& s, const Tensor& t, const lib_fold::Folded& f, const Tensor& w1, const OptTensor& b1,
              const Tensor& w2, const OptTensor& b2, double eps, int64_t chunk, const Tensor& scale,
              int64_t scale_stride, Tensor* distance) {
  Grads g{at::empty(s.sizes(), s.options()), at::zeros_like(f.w),
          f.b ? OptTensor(at::zeros_like(*f.b)) : OptTensor()};
  run_chunks(s, t, f, eps, chunk, scale, scale_stride, distance, &g);
  auto [gw1, gb1, gw2, gb2] = lib_fold::unfold_grads(g.w, g.b, w1, b1, w2, b2);
  return {g.s, gw1, gb1, gw2, gb2};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor, Tensor> forward(
    const Tensor& student,  // (N, D_s)
    const Tensor& teacher,  // (N, D_t)
    const Tensor& w1,       // (E, D_s)
    const OptTensor& b1,    // (E) or None
    const Tensor& w2,       // (D_t, E)
    const OptTensor& b2,    // (D_t) or None
    double eps, int64_t chunk_size, double grad_scale, bool compute_grad) {
  const auto d = check_inputs(student, teacher, w1, b1, w2, b2, eps);
  const auto opmath = at::toOpMathType(student.scalar_type());
  const lib_fold::Folded f = lib_fold::fold(w1, b1, w2, b2, opmath);
  const int64_t n = student.size(0);
  Tensor distance = at::empty({n}, student.options().dtype(opmath));  // (N,)
  const Tensor scale = at::full({1}, grad_scale, student.options().dtype(opmath));
  const int64_t chunk = chunk_rows(chunk_size, n, d, at::elementSize(opmath));
  const Tensor s = student.contiguous(), t = teacher.contiguous();
  if (!compute_grad) {
    run_chunks(s, t, f, eps, chunk, scale, 0, &distance, nullptr);
    auto none = [&] { return at::empty({0}, student.options()); };  // distinct: outputs must not alias
    return {distance, none(), none(), none(), none(), none()};
  }
  auto [gs, gw1, gb1, gw2, gb2] = grads_of(s, t, f, w1, b1, w2, b2, eps, chunk, scale, 0, &distance);
  return {distance, gs, gw1, gb1, gw2, gb2};
}

Out5 backward(const Tensor& grad_distance,  // (N,)
              const Tensor& student,        // (N, D_s)
              const Tensor& teacher,        // (N, D_t)
              const Tensor& w1,             // (E, D_s)
              const OptTensor& b1,          // (E) or None
              const Tensor& w2,             // (D_t, E)
              const OptTensor& b2,          // (D_t) or None
              double eps, int64_t chunk_size) {
  const auto d = check_inputs(student, teacher, w1, b1, w2, b2, eps);
  check_grad_distance(grad_distance, student);
  const auto opmath = at::toOpMathType(student.scalar_type());
  const lib_fold::Folded f = lib_fold::fold(w1, b1, w2, b2, opmath);
  const Tensor scale = grad_distance.to(opmath);  // keeps an expanded scalar's 0 stride
  const Tensor s = student.contiguous();
  return grads_of(s, teacher.contiguous(), f, w1, b1, w2, b2, eps,
                  chunk_rows(chunk_size, s.size(0), d, at::elementSize(opmath)), scale, scale.stride(0), nullptr);
}

}  // namespace

TORCH_LIBRARY_IMPL(pycosdist, CPU, m) {
  m.impl("lib_cosine_distance_forward", &forward);
  m.impl("lib_cosine_distance_backward", &backward);
}

}  // namespace pycosdist::lib_cosine_loss
