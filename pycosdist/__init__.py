"""pycosdist: fused kernels for knowledge distillation of speech denoisers by latent
representation alignment with cosine distance (Luong et al., AES 2025).

Public API:
  - :func:`cosine_distance_loss`, :func:`lib_projection`, :func:`lib_cosine_distance_loss`
  - :mod:`pycosdist.nn`: ``CosineDistanceLoss``, ``LinearInvertedBottleneck``, ``CosineLIBDistillationLoss``
  - :mod:`pycosdist.reference`: pure-PyTorch twins of every op (the test oracle)
  - :func:`build_info`
The training package (data, models, distill, training, evaluation, cli) is imported on demand.
"""

from ._extension import build_info
from .functional import cosine_distance_loss, lib_cosine_distance_loss, lib_projection
from . import nn, reference

__version__ = "0.1.0"

__all__ = [
    "build_info",
    "cosine_distance_loss",
    "lib_projection",
    "lib_cosine_distance_loss",
    "nn",
    "reference",
]
