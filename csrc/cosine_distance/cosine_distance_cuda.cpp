// cosine_distance on CUDA: argument checks, output allocation, the (outer, D, inner) view of
// the inputs, then the torch-free launchers of cosine_distance_kernels.cu on the current
// stream. Semantics and schemas: csrc/ops.cpp.
#include <ATen/OpMathType.h>
#include <ATen/TensorUtils.h>
#include <torch/library.h>

#include <tuple>
#include <utility>
#include <vector>

#include "common/checks.h"
#include "common/cuda_torch.h"
#include "cosine_distance/cosine_distance_checks.h"
#include "cosine_distance/cosine_distance_kernels.cuh"

namespace pycosdist {
namespace {

// Host checks shared with the CPU op; the kernels take the (outer, D, inner) shape.
using cosine_distance::RowsView;
cuda::RowsShape rows_shape(const RowsView& v) { return {v.outer, v.size, v.inner}; }

// `t` on (outer, D, inner) with unit stride along the kernels' vector axis (D when inner == 1,
// inner otherwise), or a contiguous copy when its strides do not allow that.
std::pair<at::Tensor, cuda::RowsStrides> rows_operand(const at::Tensor& t, const cuda::RowsShape& sh) {
  if (auto st = at::detail::computeStride(t.sizes(), t.strides(), at::DimVector{sh.outer, sh.size, sh.inner})) {
    const auto& s = *st;
    if (sh.inner == 1 ? (s[1] == 1 || sh.size <= 1) : s[2] == 1) return {t, {s[0], s[1]}};
  }
  return {t.contiguous(), {sh.size * sh.inner, sh.inner}};
}

// grad_distance as opmath on (outer, inner); an expanded scalar (strides 0) is not materialized.
std::pair<at::Tensor, cuda::GradStrides> rows_grad(const at::Tensor& grad, at::ScalarType opmath,
                                                   const cuda::RowsShape& sh) {
  const at::Tensor g = grad.to(opmath);
  if (auto st = at::detail::computeStride(g.sizes(), g.strides(), at::DimVector{sh.outer, sh.inner}))
    return {g, {(*st)[0], (*st)[1]}};
  return {g.contiguous(), {sh.inner, 1}};
}

// Scratch memory of the column kernels' split reduction (cosine_distance_kernels.cuh), or an
// undefined tensor when the plan needs none.
at::Tensor workspace_for(const cuda::RowsShape& shape, const at::TensorOptions& opmath_opts) {
  int64_t elems = 0;
  C10_CUDA_CHECK(cuda::cosine_distance_workspace(shape, &elems));
  return elems > 0 ? at::empty({elems}, opmath_opts) : at::Tensor();
}

template <typename A> A* ptr_or_null(const at::Tensor& t) { return t.defined() ? mut_ptr<A>(t) : nullptr; }

// student, teacher: (..., D, ...) -> distance: shape without `dim`; row_stats: (*distance.shape, 3), opmath dtype.
std::tuple<at::Tensor, at::Tensor> cosine_distance_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                int64_t dim, double eps) {
  const RowsView v = cosine_distance::check_inputs(student, teacher, dim, eps);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options().dtype(at::toOpMathType(student.scalar_type()));
  at::Tensor distance = at::empty(v.distance_shape, opts);  // distance_shape
  at::Tensor row_stats = at::empty(v.stats_shape(), opts);  // (*distance_shape, 3)
  const cuda::RowsShape shape = rows_shape(v);
  const at::Tensor workspace = workspace_for(shape, opts);
  // Plain variables, not structured bindings: C++17 lambdas cannot capture those.
  at::Tensor s, t;
  cuda::RowsStrides s_st, t_st;
  std::tie(s, s_st) = rows_operand(student, shape);
  std::tie(t, t_st) = rows_operand(teacher, shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "cosine_distance_forward_cuda", [&] {
    using T = cuda_scalar_t<scalar_t>;
    using A = cuda::opmath_t<T>;
    C10_CUDA_CHECK(cuda::cosine_distance_forward<T>(const_ptr<T>(s), s_st, const_ptr<T>(t), t_st, shape, eps,
                                                    mut_ptr<A>(distance), mut_ptr<A>(row_stats),
                                                    ptr_or_null<A>(workspace), current_cuda_stream()));
  });
  return {distance, row_stats};
}

// student, teacher: (..., D, ...) -> distance: shape without `dim`, opmath dtype; grad_student,
// grad_teacher: the gradients of grad_scale * sum(distance), contiguous in student's shape and
// dtype (computed in opmath, rounded once), each empty unless asked for. One pass over the inputs.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cosine_distance_forward_with_grad_cuda(
    const at::Tensor& student, const at::Tensor& teacher, int64_t dim, double eps, double grad_scale,
    bool student_grad, bool teacher_grad) {
  const RowsView v = cosine_distance::check_inputs(student, teacher, dim, eps);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options().dtype(at::toOpMathType(student.scalar_type()));
  at::Tensor distance = at::empty(v.distance_shape, opts);
  at::Tensor grad_student = at::empty(student_grad ? student.sizes() : at::IntArrayRef{0}, student.options());
  at::Tensor grad_teacher = at::empty(teacher_grad ? teacher.sizes() : at::IntArrayRef{0}, student.options());
  const cuda::RowsShape shape = rows_shape(v);
  const at::Tensor workspace = workspace_for(shape, opts);
  at::Tensor s, t;
  cuda::RowsStrides s_st, t_st;
  std::tie(s, s_st) = rows_operand(student, shape);
  std::tie(t, t_st) = rows_operand(teacher, shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(),
                                  "cosine_distance_forward_with_grad_cuda", [&] {
    using T = cuda_scalar_t<scalar_t>;
    using A = cuda::opmath_t<T>;
    C10_CUDA_CHECK(cuda::cosine_distance_forward_with_grad<T>(
        const_ptr<T>(s), s_st, const_ptr<T>(t), t_st, shape, eps, grad_scale, mut_ptr<A>(distance),
        student_grad ? mut_ptr<T>(grad_student) : nullptr, teacher_grad ? mut_ptr<T>(grad_teacher) : nullptr,
        ptr_or_null<A>(workspace), current_cuda_stream()));
  });
  return {distance, grad_student, grad_teacher};
}

// grad_distance: distance.shape; student, teacher: (..., D, ...); row_stats: (*distance.shape, 3)
//   -> grad_student: student's shape and dtype; grad_teacher: the same, or empty unless teacher_grad.
std::tuple<at::Tensor, at::Tensor> cosine_distance_backward_cuda(const at::Tensor& grad_distance,
                                                                 const at::Tensor& student, const at::Tensor& teacher,
                                                                 const at::Tensor& row_stats, int64_t dim, double eps,
                                                                 bool teacher_grad) {
  const RowsView v = cosine_distance::check_inputs(student, teacher, dim, eps);
  cosine_distance::check_backward_inputs(grad_distance, student, row_stats, v);
  const auto opmath = at::toOpMathType(student.scalar_type());

  const c10::cuda::CUDAGuard guard(student.device());
  // Both grads contiguous in the inputs' shape, as the fake kernel says.
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  at::Tensor grad_teacher = teacher_grad ? at::empty(teacher.sizes(), teacher.options()) : at::empty({0}, student.options());
  at::Tensor g, s, t;
  cuda::GradStrides g_st;
  cuda::RowsStrides s_st, t_st;
  std::tie(g, g_st) = rows_grad(grad_distance, opmath, rows_shape(v));
  std::tie(s, s_st) = rows_operand(student, rows_shape(v));
  std::tie(t, t_st) = rows_operand(teacher, rows_shape(v));
  const at::Tensor stats = row_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "cosine_distance_backward_cuda", [&] {
    using T = cuda_scalar_t<scalar_t>;
    using A = cuda::opmath_t<T>;
    C10_CUDA_CHECK(cuda::cosine_distance_backward<T>(const_ptr<A>(g), g_st, const_ptr<T>(s), s_st, const_ptr<T>(t),
                                                     t_st, const_ptr<A>(stats), rows_shape(v), eps, mut_ptr<T>(grad_student),
                                                     teacher_grad ? mut_ptr<T>(grad_teacher) : nullptr,
                                                     current_cuda_stream()));
  });
  return {grad_student, grad_teacher};
}

}  // namespace
}  // namespace pycosdist

TORCH_LIBRARY_IMPL(pycosdist, CUDA, m) {
  m.impl("cosine_distance_forward", &pycosdist::cosine_distance_forward_cuda);
  m.impl("cosine_distance_backward", &pycosdist::cosine_distance_backward_cuda);
  m.impl("cosine_distance_forward_with_grad", &pycosdist::cosine_distance_forward_with_grad_cuda);
}
