"""Linear inverted bottleneck ops: fake kernels, autograd Functions, public functions. (to be implemented)"""

from __future__ import annotations

from torch import Tensor

from . import _extension  # noqa: F401  (registers torch.ops.pycosdist)


def lib_projection(input: Tensor, w1: Tensor, b1: Tensor | None, w2: Tensor, b2: Tensor | None) -> Tensor:
    raise NotImplementedError


def lib_cosine_distance_loss(student_latent: Tensor, teacher_latent: Tensor, w1: Tensor, b1: Tensor | None,
                             w2: Tensor, b2: Tensor | None, eps: float = 1e-8, reduction: str = "mean",
                             layout: str = "nd", chunk_size: int | None = None) -> Tensor:
    raise NotImplementedError
