// Host-side argument checks and the (outer, D, inner) row view of cosine_distance, shared by
// the CPU kernel and the CUDA launcher (no kernel code here).
//
// A (..., D, ...) tensor with the reduced dim at `dim` is seen as (outer, D, inner):
// outer = prod(sizes[:dim]), inner = prod(sizes[dim+1:]); row (o, i) is row o * inner + i of
// the distance / row_stats outputs. The unit-stride ("vector") axis is D when inner == 1 and
// the inner axis otherwise, so dim != -1 on a contiguous tensor needs no transposing copy.
#pragma once

#include <ATen/ATen.h>
#include <ATen/TensorUtils.h>

#include <vector>

#include "common/checks.h"

namespace pycosdist::cosine_distance {

struct RowsView {
  int64_t dim = 0;                       // wrapped reduced dim
  int64_t outer = 1, size = 1, inner = 1;  // (outer, D, inner)
  std::vector<int64_t> distance_shape;   // input shape without `dim`
  int64_t rows() const { return outer * inner; }
  std::vector<int64_t> stats_shape() const {  // (*distance_shape, 3)
    auto s = distance_shape;
    s.push_back(3);
    return s;
  }
};

// A tensor on the (outer, D, inner) view. Elements (o, d, i) live at
// data + o * outer_stride + d * size_stride + i (inner == 1: data + o * outer_stride + d).
struct RowsOperand {
  at::Tensor tensor;  // the input itself, or a contiguous copy when it cannot be viewed
  int64_t outer_stride = 0, size_stride = 0;
};

// Checks student / teacher / dim / eps and returns the row view.
//   student, teacher: same shape, dtype (float32/64, bfloat16, float16) and device; D at `dim`.
inline RowsView check_inputs(const at::Tensor& student, const at::Tensor& teacher, int64_t dim, double eps) {
  check_floating(student, "student");
  check_floating(teacher, "teacher");
  check_same_device(student, "student", teacher, "teacher");
  check_same_dtype(student, "student", teacher, "teacher");
  check_same_shape(student, "student", teacher, "teacher");
  TORCH_CHECK(eps >= 0, "pycosdist: `eps` must be >= 0, got ", eps);
  RowsView v;
  v.dim = wrap_dim(student, "student", dim);
  const auto sizes = student.sizes();
  for (int64_t k = 0; k < student.dim(); ++k) {
    if (k < v.dim) v.outer *= sizes[k];
    if (k > v.dim) v.inner *= sizes[k];
    if (k != v.dim) v.distance_shape.push_back(sizes[k]);
  }
  v.size = sizes[v.dim];
  return v;
}

// Extra checks of the backward op (after check_inputs on student / teacher).
//   grad_distance: distance shape, any strides (an expanded scalar is fine)
//   row_stats:     (*distance.shape, 3), opmath dtype
inline void check_backward_inputs(const at::Tensor& grad_distance, const at::Tensor& student,
                                  const at::Tensor& row_stats, const RowsView& v) {
  check_floating(grad_distance, "grad_distance");
  check_same_device(student, "student", grad_distance, "grad_distance");
  check_same_device(student, "student", row_stats, "row_stats");
  check_shape(grad_distance, "grad_distance", v.distance_shape);
  check_shape(row_stats, "row_stats", v.stats_shape());
  const auto opmath = at::toOpMathType(student.scalar_type());
  TORCH_CHECK(row_stats.scalar_type() == opmath, "pycosdist: `row_stats` must have dtype ", opmath,
              " (the opmath dtype of ", student.scalar_type(), " inputs), got ", row_stats.scalar_type());
}

// `t` on the row view, with a unit-stride vector axis. Inputs that cannot be viewed so
// (e.g. a transposed matrix with dim=-1, or rows that do not collapse) are copied to
// contiguous first: the only extra pass the op ever makes.
inline RowsOperand rows_operand(const at::Tensor& t, const RowsView& v) {
  if (auto st = at::detail::computeStride(t.sizes(), t.strides(), at::DimVector{v.outer, v.size, v.inner})) {
    const auto& s = *st;
    const bool unit = v.inner == 1 ? (s[1] == 1 || v.size <= 1) : s[2] == 1;
    if (unit) return {t, s[0], s[1]};
  }
  return {t.contiguous(), v.size * v.inner, v.inner};
}

// grad_distance on the (outer, inner) view: {outer_stride, inner_stride}; an expanded
// scalar gives {0, 0} and is read without being materialized.
inline std::pair<at::Tensor, std::array<int64_t, 2>> rows_grad(const at::Tensor& grad, const RowsView& v) {
  if (auto st = at::detail::computeStride(grad.sizes(), grad.strides(), at::DimVector{v.outer, v.inner}))
    return {grad, {(*st)[0], (*st)[1]}};
  return {grad.contiguous(), {v.inner, 1}};
}

// A row's norm was clamped to eps (and gets no gradient through the norm) iff its
// row_stats entry 1/max(|x|, eps) is not below 1/eps, both computed in opmath as here.
template <typename opmath_t>
inline opmath_t inv_eps(double eps) {
  return opmath_t(1) / opmath_t(eps);
}

}  // namespace pycosdist::cosine_distance
