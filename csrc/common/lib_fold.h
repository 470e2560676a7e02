// Folding of the linear inverted bottleneck, shared by the CPU and CUDA fused LIB + cosine loss.
//
// The LIB has no activation, so W2 (W1 s + b1) + b2 = W s + b with
//   W = W2 W1 (D_t, D_s),  b = W2 b1 + b2 (D_t)
// and, by the chain rule, the factor gradients follow from those of the folded pair
// (dW = sum_n g_n s_n^T, db = sum_n g_n, g_n = dL/dp_n):
//   dW1 = W2^T dW,  dW2 = dW W1^T + db b1^T,  db1 = W2^T db,  db2 = db.
// The same math as pycosdist.reference.fold_lib (used by LinearInvertedBottleneck.folded()).
// Everything here runs in the caller's compute dtype (float32 for half inputs).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace pycosdist::lib_fold {

struct Folded {
  at::Tensor w;                   // (D_t, D_s)
  c10::optional<at::Tensor> b;    // (D_t), when b1 or b2 exists
};

// w1: (E, D_s), b1: (E) or None, w2: (D_t, E), b2: (D_t) or None, any float dtype; result in `dtype`.
inline Folded fold(const at::Tensor& w1, const c10::optional<at::Tensor>& b1, const at::Tensor& w2,
                   const c10::optional<at::Tensor>& b2, at::ScalarType dtype) {
  const at::Tensor w1c = w1.to(dtype), w2c = w2.to(dtype);
  Folded f{at::mm(w2c, w1c), c10::nullopt};
  if (b1) {
    f.b = b2 ? at::addmv(b2->to(dtype), w2c, b1->to(dtype)) : at::mv(w2c, b1->to(dtype));
  } else if (b2) {
    f.b = b2->to(dtype).contiguous();
  }
  return f;
}

// The factor gradients (in w1's dtype) from those of the folded pair: grad_w (D_t, D_s) and
// grad_b (D_t) (defined iff the folded bias exists), in the compute dtype. A bias gradient is
// empty when that bias is None. Returns grad_w1, grad_b1, grad_w2, grad_b2.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> unfold_grads(
    const at::Tensor& grad_w, const c10::optional<at::Tensor>& grad_b, const at::Tensor& w1,
    const c10::optional<at::Tensor>& b1, const at::Tensor& w2, const c10::optional<at::Tensor>& b2) {
  const auto dtype = grad_w.scalar_type(), out = w1.scalar_type();
  const at::Tensor w1c = w1.to(dtype), w2c = w2.to(dtype);
  const at::Tensor grad_w1 = at::mm(w2c.t(), grad_w);  // (E, D_s)
  at::Tensor grad_w2 = at::mm(grad_w, w1c.t());         // (D_t, E)
  at::Tensor grad_b1 = at::empty({0}, w1.options()), grad_b2 = at::empty({0}, w1.options());
  if (b1) {
    grad_w2.addr_(*grad_b, b1->to(dtype));
    grad_b1 = at::mv(w2c.t(), *grad_b).to(out);
  }
  if (b2) grad_b2 = grad_b->to(out);
  return {grad_w1.to(out), grad_b1, grad_w2.to(out), grad_b2};
}

}  // namespace pycosdist::lib_fold
