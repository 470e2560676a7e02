// Host-side argument checks of the linear inverted bottleneck p = W2 (W1 x + b1) + b2, shared
// by the CPU ops, the fused LIB + cosine loss (csrc/lib_cosine_loss/) and a CUDA launcher.
// No kernel code here. Every message names the arguments and prints both shapes.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include "common/checks.h"

namespace pycosdist::lib_projection {

struct Dims {
  int64_t d_s = 0, e = 0, d_t = 0;  // input features, hidden (expanded) features, output features
};

// The weights and biases, consistent with each other and with `x` (dtype, device).
//   x: (..., D_s), named `x_name`; w1: (E, D_s); b1: (E) or None; w2: (D_t, E); b2: (D_t) or None
inline Dims check_weights(const at::Tensor& x, const char* x_name, const at::Tensor& w1,
                          const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                          const c10::optional<at::Tensor>& b2) {
  check_floating(x, x_name);
  TORCH_CHECK(x.dim() >= 1, "pycosdist: `", x_name, "` must have at least one dimension (..., D_s), got a 0-D tensor");
  check_dim(w1, "w1", 2, "(E, D_s)");
  check_dim(w2, "w2", 2, "(D_t, E)");
  const Dims d{x.size(-1), w1.size(0), w2.size(0)};
  TORCH_CHECK(w1.size(1) == d.d_s, "pycosdist: `", x_name, "` has D_s=", d.d_s, " features (shape ", x.sizes(),
              "), but `w1` (shape ", w1.sizes(), ") expects D_s=", w1.size(1));
  TORCH_CHECK(w2.size(1) == d.e, "pycosdist: `w2` (shape ", w2.sizes(), ") must have E=", d.e,
              " columns to follow `w1` (shape ", w1.sizes(), "), got ", w2.size(1));
  auto like_x = [&](const at::Tensor& t, const char* name) {
    check_same_dtype(x, x_name, t, name);
    check_same_device(x, x_name, t, name);
  };
  auto bias = [&](const c10::optional<at::Tensor>& b, const char* name, const at::Tensor& w, const char* w_name) {
    if (!b.has_value()) return;
    TORCH_CHECK(b->dim() == 1 && b->size(0) == w.size(0), "pycosdist: `", name, "` must have shape [", w.size(0),
                "] (the rows of `", w_name, "`, shape ", w.sizes(), "), got ", b->sizes());
    like_x(*b, name);
  };
  like_x(w1, "w1");
  like_x(w2, "w2");
  bias(b1, "b1", w1, "w1");
  bias(b2, "b2", w2, "w2");
  return d;
}

// lib_projection_backward's extra inputs, after check_weights(input, "input", ...).
//   grad_output: (..., D_t); hidden: (..., E); leading dims those of `input`
inline void check_backward(const at::Tensor& grad_output, const at::Tensor& input, const at::Tensor& hidden,
                           const Dims& d) {
  auto leading = [&](const at::Tensor& t, const char* name, int64_t last) {
    check_same_dtype(input, "input", t, name);
    check_same_device(input, "input", t, name);
    auto expected = input.sizes().vec();
    expected.back() = last;
    TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), "pycosdist: `", name, "` must have shape ", at::IntArrayRef(expected),
                " (the leading dims of `input`, shape ", input.sizes(), "), got ", t.sizes());
  };
  leading(grad_output, "grad_output", d.d_t);
  leading(hidden, "hidden", d.e);
}

}  // namespace pycosdist::lib_projection
