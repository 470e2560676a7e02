// Host-side argument checks of the fused LIB + cosine distance ops, shared by the CPU op and a
// CUDA launcher. No kernel code here.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "common/checks.h"
#include "lib_projection/lib_projection_checks.h"

namespace pycosdist::lib_cosine_loss {

// student: (N, D_s); teacher: (N, D_t), same dtype / device; w1: (E, D_s); b1: (E) or None;
// w2: (D_t, E); b2: (D_t) or None; eps >= 0. Returns D_s, E, D_t.
inline lib_projection::Dims check_inputs(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1,
                                         const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                                         const c10::optional<at::Tensor>& b2, double eps) {
  check_dim(student, "student", 2, "(N, D_s) (one row per frame)");
  check_dim(teacher, "teacher", 2, "(N, D_t) (one row per frame)");
  const auto d = lib_projection::check_weights(student, "student", w1, b1, w2, b2);
  check_floating(teacher, "teacher");
  check_same_dtype(student, "student", teacher, "teacher");
  check_same_device(student, "student", teacher, "teacher");
  TORCH_CHECK(teacher.size(0) == student.size(0), "pycosdist: `student` (shape ", student.sizes(), ") and `teacher` (shape ",
              teacher.sizes(), ") must have the same number of rows (frames)");
  TORCH_CHECK(teacher.size(1) == d.d_t, "pycosdist: `teacher` has D_t=", teacher.size(1), " features (shape ",
              teacher.sizes(), "), but `w2` (shape ", w2.sizes(), ") projects to D_t=", d.d_t);
  TORCH_CHECK(eps >= 0, "pycosdist: `eps` must be >= 0, got ", eps);
  return d;
}

// grad_distance: (N,), any floating dtype and strides (an expanded scalar is fine).
inline void check_grad_distance(const at::Tensor& grad_distance, const at::Tensor& student) {
  check_floating(grad_distance, "grad_distance");
  check_same_device(student, "student", grad_distance, "grad_distance");
  TORCH_CHECK(grad_distance.dim() == 1 && grad_distance.size(0) == student.size(0),
              "pycosdist: `grad_distance` must have shape [", student.size(0), "] (one per row of `student`, shape ",
              student.sizes(), "), got ", grad_distance.sizes());
}

}  // namespace pycosdist::lib_cosine_loss
