// CPU kernels of cosine_distance (schemas and semantics: csrc/ops.cpp).
//
// Memory-bound, so the design is about passes over memory:
//   cosine_distance_forward            reads student and teacher once (dot, |s|^2, |t|^2 together);
//   cosine_distance_backward           reads them once more and writes the gradients;
//   cosine_distance_forward_with_grad  (one pass, 'mean' / 'sum' under autograd) does both per
//                                      small block of rows: the block's second read hits cache,
//                                      so memory sees one read of the inputs and one write of
//                                      each gradient.
// Vectorized with at::vec (half types load-convert to float and accumulate in float32),
// parallel over rows with at::parallel_for. Two layouts of the (outer, D, inner) view:
//   inner == 1 ("rows"):    a row is D contiguous values; vectorize along D with
//                           kUnroll independent accumulators per sum (hides FMA latency);
//   inner > 1 ("columns"):  adjacent rows are adjacent in memory; vectorize across a block of
//                           rows and walk D, so dim != -1 needs no transpose.
// Large gradients are written with non-temporal stores (no read-for-ownership of lines that are
// overwritten whole). Outputs come from the default CPU allocator, like every other torch op.
//
// Range: the sums are accumulated in opmath; a row whose sums overflow (float32 |x| >~ 1e18) or
// underflow where eps does not clamp them is recomputed in float64, scaled by its max |x|
// (rescue_row: rare rows only, so the common path pays one isfinite test per row).
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <limits>

#include "cosine_distance/cosine_distance_checks.h"

namespace pycosdist::cosine_distance {
namespace {

using at::vec::Vectorized;
constexpr int kUnroll = 4;
// Gradients at least this large are written with non-temporal stores (they do not fit in cache).
constexpr size_t kStreamBytes = size_t(32) << 20;
// The one-pass op works on blocks of about this many input bytes (student + teacher), so that
// a block's second read (for the gradients) comes from L1 / L2.
constexpr int64_t kBlockBytes = 32 << 10;

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

// ---------------------------------------------------------------- per-row math

template <typename opmath_t>
struct RowStats {
  opmath_t cos, inv_s, inv_t;  // inv_x = 1 / max(|x|, eps); stored as row_stats [cos, inv_s, inv_t]
};

// Sums that overflowed, or underflowed (precision lost to subnormals) in a row whose norm eps
// does not clamp: the row must be recomputed in float64 (rescue_row).
template <typename opmath_t>
inline bool needs_rescue(opmath_t dot, opmath_t ss, opmath_t tt, opmath_t eps) {
  constexpr opmath_t kTiny = std::numeric_limits<opmath_t>::min() * opmath_t(1 << 24);
  const bool finite = std::isfinite(dot) && std::isfinite(ss) && std::isfinite(tt);
  return !finite || (std::min(ss, tt) < kTiny && eps * eps < kTiny);
}

template <typename opmath_t>
inline RowStats<opmath_t> stats_from_sums(opmath_t dot, opmath_t ss, opmath_t tt, opmath_t eps) {
  const opmath_t inv_s = opmath_t(1) / std::max(std::sqrt(ss), eps);
  const opmath_t inv_t = opmath_t(1) / std::max(std::sqrt(tt), eps);
  return {dot * inv_s * inv_t, inv_s, inv_t};
}

// A row recomputed in float64 on values divided by the row's max |x| (sums in [1, D]), so it
// neither overflows nor underflows for any float32 / half row, nor for float64 rows with norms
// below ~1e308. Inf / NaN inputs give NaN, as in the float64 reference. Scalar: rare rows only.
// Elements at x[d * stride].
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
RowStats<opmath_t> rescue_row(const scalar_t* s, int64_t s_stride, const scalar_t* t, int64_t t_stride, int64_t D,
                              opmath_t eps) {
  double ms = 0, mt = 0;
  for (int64_t d = 0; d < D; ++d) {
    ms = std::max(ms, std::abs(double(s[d * s_stride])));
    mt = std::max(mt, std::abs(double(t[d * t_stride])));
    if (std::isnan(double(s[d * s_stride])) || std::isnan(double(t[d * t_stride]))) ms = mt = NAN;
  }
  const double ks = ms > 0 ? ms : 1, kt = mt > 0 ? mt : 1;  // a zero row stays zero
  double dot = 0, ss = 0, tt = 0;
  for (int64_t d = 0; d < D; ++d) {
    const double x = double(s[d * s_stride]) / ks, y = double(t[d * t_stride]) / kt;
    dot += x * y, ss += x * x, tt += y * y;
  }
  const double u = std::sqrt(ss), v = std::sqrt(tt);  // norms of the scaled rows
  const double ns = ms * u, nt = mt * v, e = double(eps);
  // The clamped case gives exactly inv_eps (as stats_from_sums does), so the backward's
  // clamp test `inv < inv_eps` reads it the same way.
  const opmath_t inv_eps = opmath_t(1) / eps;
  const opmath_t inv_s = ns > e ? opmath_t(1 / ns) : inv_eps;
  const opmath_t inv_t = nt > e ? opmath_t(1 / nt) : inv_eps;
  double cos;
  if (u > 0 && v > 0) {  // dot / (max(ns, eps) max(nt, eps)) without forming ns * nt
    cos = dot / (u * v) * (ns > e ? 1.0 : ns / e) * (nt > e ? 1.0 : nt / e);
  } else {  // a zero row: cos = 0 / (eps * ...), undefined (NaN) when eps = 0
    cos = e > 0 || std::isnan(ms + mt) ? 0.0 * (ms + mt) : NAN;
  }
  return {opmath_t(cos), inv_s, inv_t};
}

// Gradient of g * (1 - cos) for one row, written to avoid over/underflow at any scale:
//   grad_s = g inv_s (cos inv_s s - inv_t t),  grad_t = g inv_t (cos inv_t t - inv_s s),
// without the cos inv_x x term when |x| was clamped to eps (no gradient through the norm).
// A NaN cos (eps = 0 and a zero row) makes the whole row's gradient NaN, as in the reference.
template <typename opmath_t>
struct RowCoef {
  opmath_t scale_s, self_s, other_s;  // grad_s = scale_s * (self_s * s - other_s * t)
  opmath_t scale_t, self_t, other_t;  // grad_t = scale_t * (self_t * t - other_t * s)
};
template <typename opmath_t>
inline RowCoef<opmath_t> row_coef(opmath_t g, const RowStats<opmath_t>& r, opmath_t inv_eps) {
  const opmath_t self_s = r.inv_s < inv_eps ? r.cos * r.inv_s : r.cos * opmath_t(0);
  const opmath_t self_t = r.inv_t < inv_eps ? r.cos * r.inv_t : r.cos * opmath_t(0);
  return {g * r.inv_s, self_s, r.inv_t, g * r.inv_t, self_t, r.inv_s};
}

template <typename opmath_t>
inline void store_stats(const RowStats<opmath_t>& r, opmath_t* distance, opmath_t* stats) {
  *distance = opmath_t(1) - r.cos;
  stats[0] = r.cos, stats[1] = r.inv_s, stats[2] = r.inv_t;
}
template <typename opmath_t>
inline RowStats<opmath_t> load_stats(const opmath_t* stats) {
  return {stats[0], stats[1], stats[2]};
}

template <typename scalar_t>
struct Args {
  using opmath_t = at::opmath_type<scalar_t>;
  const scalar_t *s, *t;
  int64_t s_outer, s_size, t_outer, t_size;  // strides on the (outer, D, inner) view
  RowsView v;
  opmath_t eps, inv_eps;
  int64_t grain(int64_t lanes) const {  // work items per task: ~GRAIN_SIZE elements
    return std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, v.size * lanes));
  }
};

template <typename scalar_t>
Args<scalar_t> make_args(const RowsOperand& s, const RowsOperand& t, const RowsView& v, double eps) {
  using opmath_t = at::opmath_type<scalar_t>;
  return {s.tensor.const_data_ptr<scalar_t>(), t.tensor.const_data_ptr<scalar_t>(), s.outer_stride, s.size_stride,
          t.outer_stride, t.size_stride, v, static_cast<opmath_t>(eps), inv_eps<opmath_t>(eps)};
}

// The upstream gradient of row (o, i): g[o * outer + i * inner] (strides 0 for a constant).
template <typename opmath_t>
struct Upstream {
  const opmath_t* g;
  int64_t outer, inner;
  opmath_t at(int64_t o, int64_t i) const { return g[o * outer + i * inner]; }
};

// Where the gradients go: contiguous, student's shape; nullptr when not asked for.
template <typename scalar_t>
struct Grads {
  scalar_t *s, *t;
  bool stream;  // non-temporal stores (large outputs)
};

// ---------------------------------------------------------------- rows (inner == 1)

// Rows [r0, r1): distance[r] and stats[3 * (r - r0)].
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void forward_rows(const Args<scalar_t>& a, int64_t r0, int64_t r1, opmath_t* distance, opmath_t* stats) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::W;
  const int64_t D = a.v.size;
  for (int64_t r = r0; r < r1; ++r) {
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
    const opmath_t sdot = total(dot), sss = total(ss), stt = total(tt);
    const RowStats<opmath_t> st = needs_rescue(sdot, sss, stt, a.eps) ? rescue_row(s, 1, t, 1, D, a.eps)
                                                                       : stats_from_sums(sdot, sss, stt, a.eps);
    store_stats(st, distance + r, stats + 3 * (r - r0));
  }
}

// Gradients of rows [r0, r1) from stats[3 * (r - r0)].
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void grad_rows(const Args<scalar_t>& a, int64_t r0, int64_t r1, Upstream<opmath_t> g, const opmath_t* stats,
               Grads<scalar_t> out) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::W;
  const int64_t D = a.v.size;
  for (int64_t r = r0; r < r1; ++r) {
    const scalar_t* s = a.s + r * a.s_outer;
    const scalar_t* t = a.t + r * a.t_outer;
    scalar_t* gs = out.s ? out.s + r * D : nullptr;
    scalar_t* gt = out.t ? out.t + r * D : nullptr;
    const RowCoef<opmath_t> c = row_coef(g.at(r, 0), load_stats(stats + 3 * (r - r0)), a.inv_eps);
    const Vec ks(c.scale_s), ss(c.self_s), os(c.other_s), kt(c.scale_t), st(c.self_t), ot(c.other_t);
    auto grad_s = [&](const Vec& x, const Vec& y) { return ks * at::vec::fmsub(ss, x, os * y); };
    auto grad_t = [&](const Vec& x, const Vec& y) { return kt * at::vec::fmsub(st, y, ot * x); };
    int64_t d = 0;
    for (; d + 2 * W <= D; d += 2 * W) {
      const Vec x0 = IO::load(s + d), x1 = IO::load(s + d + W);
      const Vec y0 = IO::load(t + d), y1 = IO::load(t + d + W);
      if (gs) IO::store2(gs + d, grad_s(x0, y0), grad_s(x1, y1), out.stream);
      if (gt) IO::store2(gt + d, grad_t(x0, y0), grad_t(x1, y1), out.stream);
    }
    for (; d < D; d += W) {
      const Vec x = IO::load(s + d, D - d), y = IO::load(t + d, D - d);
      if (gs) IO::store(gs + d, grad_s(x, y), D - d);
      if (gt) IO::store(gt + d, grad_t(x, y), D - d);
    }
  }
}

// ---------------------------------------------------------------- columns (inner > 1)

// Columns: a work item is up to `lanes` adjacent rows (o, i0 .. i0 + n) of one `outer` slice; it
// walks D, reading a contiguous (D, lanes) slab in order, with its accumulators (or gradient
// coefficients) in L1: at most 6 x kColumnVecs vectors.
constexpr int64_t kColumnVecs = 64;

template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
struct ColumnItem {
  int64_t o, i0, n;
  ColumnItem(const Args<scalar_t>& a, int64_t item, int64_t lanes) {
    const int64_t blocks = (a.v.inner + lanes - 1) / lanes;
    o = item / blocks, i0 = (item % blocks) * lanes, n = std::min(lanes, a.v.inner - i0);
  }
  int64_t row0(const Args<scalar_t>& a) const { return o * a.v.inner + i0; }
};

// distance of the item's rows and their stats at stats[3 * j], j < n.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void forward_columns(const Args<scalar_t>& a, const ColumnItem<scalar_t>& it, opmath_t* distance, opmath_t* stats) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::W;
  alignas(64) opmath_t acc[3][kColumnVecs * W];  // dot, |s|^2, |t|^2 per lane
  const int64_t D = a.v.size, nv = (it.n + W - 1) / W;
  const scalar_t* s = a.s + it.o * a.s_outer + it.i0;
  const scalar_t* t = a.t + it.o * a.t_outer + it.i0;
  for (auto& row : acc) std::fill(row, row + nv * W, opmath_t(0));
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t* sd = s + d * a.s_size;
    const scalar_t* td = t + d * a.t_size;
    for (int64_t k = 0; k < nv; ++k) {
      const Vec x = IO::load(sd + k * W, it.n - k * W), y = IO::load(td + k * W, it.n - k * W);
      at::vec::fmadd(x, y, Vec::loadu(acc[0] + k * W)).store(acc[0] + k * W);
      at::vec::fmadd(x, x, Vec::loadu(acc[1] + k * W)).store(acc[1] + k * W);
      at::vec::fmadd(y, y, Vec::loadu(acc[2] + k * W)).store(acc[2] + k * W);
    }
  }
  const int64_t r0 = it.row0(a);
  for (int64_t j = 0; j < it.n; ++j) {
    const opmath_t dot = acc[0][j], ss = acc[1][j], tt = acc[2][j];
    const RowStats<opmath_t> st = needs_rescue(dot, ss, tt, a.eps)
                                      ? rescue_row(s + j, a.s_size, t + j, a.t_size, D, a.eps)
                                      : stats_from_sums(dot, ss, tt, a.eps);
    store_stats(st, distance + r0 + j, stats + 3 * j);
  }
}

// Gradients of the item's rows from stats[3 * j], j < n.
template <typename scalar_t, typename opmath_t = at::opmath_type<scalar_t>>
void grad_columns(const Args<scalar_t>& a, const ColumnItem<scalar_t>& it, Upstream<opmath_t> g,
                  const opmath_t* stats, Grads<scalar_t> out) {
  using IO = VecIO<scalar_t>;
  using Vec = typename IO::Vec;
  constexpr int64_t W = IO::W, kLanes = kColumnVecs * W;
  alignas(64) opmath_t coef[6][kLanes];  // RowCoef fields per lane
  const int64_t D = a.v.size, inner = a.v.inner, nv = (it.n + W - 1) / W;
  for (int64_t j = 0; j < it.n; ++j) {
    const auto c = row_coef(g.at(it.o, it.i0 + j), load_stats(stats + 3 * j), a.inv_eps);
    coef[0][j] = c.scale_s, coef[1][j] = c.self_s, coef[2][j] = c.other_s;
    coef[3][j] = c.scale_t, coef[4][j] = c.self_t, coef[5][j] = c.other_t;
  }
  const scalar_t* s = a.s + it.o * a.s_outer + it.i0;
  const scalar_t* t = a.t + it.o * a.t_outer + it.i0;
  const int64_t out0 = it.o * D * inner + it.i0;  // grads are contiguous
  auto lane = [&](int c, int64_t k) { return Vec::loadu(coef[c] + k * W); };
  for (int64_t d = 0; d < D; ++d) {
    const scalar_t* sd = s + d * a.s_size;
    const scalar_t* td = t + d * a.t_size;
    for (int64_t k = 0; k < nv; ++k) {
      const int64_t m = it.n - k * W, off = out0 + d * inner + k * W;
      const Vec x = IO::load(sd + k * W, m), y = IO::load(td + k * W, m);
      if (out.s) {
        const Vec gs = lane(0, k) * at::vec::fmsub(lane(1, k), x, lane(2, k) * y);
        m >= W ? IO::store1(out.s + off, gs, out.stream) : IO::store(out.s + off, gs, m);
      }
      if (out.t) {
        const Vec gt = lane(3, k) * at::vec::fmsub(lane(4, k), y, lane(5, k) * x);
        m >= W ? IO::store1(out.t + off, gt, out.stream) : IO::store(out.t + off, gt, m);
      }
    }
  }
}

inline void fence_streams(bool stream) {
#ifdef CPU_CAPABILITY_AVX512
  if (stream) _mm_sfence();  // make the streamed lines visible before the task ends
#endif
}

// Streamed stores need aligned vectors: grads are contiguous and 64-byte aligned, so every row
// (every column vector) is aligned when a row (an inner slice) is a whole number of 64-byte lines.
template <typename scalar_t>
bool can_stream(const at::Tensor& grad, const RowsView& v) {
  const int64_t unit = v.inner == 1 ? v.size : v.inner;
  return grad.nbytes() >= kStreamBytes && (unit * int64_t(sizeof(scalar_t))) % 64 == 0;
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
    opmath_t* dist = distance.mutable_data_ptr<opmath_t>();
    opmath_t* st = stats.mutable_data_ptr<opmath_t>();
    if (v.inner == 1) {
      at::parallel_for(0, v.outer, args.grain(1), [&](int64_t begin, int64_t end) {
        forward_rows(args, begin, end, dist, st + 3 * begin);
      });
    } else {
      constexpr int64_t lanes = kColumnVecs * Vectorized<opmath_t>::size();
      const int64_t items = v.outer * ((v.inner + lanes - 1) / lanes);
      at::parallel_for(0, items, args.grain(std::min(v.inner, lanes)), [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const ColumnItem<scalar_t> it(args, item, lanes);
          forward_columns(args, it, dist, st + 3 * it.row0(args));
        }
      });
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
  const auto dtype = student.scalar_type();
  at::Tensor grad_s = at::empty(student.sizes(), student.options());
  at::Tensor grad_t = at::empty(teacher_grad ? student.sizes() : at::IntArrayRef{0}, student.options());
  if (v.rows() == 0 || v.size == 0) return {grad_s, grad_t};
  const auto [g, g_strides] = rows_grad(grad_distance.to(at::toOpMathType(dtype)), v);
  const at::Tensor stats = row_stats.contiguous();
  const RowsOperand s = rows_operand(student, v), t = rows_operand(teacher, v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cosine_distance_backward", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const auto args = make_args<scalar_t>(s, t, v, eps);
    const opmath_t* st = stats.const_data_ptr<opmath_t>();
    const bool stream = can_stream<scalar_t>(grad_s, v);
    const Grads<scalar_t> out{grad_s.mutable_data_ptr<scalar_t>(),
                              teacher_grad ? grad_t.mutable_data_ptr<scalar_t>() : nullptr, stream};
    if (v.inner == 1) {
      const Upstream<opmath_t> up{g.const_data_ptr<opmath_t>(), g_strides[0], 0};
      at::parallel_for(0, v.outer, args.grain(1), [&](int64_t begin, int64_t end) {
        grad_rows(args, begin, end, up, st + 3 * begin, out);
        fence_streams(stream);
      });
    } else {
      const Upstream<opmath_t> up{g.const_data_ptr<opmath_t>(), g_strides[0], g_strides[1]};
      constexpr int64_t lanes = kColumnVecs * Vectorized<opmath_t>::size();
      const int64_t items = v.outer * ((v.inner + lanes - 1) / lanes);
      at::parallel_for(0, items, args.grain(std::min(v.inner, lanes)), [&](int64_t begin, int64_t end) {
        for (int64_t item = begin; item < end; ++item) {
          const ColumnItem<scalar_t> it(args, item, lanes);
          grad_columns(args, it, up, st + 3 * it.row0(args), out);
        }
        fence_streams(stream);
      });
    }
  });
  return {grad_s, grad_t};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_distance_forward_with_grad_cpu(
    const at::Tensor& student, const at::Tensor& teacher, int64_t dim, double eps, double grad_scale,
    bool student_grad, bool teacher_grad) {
  const RowsView v = check_inputs(student, teacher, dim, eps);
  const auto dtype = student.scalar_type();
  const auto opmath = at::toOpMathType(dtype);
  at::Tensor distance = at::empty(v.distance_shape, student.options().dtype(opmath));
  at::Tensor grad_s = at::empty(student_grad ? student.sizes() : at::IntArrayRef{0}, student.options());
  at::Tensor grad_t = at::empty(teacher_grad ? student.sizes() : at::IntArrayRef{0}, student.options());
  if (v.rows() == 0) return {distance, grad_s, grad_t};
  const RowsOperand s = rows_operand(student, v), t = rows_operand(teacher, v);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, dtype, "cosine_distance_forward_with_grad", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    constexpr int64_t W = Vectorized<opmath_t>::size();
    const auto args = make_args<scalar_t>(s, t, v, eps);
    opmath_t* dist = distance.mutable_data_ptr<opmath_t>();
    const opmath_t scale = static_cast<opmath_t>(grad_scale);
    const Upstream<opmath_t> up{&scale, 0, 0};
    const bool stream = (student_grad && can_stream<scalar_t>(grad_s, v)) ||
                        (teacher_grad && can_stream<scalar_t>(grad_t, v));
    const Grads<scalar_t> out{student_grad ? grad_s.mutable_data_ptr<scalar_t>() : nullptr,
                              teacher_grad ? grad_t.mutable_data_ptr<scalar_t>() : nullptr, stream};
    const int64_t row_bytes = 2 * std::max<int64_t>(v.size, 1) * int64_t(sizeof(scalar_t));
    if (v.inner == 1) {
      constexpr int64_t kMaxBlockRows = 64;
      const int64_t block = std::clamp<int64_t>(kBlockBytes / row_bytes, 1, kMaxBlockRows);
      at::parallel_for(0, v.outer, args.grain(1), [&](int64_t begin, int64_t end) {
        opmath_t stats[3 * kMaxBlockRows];
        for (int64_t r0 = begin; r0 < end; r0 += block) {
          const int64_t r1 = std::min(end, r0 + block);
          forward_rows(args, r0, r1, dist, stats);
          grad_rows(args, r0, r1, up, stats, out);  // the block's rows are still in cache
        }
        fence_streams(stream);
      });
    } else {
      // Fewer lanes than the two-pass ops, so that an item's (D, lanes) slab stays in cache.
      const int64_t lanes = std::clamp<int64_t>(8 * kBlockBytes / row_bytes / W * W, W, kColumnVecs * W);
      const int64_t items = v.outer * ((v.inner + lanes - 1) / lanes);
      at::parallel_for(0, items, args.grain(std::min(v.inner, lanes)), [&](int64_t begin, int64_t end) {
        opmath_t stats[3 * kColumnVecs * W];
        for (int64_t item = begin; item < end; ++item) {
          const ColumnItem<scalar_t> it(args, item, lanes);
          forward_columns(args, it, dist, stats);
          grad_columns(args, it, up, stats, out);
        }
        fence_streams(stream);
      });
    }
  });
  return {distance, grad_s, grad_t};
}

}  // namespace
}  // namespace pycosdist::cosine_distance

TORCH_LIBRARY_IMPL(pycosdist, CPU, m) {
  m.impl("cosine_distance_forward", &pycosdist::cosine_distance::cosine_distance_forward_cpu);
  m.impl("cosine_distance_backward", &pycosdist::cosine_distance::cosine_distance_backward_cpu);
  m.impl("cosine_distance_forward_with_grad", &pycosdist::cosine_distance::cosine_distance_forward_with_grad_cpu);
}
