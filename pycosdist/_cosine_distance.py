"""cosine_distance op: fake kernels, autograd Function, public function.

The native ops (csrc/cosine_distance/) return per-row distances in the opmath dtype (float32;
float64 for float64 inputs); the reduction happens here. Two paths:

* one pass ('mean' / 'sum' while an input needs a gradient):
  ``cosine_distance_forward_with_grad`` returns the distances and the gradients of the reduced
  loss from one read of student and teacher; the backward only scales them by the upstream
  gradient (``scale_grad_``: no pass at all when it is 1; never read back to the host on CUDA).
* two passes ('none', or nothing needs a gradient): ``cosine_distance_forward`` keeps 3 row stats,
  ``cosine_distance_backward`` reads the inputs again (inference pays nothing for gradients).

float16: the one-pass gradient is computed at the scale of 'sum' and 1/N is applied together with
the upstream gradient, so a 'mean' gradient that a GradScaler factor brings back into range does
not underflow on the way (N >= 65536). bfloat16 has float32's exponent range: it needs no such care.

Double backward (``create_graph=True``) recomputes the gradient with differentiable PyTorch ops
(the float64-exact formula of ``pycosdist.reference``), so second-order terms are never dropped.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (registers torch.ops.pycosdist)
from . import reference
from .reference import REDUCTIONS

_ops = torch.ops.pycosdist
_FLOATS = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _opmath(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_inputs(student: Tensor, teacher: Tensor, dim: int, eps: float) -> list[int]:
    """The checks of csrc/cosine_distance/cosine_distance_checks.h, for fake / meta tensors.
    Returns the distance shape (the input shape without ``dim``)."""
    for name, x in (("student", student), ("teacher", teacher)):
        torch._check(x.dtype in _FLOATS, lambda: f"pycosdist: `{name}` must be a floating-point tensor (float32, "
                     f"float64, bfloat16 or float16), got {x.dtype} with shape {list(x.shape)}")
    torch._check(student.device == teacher.device, lambda: "pycosdist: `teacher` must be on the same device as "
                 f"`student` ({student.device}), got {teacher.device}")
    torch._check(student.dtype == teacher.dtype, lambda: "pycosdist: `teacher` must have the same dtype as "
                 f"`student` ({student.dtype}), got {teacher.dtype}")
    torch._check(student.shape == teacher.shape, lambda: "pycosdist: `student` and `teacher` must have the same "
                 f"shape, got {list(student.shape)} and {list(teacher.shape)}")
    torch._check(eps >= 0, lambda: f"pycosdist: `eps` must be >= 0, got {eps}")
    nd = student.dim()
    torch._check(nd >= 1, lambda: "pycosdist: `student` must have at least one dimension, got a 0-D tensor")
    torch._check(-nd <= dim < nd, lambda: f"pycosdist: `dim` must be in [{-nd}, {nd - 1}] for `student` of shape "
                 f"{list(student.shape)}, got {dim}")
    shape = list(student.shape)
    del shape[dim]
    return shape


def _empty_grad(student: Tensor, wanted: bool) -> Tensor:
    """A gradient output of the ops: contiguous, student's shape and dtype; empty when not asked for."""
    if wanted:
        return torch.empty_like(student, memory_format=torch.contiguous_format)
    return student.new_empty(0)


@torch.library.register_fake("pycosdist::cosine_distance_forward")
def _(student: Tensor, teacher: Tensor, dim: int, eps: float) -> tuple[Tensor, Tensor]:
    shape = _check_inputs(student, teacher, dim, eps)
    opmath = _opmath(student.dtype)
    return student.new_empty(shape, dtype=opmath), student.new_empty(shape + [3], dtype=opmath)


@torch.library.register_fake("pycosdist::cosine_distance_backward")
def _(grad_distance: Tensor, student: Tensor, teacher: Tensor, row_stats: Tensor, dim: int, eps: float,
      teacher_grad: bool) -> tuple[Tensor, Tensor]:
    shape = _check_inputs(student, teacher, dim, eps)
    torch._check(list(grad_distance.shape) == shape, lambda: f"pycosdist: `grad_distance` must have shape {shape}, "
                 f"got {list(grad_distance.shape)}")
    torch._check(list(row_stats.shape) == shape + [3], lambda: f"pycosdist: `row_stats` must have shape "
                 f"{shape + [3]}, got {list(row_stats.shape)}")
    return _empty_grad(student, True), _empty_grad(student, teacher_grad)


@torch.library.register_fake("pycosdist::cosine_distance_forward_with_grad")
def _(student: Tensor, teacher: Tensor, dim: int, eps: float, grad_scale: float, student_grad: bool,
      teacher_grad: bool) -> tuple[Tensor, Tensor, Tensor]:
    shape = _check_inputs(student, teacher, dim, eps)
    distance = student.new_empty(shape, dtype=_opmath(student.dtype))
    return distance, _empty_grad(student, student_grad), _empty_grad(student, teacher_grad)


@torch.library.register_fake("pycosdist::scale_grad_")
def _(grad: Tensor, factor: Tensor) -> None:
    torch._check(factor.numel() == 1, lambda: f"pycosdist: `factor` must have exactly one element, got shape "
                 f"{list(factor.shape)}")


def _reduce(distance: Tensor, reduction: str) -> Tensor:
    return distance if reduction == "none" else reference.reduce(distance, reduction)


def _loss_in(loss: Tensor, dtype: torch.dtype) -> Tensor:
    """``loss`` as ``dtype`` for an autograd Function's output, never an alias of the intermediate
    (a no-op ``.to()``): under torch.compile (2.11) the gradients of such an output came back as zeros."""
    return loss if loss.dtype == dtype else loss.to(dtype)


def _scale_in_place(grad: Tensor, factor: Tensor) -> Tensor:
    """``grad *= factor`` (one element) by the ``scale_grad_`` op, which skips the pass over
    ``grad`` when the factor is exactly 1, as from ``loss.backward()``: on the CPU by reading it,
    on CUDA in the kernel (no host synchronization). Other devices multiply."""
    if grad.device.type in ("cpu", "cuda") and type(factor) is torch.Tensor and type(grad) is torch.Tensor:
        _ops.scale_grad_(grad, factor)
        return grad
    return grad.mul_(factor)


def _differentiable_grads(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """The input gradients as a differentiable function of the inputs (for ``create_graph=True``):
    the reference formula in opmath, differentiated by autograd with its graph kept."""
    student, teacher = ctx.saved_tensors[:2]
    wanted = [x for x, need in zip((student, teacher), ctx.needs_input_grad[:2]) if need]
    opmath = _opmath(student.dtype)
    with torch.enable_grad():
        rows = reference.cosine_distance(student.to(opmath), teacher.to(opmath), ctx.dim, ctx.eps)
        loss = _reduce(rows, ctx.reduction)
        grads = iter(torch.autograd.grad(loss, wanted, grad.to(opmath), create_graph=True))
    return tuple(next(grads) if need else None for need in ctx.needs_input_grad[:2])


class _CosineDistanceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, dim: int, eps: float, reduction: str, student_grad: bool,
                teacher_grad: bool) -> Tensor:
        ctx.dim, ctx.eps, ctx.reduction = dim, eps, reduction
        ctx.one_pass = reduction != "none" and (student_grad or teacher_grad)
        if ctx.one_pass:
            rows = math.prod(student.shape[:dim] + student.shape[dim:][1:])
            # 'mean': the gradients come out final (1/N applied here, so a unit upstream gradient needs
            # no second pass), except float16's, which keep the 'sum' scale (see module docstring).
            grad_scale = 1.0 / max(rows, 1) if reduction == "mean" else 1.0
            in_kernel = 1.0 if student.dtype == torch.float16 else grad_scale
            ctx.late_scale = grad_scale / in_kernel
            distance, grad_s, grad_t = _ops.cosine_distance_forward_with_grad(
                student, teacher, dim, eps, in_kernel, student_grad, teacher_grad)
            if torch.compiler.is_compiling():  # a traced graph keeps only what is saved for backward
                ctx.save_for_backward(student, teacher, grad_s, grad_t)
                ctx.grads = None
            else:
                # Eager: each gradient is handed out once, scaled in place (no copy); a second
                # backward through a retained graph recomputes them with the two-pass ops.
                ctx.save_for_backward(student, teacher)
                ctx.grads = [grad_s, grad_t]
        else:
            distance, row_stats = _ops.cosine_distance_forward(student, teacher, dim, eps)
            ctx.save_for_backward(student, teacher, row_stats)
        ctx.rows = distance.shape
        return _loss_in(_reduce(distance, reduction), student.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        none = (None,) * 5
        if torch.is_grad_enabled():  # create_graph=True: the gradient must be differentiable itself
            return *_differentiable_grads(ctx, grad), *none
        need_s, need_t = ctx.needs_input_grad[:2]
        student, teacher = ctx.saved_tensors[:2]
        if ctx.one_pass:
            factor = grad.to(_opmath(student.dtype)) * ctx.late_scale
            if ctx.grads is not None:  # eager, first backward
                grad_s, grad_t = ctx.grads
                ctx.grads = None
                return (_scale_in_place(grad_s, factor) if need_s else None,
                        _scale_in_place(grad_t, factor) if need_t else None, *none)
            if torch.compiler.is_compiling():
                grad_s, grad_t = ctx.saved_tensors[2:]
                return (grad_s * factor if need_s else None), (grad_t * factor if need_t else None), *none
            _, row_stats = _ops.cosine_distance_forward(student, teacher, ctx.dim, ctx.eps)
        else:
            row_stats = ctx.saved_tensors[2]
        grad = grad.to(row_stats.dtype)
        if ctx.reduction == "mean":
            grad = (grad / max(ctx.rows.numel(), 1)).expand(ctx.rows)
        elif ctx.reduction == "sum":
            grad = grad.expand(ctx.rows)
        grad_s, grad_t = _ops.cosine_distance_backward(grad, student, teacher, row_stats, ctx.dim, ctx.eps, need_t)
        return (grad_s if need_s else None), (grad_t if need_t else None), *none


def _autocast_promote(student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
    """Under autocast, mixed dtypes (e.g. a bfloat16 student and a float32 teacher) run in the
    widest of them, as torch does for ``F.cosine_similarity``. The casts are differentiable."""
    if student.dtype == teacher.dtype or not torch.is_autocast_enabled(student.device.type):
        return student, teacher
    if student.dtype not in _FLOATS or teacher.dtype not in _FLOATS:
        return student, teacher  # the op's own check names the argument
    wide = torch.promote_types(student.dtype, teacher.dtype)
    return student.to(wide), teacher.to(wide)


def cosine_distance_loss(student: Tensor, teacher: Tensor, dim: int = -1, eps: float = 1e-8,
                         reduction: str = "mean") -> Tensor:
    """Cosine distance ``1 - <s, t> / (max(|s|, eps) * max(|t|, eps))`` between ``student`` and
    ``teacher`` along ``dim``, reduced over all other positions ('mean', 'sum') or not ('none').

    Accumulates in float32 (float64 for float64 inputs) and returns the input dtype. The
    teacher gets a gradient only if it requires one. Any strides work; inputs whose rows cannot
    be viewed with a unit stride along D (dim=-1) or along the trailing dims (dim != -1), e.g. a
    transposed matrix, are copied to contiguous first. Under ``torch.autocast``, a student and a
    teacher of different dtypes run in the wider one; without autocast they must match.

    'mean' and 'sum' with an input that requires grad compute the gradients in the forward pass
    (one read of the inputs); the backward scales them by the upstream gradient. Double backward
    (``create_graph=True``) is supported: it differentiates the reference formula.

    Range: any finite input. Rows whose float32 sums would overflow (``|x|`` above ~1e18) or
    underflow are recomputed in float64 scaled by their largest entry, so every finite float32 /
    bfloat16 / float16 row, and float64 rows with norms below ~1e308, match the float64 reference.
    Inf / NaN entries give NaN for their row.

    eps: norms below ``eps`` are clamped to it (no gradient through the norm there). A row with
    norm <= eps gets a gradient of size about |g| / eps: with float16 inputs pick eps so that it
    fits (e.g. 1e-3). With ``eps=0`` an all-zero row has an undefined cosine (0/0): its distance
    and the whole row's gradients (student's and teacher's) are NaN, in every dtype, as in
    ``pycosdist.reference``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"pycosdist: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    student, teacher = _autocast_promote(student, teacher)
    grad_mode = torch.is_grad_enabled()
    return _CosineDistanceLoss.apply(student, teacher, dim, eps, reduction, grad_mode and student.requires_grad,
                                     grad_mode and teacher.requires_grad)
