// Host-side argument checks shared by every op and backend. Each message names the
// argument, what it got (shape / dtype / device) and what was expected.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <string>

namespace pycosdist {

inline void check_floating(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::isFloatingType(t.scalar_type()),
              "pycosdist: `", name, "` must be a floating-point tensor (float32, float64, bfloat16 or float16), got ",
              t.scalar_type(), " with shape ", t.sizes());
}

inline void check_same_dtype(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.scalar_type() == b.scalar_type(),
              "pycosdist: `", b_name, "` must have the same dtype as `", a_name, "` (", a.scalar_type(), "), got ",
              b.scalar_type());
}

inline void check_same_device(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.device() == b.device(),
              "pycosdist: `", b_name, "` must be on the same device as `", a_name, "` (", a.device(), "), got ",
              b.device());
}

inline void check_same_shape(const at::Tensor& a, const char* a_name, const at::Tensor& b, const char* b_name) {
  TORCH_CHECK(a.sizes() == b.sizes(),
              "pycosdist: `", a_name, "` and `", b_name, "` must have the same shape, got ", a.sizes(), " and ",
              b.sizes());
}

inline void check_dim(const at::Tensor& t, const char* name, int64_t ndim, const char* layout) {
  TORCH_CHECK(t.dim() == ndim,
              "pycosdist: `", name, "` must be ", ndim, "-D ", layout, ", got shape ", t.sizes());
}

// `dim` of `t` wrapped into [0, t.dim()); `t` must have at least one dim.
inline int64_t wrap_dim(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.dim() >= 1, "pycosdist: `", name, "` must have at least one dimension, got a 0-D tensor");
  TORCH_CHECK(dim >= -t.dim() && dim < t.dim(),
              "pycosdist: `dim` must be in [", -t.dim(), ", ", t.dim() - 1, "] for `", name, "` of shape ",
              t.sizes(), ", got ", dim);
  return dim < 0 ? dim + t.dim() : dim;
}

inline void check_shape(const at::Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK(t.sizes() == expected,
              "pycosdist: `", name, "` must have shape ", expected, ", got ", t.sizes());
}

}  // namespace pycosdist
