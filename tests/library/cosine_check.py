"""The float64 check of cosine_distance_loss shared by the CPU and the CUDA tests."""

from __future__ import annotations

import torch

import pycosdist
from pycosdist import reference

# Relative tolerance per dtype: values, and gradients relative to the scale of each row.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.bfloat16: 2e-2, torch.float16: 3e-3}


def check_cosine_against_reference(student, teacher, dim=-1, eps=1e-8, reduction="none", teacher_grad=True,
                                   upstream=None):
    """pycosdist's forward and backward vs the float64 reference on the same (rounded) values, on the
    inputs' device. ``upstream(shape) -> float64 tensor`` is the upstream gradient (default: randn).
    Returns ``(loss, student grad, teacher grad)``."""
    dtype = student.dtype
    s = student.detach().requires_grad_()  # detach keeps the strides (views stay views)
    t = teacher.detach().requires_grad_(teacher_grad)
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_(teacher_grad)
    out = pycosdist.cosine_distance_loss(s, t, dim, eps, reduction)
    rows = reference.cosine_distance(s64, t64, dim, eps)
    rows.retain_grad()
    ref = reference.reduce(rows, reduction)
    assert out.device == student.device and out.dtype == dtype and out.shape == ref.shape
    tol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=tol * max(1.0, ref.abs().max().item() if ref.numel() else 1.0),
                               rtol=tol, equal_nan=True)
    up = upstream(ref.shape) if upstream is not None else torch.randn(ref.shape, dtype=torch.float64,
                                                                      device=ref.device)
    (out.double() * up).sum().backward()
    (ref * up).sum().backward()
    if not teacher_grad:
        assert t.grad is None
    for x, got, want in [(s64, s.grad, s64.grad)] + ([(t64, t.grad, t64.grad)] if teacher_grad else []):
        assert got.dtype == dtype and got.shape == want.shape and got.device == student.device
        assert torch.isfinite(got).all()
        if want.numel():
            # Error relative to each row's own scale (rows may differ by 1e8): its largest gradient,
            # or |g| / max(|x|, eps), the size of the two terms that cancel in it.
            g = rows.grad.unsqueeze(dim).abs()
            scale = want.abs().amax(dim, keepdim=True) + g / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(eps)
            assert ((got.double() - want).abs() <= tol * scale).all(), (got, want)
    return out, s.grad, t.grad
