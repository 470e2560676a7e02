"""Functional API: autograd-aware wrappers over the ``torch.ops.pycosdist`` ops.

Each op family lives in its own module (mirroring ``csrc/<op>/``) with its fake (meta)
kernel and autograd Function; this module is the public face.
"""

from ._cosine_distance import cosine_distance_loss
from ._lib import lib_cosine_distance_loss, lib_projection

__all__ = ["cosine_distance_loss", "lib_projection", "lib_cosine_distance_loss"]
