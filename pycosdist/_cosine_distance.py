"""cosine_distance op: fake kernels, autograd Function, public function.

The native ops (csrc/cosine_distance/) return per-row distances and row stats in the opmath
dtype (float32; float64 for float64 inputs); the reduction happens here on those, and the
backward hands the kernel the per-row gradient as an expanded (stride-0) view for 'mean' and
'sum', so no (rows,) or (rows, D) tensor is materialized for it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (registers torch.ops.pycosdist)
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
    grad_t = torch.empty_like(student, memory_format=torch.contiguous_format) if teacher_grad \
        else student.new_empty(0)
    return torch.empty_like(student, memory_format=torch.contiguous_format), grad_t


class _CosineDistanceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, dim: int, eps: float, reduction: str) -> Tensor:
        distance, row_stats = _ops.cosine_distance_forward(student, teacher, dim, eps)
        ctx.save_for_backward(student, teacher, row_stats)
        ctx.dim, ctx.eps, ctx.reduction, ctx.rows = dim, eps, reduction, distance.shape
        if reduction == "mean":
            distance = distance.mean()
        elif reduction == "sum":
            distance = distance.sum()
        return distance.to(student.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward op has no derivative itself
    def backward(ctx, grad: Tensor):
        student, teacher, row_stats = ctx.saved_tensors
        grad = grad.to(row_stats.dtype)
        if ctx.reduction == "mean":
            grad = (grad / max(ctx.rows.numel(), 1)).expand(ctx.rows)
        elif ctx.reduction == "sum":
            grad = grad.expand(ctx.rows)
        teacher_grad = ctx.needs_input_grad[1]
        grad_s, grad_t = _ops.cosine_distance_backward(grad, student, teacher, row_stats, ctx.dim, ctx.eps,
                                                       teacher_grad)
        return (grad_s if ctx.needs_input_grad[0] else None), (grad_t if teacher_grad else None), None, None, None


def cosine_distance_loss(student: Tensor, teacher: Tensor, dim: int = -1, eps: float = 1e-8,
                         reduction: str = "mean") -> Tensor:
    """Cosine distance ``1 - <s, t> / (max(|s|, eps) * max(|t|, eps))`` between ``student`` and
    ``teacher`` along ``dim``, reduced over all other positions ('mean', 'sum') or not ('none').

    Accumulates in float32 (float64 for float64 inputs) and returns the input dtype. The
    teacher gets a gradient only if it requires one. A row with norm <= eps gets a gradient
    of size about |g| / eps: with float16 inputs pick eps so that it fits (e.g. 1e-3). Any strides work; inputs whose rows cannot
    be viewed with a unit stride along D (dim=-1) or along the trailing dims (dim != -1), e.g.
    a transposed matrix, are copied to contiguous first.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"pycosdist: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    return _CosineDistanceLoss.apply(student, teacher, dim, eps, reduction)
