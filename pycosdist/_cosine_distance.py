"""cosine_distance op: fake kernel, autograd Function, public function. (to be implemented)"""

from __future__ import annotations

from torch import Tensor

from . import _extension  # noqa: F401  (registers torch.ops.pycosdist)


def cosine_distance_loss(student: Tensor, teacher: Tensor, dim: int = -1, eps: float = 1e-8,
                         reduction: str = "mean") -> Tensor:
    raise NotImplementedError
