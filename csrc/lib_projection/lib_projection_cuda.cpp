// lib_projection on CUDA: p = W2 (W1 x + b1) + b2 and its backward as cuBLAS GEMMs through
// ATen (nothing to fuse: no activation, and the bias adds ride in addmm). Schemas: csrc/ops.cpp.
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "common/cuda_torch.h"
#include "lib_projection/lib_projection_checks.h"

namespace pycosdist {
namespace {

// Rows of a (..., D) tensor: the product of its leading dims (reshape(-1, D) fails for D == 0).
int64_t leading_rows(const at::Tensor& x) {
  int64_t n = 1;
  for (int64_t k = 0; k + 1 < x.dim(); ++k) n *= x.size(k);
  return n;
}

std::tuple<at::Tensor, at::Tensor> lib_projection_forward_cuda(const at::Tensor& input, const at::Tensor& w1,
                                                               const std::optional<at::Tensor>& b1,
                                                               const at::Tensor& w2,
                                                               const std::optional<at::Tensor>& b2) {
  const auto d = lib_projection::check_weights(input, "input", w1, b1, w2, b2);
  const c10::cuda::CUDAGuard guard(input.device());
  const at::Tensor x = input.reshape({leading_rows(input), d.d_s});                      // (N, D_s)
  const at::Tensor hidden = b1 ? at::addmm(*b1, x, w1.t()) : at::mm(x, w1.t());          // (N, E)
  const at::Tensor output = b2 ? at::addmm(*b2, hidden, w2.t()) : at::mm(hidden, w2.t());  // (N, D_t)
  auto shape = input.sizes().vec();
  shape.back() = d.d_t;
  const at::Tensor out = output.view(shape);  // (..., D_t)
  shape.back() = d.e;
  return {out, hidden.view(shape)};  // (..., E)
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lib_projection_backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& hidden, const at::Tensor& w1,
    const at::Tensor& w2, bool b1_grad, bool b2_grad) {
  const auto d = lib_projection::check_weights(input, "input", w1, std::nullopt, w2, std::nullopt);
  lib_projection::check_backward(grad_output, input, hidden, d);
  const c10::cuda::CUDAGuard guard(input.device());
  const int64_t n = leading_rows(input);
  const at::Tensor g = grad_output.reshape({n, d.d_t});  // (N, D_t)
  const at::Tensor x = input.reshape({n, d.d_s});        // (N, D_s)
  const at::Tensor h = hidden.reshape({n, d.e});         // (N, E)
  const at::Tensor grad_hidden = at::mm(g, w2);          // (N, E)
  // A gradient not asked for is a fresh empty tensor each: the schema's outputs never alias.
  return {at::mm(grad_hidden, w1).view(input.sizes()),                    // grad_input (..., D_s)
          at::mm(grad_hidden.t(), x),                                     // grad_w1 (E, D_s)
          b1_grad ? grad_hidden.sum(0) : at::empty({0}, w1.options()),  // grad_b1 (E)
          at::mm(g.t(), h),                                               // grad_w2 (D_t, E)
          b2_grad ? g.sum(0) : at::empty({0}, w2.options())};           // grad_b2 (D_t)
}

}  // namespace
}  // namespace pycosdist

TORCH_LIBRARY_IMPL(pycosdist, CUDA, m) {
  m.impl("lib_projection_forward", &pycosdist::lib_projection_forward_cuda);
  m.impl("lib_projection_backward", &pycosdist::lib_projection_backward_cuda);
}
