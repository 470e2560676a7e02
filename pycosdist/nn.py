"""nn.Modules over the fused ops: drop-in losses and the LIB projection."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from . import functional as F


class CosineDistanceLoss(nn.Module):
    """Mean (or sum / per-row) cosine distance 1 - cos between student and teacher along ``dim``."""

    def __init__(self, dim: int = -1, eps: float = 1e-8, reduction: str = "mean"):
        super().__init__()
        self.dim, self.eps, self.reduction = dim, eps, reduction

    def forward(self, student: Tensor, teacher: Tensor) -> Tensor:
        return F.cosine_distance_loss(student, teacher, self.dim, self.eps, self.reduction)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, eps={self.eps}, reduction={self.reduction!r}"
