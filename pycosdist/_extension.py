"""Loads the native extension ``pycosdist._C`` (which registers ``torch.ops.pycosdist``).

The torch version the extension was built against is recorded in a pure-Python file at
build time and compared with the running torch *before* the shared library is loaded, so
a mismatch gives a readable error instead of an undefined-symbol crash.
"""

from __future__ import annotations

import torch

try:
    from . import _build_config
except ImportError as exc:  # pragma: no cover - only without a build
    raise ImportError(
        "pycosdist: the native extension is not built. Install with "
        "`pip install --no-build-isolation .` (or `make dev` for an in-place developer build)."
    ) from exc

if _build_config.TORCH_VERSION != torch.__version__:
    raise ImportError(
        f"pycosdist: the extension was built against torch {_build_config.TORCH_VERSION} but torch "
        f"{torch.__version__} is running; rebuild it with `pip install --no-build-isolation .` "
        "in this environment."
    )

try:
    from . import _C
except ImportError as exc:  # pragma: no cover
    raise ImportError(
        f"pycosdist: could not load the native extension built against torch {_build_config.TORCH_VERSION} "
        f"(running torch {torch.__version__}): {exc}"
    ) from exc


def build_info() -> dict:
    """How the extension was built: ``torch_version``, ``with_cuda``, ``cuda_version``, ``simd``, ..."""
    return dict(_C.build_info())
