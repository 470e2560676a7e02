// Fused LIB + cosine distance on CUDA, over row chunks so that the (N, E) hidden and (N, D_t)
// projection exist one chunk at a time, in two buffers reused by every chunk:
//   h = s_c W1^T + b1, p = h W2^T + b2           (cuBLAS through ATen, out= into the buffers)
//   distance_c and dL/dp over p                  (one kernel: lib_cosine_loss_kernels.cu)
//   dW2 += dp^T h, db2 += sum dp, dh = dp W2 over h, dW1 += dh^T s_c, db1 += sum dh, ds_c = dh W1
// Schemas and semantics: csrc/ops.cpp.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/cuda_torch.h"
#include "lib_cosine_loss/lib_cosine_loss_kernels.cuh"
#include "lib_cosine_loss/lib_cosine_loss_checks.h"

namespace pycosdist {
namespace {

using Opt = std::optional<at::Tensor>;

// Rows per chunk. Automatic: about 8M elements in the two buffers (32 MB in float32): GEMMs
// big enough to run at speed, and p stays in L2 (40-50 MB on A100 / H100) between the
// kernel's two passes over it.
int64_t chunk_rows(int64_t n, const lib_projection::Dims& d, int64_t requested) {
  const int64_t rows = requested > 0 ? requested : std::max<int64_t>(256, (int64_t(1) << 23) / std::max<int64_t>(d.e + d.d_t, 1));
  return std::max<int64_t>(1, std::min(rows, n));
}

// acc += a @ b through cuBLAS; an opmath accumulator (half inputs) takes the product in the inputs' dtype.
void add_mm(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.scalar_type() == a.scalar_type()) {
    acc.addmm_(a, b);
  } else {
    acc.add_(at::mm(a, b));
  }
}

// acc += x.sum(0), summed in acc's dtype.
void add_column_sums(at::Tensor& acc, const at::Tensor& x) { acc.add_(x.sum(0, false, acc.scalar_type())); }

struct Grads { at::Tensor student, w1, b1, w2, b2; };  // undefined when not computed

// The chunk loop of both ops. distance: (N) opmath, or undefined. grad_rows: (N) opmath (any
// stride), or undefined for grad_scale on every row. With compute_grad, returns the
// gradients of sum_r g_r * distance_r.
Grads run_chunks(const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1, const Opt& b1,
                 const at::Tensor& w2, const Opt& b2, const lib_projection::Dims& d, double eps, int64_t chunk_size,
                 const at::Tensor& distance, const at::Tensor& grad_rows, double grad_scale, bool compute_grad) {
  const int64_t n = student.size(0);
  const at::Tensor s = student.contiguous();  // (N, D_s)
  const at::Tensor t = teacher.contiguous();  // (N, D_t)
  const int64_t chunk = chunk_rows(n, d, chunk_size);
  at::Tensor h_buf = at::empty({chunk, d.e}, s.options());    // (chunk, E): hidden, then dL/dhidden
  at::Tensor p_buf = at::empty({chunk, d.d_t}, s.options());  // (chunk, D_t): projection, then dL/dp
  Grads g;
  if (compute_grad) {
    // Weight grads accumulate over chunks in opmath (float32 for half types), cast at the end.
    const auto acc = w1.options().dtype(at::toOpMathType(w1.scalar_type()));
    g.student = at::empty({n, d.d_s}, s.options());  // (N, D_s)
    g.w1 = at::zeros({d.e, d.d_s}, acc);             // (E, D_s)
    g.w2 = at::zeros({d.d_t, d.e}, acc);             // (D_t, E)
    if (b1) g.b1 = at::zeros({d.e}, acc);            // (E)
    if (b2) g.b2 = at::zeros({d.d_t}, acc);          // (D_t)
  }
  const at::Tensor w1t = w1.t(), w2t = w2.t();
  const cudaStream_t stream = current_cuda_stream();
  const int64_t grad_stride = grad_rows.defined() ? grad_rows.stride(0) : 0;
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t c = std::min(chunk, n - r0);
    const at::Tensor s_c = s.narrow(0, r0, c);  // (c, D_s)
    at::Tensor h = h_buf.narrow(0, 0, c);       // (c, E)
    at::Tensor p = p_buf.narrow(0, 0, c);       // (c, D_t)
    if (b1) at::addmm_out(h, *b1, s_c, w1t); else at::mm_out(h, s_c, w1t);
    if (b2) at::addmm_out(p, *b2, h, w2t); else at::mm_out(p, h, w2t);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "lib_cosine_distance_cuda", [&] {
      using T = cuda_scalar_t<scalar_t>;
      using A = cuda::opmath_t<T>;
      C10_CUDA_CHECK(cuda::lib_cosine_rows<T>(
          mut_ptr<T>(p), const_ptr<T>(t) + r0 * d.d_t, c, d.d_t, eps,
          distance.defined() ? mut_ptr<A>(distance) + r0 : nullptr,
          grad_rows.defined() ? const_ptr<A>(grad_rows) + r0 * grad_stride : nullptr, grad_stride, grad_scale,
          compute_grad, stream));
    });
    if (!compute_grad) continue;
    // p now holds dL/dp.
    add_mm(g.w2, p.t(), h);
    if (b2) add_column_sums(g.b2, p);
    at::mm_out(h, p, w2);  // dL/dh over h: the dW2 GEMM that reads h runs first on this stream
    if (b1) add_column_sums(g.b1, h);
    add_mm(g.w1, h.t(), s_c);
    at::Tensor gs_c = g.student.narrow(0, r0, c);
    at::mm_out(gs_c, h, w1);
  }
  if (compute_grad) {
    g.w1 = g.w1.to(w1.scalar_type());
    g.w2 = g.w2.to(w2.scalar_type());
    if (b1) g.b1 = g.b1.to(b1->scalar_type());
    if (b2) g.b2 = g.b2.to(b2->scalar_type());
  }
  return g;
}

// A gradient that was not computed comes back as an empty tensor.
at::Tensor or_empty(const at::Tensor& t, const at::Tensor& like) {
  return t.defined() ? t : at::empty({0}, like.options());
}

// student: (N, D_s); teacher: (N, D_t); w1: (E, D_s); b1: (E)?; w2: (D_t, E); b2: (D_t)?
//   -> distance (N) opmath; grads of grad_scale * sum(distance) in the inputs' shapes (empty unless compute_grad).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lib_cosine_distance_forward_cuda(
    const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1, const Opt& b1, const at::Tensor& w2,
    const Opt& b2, double eps, int64_t chunk_size, double grad_scale, bool compute_grad) {
  const auto d = lib_cosine_loss::check_inputs(student, teacher, w1, b1, w2, b2, eps);
  const c10::cuda::CUDAGuard guard(student.device());
  at::Tensor distance = at::empty({student.size(0)}, student.options().dtype(at::toOpMathType(student.scalar_type())));
  const Grads g = run_chunks(student, teacher, w1, b1, w2, b2, d, eps, chunk_size, distance, at::Tensor(), grad_scale,
                             compute_grad);
  return {distance, or_empty(g.student, student), or_empty(g.w1, student), or_empty(g.b1, student),
          or_empty(g.w2, student), or_empty(g.b2, student)};
}

// grad_distance: (N); the rest as the forward -> grads of sum(grad_distance * distance) (bias grads empty if None).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lib_cosine_distance_backward_cuda(
    const at::Tensor& grad_distance, const at::Tensor& student, const at::Tensor& teacher, const at::Tensor& w1,
    const Opt& b1, const at::Tensor& w2, const Opt& b2, double eps, int64_t chunk_size) {
  const auto d = lib_cosine_loss::check_inputs(student, teacher, w1, b1, w2, b2, eps);
  lib_cosine_loss::check_grad_distance(grad_distance, student);  // (N), any strides: an expanded scalar is read in place
  const c10::cuda::CUDAGuard guard(student.device());
  const at::Tensor grad_rows = grad_distance.to(at::toOpMathType(student.scalar_type()));
  const Grads g = run_chunks(student, teacher, w1, b1, w2, b2, d, eps, chunk_size, at::Tensor(), grad_rows, 1.0, true);
  return {g.student, g.w1, or_empty(g.b1, student), g.w2, or_empty(g.b2, student)};
}

}  // namespace
}  // namespace pycosdist

TORCH_LIBRARY_IMPL(pycosdist, CUDA, m) {
  m.impl("lib_cosine_distance_forward", &pycosdist::lib_cosine_distance_forward_cuda);
  m.impl("lib_cosine_distance_backward", &pycosdist::lib_cosine_distance_backward_cuda);
}
