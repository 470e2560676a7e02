// CPU ops of the fused LIB + cosine distance (contract: csrc/ops.cpp).
//
// Rows are processed in chunks, so the (N, E) hidden and (N, D_t) projection only ever exist
// one chunk at a time. Per chunk of c rows (s, t: its student / teacher rows):
//   h  = s W1^T + b1              (c, E)    GEMM into hbuf
//   p  = h W2^T + b2              (c, D_t)  GEMM into pbuf
//   d, dL/dp = cosine_rows(p, t)            one pass per row; dL/dp overwrites p
//   gW2 += dp^T h, gb2 += dp^T 1            GEMM / GEMV, accumulating
//   dh = dp W2                    (c, E)    GEMM into hbuf (h is no longer needed)
//   gW1 += dh^T s, gb1 += dh^T 1
//   gs[rows] = dh W1              (c, D_s)  GEMM into the output rows
// These are the 6 GEMMs of the unfused forward + backward and nothing is recomputed: for
// 'mean' / 'sum' the gradients of grad_scale * sum(d) come out of the forward, and the
// autograd Function only scales them by the upstream scalar (the chunked fused-linear-loss
// idea). The backward op (reduction='none') recomputes h and p with per-row upstream grads.
// Chunks run in parallel, one thread each, every GEMM single-threaded (see run_chunks).
// Half types run everything in float32 ("opmath"): weights converted once, rows per chunk.
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
#include <vector>

#include "lib_cosine_loss/lib_cosine_loss_checks.h"

namespace pycosdist::lib_cosine_loss {
namespace {

using at::Tensor;
using OptTensor = c10::optional<Tensor>;

// Automatic chunk: a thread's opmath intermediates (h and p rows) take about this much (its
// share of L2), so they stay cache-resident between the GEMM that writes them and the next one
// that reads them, while the GEMMs stay large enough (hundreds of rows) to run at full speed;
// and at least a few chunks per thread, so that every thread gets about the same work.
constexpr int64_t kChunkBytes = 2 << 20;
constexpr int64_t kMinChunksPerThread = 4;

int64_t chunk_rows(int64_t requested, int64_t n, const lib_projection::Dims& d, int64_t elem_size) {
  int64_t rows = requested;
  if (rows <= 0) {
    rows = kChunkBytes / ((d.e + d.d_t) * elem_size);
    rows = std::min(rows, n / (kMinChunksPerThread * at::get_num_threads()));
    rows = std::max<int64_t>(32, rows / 32 * 32);
  }
  return std::max<int64_t>(1, std::min(rows, n));
}

// For each row r of p, t (rows, D), contiguous: dist[r] = 1 - cos(p_r, t_r) (when dist is set).
// With `grad`, p_r is overwritten by dL/dp_r for L = scale[r * scale_stride] * dist[r]:
//   dL/dp = -scale * (t / (|p|' |t|') - cos * p / |p|'^2),  |x|' = max(|x|, eps),
// without the second term when |p| < eps (the clamp passes no gradient there, as in autograd).
template <typename T>
void cosine_rows(T* p, const T* t, int64_t rows, int64_t D, T eps, const T* scale, int64_t scale_stride, T* dist,
                 bool grad) {
  using Vec = at::vec::Vectorized<T>;
  constexpr int64_t W = Vec::size();
  const auto sum = [](Vec v) { return at::vec::vec_reduce_all<T>([](Vec& a, Vec& b) { return a + b; }, v); };
  const int64_t grain = std::max<int64_t>(1, (1 << 14) / std::max<int64_t>(D, 1));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      T* pr = p + r * D;
      const T* tr = t + r * D;
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
      const T norm_p = std::sqrt(pp);
      const T inv_p = T(1) / std::max(norm_p, eps), inv_t = T(1) / std::max(std::sqrt(tt), eps);
      const T cos = pt * inv_p * inv_t;
      if (dist) dist[r] = T(1) - cos;
      if (!grad) continue;
      const T g = scale[r * scale_stride];
      const T a = -g * inv_p * inv_t, b = norm_p >= eps ? g * cos * inv_p * inv_p : T(0);  // dp = a t + b p
      const Vec va(a), vb(b);
      for (j = 0; j + W <= D; j += W) at::vec::fmadd(vb, Vec::loadu(pr + j), va * Vec::loadu(tr + j)).store(pr + j);
      for (; j < D; ++j) pr[j] = b * pr[j] + a * tr[j];
    }
  });
}

struct Weights {  // in the opmath dtype
  Tensor w1, w2;  // (E, D_s), (D_t, E)
  OptTensor b1, b2;
};

struct Grads {
  Tensor s;           // (N, D_s), student dtype; every row written
  Tensor w1, w2;      // opmath accumulators, zeroed
  OptTensor b1, b2;   // opmath accumulators, zeroed, when the bias exists
};

Weights to_opmath(const Tensor& w1, const OptTensor& b1, const Tensor& w2, const OptTensor& b2, at::ScalarType dt) {
  auto conv = [&](const OptTensor& b) { return b ? OptTensor(b->to(dt).contiguous()) : OptTensor(); };
  return {w1.to(dt).contiguous(), w2.to(dt).contiguous(), conv(b1), conv(b2)};
}

Grads zero_grads(const Tensor& student, const Weights& w) {
  auto zeros = [](const OptTensor& b) { return b ? OptTensor(at::zeros_like(*b)) : OptTensor(); };
  return {at::empty(student.sizes(), student.options()), at::zeros_like(w.w1), at::zeros_like(w.w2), zeros(w.b1),
          zeros(w.b2)};
}

// The 5 gradient outputs in the parameters' dtype; empty for a missing bias.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> finish(const Grads& g, const Tensor& w1) {
  auto out = [&](const OptTensor& b) { return b ? b->to(w1.scalar_type()) : at::empty({0}, w1.options()); };
  return {g.s, g.w1.to(w1.scalar_type()), out(g.b1), g.w2.to(w1.scalar_type()), out(g.b2)};
}

// One chunk of c rows from row r0 (see the top of the file). `buf`: this thread's buffers.
struct ChunkBuffers {
  Tensor h, p, ones, s, t, gs;  // (chunk, E), (chunk, D_t), (chunk); half types: (chunk, D_s | D_t | D_s)
};

void run_chunk(int64_t r0, int64_t c, const Tensor& student, const Tensor& teacher, const Weights& w, double eps,
               const Tensor& scale, int64_t scale_stride, Tensor* distance, Grads* grads, const ChunkBuffers& buf) {
  const bool cast = student.scalar_type() != w.w1.scalar_type();  // half types: rows go through float32 buffers
  Tensor s = student.narrow(0, r0, c), t = teacher.narrow(0, r0, c);  // (c, D_s), (c, D_t)
  if (cast) {
    s = buf.s.narrow(0, 0, c).copy_(s);
    t = buf.t.narrow(0, 0, c).copy_(t);
  }
  Tensor h = buf.h.narrow(0, 0, c), p = buf.p.narrow(0, 0, c);
  at::linear_out(h, s, w.w1, w.b1);  // addmm_out / mm_out
  at::linear_out(p, h, w.w2, w.b2);
  AT_DISPATCH_FLOATING_TYPES(w.w1.scalar_type(), "lib_cosine_rows", [&] {
    cosine_rows<scalar_t>(p.data_ptr<scalar_t>(), t.data_ptr<scalar_t>(), c, p.size(1), static_cast<scalar_t>(eps),
                          scale.data_ptr<scalar_t>() + r0 * scale_stride, scale_stride,
                          distance ? distance->data_ptr<scalar_t>() + r0 : nullptr, grads != nullptr);
  });
  if (!grads) return;
  const Tensor& dp = p;  // (c, D_t)
  const Tensor ones = buf.ones.narrow(0, 0, c);
  grads->w2.addmm_(dp.t(), h);
  if (grads->b2) grads->b2->addmv_(dp.t(), ones);
  const Tensor& dh = at::mm_out(h, dp, w.w2);  // (c, E), over h
  grads->w1.addmm_(dh.t(), s);
  if (grads->b1) grads->b1->addmv_(dh.t(), ones);
  Tensor gs = grads->s.narrow(0, r0, c);  // (c, D_s)
  if (cast) {
    Tensor gs32 = buf.gs.narrow(0, 0, c);
    gs.copy_(at::mm_out(gs32, dh, w.w1));
  } else {
    at::mm_out(gs, dh, w.w1);
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
void run_chunks(const Tensor& student, const Tensor& teacher, const Weights& w, double eps, int64_t chunk,
                const Tensor& scale, int64_t scale_stride, Tensor* distance, Grads* grads) {
  const int64_t n = student.size(0), n_chunks = (n + chunk - 1) / chunk;
  const int64_t n_tasks = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n_chunks));
  std::vector<Grads> partial;  // task 0 accumulates into `grads` itself
  for (int64_t k = 0; grads && k < n_tasks; ++k) {
    partial.push_back(k == 0 ? *grads : Grads{grads->s, at::zeros_like(grads->w1), at::zeros_like(grads->w2),
                                              grads->b1 ? OptTensor(at::zeros_like(*grads->b1)) : OptTensor(),
                                              grads->b2 ? OptTensor(at::zeros_like(*grads->b2)) : OptTensor()});
  }
  const bool cast = student.scalar_type() != w.w1.scalar_type();
  const auto opts = student.options().dtype(w.w1.scalar_type());
  const at::ThreadLocalState caller;  // the ATen calls below must see the caller's dispatch state (no autograd)
  at::parallel_for(0, n_tasks, 1, [&](int64_t begin, int64_t end) {
    const at::ThreadLocalStateGuard tls(caller);
    for (int64_t task = begin; task < end; ++task) {
      ChunkBuffers buf{at::empty({chunk, w.w1.size(0)}, opts), at::empty({chunk, w.w2.size(0)}, opts)};
      if (grads) buf.ones = at::ones({chunk}, opts);  // bias grads as GEMVs: no temporaries
      if (cast) {
        buf.s = at::empty({chunk, student.size(1)}, opts);
        buf.t = at::empty({chunk, teacher.size(1)}, opts);
        if (grads) buf.gs = at::empty({chunk, student.size(1)}, opts);
      }
      for (int64_t k = task; k < n_chunks; k += n_tasks) {
        run_chunk(k * chunk, std::min(chunk, n - k * chunk), student, teacher, w, eps, scale, scale_stride, distance,
                  grads ? &partial[task] : nullptr, buf);
      }
    }
  });
  for (size_t k = 1; k < partial.size(); ++k) {
    grads->w1.add_(partial[k].w1);
    grads->w2.add_(partial[k].w2);
    if (grads->b1) grads->b1->add_(*partial[k].b1);
    if (grads->b2) grads->b2->add_(*partial[k].b2);
  }
}

using Out5 = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

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
  const Weights w = to_opmath(w1, b1, w2, b2, opmath);
  const int64_t n = student.size(0);
  Tensor distance = at::empty({n}, student.options().dtype(opmath));  // (N,)
  const Tensor scale = at::full({1}, grad_scale, student.options().dtype(opmath));
  const int64_t chunk = chunk_rows(chunk_size, n, d, at::elementSize(opmath));
  const Tensor s = student.contiguous(), t = teacher.contiguous();
  if (!compute_grad) {
    run_chunks(s, t, w, eps, chunk, scale, 0, &distance, nullptr);
    auto none = [&] { return at::empty({0}, student.options()); };  // distinct: outputs must not alias
    return {distance, none(), none(), none(), none(), none()};
  }
  Grads g = zero_grads(s, w);
  run_chunks(s, t, w, eps, chunk, scale, 0, &distance, &g);
  auto [gs, gw1, gb1, gw2, gb2] = finish(g, w1);
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
  const Weights w = to_opmath(w1, b1, w2, b2, opmath);
  const Tensor scale = grad_distance.to(opmath);  // keeps an expanded scalar's 0 stride
  const Tensor s = student.contiguous();
  Grads g = zero_grads(s, w);
  run_chunks(s, teacher.contiguous(), w, eps, chunk_rows(chunk_size, s.size(0), d, at::elementSize(opmath)), scale,
             scale.stride(0), nullptr, &g);
  return finish(g, w1);
}

}  // namespace

TORCH_LIBRARY_IMPL(pycosdist, CPU, m) {
  m.impl("lib_cosine_distance_forward", &forward);
  m.impl("lib_cosine_distance_backward", &backward);
}

}  // namespace pycosdist::lib_cosine_loss
