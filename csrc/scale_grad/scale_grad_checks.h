// Host-side checks of scale_grad_ (shared by the CPU op and the CUDA launcher).
#pragma once

#include <ATen/ATen.h>

#include "common/checks.h"

namespace pycosdist::scale_grad {

// grad: any floating tensor; factor: one floating element on grad's device.
inline void check_inputs(const at::Tensor& grad, const at::Tensor& factor) {
  check_floating(grad, "grad");
  check_floating(factor, "factor");
  check_same_device(grad, "grad", factor, "factor");
  TORCH_CHECK(factor.numel() == 1, "pycosdist: `factor` must have exactly one element, got shape ", factor.sizes());
}

}  // namespace pycosdist::scale_grad
