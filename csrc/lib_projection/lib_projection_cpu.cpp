// CPU ops of the linear inverted bottleneck p = W2 (W1 x + b1) + b2 (contract: csrc/ops.cpp).
// Every product is one ATen GEMM (MKL / oneDNN, multithreaded) writing into its output; a bias
// rides on addmm's beta (broadcast into the output before the GEMM), so there is no extra pass.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "lib_projection/lib_projection_checks.h"

namespace pycosdist::lib_projection {
namespace {

using at::Tensor;

// `input` (..., last_in) -> shape (..., last)
std::vector<int64_t> with_last(const Tensor& input, int64_t last) {
  auto shape = input.sizes().vec();
  shape.back() = last;
  return shape;
}

// `t` (..., last) as (rows, last), rows the product of the leading dims. Not reshape({-1, last}):
// that is ambiguous for last = 0 (D_s = 0 or E = 0), where every row is just the bias.
Tensor as_rows(const Tensor& t) {
  const int64_t last = t.size(-1);
  int64_t rows = 1;
  for (int64_t i = 0; i + 1 < t.dim(); ++i) rows *= t.size(i);
  return t.reshape({rows, last});
}

std::tuple<Tensor, Tensor> forward(const Tensor& input,                // (..., D_s)
                                   const Tensor& w1,                   // (E, D_s)
                                   const c10::optional<Tensor>& b1,    // (E) or None
                                   const Tensor& w2,                   // (D_t, E)
                                   const c10::optional<Tensor>& b2) {  // (D_t) or None
  const Dims d = check_weights(input, "input", w1, b1, w2, b2);
  const Tensor x = as_rows(input);                                      // (M, D_s)
  Tensor hidden = at::empty({x.size(0), d.e}, input.options());         // (M, E)
  Tensor output = at::empty({x.size(0), d.d_t}, input.options());       // (M, D_t)
  at::linear_out(hidden, x, w1, b1);  // 2-D: addmm_out with a bias, mm_out without
  at::linear_out(output, hidden, w2, b2);
  return {output.view(with_last(input, d.d_t)), hidden.view(with_last(input, d.e))};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(const Tensor& grad_output,  // (..., D_t)
                                                            const Tensor& input,        // (..., D_s)
                                                            const Tensor& hidden,       // (..., E)
                                                            const Tensor& w1,           // (E, D_s)
                                                            const Tensor& w2,           // (D_t, E)
                                                            bool b1_grad, bool b2_grad) {
  const Dims d = check_weights(input, "input", w1, c10::nullopt, w2, c10::nullopt);
  check_backward(grad_output, input, hidden, d);
  const Tensor g = as_rows(grad_output);  // (M, D_t)
  const Tensor x = as_rows(input);        // (M, D_s)
  const Tensor h = as_rows(hidden);       // (M, E)
  const Tensor grad_hidden = at::mm(g, w2);           // (M, E)
  Tensor grad_w2 = at::mm(g.t(), h);                  // (D_t, E)
  Tensor grad_w1 = at::mm(grad_hidden.t(), x);        // (E, D_s)
  Tensor grad_input = at::mm(grad_hidden, w1);        // (M, D_s)
  // sum(0) accumulates half types in float32.
  Tensor grad_b1 = b1_grad ? grad_hidden.sum(0) : at::empty({0}, w1.options());  // (E) or (0)
  Tensor grad_b2 = b2_grad ? g.sum(0) : at::empty({0}, w2.options());            // (D_t) or (0)
  return {grad_input.view(input.sizes()), grad_w1, grad_b1, grad_w2, grad_b2};
}

}  // namespace

TORCH_LIBRARY_IMPL(pycosdist, CPU, m) {
  m.impl("lib_projection_forward", &forward);
  m.impl("lib_projection_backward", &backward);
}

}  // namespace pycosdist::lib_projection
