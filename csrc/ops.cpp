// The one place where every pycosdist op's schema is defined. Backends register
// implementations with TORCH_LIBRARY_IMPL in each op's folder (<op>/<op>_cpu.cpp,
// <op>/<op>_cuda.cpp); fake (meta) kernels and autograd live in pycosdist/_cosine_distance.py
// and pycosdist/_lib.py (re-exported by pycosdist/functional.py).
//
// Conventions: "rows" are all leading dims of a (..., D) tensor; half types accumulate
// in float32 ("opmath"); a gradient that was not asked for comes back as an empty tensor.
#include <torch/library.h>

TORCH_LIBRARY(pycosdist, m) {
  // Per-row cosine distance d = 1 - <s, t> / (max(|s|, eps) * max(|t|, eps)) along `dim`.
  //   student, teacher: (..., D, ...) same shape, D at `dim`
  //   distance:  shape without `dim`, opmath dtype (float32; float64 for float64 inputs)
  //   row_stats: (*distance.shape, 3), opmath dtype: [cos, 1/max(|s|,eps), 1/max(|t|,eps)]
  m.def("cosine_distance_forward(Tensor student, Tensor teacher, int dim, float eps) "
        "-> (Tensor distance, Tensor row_stats)");
  //   grad_distance: distance.shape (may be an expanded view); grads: student's shape and dtype.
  //   grad_teacher is empty unless teacher_grad.
  m.def("cosine_distance_backward(Tensor grad_distance, Tensor student, Tensor teacher, "
        "Tensor row_stats, int dim, float eps, bool teacher_grad) -> (Tensor grad_student, Tensor grad_teacher)");
  // One pass for reduction 'mean' / 'sum' under autograd: the per-row distances AND the gradients of
  // grad_scale * sum(distance) w.r.t. student (if student_grad) and teacher (if teacher_grad), from one
  // read of student and teacher. A gradient not asked for comes back empty. The autograd backward
  // only scales the returned gradients by the upstream scalar.
  m.def("cosine_distance_forward_with_grad(Tensor student, Tensor teacher, int dim, float eps, "
        "float grad_scale, bool student_grad, bool teacher_grad) "
        "-> (Tensor distance, Tensor grad_student, Tensor grad_teacher)");

  // grad *= factor (one element, on grad's device), skipped when factor is exactly 1: the
  // one-pass losses' backward scales their forward's gradients by the upstream scalar, which is
  // 1 for loss.backward(). CUDA reads the factor on the device (no host synchronization).
  m.def("scale_grad_(Tensor(a!) grad, Tensor factor) -> ()");

  // Linear inverted bottleneck p = W2 (W1 x + b1) + b2, no activation.
  //   input: (..., D_s); w1: (E, D_s); b1: (E) or None; w2: (D_t, E); b2: (D_t) or None
  //   output: (..., D_t); hidden: (..., E) (kept for the W2 gradient)
  m.def("lib_projection_forward(Tensor input, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2) "
        "-> (Tensor output, Tensor hidden)");
  //   grad_output: (..., D_t). Bias grads are empty unless asked for.
  m.def("lib_projection_backward(Tensor grad_output, Tensor input, Tensor hidden, Tensor w1, Tensor w2, "
        "bool b1_grad, bool b2_grad) -> (Tensor grad_input, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");

  // Fused LIB + cosine distance over row chunks; the (N, E) and (N, D_t) intermediates exist
  // one chunk at a time. student: (N, D_s); teacher: (N, D_t) (a constant); weights as above.
  //   distance: (N,) opmath dtype. With compute_grad, the gradients of grad_scale * sum(distance)
  //   w.r.t. student, w1, b1, w2, b2 are computed in the same pass (empty otherwise).
  //   chunk_size <= 0 picks one automatically.
  m.def("lib_cosine_distance_forward(Tensor student, Tensor teacher, Tensor w1, Tensor? b1, Tensor w2, "
        "Tensor? b2, float eps, int chunk_size, float grad_scale, bool compute_grad) "
        "-> (Tensor distance, Tensor grad_student, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
  // Gradients for per-row upstream gradients (reduction='none'), recomputing each chunk.
  //   grad_distance: (N,)
  m.def("lib_cosine_distance_backward(Tensor grad_distance, Tensor student, Tensor teacher, Tensor w1, "
        "Tensor? b1, Tensor w2, Tensor? b2, float eps, int chunk_size) "
        "-> (Tensor grad_student, Tensor grad_w1, Tensor grad_b1, Tensor grad_w2, Tensor grad_b2)");
}
