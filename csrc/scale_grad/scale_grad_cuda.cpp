// scale_grad_ on CUDA: a contiguous grad is scaled by the kernel that reads the factor on the
// device (a factor of 1 costs one launch); any other layout by ATen's in-place multiply.
// Schema: csrc/ops.cpp.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include "common/cuda_torch.h"
#include "scale_grad/scale_grad_checks.h"
#include "scale_grad/scale_grad_kernels.cuh"

namespace pycosdist {
namespace {

void scale_grad_cuda(const at::Tensor& grad, const at::Tensor& factor) {
  scale_grad::check_inputs(grad, factor);
  if (!grad.is_contiguous()) {
    grad.mul_(factor.reshape({}));
    return;
  }
  const c10::cuda::CUDAGuard guard(grad.device());
  const at::Tensor f = factor.reshape({}).to(at::toOpMathType(grad.scalar_type()));  // async on the stream
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "scale_grad_cuda", [&] {
    using T = cuda_scalar_t<scalar_t>;
    using A = cuda::opmath_t<T>;
    C10_CUDA_CHECK(cuda::scale_unless_one<T>(mut_ptr<T>(grad), grad.numel(), const_ptr<A>(f), current_cuda_stream()));
  });
}

}  // namespace
}  // namespace pycosdist

TORCH_LIBRARY_IMPL(pycosdist, CUDA, m) { m.impl("scale_grad_", &pycosdist::scale_grad_cuda); }
