"""Linear inverted bottleneck ops: fake kernels, autograd Functions, public functions.

Two op families (csrc/lib_projection/, csrc/lib_cosine_loss/):
  - ``lib_projection``: p = W2 (W1 x + b1) + b2 through ATen GEMMs, any leading shape.
  - ``lib_cosine_distance_loss``: the fused LIB + cosine distance KD loss. The projection only
    ever exists one row chunk at a time; for 'mean' / 'sum' the parameter and student
    gradients are computed in the forward pass (the backward only scales them by the upstream
    scalar), for 'none' the backward op recomputes each chunk with per-row upstream gradients.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _extension  # noqa: F401  (registers torch.ops.pycosdist)
from .reference import REDUCTIONS, frames

_ops = torch.ops.pycosdist


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


# ---- fake (meta) kernels: shapes only; the argument checks run in the real kernels ----

@torch.library.register_fake("pycosdist::lib_projection_forward")
def _(input, w1, b1, w2, b2):
    lead = input.shape[:-1]
    return input.new_empty((*lead, w2.shape[0])), input.new_empty((*lead, w1.shape[0]))


@torch.library.register_fake("pycosdist::lib_projection_backward")
def _(grad_output, input, hidden, w1, w2, b1_grad, b2_grad):
    return (torch.empty_like(input, memory_format=torch.contiguous_format),
            torch.empty_like(w1, memory_format=torch.contiguous_format), _bias_grad(w1, w1.shape[0] if b1_grad else None),
            torch.empty_like(w2, memory_format=torch.contiguous_format), _bias_grad(w2, w2.shape[0] if b2_grad else None))


@torch.library.register_fake("pycosdist::lib_cosine_distance_forward")
def _(student, teacher, w1, b1, w2, b2, eps, chunk_size, grad_scale, compute_grad):
    distance = student.new_empty(student.shape[0], dtype=_opmath(student.dtype))
    if not compute_grad:
        return (distance, *[student.new_empty(0) for _ in range(5)])
    return (distance, torch.empty_like(student, memory_format=torch.contiguous_format), *_param_grads(w1, b1, w2, b2))


@torch.library.register_fake("pycosdist::lib_cosine_distance_backward")
def _(grad_distance, student, teacher, w1, b1, w2, b2, eps, chunk_size):
    return (torch.empty_like(student, memory_format=torch.contiguous_format), *_param_grads(w1, b1, w2, b2))


# ---- autograd ----

class _LibProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, input: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
        output, hidden = _ops.lib_projection_forward(input, w1, b1, w2, b2)
        ctx.save_for_backward(input, hidden, w1, w2)
        return output

    @staticmethod
    @torch.autograd.function.once_differentiable  # the backward op has no derivative itself
    def backward(ctx, grad_output: Tensor):
        input, hidden, w1, w2 = ctx.saved_tensors
        need = ctx.needs_input_grad
        grads = _ops.lib_projection_backward(grad_output, input, hidden, w1, w2, need[2], need[4])
        return tuple(g if n else None for g, n in zip(grads, need))


class _LibCosineDistanceLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor,
                b2: Tensor | None, eps: float, reduction: str, chunk_size: int, compute_grad: bool) -> Tensor:
        ctx.reduction = reduction
        if reduction == "none":  # per-row upstream grads: the backward op recomputes each chunk
            distance = _ops.lib_cosine_distance_forward(student, teacher, w1, b1, w2, b2, eps, chunk_size, 1.0,
                                                        False)[0]
            ctx.save_for_backward(student, teacher, w1, b1, w2, b2)
            ctx.eps, ctx.chunk_size = eps, chunk_size
            return distance.to(student.dtype)
        # 'mean' / 'sum': the gradients of grad_scale * sum(distance) come with the forward.
        grad_scale = 1.0 / max(student.shape[0], 1) if reduction == "mean" else 1.0
        distance, *grads = _ops.lib_cosine_distance_forward(student, teacher, w1, b1, w2, b2, eps, chunk_size,
                                                            grad_scale, compute_grad)
        ctx.save_for_backward(*grads)
        loss = distance.mean() if reduction == "mean" else distance.sum()
        return loss.to(student.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: Tensor):
        need = [ctx.needs_input_grad[i] for i in (0, 2, 3, 4, 5)]  # student, w1, b1, w2, b2
        if ctx.reduction == "none":
            student, teacher, w1, b1, w2, b2 = ctx.saved_tensors
            grads = _ops.lib_cosine_distance_backward(grad, student, teacher, w1, b1, w2, b2, ctx.eps,
                                                      ctx.chunk_size)
            gs, gw1, gb1, gw2, gb2 = (g if n else None for g, n in zip(grads, need))
        else:  # the forward's gradients of grad_scale * sum(distance), times the upstream scalar
            gs, gw1, gb1, gw2, gb2 = (g * grad if n else None for g, n in zip(ctx.saved_tensors, need))
        return gs, None, gw1, gb1, gw2, gb2, None, None, None, None


# ---- public API ----

def lib_projection(input: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    """Linear inverted bottleneck ``W2 (W1 x + b1) + b2`` (no activation) over the last dim.

    input: (..., D_s); w1: (E, D_s); b1: (E,) or None; w2: (D_t, E); b2: (D_t,) or None
    -> (..., D_t). float32, float64, bfloat16, float16 (all arguments the same dtype).
    Same result as two ``nn.functional.linear`` calls; the backward runs the 4 GEMMs of
    the gradients in one op and keeps the (..., E) hidden activation for the W2 gradient.
    """
    return _LibProjection.apply(input, w1, b1, w2, b2)


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
    chunk_size: rows per chunk (None: automatic, a few MB of intermediates); only the
    (chunk, E) and (chunk, D_t) intermediates ever exist. Half types compute in float32;
    the result has the input dtype. For 'mean' / 'sum' the gradients are computed in the
    forward (already divided by N for 'mean') and the backward only scales them by the upstream
    gradient: with float16 and a large N the student gradient can underflow before a
    GradScaler's factor reaches it, so prefer bfloat16 (or float32) there.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"pycosdist: `reduction` must be one of {REDUCTIONS}, got {reduction!r}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"pycosdist: `chunk_size` must be None (automatic) or >= 1, got {chunk_size}")
    if layout == "bcft":
        for name, x in (("student_latent", student_latent), ("teacher_latent", teacher_latent)):
            if x.dim() != 4:
                raise ValueError(f"pycosdist: layout 'bcft' expects `{name}` to be a 4-D (B, C, F, T) feature map, "
                                 f"got shape {list(x.shape)}")
        s_frames, t_frames = student_latent.shape[::3], teacher_latent.shape[::3]
        frame_dims = "(B, T)"
    elif layout == "nd":
        for name, x in (("student_latent", student_latent), ("teacher_latent", teacher_latent)):
            if x.dim() < 1:
                raise ValueError(f"pycosdist: layout 'nd' expects `{name}` of shape (..., D), got a 0-D tensor")
        s_frames, t_frames = student_latent.shape[:-1], teacher_latent.shape[:-1]
        frame_dims = "leading"
    else:
        raise ValueError(f"pycosdist: `layout` must be 'nd' or 'bcft', got {layout!r}")
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
    compute_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (student, w1, b1, w2, b2))
    return _LibCosineDistanceLoss.apply(student, teacher, w1, b1, w2, b2, eps, reduction, chunk_size or 0,
                                        compute_grad)
