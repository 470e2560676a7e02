// Fused LIB + cosine distance on CUDA. The LIB has no activation, so it is folded once per call
// into one linear map, in opmath (float32 for half inputs; float64 for float64):
//   W = W2 W1 (D_t, D_s), b = W2 b1 + b2 (D_t)
// and the rows are processed in chunks, in one opmath buffer reused by every chunk (the
// (N, E) hidden never exists, and the (N, D_t) projection exists one chunk at a time):
//   p = s_c W^T + b                              (one cuBLAS GEMM through ATen, out= into the buffer)
//   distance_c and dL/dp over p                  (one kernel: lib_cosine_loss_kernels.cu; for bfloat16
//                                                 it also adds b and writes the bfloat16 dL/dp)
//   dW += dp^T s_c, db += sum dp, ds_c = dp W    (two GEMMs)
// and at the end the gradients are mapped back to the factors:
//   dW1 = W2^T dW, dW2 = dW W1^T + db b1^T, db1 = W2^T db, db2 = db.
// bfloat16 inputs: the GEMMs run on bfloat16 tensor cores with float32 accumulation and a
// float32 p (cuBLAS through at::mm's out_dtype): W is folded in float32 and rounded once, and
// dL/dp is rounded to bfloat16 (float32's exponent range: nothing flushes) for the two
// gradient GEMMs. float16 inputs: the student chunk is converted to float32 in a second buffer
// and every GEMM runs in float32, because dL/dp carries 1/N for 'mean' and would flush to zero
// in float16. Either way p, dL/dp's row math and every accumulation are float32; only the
// outputs are rounded to the inputs' dtype.
// Schemas and semantics: csrc/ops.cpp.
#include <ATen/OpMathType.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "common/cuda_torch.h"
#include "common/lib_fold.h"
#include "lib_cosine_loss/lib_cosine_loss_kernels.cuh"
#include "lib_cosine_loss/lib_cosine_loss_checks.h"

namespace pycosdist {
namespace {

using Opt = std::optional<at::Tensor>;

// Rows per chunk. Automatic: about 8M elements in the buffers (32 MB in float32): GEMMs big
// enough to run at speed, and p stays in L2 (40-50 MB on A100 / H100) between the kernel's
// two passes over it.
int64_t chunk_rows(int64_t n, const lib_projection::Dims& d, int64_t requested) {
  const int64_t rows = requested > 0 ? requested : std::max<int64_t>(256, (int64_t(1) << 23) / std::max<int64_t>(d.d_s + d.d_t, 1));
  return std::max<int64_t>(1, std::min(rows, n));
}

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
  const auto opmath = at::toOpMathType(s.scalar_type());
  const auto acc = s.options().dtype(opmath);
  const bool tensor_cores = s.scalar_type() == at::kBFloat16;       // bf16 GEMMs, float32 out
  const bool convert = opmath != s.scalar_type() && !tensor_cores;  // float16: float32 GEMMs on a converted chunk
  const lib_fold::Folded f = lib_fold::fold(w1, b1, w2, b2, opmath);  // shared with the CPU op
  const at::Tensor w = tensor_cores ? f.w.to(s.scalar_type()) : f.w;  // (D_t, D_s), the GEMMs' dtype
  const int64_t chunk = chunk_rows(n, d, chunk_size);
  at::Tensor p_buf = at::empty({chunk, d.d_t}, acc);                                // projection, then dL/dp
  at::Tensor x_buf = convert ? at::empty({chunk, d.d_s}, acc) : at::Tensor();       // student chunk, then dL/ds
  at::Tensor dp_buf = tensor_cores && compute_grad ? at::empty({chunk, d.d_t}, s.options()) : at::Tensor();
  at::Tensor dw, db;
  Grads g;
  if (compute_grad) {  // the first chunk writes dW and db, later ones add to them: no zero fill
    g.student = at::empty({n, d.d_s}, s.options());                          // (N, D_s)
    dw = n > 0 ? at::empty({d.d_t, d.d_s}, acc) : at::zeros({d.d_t, d.d_s}, acc);  // dL/dW (D_t, D_s)
    if (b1 || b2) db = n > 0 ? at::empty({d.d_t}, acc) : at::zeros({d.d_t}, acc);  // dL/db (D_t): for dW2 when b1 exists
  }
  const at::Tensor wt = w.t();
  const cudaStream_t stream = current_cuda_stream();
  const int64_t grad_stride = grad_rows.defined() ? grad_rows.stride(0) : 0;
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t c = std::min(chunk, n - r0);
    const at::Tensor s_c = s.narrow(0, r0, c);                            // (c, D_s)
    at::Tensor x = convert ? x_buf.narrow(0, 0, c).copy_(s_c) : s_c;      // (c, D_s) in the GEMMs' dtype
    at::Tensor p = p_buf.narrow(0, 0, c);                                 // (c, D_t) opmath
    if (tensor_cores) {
      at::mm_out(p, x, wt, opmath);  // the row kernel adds the bias
    } else if (f.b) {
      at::addmm_out(p, *f.b, x, wt);
    } else {
      at::mm_out(p, x, wt);
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, s.scalar_type(), "lib_cosine_distance_cuda", [&] {
      using T = cuda_scalar_t<scalar_t>;
      using A = cuda::opmath_t<T>;
      C10_CUDA_CHECK(cuda::lib_cosine_rows<T>(
          mut_ptr<A>(p), const_ptr<T>(t) + r0 * d.d_t, c, d.d_t, eps,
          distance.defined() ? mut_ptr<A>(distance) + r0 : nullptr,
          grad_rows.defined() ? const_ptr<A>(grad_rows) + r0 * grad_stride : nullptr, grad_stride, grad_scale,
          compute_grad, tensor_cores && f.b ? const_ptr<A>(*f.b) : nullptr,
          dp_buf.defined() ? mut_ptr<T>(dp_buf) : nullptr, stream));
    });
    if (!compute_grad) continue;
    // p now holds dL/dp. Everything below is queued on one stream: the GEMM that reads x
    // runs before the one that overwrites it. With one chunk (the automatic choice whenever the
    // rows fit the memory budget, pycosdist/_lib.py) this is 4 launches (3 with no bias).
    const bool first = r0 == 0;
    if (db.defined()) {
      if (first) {
        at::sum_out(db, p, at::IntArrayRef{0});
      } else {
        db.add_(p.sum(0));
      }
    }
    at::Tensor gs_c = g.student.narrow(0, r0, c);
    if (tensor_cores) {
      const at::Tensor dp = dp_buf.narrow(0, 0, c);  // (c, D_t) bf16, written by the row kernel
      if (first) {
        at::mm_out(dw, dp.t(), x, opmath);
      } else {
        dw.add_(at::mm(dp.t(), x, opmath));
      }
      at::mm_out(gs_c, dp, w);
    } else {
      if (first) {
        at::mm_out(dw, p.t(), x);
      } else {
        dw.addmm_(p.t(), x);
      }
      if (convert) {
        at::mm_out(x, p, w);
        gs_c.copy_(x);
      } else {
        at::mm_out(gs_c, p, w);
      }
    }
  }
  if (compute_grad) {  // the factor gradients by the chain rule (common/lib_fold.h)
    std::tie(g.w1, g.b1, g.w2, g.b2) =
        lib_fold::unfold_grads(dw, db.defined() ? c10::optional<at::Tensor>(db) : c10::nullopt, w1, b1, w2, b2);
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
