"""nn.Modules over the fused ops: drop-in losses and the LIB projection."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as F
from ._lib import check_options
from .reference import fold_lib


class CosineDistanceLoss(nn.Module):
    """Mean (or sum / per-row) cosine distance 1 - cos between student and teacher along ``dim``."""

    def __init__(self, dim: int = -1, eps: float = 1e-8, reduction: str = "mean"):
        super().__init__()
        self.dim, self.eps, self.reduction = dim, eps, reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return F.cosine_distance_loss(student, teacher, self.dim, self.eps, self.reduction)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, reduction={self.reduction!r}"


class LinearInvertedBottleneck(nn.Module):
    """Linear inverted bottleneck ``W2 (W1 x + b1) + b2`` (no activation): (..., in_dim) -> (..., out_dim)
    through a hidden width ``expansion * in_dim``.

    Parameters (state_dict keys): ``expand.weight`` (E, in_dim), ``expand.bias`` (E,),
    ``project.weight`` (out_dim, E), ``project.bias`` (out_dim,); ``expand`` and ``project`` are
    ``nn.Linear`` submodules, so the layers keep nn.Linear's familiar init and checkpoint format,
    while the forward runs both products in one op (:func:`pycosdist.lib_projection`).
    Init: nn.Linear's default (kaiming-uniform). The cosine distance it feeds is invariant to
    the scale of the projection, so the init's gain does not matter; what matters is that the
    product W2 W1 of two independent random matrices starts full-rank and close to isotropic.
    Use :meth:`folded` for inference: one nn.Linear with the same output.
    """

    def __init__(self, in_dim: int, out_dim: int, expansion: int = 4, bias: bool = True):
        super().__init__()
        if min(in_dim, out_dim, expansion) < 1:
            raise ValueError(f"pycosdist: in_dim, out_dim and expansion must be >= 1, got {in_dim}, {out_dim}, "
                             f"{expansion}")
        self.in_dim, self.out_dim, self.expansion = in_dim, out_dim, expansion
        self.expand = nn.Linear(in_dim, expansion * in_dim, bias=bias)
        self.project = nn.Linear(expansion * in_dim, out_dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.lib_projection(x, self.expand.weight, self.expand.bias, self.project.weight, self.project.bias)

    @torch.no_grad()
    def folded(self) -> nn.Linear:
        """One nn.Linear(in_dim, out_dim) with W = W2 W1, b = W2 b1 + b2: :func:`pycosdist.reference.fold_lib`
        (the folding the fused loss does), computed in float64 and stored in the parameters' dtype."""
        params = (self.expand.weight, self.expand.bias, self.project.weight, self.project.bias)
        w, b = fold_lib(*(None if p is None else p.double() for p in params))
        linear = nn.Linear(self.in_dim, self.out_dim, bias=b is not None, device=w.device,
                           dtype=self.expand.weight.dtype)
        linear.weight.copy_(w)
        if b is not None:
            linear.bias.copy_(b)
        return linear

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}, expansion={self.expansion}"


class CosineLIBDistillationLoss(nn.Module):
    """The paper's KD loss with its trainable projection: mean (or sum / per-frame) cosine distance
    between ``LinearInvertedBottleneck(student frame)`` and the teacher frame, fused
    (:func:`pycosdist.lib_cosine_distance_loss`).

    The projection is the submodule ``lib`` (state_dict keys ``lib.expand.weight``, ...), so its
    parameters reach ``.parameters()`` / the optimizer and the checkpoint. ``teacher_latent`` is
    detached (a constant). layout: 'nd' ((..., D) latents, frames leading) or 'bcft'
    ((B, C, F, T) feature maps, student_dim = C_s * F_s, teacher_dim = C_t * F_t).
    eps (>= 0), reduction, layout and chunk_size (None or >= 1) are checked at construction.
    Under ``torch.autocast`` a bfloat16 / float16 student latent is promoted to the teacher's
    and the projection's dtype inside the loss (see :func:`pycosdist.lib_cosine_distance_loss`).
    """

    def __init__(self, student_dim: int, teacher_dim: int, expansion: int = 4, bias: bool = True, eps: float = 1e-8,
                 reduction: str = "mean", layout: str = "nd", chunk_size: int | None = None):
        super().__init__()
        check_options(eps, reduction, layout, chunk_size)  # here, not at the first forward
        self.lib = LinearInvertedBottleneck(student_dim, teacher_dim, expansion, bias)
        self.eps, self.reduction, self.layout, self.chunk_size = eps, reduction, layout, chunk_size

    def forward(self, student_latent: Tensor, teacher_latent: Tensor) -> Tensor:
        lib = self.lib
        return F.lib_cosine_distance_loss(student_latent, teacher_latent.detach(), lib.expand.weight, lib.expand.bias,
                                          lib.project.weight, lib.project.bias, self.eps, self.reduction, self.layout,
                                          self.chunk_size)

    def extra_repr(self) -> str:
        return f"eps={self.eps}, reduction={self.reduction!r}, layout={self.layout!r}, chunk_size={self.chunk_size}"
