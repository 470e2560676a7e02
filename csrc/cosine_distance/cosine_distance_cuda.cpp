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
#include "cosine_distance/cosine_distance_kernels.cuh"

namespace pycosdist {
namespace {

// Same contract as the CPU op's checks (student / teacher / dim / eps).
struct RowsView {
  cuda::RowsShape shape{1, 1, 1};        // (outer, D, inner) around `dim`
  std::vector<int64_t> distance_shape;  // the input shape without `dim`
};

//   student, teacher: same shape, dtype (float32/64, bfloat16, float16) and device; D at `dim`.
RowsView check_inputs(const at::Tensor& student, const at::Tensor& teacher, int64_t dim, double eps) {
  check_floating(student, "student");
  check_floating(teacher, "teacher");
  check_same_device(student, "student", teacher, "teacher");
  check_same_dtype(student, "student", teacher, "teacher");
  check_same_shape(student, "student", teacher, "teacher");
  TORCH_CHECK(eps >= 0, "pycosdist: `eps` must be >= 0, got ", eps);
  const int64_t nd = student.dim();
  TORCH_CHECK(nd >= 1, "pycosdist: `student` must have at least one dimension, got a 0-D tensor");
  TORCH_CHECK(dim >= -nd && dim < nd, "pycosdist: `dim` must be in [", -nd, ", ", nd - 1, "] for `student` of shape ",
              student.sizes(), ", got ", dim);
  if (dim < 0) dim += nd;
  RowsView v;
  for (int64_t k = 0; k < nd; ++k) {
    const int64_t n = student.size(k);
    if (k < dim) v.shape.outer *= n;
    if (k > dim) v.shape.inner *= n;
    if (k != dim) v.distance_shape.push_back(n);
  }
  v.shape.size = student.size(dim);
  return v;
}

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

// student, teacher: (..., D, ...) -> distance: shape without `dim`; row_stats: (*distance.shape, 3), opmath dtype.
std::tuple<at::Tensor, at::Tensor> cosine_distance_forward_cuda(const at::Tensor& student, const at::Tensor& teacher,
                                                                int64_t dim, double eps) {
  const RowsView v = check_inputs(student, teacher, dim, eps);
  const c10::cuda::CUDAGuard guard(student.device());
  const auto opts = student.options().dtype(at::toOpMathType(student.scalar_type()));
  at::Tensor distance = at::empty(v.distance_shape, opts);  // distance_shape
  auto stats_shape = v.distance_shape;
  stats_shape.push_back(3);
  at::Tensor row_stats = at::empty(stats_shape, opts);  // (*distance_shape, 3)
  // Plain variables, not structured bindings: C++17 lambdas cannot capture those.
  at::Tensor s, t;
  cuda::RowsStrides s_st, t_st;
  std::tie(s, s_st) = rows_operand(student, v.shape);
  std::tie(t, t_st) = rows_operand(teacher, v.shape);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "cosine_distance_forward_cuda", [&] {
    using T = cuda_scalar_t<scalar_t>;
    using A = cuda::opmath_t<T>;
    C10_CUDA_CHECK(cuda::cosine_distance_forward<T>(const_ptr<T>(s), s_st, const_ptr<T>(t), t_st, v.shape, eps,
                                                    mut_ptr<A>(distance), mut_ptr<A>(row_stats),
                                                    current_cuda_stream()));
  });
  return {distance, row_stats};
}

// grad_distance: distance.shape; student, teacher: (..., D, ...); row_stats: (*distance.shape, 3)
//   -> grad_student: student's shape and dtype; grad_teacher: the same, or empty unless teacher_grad.
std::tuple<at::Tensor, at::Tensor> cosine_distance_backward_cuda(const at::Tensor& grad_distance,
                                                                 const at::Tensor& student, const at::Tensor& teacher,
                                                                 const at::Tensor& row_stats, int64_t dim, double eps,
                                                                 bool teacher_grad) {
  const RowsView v = check_inputs(student, teacher, dim, eps);
  //   grad_distance: distance shape, any strides; row_stats: (*distance shape, 3), opmath dtype
  const auto opmath = at::toOpMathType(student.scalar_type());
  check_floating(grad_distance, "grad_distance");
  check_same_device(student, "student", grad_distance, "grad_distance");
  check_same_device(student, "student", row_stats, "row_stats");
  TORCH_CHECK(grad_distance.sizes() == at::IntArrayRef(v.distance_shape), "pycosdist: `grad_distance` must have shape ",
              v.distance_shape, ", got ", grad_distance.sizes());
  auto stats_shape = v.distance_shape;
  stats_shape.push_back(3);
  TORCH_CHECK(row_stats.sizes() == at::IntArrayRef(stats_shape), "pycosdist: `row_stats` must have shape ",
              stats_shape, ", got ", row_stats.sizes());
  TORCH_CHECK(row_stats.scalar_type() == opmath, "pycosdist: `row_stats` must have dtype ", opmath,
              " (the opmath dtype of ", student.scalar_type(), " inputs), got ", row_stats.scalar_type());

  const c10::cuda::CUDAGuard guard(student.device());
  // Both grads contiguous in the inputs' shape, as the fake kernel says.
  at::Tensor grad_student = at::empty(student.sizes(), student.options());
  at::Tensor grad_teacher = teacher_grad ? at::empty(teacher.sizes(), teacher.options()) : at::empty({0}, student.options());
  at::Tensor g, s, t;
  cuda::GradStrides g_st;
  cuda::RowsStrides s_st, t_st;
  std::tie(g, g_st) = rows_grad(grad_distance, opmath, v.shape);
  std::tie(s, s_st) = rows_operand(student, v.shape);
  std::tie(t, t_st) = rows_operand(teacher, v.shape);
  const at::Tensor stats = row_stats.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, student.scalar_type(), "cosine_distance_backward_cuda", [&] {
    using T = cuda_scalar_t<scalar_t>;
    using A = cuda::opmath_t<T>;
    C10_CUDA_CHECK(cuda::cosine_distance_backward<T>(const_ptr<A>(g), g_st, const_ptr<T>(s), s_st, const_ptr<T>(t),
                                                     t_st, const_ptr<A>(stats), v.shape, eps, mut_ptr<T>(grad_student),
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
}
