// scale_grad_ on the CPU: the factor is ordinary host memory, so a factor of exactly 1 is seen
// here and the pass over grad skipped. Schema: csrc/ops.cpp.
#include <torch/library.h>

#include "scale_grad/scale_grad_checks.h"

namespace pycosdist {
namespace {

void scale_grad_cpu(const at::Tensor& grad, const at::Tensor& factor) {
  scale_grad::check_inputs(grad, factor);
  if (factor.item<double>() != 1.0) grad.mul_(factor.reshape({}));
}

}  // namespace
}  // namespace pycosdist

TORCH_LIBRARY_IMPL(pycosdist, CPU, m) { m.impl("scale_grad_", &pycosdist::scale_grad_cpu); }
