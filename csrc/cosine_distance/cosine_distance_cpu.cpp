// CPU kernels of cosine_distance (schemas and semantics: csrc/ops.cpp).
//
// Memory-bound, so the design is about passes over memory: the forward reads student and
// teacher once (dot, |s|^2, |t|^2 accumulated together); the backward reads them once more
// (plus the 3 row stats) and writes grad_student (and grad_teacher) in the same pass.
// Vectorized with at::vec (half types load-convert to float and accumulate in float32),
// parallel over rows with at::parallel_for. Two layouts of the (outer, D, inner) view:
//   inner == 1 ("rows"):    a row is D contiguous values; vectorize along D with
//                           kUnroll independent accumulators per sum (hides FMA latency);
//   inner > 1 ("columns"):  adjacent rows are adjacent in memory; vectorize across a block of
//                           rows and walk D, so dim != -1 needs no transpose.
// Large gradients are written with non-temporal stores into recycled memory
// (recycling_allocator.h): page-faulting fresh memory would cost more than the kernel.
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>

#include "cosine_distance/cosine_distance_checks.h"
#include "cosine_distance/recycling_allocator.h"

namespace pycosdist::cosine_distance {
namespace {

using at::vec::Vectorized;
constexpr int kUnroll = 4;
// Gradients at least this large are written with non-temporal stores (they do not fit in cache).
constexpr size_t kStreamBytes = size_t(32) << 20;

// One Vectorized<opmath_t> worth of scalar_t elements, converted to opmath on load / from it on store.
template <typename scalar_t>
struct VecIO {
  using opmath_t = at::opmath_type<scalar_t>;
  using Vec = Vectorized<opmath_t>;
  static constexpr int64_t W = Vec::size();
  static constexpr bool kSame = std::is_same_v<scalar_t, opmath_t>;

  static Vec load(const scalar_t* p) {
    if constexpr (kSame) {
      return Vec::loadu(p);
    } else {
      Vec v;
      at::vec::load_to_float(p, v);
      return v;
    }
  }
  static Vec load(const scalar_t* p, int64_t n) {  // lanes >= n read as zero
    if (n >= W) return load(p);
    if constexpr (kSame) {
      return Vec::loadu(p, n);
    } else {
      return std::get<0>(at::vec::convert_to_float<scalar_t>(Vectorized<scalar_t>::loadu(p, n)));
    }
  }
  static void store(scalar_t* p, const Vec& v, int64_t n = W) {
    const int count = static_cast<int>(std::min(n, W));
    if constexpr (kSame) {
      v.store(p, count);
    } else {
      at::vec::convert_from_float<scalar_t>(v, v).store(p, count);
    }
  }
  // W lanes; `stream`: non-temporal, p aligned to W elements (AVX-512 only; regular stores elsewhere).
  static void store1(scalar_t* p, const Vec& v, bool stream) {
#ifdef CPU_CAPABILITY_AVX512
    if (stream) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm512_stream_ps(p, v);
      } else if constexpr (std::is_same_v<scalar_t, double>) {
        _mm512_stream_pd(p, v);
      } else {
        const __m512i packed = at::vec::convert_from_float<scalar_t>(v, v);
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_castsi512_si256(packed));
      }
      return;
    }
#endif
    store(p, v);
  }
  // 2*W lanes; `stream`: non-temporal, p 64-byte aligned (AVX-512 only; regular stores elsewhere).
  static void store2(scalar_t* p, const Vec& v0, const Vec& v1, bool stream) {
#ifdef CPU_CAPABILITY_AVX512
    if (stream) {
      if constexpr (std::is_same_v<scalar_t, float>) {
        _mm512_stream_ps(p, v0), _mm512_stream_ps(p + W, v1);
      } else if constexpr (std::is_same_v<scalar_t, double>) {
        _mm512_stream_pd(p, v0), _mm512_stream_pd(p + W, v1);
      } else {
        _mm512_stream_si512(reinterpret_cast<__m512i*>(p), at::vec::convert_from_float<scalar_t>(v0, v1));
      }
      return;
    }
#endif
    if constexpr (kSame) {
      v0.store(p), v1.store(p + W);
    } else {
      at::vec::convert_from_float<scalar_t>(v0, v1).store(p);
    }
  }
};

// The per-row math shared by both layouts.
template <typename opmath_t>
inline void finish_row(opmath_t dot, opmath_t ss, opmath_t tt, opmath_t eps, opmath_t* distance,
                       opmath_t* stats /* [cos, inv_s, inv_t] */) {
  const opmath_t inv_s = opmath_t(1) / std::max(std::sqrt(ss), eps);
  const opmath_t inv_t = opmath_t(1) / std::max(std::sqrt(tt), eps);
  const opmath_t cos = dot * inv_s * inv_t;
  *distance = opmath_t(1) - cos;
  stats[0] = cos;
  stats[1] = inv_s;
  stats[2] = inv_t;
}

// Coefficients of the row gradient: grad_s = a*t + b_s*s, grad_t = a*s + b_t*t.
template <typename opmath_t>
struct RowCoef {
  opmath_t a, b_s, b_t;
};
template <typename opmath_t>
inline RowCoef<opmath_t> row_coef(opmath_t g, const opmath_t* stats, opmath_t inv_eps) {
  const opmath_t cos = stats[0], inv_s = stats[1], inv_t = stats[2];
  return {-g * inv_s * inv_t, inv_s < inv_eps ? g * cos * inv_s * inv_s : opmath_t(0),
          inv_t < inv_eps ? g * cos * inv_t * inv_t : opmath_t(0)};
}

template <typename scalar_t>
struct Args {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t *s, *t;
  int64_t s_outer, s_size, t_outer, t_size;  // strides on the (outer, D, inner) view
  RowsView v;
  opmath_t eps;
  int64_t grain(int64_t lanes) const {  // work items per task: ~GRAIN_SIZE elements
    return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, v.size * lanes));
  }
};

template <typename scalar_t>
Args<scalar_t> make_args(const RowsOperand& s, const RowsOperand& t, const RowsView& v, double eps) {
  return {s.tensor.const_data_ptr<scalar_t>(), t.tensor.const_data_ptr<scalar_t>(), s.outer_stride, s.size_stride,
          t.outer_stride, t.size_stride, v, static_cast<at::opmath_type<scalar_t>>(eps)};
}

// ---------------------------------------------------------------- forward

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void forward_rows(const Args<scalar_t>& a, opmath_t* distance, opmath_t* stats) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::W;
  const int64_t D = a.v.size;
  at::parallel_for(0, a.v.outer, a.grain(1), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s = a.s + r * a.s_outer;
      const scalar_t* t = a.t + r * a.t_outer;
      std::array<Vec, kUnroll> dot, ss, tt;
      dot.fill(Vec(0)), ss.fill(Vec(0)), tt.fill(Vec(0));
      int64_t d = 0;
      for (; d + kUnroll * W <= D; d += kUnroll * W) {
        for (int k = 0; k < kUnroll; ++k) {
          const Vec x = IO::load(s + d + k * W), y = IO::load(t + d + k * W);
          dot[k] = at::vec::fmadd(x, y, dot[k]);
          ss[k] = at::vec::fmadd(x, x, ss[k]);
          tt[k] = at::vec::fmadd(y, y, tt[k]);
        }
      }
      for (int k = 0; d < D; d += W, ++k) {  // < kUnroll vectors left, the last maybe partial
        const Vec x = IO::load(s + d, D - d), y = IO::load(t + d, D - d);
        dot[k] = at::vec::fmadd(x, y, dot[k]);
        ss[k] = at::vec::fmadd(x, x, ss[k]);
        tt[k] = at::vec::fmadd(y, y, tt[k]);
      }
      auto total = [](const std::array<Vec, kUnroll>& acc) {
        return at::vec::vec_reduce_all<opmath_t>([](Vec& x, Vec& y) { return x + y; },
                                                 (acc[0] + acc[1]) + (acc[2] + acc[3]));
      };
      finish_row(total(dot), total(ss), total(tt), a.eps, distance + r, stats + 3 * r);
    }
  });
}

// Columns: a task takes up to kColumnVecs vectors of adjacent rows of one `outer` slice and
// walks D, so it reads a contiguous (D, lanes) slab in order; its accumulators (or gradient
// coefficients), 3 x kColumnVecs vectors = 12 KiB, stay in L1.
constexpr int64_t kColumnVecs = 64;

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void forward_columns(const Args<scalar_t>& a, opmath_t* distance, opmath_t* stats) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::W, kLanes = kColumnVecs * W;
  const int64_t D = a.v.size, inner = a.v.inner, blocks = (inner + kLanes - 1) / kLanes;
  at::parallel_for(0, a.v.outer * blocks, a.grain(std::min(inner, kLanes)), [&](int64_t begin, int64_t end) {
    alignas(64) opmath_t acc[3][kLanes];  // dot, |s|^2, |t|^2 per lane
    for (int64_t item = begin; item < end; ++item) {
      const int64_t o = item / blocks, i0 = (item % blocks) * kLanes, n = std::min(kLanes, inner - i0);
      const int64_t nv = (n + W - 1) / W;
      const scalar_t* s = a.s + o * a.s_outer + i0;
      const scalar_t* t = a.t + o * a.t_outer + i0;
      std::fill(&acc[0][0], &acc[0][0] + 3 * kLanes, opmath_t(0));
      for (int64_t d = 0; d < D; ++d) {
        const scalar_t* sd = s + d * a.s_size;
        const scalar_t* td = t + d * a.t_size;
        for (int64_t k = 0; k < nv; ++k) {
          const Vec x = IO::load(sd + k * W, n - k * W), y = IO::load(td + k * W, n - k * W);
          at::vec::fmadd(x, y, Vec::loadu(acc[0] + k * W)).store(acc[0] + k * W);
          at::vec::fmadd(x, x, Vec::loadu(acc[1] + k * W)).store(acc[1] + k * W);
          at::vec::fmadd(y, y, Vec::loadu(acc[2] + k * W)).store(acc[2] + k * W);
        }
      }
      const int64_t r0 = o * inner + i0;
      for (int64_t j = 0; j < n; ++j) {
        finish_row(acc[0][j], acc[1][j], acc[2][j], a.eps, distance + r0 + j, stats + 3 * (r0 + j));
      }
    }
  });
}

// ---------------------------------------------------------------- backward

// `stream`: write the grads with non-temporal stores (large outputs: no read-for-ownership of
// lines that are overwritten whole, and student / teacher are not evicted by them).
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void backward_rows(const Args<scalar_t>& a, const opmath_t* g, int64_t g_outer, const opmath_t* stats,
                   opmath_t inv_eps, scalar_t* grad_s, scalar_t* grad_t /* nullptr: not asked */, bool stream) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::W;
  const int64_t D = a.v.size;
  // Grads are contiguous and 64-byte aligned, so every row is aligned when its byte size is.
  stream = stream && (D * sizeof(scalar_t)) % 64 == 0;
  at::parallel_for(0, a.v.outer, a.grain(1), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const scalar_t* s = a.s + r * a.s_outer;
      const scalar_t* t = a.t + r * a.t_outer;
      scalar_t* gs = grad_s + r * D;
      scalar_t* gt = grad_t ? grad_t + r * D : nullptr;
      const RowCoef<opmath_t> c = row_coef(g[r * g_outer], stats + 3 * r, inv_eps);
      const Vec va(c.a), vbs(c.b_s), vbt(c.b_t);
      int64_t d = 0;
      for (; d + 2 * W <= D; d += 2 * W) {
        const Vec x0 = IO::load(s + d), x1 = IO::load(s + d + W);
        const Vec y0 = IO::load(t + d), y1 = IO::load(t + d + W);
        IO::store2(gs + d, at::vec::fmadd(va, y0, vbs * x0), at::vec::fmadd(va, y1, vbs * x1), stream);
        if (gt) IO::store2(gt + d, at::vec::fmadd(va, x0, vbt * y0), at::vec::fmadd(va, x1, vbt * y1), stream);
      }
      for (; d < D; d += W) {
        const Vec x = IO::load(s + d, D - d), y = IO::load(t + d, D - d);
        IO::store(gs + d, at::vec::fmadd(va, y, vbs * x), D - d);
        if (gt) IO::store(gt + d, at::vec::fmadd(va, x, vbt * y), D - d);
      }
    }
#ifdef CPU_CAPABILITY_AVX512
    if (stream) _mm_sfence();  // make the streamed lines visible before the task ends
#endif
  });
}

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void backward_columns(const Args<scalar_t>& a, const opmath_t* g, std::array<int64_t, 2> g_strides,
                      const opmath_t* stats, opmath_t inv_eps, scalar_t* grad_s, scalar_t* grad_t, bool stream) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::W, kLanes = kColumnVecs * W;
  const int64_t D = a.v.size, inner = a.v.inner, blocks = (inner + kLanes - 1) / kLanes;
  stream = stream && (inner * sizeof(scalar_t)) % 64 == 0;  // then every full vector is aligned
  at::parallel_for(0, a.v.outer * blocks, a.grain(std::min(inner, kLanes)), [&](int64_t begin, int64_t end) {
    alignas(64) opmath_t coef[3][kLanes];  // a, b_s, b_t per lane
    for (int64_t item = begin; item < end; ++item) {
      const int64_t o = item / blocks, i0 = (item % blocks) * kLanes, n = std::min(kLanes, inner - i0);
      const int64_t nv = (n + W - 1) / W;
      for (int64_t j = 0; j < n; ++j) {
        const auto c = row_coef(g[o * g_strides[0] + (i0 + j) * g_strides[1]], stats + 3 * (o * inner + i0 + j), inv_eps);
        coef[0][j] = c.a, coef[1][j] = c.b_s, coef[2][j] = c.b_t;
      }
      const scalar_t* s = a.s + o * a.s_outer + i0;
      const scalar_t* t = a.t + o * a.t_outer + i0;
      const int64_t out0 = o * D * inner + i0;  // grads are contiguous
      for (int64_t d = 0; d < D; ++d) {
        const scalar_t* sd = s + d * a.s_size;
        const scalar_t* td = t + d * a.t_size;
        for (int64_t k = 0; k < nv; ++k) {
          const int64_t m = n - k * W;
          const Vec x = IO::load(sd + k * W, m), y = IO::load(td + k * W, m);
          const Vec ca = Vec::loadu(coef[0] + k * W);
          const Vec gs = at::vec::fmadd(ca, y, Vec::loadu(coef[1] + k * W) * x);
          const int64_t off = out0 + d * inner + k * W;
          m >= W ? IO::store1(grad_s + off, gs, stream) : IO::store(grad_s + off, gs, m);
          if (grad_t) {
            const Vec gt = at::vec::fmadd(ca, x, Vec::loadu(coef[2] + k * W) * y);
            m >= W ? IO::store1(grad_t + off, gt, stream) : IO::store(grad_t + off, gt, m);
          }
        }
      }
    }
#ifdef CPU_CAPABILITY_AVX512
    if (stream) _mm_sfence();
#endif
  });
}

// ---------------------------------------------------------------- ops

std::tuple<at::Tensor, at::Tensor> cosine_distance_forward_cpu(const at::Tensor& student, const at::Tensor& teacher,
                                                               int64_t dim, double eps) {
  const RowsView v = check_inputs(student, teacher, dim, eps);
  const auto opts = student.options().dtype(at::toOpMathType(student.scalar_type()));
  at::Tensor distance = at::empty(v.distance_shape, opts);  // (rows...)
  at::Tensor stats = at::empty(v.stats_shape(), opts);      // (rows..., 3)
  if (v.rows() == 0) return {distance, stats};
  const RowsOperand s = rows_operand(student, v), t = rows_operand(teacher, v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "cosine_distance_forward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto args = make_args<scalar_t>(s, t, v, eps);
    if (v.inner == 1) {
      forward_rows(args, distance.mutable_data_ptr<opmath_t>(), stats.mutable_data_ptr<opmath_t>());
    } else {
      forward_columns(args, distance.mutable_data_ptr<opmath_t>(), stats.mutable_data_ptr<opmath_t>());
    }
  });
  return {distance, stats};
}

std::tuple<at::Tensor, at::Tensor> cosine_distance_backward_cpu(const at::Tensor& grad_distance, const at::Tensor& student,
                                                                const at::Tensor& teacher, const at::Tensor& row_stats,
                                                                int64_t dim, double eps, bool teacher_grad) {
  const RowsView v = check_inputs(student, teacher, dim, eps);
  check_backward_inputs(grad_distance, student, row_stats, v);
  // Contiguous grads (student's shape and dtype): their row view is the canonical one.
  // Large ones reuse freed gradient memory (see recycling_allocator.h) and are streamed.
  const auto dtype = student.scalar_type();
  at::Tensor grad_s = RecyclingAllocator::empty(student.sizes(), dtype);
  at::Tensor grad_t = RecyclingAllocator::empty(teacher_grad ? student.sizes() : at::IntArrayRef{0}, dtype);
  const bool stream = grad_s.nbytes() >= kStreamBytes;
  if (v.rows() == 0 || v.size == 0) return {grad_s, grad_t};
  const auto opmath = at::toOpMathType(dtype);
  const auto [g, g_strides] = rows_grad(grad_distance.to(opmath), v);
  const at::Tensor stats = row_stats.contiguous();
  const RowsOperand s = rows_operand(student, v), t = rows_operand(teacher, v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, student.scalar_type(), "cosine_distance_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto args = make_args<scalar_t>(s, t, v, eps);
    scalar_t* gt = teacher_grad ? grad_t.mutable_data_ptr<scalar_t>() : nullptr;
    if (v.inner == 1) {
      backward_rows(args, g.const_data_ptr<opmath_t>(), g_strides[0], stats.const_data_ptr<opmath_t>(),
                    inv_eps<opmath_t>(eps), grad_s.mutable_data_ptr<scalar_t>(), gt, stream);
    } else {
      backward_columns(args, g.const_data_ptr<opmath_t>(), g_strides, stats.const_data_ptr<opmath_t>(),
                       inv_eps<opmath_t>(eps), grad_s.mutable_data_ptr<scalar_t>(), gt, stream);
    }
  });
  return {grad_s, grad_t};
}

}  // namespace
}  // namespace pycosdist::cosine_distance

TORCH_LIBRARY_IMPL(pycosdist, CPU, m) {
  m.impl("cosine_distance_forward", &pycosdist::cosine_distance::cosine_distance_forward_cpu);
  m.impl("cosine_distance_backward", &pycosdist::cosine_distance::cosine_distance_backward_cpu);
}
