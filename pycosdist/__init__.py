"""pycosdist: fused kernels for knowledge distillation of speech denoisers by latent
representation alignment with cosine distance (Luong et al., AES 2025).

Public API:

- :func:`cosine_distance_loss`, :func:`lib_projection`, :func:`lib_cosine_distance_loss`
- :mod:`pycosdist.nn`: ``CosineDistanceLoss``, ``LinearInvertedBottleneck``, ``CosineLIBDistillationLoss``
- :mod:`pycosdist.reference`: pure-PyTorch twins of every op (the test oracle)
- :func:`build_info`
- :class:`pycosdist.features.LatentDistiller`: distill any teacher/student ``nn.Module`` pair by module name

Only torch and numpy are needed. The denoising application built on it (data, models, KD methods,
training, evaluation, demo, experiment, export, CLI) is :mod:`pycosdist.denoise`; it needs the
``[train]`` extra and is never imported by the library.
"""

from ._extension import build_info
from .functional import cosine_distance_loss, lib_cosine_distance_loss, lib_projection
from . import nn, reference
from . import _moved

_moved.install()  # `pycosdist.training` etc. -> `pycosdist.denoise.*`, with a DeprecationWarning

__version__ = "0.2.0"

__all__ = [
    "build_info",
    "cosine_distance_loss",
    "lib_projection",
    "lib_cosine_distance_loss",
    "nn",
    "reference",
]
