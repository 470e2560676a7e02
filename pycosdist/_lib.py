"""Linear inverted bottleneck ops: fake kernels, autograd Functions, public functions.

Two op families (csrc/lib_projection/, csrc/lib_cosine_loss/):
  - ``lib_projection``: p = W2 (W1 x + b1) + b2 through ATen GEMMs, any leading shape.
  - ``lib_cosine_distance_loss``: the fused LIB + cosine distance KD loss. The LIB is folded
    once per call (W = W2 W1, b = W2 b1 + b2, the math of :func:`pycosdist.reference.fold_lib`),
    the projection only ever exists one row chunk at a time, and the factor gradients follow
    from the folded pair's by the chain rule. For 'mean' / 'sum' the parameter and student
    gradients are computed in the forward pass (the backward only scales them by the upstream
    scalar); for 'none', and for half types, the backward op recomputes each chunk with per-row
    upstream gradients (in float32 for half types, so that 1/N never lands in a half buffer).
Neither op has a derivative of its own: differentiating their gradients (double backward,
``create_graph=True``) raises a clear error rather than silently dropping the second-order term.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (registers torch.ops.pycosdist)
from ._cosine_distance import _loss_in, _scale_in_place
from .reference import REDUCTIONS, frames

_ops = torch.ops.pycosdist
LAYOUTS = ("nd", "bcft")


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias_grad(ref: Tensor, bias_len: int | None) -> Tensor:
    """A bias gradient: (bias_len,) when asked for, else the empty tensor the ops return."""
    return ref.new_empty(bias_len if bias_len is not None else 0)


def _param_grads(w1: Tensor, b1, w2: Tensor, b2) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return (torch.empty_like(w1, memory_format=torch.contiguous_format),
            _bias_grad(w1, w1.shape[0] if b1 is not None else None),
            torch.empty_like(w2, memory_format=torch.contiguous_format),
            _bias_grad(w2, w2.shape[0] if b2 is not None else None))


def check_options(eps, reduction: str, layout: str, chunk_size) -> None:
    """The loss's non-tensor arguments (shared by the function and CosineLIBDistillationLoss)."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"pycosdist: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"pycosdist: `layout` must be one of {LAYOUTS}, got {layout!r}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0 or math.isinf(eps):
        raise ValueError(f"pycosdist: `eps` must be a finite number >= 0, got {eps!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"pycosdist: `chunk_size` must be None (automatic) or an int >= 1, got {chunk_size!r}")


# ---- the automatic row chunk: a memory budget, not a fixed count ----
# The fused loss's only row-proportional intermediates are its chunk buffers (the projection of a
# chunk, and its dL/dp), so the chunk is the memory knob: as many rows as the call may spend, all
# of them (one chunk: fewest GEMMs and launches) when they fit. What a call may spend: a quarter of
# what the unfused reference (eager PyTorch autograd) needs for the same forward + backward.

EAGER_MEMORY_FRACTION = 0.25
MIN_CHUNK_ROWS = 1024


def _elem_size(dtype: torch.dtype) -> int:
    return dtype.itemsize


def eager_peak_bytes(n: int, d_s: int, e: int, d_t: int, dtype: torch.dtype) -> int:
    """A lower bound of the peak extra memory (above inputs and parameters) of the unfused reference
    :func:`pycosdist.reference.lib_cosine_distance_loss`, forward + backward, in ``dtype``: when
    autograd runs the backward of the LIB's second linear it holds the (N, E) hidden activation,
    its gradient and the (N, D_t) projection's gradient at once, and that linear's parameter
    gradients (tests/library/test_lib_chunks.py checks the bound against the measured peak)."""
    return _elem_size(dtype) * (n * (2 * e + d_t) + d_t * e + d_t)


def fused_bytes(n: int, d_s: int, e: int, d_t: int, dtype: torch.dtype, with_grad: bool) -> tuple[int, int]:
    """The CUDA op's own allocations as (fixed bytes, bytes per chunk row), from its buffers
    (csrc/lib_cosine_loss/lib_cosine_loss_cuda.cpp, csrc/common/lib_fold.h). Fixed: the per-row
    distances; with_grad, the student gradient; the weight-sized buffers (the folded W and its
    GEMM-dtype copy, dW, the factors in opmath, the factor gradients in opmath and in the input
    dtype). Per row: the opmath projection, overwritten by dL/dp; bfloat16 with gradients adds a
    bfloat16 dL/dp for the tensor-core GEMMs, float16 a float32 student row."""
    size, opmath = _elem_size(dtype), _elem_size(_opmath(dtype))
    factors = e * (d_s + d_t)
    fixed = n * opmath + opmath * (2 * d_t * d_s + factors)
    if with_grad:
        fixed += n * d_s * size + opmath * (d_t * d_s + factors) + size * factors
    per_row = d_t * opmath
    if dtype == torch.bfloat16 and with_grad:
        per_row += 2 * d_t
    if dtype == torch.float16:
        per_row += 4 * d_s
    return fixed, per_row


def chunk_rows(n_rows: int, bytes_per_row: int, budget_bytes: int) -> int:
    """Rows per chunk: all ``n_rows`` (one chunk) when ``n_rows * bytes_per_row`` fits in
    ``budget_bytes``, else the most rows that fit, and at least 1 (a budget too small for one row
    still runs, one row at a time)."""
    for name, value in (("n_rows", n_rows), ("bytes_per_row", bytes_per_row)):
        if isinstance(value, bool) or not isinstance(value, (int, torch.SymInt)) or value < 0:
            raise ValueError(f"pycosdist: `{name}` must be an int >= 0, got {value!r}")
    if n_rows * bytes_per_row <= budget_bytes or bytes_per_row == 0:
        return max(n_rows, 1)
    return max(1, int(budget_bytes) // bytes_per_row)


def memory_budget_bytes(n: int, d_s: int, e: int, d_t: int, dtype: torch.dtype) -> int:
    """What one call of the fused loss may allocate in all: EAGER_MEMORY_FRACTION of the unfused
    reference's peak (:func:`eager_peak_bytes`). Tests replace this function to fake a budget."""
    return int(EAGER_MEMORY_FRACTION * eager_peak_bytes(n, d_s, e, d_t, dtype))


def auto_chunk_size(n: int, d_s: int, e: int, d_t: int, dtype: torch.dtype, device_type: str,
                    with_grad: bool) -> int:
    """The op's chunk_size argument for ``chunk_size=None``.

    CUDA: the most rows that fit in :func:`memory_budget_bytes` after the fixed buffers
    (:func:`fused_bytes`), all of them (one chunk) when they fit; never fewer than
    MIN_CHUNK_ROWS rows (or N): a small call's weight-sized buffers may outweigh a quarter of
    eager's few rows, and smaller GEMMs would only add launches. The 25% bound therefore holds for
    calls of more than a few thousand rows.
    CPU: 0, the kernel's own cache-sized chunks (about 2 MiB of projection rows per thread, so
    that they stay in L2 between its GEMMs): far below the budget at any size where it matters
    (tests/library/test_lib_chunks.py measures the CPU op's peak against eager's)."""
    if device_type == "cpu":
        return 0
    fixed, per_row = fused_bytes(n, d_s, e, d_t, dtype, with_grad)
    rows = chunk_rows(n, per_row, memory_budget_bytes(n, d_s, e, d_t, dtype) - fixed)
    return max(rows, min(n, MIN_CHUNK_ROWS))


# ---- argument checks of the fake (meta) kernels: the real kernels' checks, with the same messages
# (csrc/common/checks.h, csrc/lib_projection/lib_projection_checks.h, csrc/lib_cosine_loss/...checks.h)

_C10_DTYPE_NAMES = {torch.float32: "Float", torch.float64: "Double", torch.float16: "Half",
                    torch.bfloat16: "BFloat16", torch.int64: "Long", torch.int32: "Int", torch.int16: "Short",
                    torch.int8: "Char", torch.uint8: "Byte", torch.bool: "Bool", torch.complex64: "ComplexFloat",
                    torch.complex128: "ComplexDouble"}


def _dt(x: Tensor) -> str:
    return _C10_DTYPE_NAMES.get(x.dtype, str(x.dtype))


def _sh(x) -> str:
    return str(list(x.shape if isinstance(x, Tensor) else x))


def _check(ok: bool, *msg) -> None:
    if not ok:
        raise RuntimeError("pycosdist: " + "".join(str(m) for m in msg))


def _check_floating(x: Tensor, name: str) -> None:
    _check(x.dtype.is_floating_point, f"`{name}` must be a floating-point tensor (float32, float64, bfloat16 or "
           f"float16), got {_dt(x)} with shape {_sh(x)}")


def _check_like(a: Tensor, a_name: str, b: Tensor, b_name: str) -> None:
    _check(a.dtype == b.dtype, f"`{b_name}` must have the same dtype as `{a_name}` ({_dt(a)}), got {_dt(b)}")
    _check(a.device == b.device, f"`{b_name}` must be on the same device as `{a_name}` ({a.device}), got {b.device}")


def _check_dim(x: Tensor, name: str, ndim: int, layout: str) -> None:
    _check(x.dim() == ndim, f"`{name}` must be {ndim}-D {layout}, got shape {_sh(x)}")


def _check_weights(x: Tensor, x_name: str, w1: Tensor, b1, w2: Tensor, b2) -> tuple[int, int, int]:
    """lib_projection::check_weights: returns D_s, E, D_t."""
    _check_floating(x, x_name)
    _check(x.dim() >= 1, f"`{x_name}` must have at least one dimension (..., D_s), got a 0-D tensor")
    _check_dim(w1, "w1", 2, "(E, D_s)")
    _check_dim(w2, "w2", 2, "(D_t, E)")
    d_s, e, d_t = x.shape[-1], w1.shape[0], w2.shape[0]
    _check(w1.shape[1] == d_s, f"`{x_name}` has D_s={d_s} features (shape {_sh(x)}), but `w1` (shape {_sh(w1)}) "
           f"expects D_s={w1.shape[1]}")
    _check(w2.shape[1] == e, f"`w2` (shape {_sh(w2)}) must have E={e} columns to follow `w1` (shape {_sh(w1)}), "
           f"got {w2.shape[1]}")
    _check_like(x, x_name, w1, "w1")
    _check_like(x, x_name, w2, "w2")
    for b, name, w, w_name in ((b1, "b1", w1, "w1"), (b2, "b2", w2, "w2")):
        if b is None:
            continue
        _check(b.dim() == 1 and b.shape[0] == w.shape[0], f"`{name}` must have shape [{w.shape[0]}] (the rows of "
               f"`{w_name}`, shape {_sh(w)}), got {_sh(b)}")
        _check_like(x, x_name, b, name)
    return d_s, e, d_t


def _check_loss_inputs(student, teacher, w1, b1, w2, b2, eps) -> None:
    """lib_cosine_loss::check_inputs."""
    _check_dim(student, "student", 2, "(N, D_s) (one row per frame)")
    _check_dim(teacher, "teacher", 2, "(N, D_t) (one row per frame)")
    _, _, d_t = _check_weights(student, "student", w1, b1, w2, b2)
    _check_floating(teacher, "teacher")
    _check_like(student, "student", teacher, "teacher")
    _check(teacher.shape[0] == student.shape[0], f"`student` (shape {_sh(student)}) and `teacher` (shape "
           f"{_sh(teacher)}) must have the same number of rows (frames)")
    _check(teacher.shape[1] == d_t, f"`teacher` has D_t={teacher.shape[1]} features (shape {_sh(teacher)}), but "
           f"`w2` (shape {_sh(w2)}) projects to D_t={d_t}")
    _check(eps >= 0, f"`eps` must be >= 0, got {eps:g}")


# ---- fake (meta) kernels: the real kernels' checks, then the shapes ----

@torch.library.register_fake("pycosdist::lib_projection_forward")
def _(input, w1, b1, w2, b2):
    _check_weights(input, "input", w1, b1, w2, b2)
    lead = input.shape[:-1]
    return input.new_empty((*lead, w2.shape[0])), input.new_empty((*lead, w1.shape[0]))


@torch.library.register_fake("pycosdist::lib_projection_backward")
def _(grad_output, input, hidden, w1, w2, b1_grad, b2_grad):
    _, e, d_t = _check_weights(input, "input", w1, None, w2, None)
    for t, name, last in ((grad_output, "grad_output", d_t), (hidden, "hidden", e)):
        _check_like(input, "input", t, name)
        expected = [*input.shape[:-1], last]
        _check(list(t.shape) == expected, f"`{name}` must have shape {expected} (the leading dims of `input`, "
               f"shape {_sh(input)}), got {_sh(t)}")
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(w1, memory_format=torch.contiguous_format), _bias_grad(w1, w1.shape[0] if b1_grad else None),
            torch.empty_like(w2, memory_format=torch.contiguous_format), _bias_grad(w2, w2.shape[0] if b2_grad else None))


@torch.library.register_fake("pycosdist::lib_cosine_distance_forward")
def _(student, teacher, w1, b1, w2, b2, eps, chunk_size, grad_scale, compute_grad):
    _check_loss_inputs(student, teacher, w1, b1, w2, b2, eps)
    distance = student.new_empty(student.shape[0], dtype=_opmath(student.dtype))
    if not compute_grad:
        return (distance, *[student.new_empty(0) for _ in range(5)])
    return (distance, torch.empty_like(student, memory_format=torch.contiguous_format), *_param_grads(w1, b1, w2, b2))


@torch.library.register_fake("pycosdist::lib_cosine_distance_backward")
def _(grad_distance, student, teacher, w1, b1, w2, b2, eps, chunk_size):
    _check_loss_inputs(student, teacher, w1, b1, w2, b2, eps)
    _check_floating(grad_distance, "grad_distance")
    _check(student.device == grad_distance.device, f"`grad_distance` must be on the same device as `student` "
           f"({student.device}), got {grad_distance.device}")
    _check(grad_distance.dim() == 1 and grad_distance.shape[0] == student.shape[0], f"`grad_distance` must have "
           f"shape [{student.shape[0]}] (one per row of `student`, shape {_sh(student)}), got {_sh(grad_distance)}")
    return (torch.empty_like(student, memory_format=torch.contiguous_format), *_param_grads(w1, b1, w2, b2))


# ---- autograd ----

def _once_differentiable(op_name: str, grads: tuple) -> tuple:
    """The backward's gradients; under create_graph they carry a node that raises a clear error
    when differentiated (the ops have no derivative of their own), instead of silently
    differentiating as if they were constants or failing with "does not require grad"."""
    if not torch.is_grad_enabled() or torch.compiler.is_compiling():
        return grads
    present = [g for g in grads if g is not None]
    err = torch._C._functions.DelayedError(
        f"pycosdist: {op_name} does not support double backward (differentiating its gradients, e.g. "
        f"torch.autograd.grad(..., create_graph=True) followed by a backward through those gradients); "
        f"use pycosdist.reference.{op_name} for higher-order derivatives".encode(), len(present))
    wrapped = err(*[g.detach().requires_grad_() for g in present])
    wrapped = iter(wrapped if isinstance(wrapped, tuple) else (wrapped,))
    return tuple(None if g is None else next(wrapped) for g in grads)


class _LibProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
        output, hidden = _ops.lib_projection_forward(input, w1, b1, w2, b2)
        ctx.save_for_backward(input, hidden, w1, w2)
        return output

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        input, hidden, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        with torch.no_grad(), _no_autocast(input):
            grads = _ops.lib_projection_backward(grad_output, input, hidden, w1, w2, need[2], need[4])
        return _once_differentiable("lib_projection", tuple(g if n else None for g, n in zip(grads, need)))


class _LibCosineDistanceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                b2: Tensor | None, eps: float, reduction: str, chunk_size: int, compute_grad: bool) -> Tensor:
        ctx.reduction, ctx.eps, ctx.chunk_size = reduction, eps, chunk_size
        ctx.grads = None
        # 'none' needs per-row upstream grads; float16 keeps 1/N (and a GradScaler's factor) out of
        # float16 buffers: both get the distances here and the gradients from the backward op.
        # (bfloat16 has float32's exponent range: it takes the one-pass path.)
        ctx.one_pass = reduction != "none" and student.dtype != torch.float16 and compute_grad
        if not ctx.one_pass:
            distance = _ops.lib_cosine_distance_forward(student, teacher, w1, b1, w2, b2, eps, chunk_size, 1.0,
                                                        False)[0]
            ctx.save_for_backward(student, teacher, w1, b1, w2, b2)  # references only: no copies
        else:  # 'mean' / 'sum': the gradients of grad_scale * sum(distance) come with the forward.
            grad_scale = 1.0 / max(student.shape[0], 1) if reduction == "mean" else 1.0
            distance, *grads = _ops.lib_cosine_distance_forward(student, teacher, w1, b1, w2, b2, eps,
                                                                chunk_size, grad_scale, True)
            if torch.compiler.is_compiling():  # a traced graph keeps only what is saved for backward
                ctx.save_for_backward(student, teacher, w1, b1, w2, b2, *grads)
            else:
                ctx.save_for_backward(student, teacher, w1, b1, w2, b2)  # references only: no copies
                ctx.grads = grads
        loss = distance if reduction == "none" else distance.mean() if reduction == "mean" else distance.sum()
        return _loss_in(loss, student.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        need = [ctx.needs_input_grad[i] for i in (0, 2, 3, 4, 5)]  # student, w1, b1, w2, b2
        with torch.no_grad(), _no_autocast(grad):
            if ctx.grads is not None:
                # The forward's gradients of grad_scale * sum(distance), scaled in place by the upstream
                # scalar (no second student-sized buffer; no pass at all when it is 1) and handed over:
                # a second backward (retain_graph=True) recomputes them below.
                grads, ctx.grads = ctx.grads, None
                grads = [_scale_in_place(g, grad) if needed else None for g, needed in zip(grads, need)]
            elif ctx.one_pass and torch.compiler.is_compiling():
                grads = [g * grad if needed else None for g, needed in zip(ctx.saved_tensors[6:], need)]
            else:
                student, teacher, w1, b1, w2, b2 = ctx.saved_tensors[:6]
                n = student.shape[0]
                if ctx.reduction != "none":  # one upstream scalar, times 1 / N for 'mean', in float32
                    scale = 1.0 / max(n, 1) if ctx.reduction == "mean" else 1.0
                    grad = (grad.to(_opmath(grad.dtype)) * scale).expand(n)
                grads = _ops.lib_cosine_distance_backward(grad, student, teacher, w1, b1, w2, b2, ctx.eps,
                                                          ctx.chunk_size)
                grads = [g if needed else None for g, needed in zip(grads, need)]
        gs, gw1, gb1, gw2, gb2 = _once_differentiable("lib_cosine_distance_loss", tuple(grads))
        return gs, None, gw1, gb1, gw2, gb2, None, None, None, None


def _autocast_dtype(device_type: str, tensors, loss: bool) -> torch.dtype | None:
    """Under torch.autocast for ``device_type``, the dtype all floating arguments are cast to
    (None outside autocast, or when they already agree): a loss promotes them to the widest
    (like autocast's float32 ops), a projection runs in the autocast dtype (like nn.Linear)."""
    if not torch.is_autocast_enabled(device_type):
        return None
    dtypes = {x.dtype for x in tensors if x is not None and x.dtype.is_floating_point}
    if not loss:
        return torch.get_autocast_dtype(device_type)
    if len(dtypes) <= 1:
        return None
    widest = dtypes.pop()
    for dt in dtypes:
        widest = torch.promote_types(widest, dt)
    return widest


def _no_autocast(x: Tensor):
    """The ops' own GEMMs must run in the dtype they chose, not autocast's."""
    return torch.autocast(x.device.type, enabled=False)


def _cast(dtype: torch.dtype | None, *tensors):
    if dtype is None:
        return tensors
    return tuple(x if x is None or not x.dtype.is_floating_point else x.to(dtype) for x in tensors)


# ---- public API ----

def lib_projection(input: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    """Linear inverted bottleneck ``W2 (W1 x + b1) + b2`` (no activation) over the last dim.

    input: (..., D_s); w1: (E, D_s); b1: (E,) or None; w2: (D_t, E); b2: (D_t,) or None
    -> (..., D_t). float32, float64, bfloat16, float16 (all arguments the same dtype; under
    ``torch.autocast`` they are cast to the autocast dtype, as ``nn.Linear`` is).
    Same result as two ``nn.functional.linear`` calls; the backward runs the 4 GEMMs of
    the gradients in one op and keeps the (..., E) hidden activation for the W2 gradient.
    First derivatives only: double backward raises an error.
    """
    cast = _autocast_dtype(input.device.type, (input, w1, b1, w2, b2), loss=False)
    args = _cast(cast, input, w1, b1, w2, b2)
    with _no_autocast(input):
        return _LibProjection.apply(*args)


def lib_cosine_distance_loss(student_latent: Tensor, teacher_latent: Tensor, w1: Tensor, b1: Tensor | None,
                             w2: Tensor, b2: Tensor | None, eps: float = 1e-8, reduction: str = "mean",
                             layout: str = "nd", chunk_size: int | None = None) -> Tensor:
    """The paper's KD loss, fused: per frame, ``d = 1 - cos(LIB(s), t)`` with
    ``LIB(s) = W2 (W1 s + b1) + b2`` and ``cos = <p, t> / (max(|p|, eps) * max(|t|, eps))``.

    layout ``'nd'``: latents (..., D) with frames as the leading dims, the same for student and
    teacher (e.g. (N, D) or (B, T, D)); ``'bcft'``: (B, C, F, T) feature maps, a frame being the
    C*F values at one (b, t) (see :func:`pycosdist.reference.frames`).
    w1: (E, D_s), b1: (E,) or None, w2: (D_t, E), b2: (D_t,) or None; D_s, D_t the per-frame sizes.
    reduction: 'mean' | 'sum' over frames, or 'none' (one value per frame, in ``frames`` order).
    The teacher is a constant: it is detached and gets no gradient.

    The LIB is folded once per call into ``W = W2 W1`` (D_t, D_s), ``b = W2 b1 + b2`` (the math
    of :func:`pycosdist.reference.fold_lib`), so the (N, E) hidden activation never exists and
    the FLOPs drop about e-fold; the gradients of w1, b1, w2, b2 follow from W's by the chain
    rule, so training (the factorized parameters, their gradients) is unchanged.
    chunk_size: rows per chunk; only a (chunk, D_t) projection ever exists. None (automatic): the
    most rows that keep the call's peak extra memory (intermediates, the distances and the
    gradients it returns) within 25% of the unfused eager reference's, and all rows in one chunk
    when they fit (fewest GEMMs and launches); on the CPU, cache-sized chunks (a few MiB per
    thread). See :func:`auto_chunk_size` and :func:`memory_budget_bytes`. Half types compute in float32 (folded weights, GEMM
    accumulation, every intermediate); the result has the input dtype. Under ``torch.autocast``
    arguments of different dtypes (e.g. a bfloat16 student latent with float32 teacher and
    weights) are promoted to the widest. Numerics: float32 rows whose squared norms over- or
    underflow float32 (entries beyond about 1e19 or below 1e-15) are redone in float64, so any
    input whose projection is finite in float32 gets the float64 result's accuracy. eps = 0
    with an all-zero projected or teacher row gives NaN (0 / 0), as the float64 reference does.
    First derivatives only: double backward raises an error.
    """
    check_options(eps, reduction, layout, chunk_size)
    if layout == "bcft":
        for name, x in (("student_latent", student_latent), ("teacher_latent", teacher_latent)):
            if x.dim() != 4:
                raise ValueError(f"pycosdist: layout 'bcft' expects `{name}` to be a 4-D (B, C, F, T) feature map, "
                                 f"got shape {list(x.shape)}")
        s_frames, t_frames = student_latent.shape[::3], teacher_latent.shape[::3]
        frame_dims = "(B, T)"
    else:
        for name, x in (("student_latent", student_latent), ("teacher_latent", teacher_latent)):
            if x.dim() < 1:
                raise ValueError(f"pycosdist: layout 'nd' expects `{name}` of shape (..., D), got a 0-D tensor")
        s_frames, t_frames = student_latent.shape[:-1], teacher_latent.shape[:-1]
        frame_dims = "leading"
    if s_frames != t_frames:
        raise ValueError(f"pycosdist: `student_latent` (shape {list(student_latent.shape)}) and `teacher_latent` "
                         f"(shape {list(teacher_latent.shape)}) must have the same {frame_dims} frame dims")
    # Per-frame sizes against the weights, with the caller's shapes (the op sees flattened rows).
    for name, x, dim, w_name, w, w_dim in (("student_latent", student_latent, "D_s", "w1", w1, 1),
                                           ("teacher_latent", teacher_latent, "D_t", "w2", w2, 0)):
        size, how = (x.shape[1] * x.shape[2], f" = C*F = {x.shape[1]}*{x.shape[2]}") if layout == "bcft" \
            else (x.shape[-1], "")
        if w.dim() == 2 and w.shape[w_dim] != size:
            raise ValueError(f"pycosdist: `{name}` has {dim}={size}{how} features per frame (shape {list(x.shape)}), "
                             f"but `{w_name}` (shape {list(w.shape)}) expects {dim}={w.shape[w_dim]}")
    student = frames(student_latent, layout)            # (N, D_s)
    teacher = frames(teacher_latent.detach(), layout)   # (N, D_t)
    cast = _autocast_dtype(student.device.type, (student, teacher, w1, b1, w2, b2), loss=True)
    student, teacher, w1, b1, w2, b2 = _cast(cast, student, teacher, w1, b1, w2, b2)
    compute_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student, w1, b1, w2, b2))
    if chunk_size is None:
        chunk_size = auto_chunk_size(student.shape[0], student.shape[1], w1.shape[0], teacher.shape[1], student.dtype,
                                     student.device.type, compute_grad)
    with _no_autocast(student):
        return _LibCosineDistanceLoss.apply(student, teacher, w1, b1, w2, b2, float(eps), reduction, chunk_size,
                                            compute_grad)
