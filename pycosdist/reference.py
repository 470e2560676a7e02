"""Pure-PyTorch reference implementations: the oracle the fused kernels are tested against,
and the "unfused" baseline they are benchmarked against. Autograd does the backward."""

from __future__ import annotations

import math

import torch
from torch import Tensor

REDUCTIONS = ("mean", "sum", "none")


def reduce(values: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def cosine_distance(student: Tensor, teacher: Tensor, dim: int = -1, eps: float = 1e-8) -> Tensor:
    """Per-row 1 - <s, t> / (max(|s|, eps) * max(|t|, eps)) along ``dim``.

    With ``eps=0`` an all-zero row gives 0/0: its distance and its gradients are NaN (the
    documented behaviour of ``pycosdist.cosine_distance_loss`` too). Run it in float64 for the
    full range: float32 squares overflow for ``|x|`` above ~1e18."""
    dot = (student * teacher).sum(dim)
    norm_s = torch.linalg.vector_norm(student, dim=dim).clamp_min(eps)
    norm_t = torch.linalg.vector_norm(teacher, dim=dim).clamp_min(eps)
    return 1.0 - dot / (norm_s * norm_t)


def cosine_distance_loss(student: Tensor, teacher: Tensor, dim: int = -1, eps: float = 1e-8,
                         reduction: str = "mean") -> Tensor:
    return reduce(cosine_distance(student, teacher, dim, eps), reduction)


def lib_projection(x: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    """Linear inverted bottleneck: W2 (W1 x + b1) + b2, no activation. x: (..., D_s) -> (..., D_t)."""
    return torch.nn.functional.linear(torch.nn.functional.linear(x, w1, b1), w2, b2)


def fold_lib(w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """The LIB folded into one affine map (it has no activation): W2 (W1 x + b1) + b2 = W x + b with
    W = W2 W1 (D_t, D_s) and b = W2 b1 + b2 (D_t,), or None without biases. Differentiable; the
    fused loss's kernels do the same math in their compute dtype (csrc/common/lib_fold.h).
    w1: (E, D_s), b1: (E,) or None, w2: (D_t, E), b2: (D_t,) or None."""
    w = w2 @ w1
    if b1 is None:
        return w, b2
    return w, (w2 @ b1 if b2 is None else torch.addmv(b2, w2, b1))


def frames(latent: Tensor, layout: str) -> Tensor:
    """Flatten a latent to one row per frame.

    layout ``"nd"``: any (..., D) tensor, rows are the leading dims;
    layout ``"bcft"``: a (B, C, F, T) feature map -> (B*T, C*F) (each frame's C*F values).
    """
    if layout == "nd":  # not reshape(-1, D): ambiguous when D = 0
        return latent.reshape(math.prod(latent.shape[:-1]), latent.shape[-1])
    if layout == "bcft":
        if latent.dim() != 4:
            raise ValueError(f"layout 'bcft' expects a 4-D (B, C, F, T) latent, got shape {tuple(latent.shape)}")
        b, c, f, t = latent.shape
        return latent.permute(0, 3, 1, 2).reshape(b * t, c * f)
    raise ValueError(f"layout must be 'nd' or 'bcft', got {layout!r}")


def lib_cosine_distance_loss(student_latent: Tensor, teacher_latent: Tensor, w1: Tensor, b1: Tensor | None,
                             w2: Tensor, b2: Tensor | None, eps: float = 1e-8, reduction: str = "mean",
                             layout: str = "nd") -> Tensor:
    """The paper's KD loss, unfused: cosine distance between LIB(student frame) and teacher frame."""
    s = frames(student_latent, layout)
    t = frames(teacher_latent, layout).detach()
    return reduce(cosine_distance(lib_projection(s, w1, b1, w2, b2), t, -1, eps), reduction)
