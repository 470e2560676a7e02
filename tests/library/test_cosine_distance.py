"""cosine_distance op: values and gradients against the float64 pure-PyTorch reference,
gradcheck, opcheck, torch.compile, the nn module and argument errors."""

from __future__ import annotations

import pytest
import torch

import pycosdist
from pycosdist import reference
from pycosdist.nn import CosineDistanceLoss

ops = torch.ops.pycosdist
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (values atol, grads rtol relative to the largest reference gradient)
TOL = {torch.float32: (1e-5, 1e-5), torch.float64: (1e-12, 1e-12), torch.bfloat16: (2e-2, 2e-2),
       torch.float16: (3e-3, 3e-3)}


def _check_against_reference(student, teacher, dim=-1, eps=1e-8, reduction="none", teacher_grad=True):
    """Forward and backward of pycosdist vs the float64 reference on the same (rounded) values."""
    dtype = student.dtype
    s = student.detach().requires_grad_()  # detach keeps the strides (clone would not for views)
    t = teacher.detach().requires_grad_(teacher_grad)
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_(teacher_grad)
    out = pycosdist.cosine_distance_loss(s, t, dim, eps, reduction)
    rows = reference.cosine_distance(s64, t64, dim, eps)
    rows.retain_grad()
    ref = reference.reduce(rows, reduction)
    assert out.dtype == dtype and out.shape == ref.shape
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol * max(1.0, ref.abs().max().item() if ref.numel() else 1),
                               rtol=atol, equal_nan=True)
    upstream = torch.randn(ref.shape, dtype=torch.float64)
    (out.double() * upstream).sum().backward()
    (ref * upstream).sum().backward()
    for x, got, want in ((s64, s.grad, s64.grad), (t64, t.grad, t64.grad) if teacher_grad else (t64, None, None)):
        if want is None:
            assert t.grad is None
            continue
        assert got.dtype == dtype and got.shape == want.shape
        assert torch.isfinite(got).all()
        if want.numel():
            # Error relative to the row's own scale (rows may differ by 1e8): its largest
            # gradient, or |g| / max(|x|, eps), the size of the two terms that cancel in it.
            g = rows.grad.unsqueeze(dim).abs()
            scale = want.abs().amax(dim, keepdim=True) + g / torch.linalg.vector_norm(x, dim=dim, keepdim=True).clamp_min(eps)
            assert ((got.double() - want).abs() <= rtol * scale).all(), (got, want)
    return out, s.grad, t.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [
    ((37, 77), -1),         # odd sizes, row layout
    ((64, 512), -1),        # whole unrolled vectors
    ((5, 33), 1),           # D shorter than one vector
    ((7, 1), -1),           # D = 1
    ((3, 0), -1),           # D = 0: distance 1
    ((2, 6, 9, 70), 1),     # (B, C, F, T), dim=1: inner = 630, vectorized across rows
    ((4, 6, 5), 0),         # dim=0, inner < one vector
    ((3, 130, 2), -2),      # negative dim, inner = 2
])
def test_matches_reference(dtype, shape, dim):
    torch.manual_seed(0)
    student, teacher = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    _check_against_reference(student, teacher, dim)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dim", [-1, 1])
def test_reductions(reduction, dim):
    torch.manual_seed(1)
    student, teacher = torch.randn(4, 19, 23), torch.randn(4, 19, 23)
    _check_against_reference(student, teacher, dim, reduction=reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_empty_batch(reduction):
    student, teacher = torch.randn(0, 16), torch.randn(0, 16)
    out, grad_s, grad_t = _check_against_reference(student, teacher, reduction=reduction)
    assert grad_s.shape == (0, 16) and grad_t.shape == (0, 16)


def _views():
    torch.manual_seed(2)
    yield "transposed", torch.randn(40, 33).t(), torch.randn(40, 33).t(), -1        # copied to contiguous
    yield "row step", torch.randn(60, 48)[::3], torch.randn(60, 48)[::3], -1         # viewed in place
    yield "column step", torch.randn(20, 96)[:, ::2], torch.randn(20, 96)[:, ::2], -1
    yield "column prefix", torch.randn(20, 96)[:, :50], torch.randn(20, 50), -1
    yield "bcft permuted", *(torch.randn(2, 70, 6, 9).permute(0, 2, 3, 1) for _ in range(2)), 1
    yield "outer step dim=1", torch.randn(6, 8, 70)[::2], torch.randn(3, 8, 70), 1
    yield "expanded teacher", torch.randn(30, 40), torch.randn(1, 40).expand(30, 40), -1


@pytest.mark.parametrize("name,student,teacher,dim", list(_views()), ids=[v[0] for v in _views()])
def test_non_contiguous(name, student, teacher, dim):
    _check_against_reference(student, teacher, dim, teacher_grad=name != "expanded teacher")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [-1, 0])
def test_zero_and_tiny_rows(dtype, dim):
    torch.manual_seed(3)
    # A clamped row's gradient is about |g| / eps: 1e8 |g| overflows float16, so a larger eps there.
    eps = 1e-3 if dtype == torch.float16 else 1e-8
    student, teacher = torch.randn(6, 40, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    student[0] = 0                                  # zero student row
    teacher[1] = 0                                  # zero teacher row
    student[2] = teacher[2] = 0                     # both zero
    student[3] *= 0.5 * eps / student[3].norm()     # below eps: clamped norm, no gradient through it
    teacher[4] *= 2 * eps / teacher[4].norm()       # above eps: not clamped
    if dim == 0:
        student, teacher = student.t(), teacher.t()
    out, grad_s, grad_t = _check_against_reference(student.to(dtype), teacher.to(dtype), dim, eps)
    zero_rows = [0, 1, 2]
    torch.testing.assert_close(out[zero_rows].double(), torch.ones(3, dtype=torch.float64))


def test_teacher_grad_only_when_required():
    student = torch.randn(8, 16, requires_grad=True)
    teacher = torch.randn(8, 16)
    pycosdist.cosine_distance_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None
    # And the op itself returns an empty teacher gradient when not asked.
    _, stats = ops.cosine_distance_forward(student.detach(), teacher, -1, 1e-8)
    grad_s, grad_t = ops.cosine_distance_backward(torch.ones(8), student.detach(), teacher, stats, -1, 1e-8, False)
    assert grad_s.shape == (8, 16) and grad_t.numel() == 0


def test_teacher_only_requires_grad():
    student, teacher = torch.randn(8, 16), torch.randn(8, 16, requires_grad=True)
    pycosdist.cosine_distance_loss(student, teacher, reduction="sum").backward()
    t64 = teacher.detach().double().requires_grad_()
    reference.cosine_distance_loss(student.double(), t64, reduction="sum").backward()
    torch.testing.assert_close(teacher.grad.double(), t64.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape,dim", [((5, 13), -1), ((3, 4, 7), 1)])
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_gradcheck(shape, dim, reduction):
    torch.manual_seed(4)
    student = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, t: pycosdist.cosine_distance_loss(s, t, dim, 1e-8, reduction),
                                    (student, teacher))


def test_large_streamed_gradients_and_recycled_memory():
    """Gradients >= 32 MiB take the non-temporal store path and come from recycled memory:
    check them, and that a live gradient is never handed out again."""
    torch.manual_seed(5)
    for dtype, shape, dim in ((torch.float32, (16384, 512), -1), (torch.bfloat16, (32768, 512), -1),
                              (torch.float32, (16, 512, 1024), 1), (torch.bfloat16, (64, 512, 512), 1)):
        student, teacher = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        out, grad_s, grad_t = _check_against_reference(student, teacher, dim, reduction="mean")
        kept = grad_s.clone()
        _check_against_reference(teacher, student, dim, reduction="mean")  # same sizes: freed blocks reused
        assert torch.equal(grad_s, kept)


def test_opcheck():
    torch.manual_seed(6)
    for shape, dim in (((6, 20), -1), ((2, 5, 7), 1)):
        s, t = torch.randn(shape), torch.randn(shape)
        torch.library.opcheck(ops.cosine_distance_forward, (s, t, dim, 1e-8))
        _, stats = ops.cosine_distance_forward(s, t, dim, 1e-8)
        rows = stats.shape[:-1]
        for g in (torch.randn(rows), torch.tensor(0.5).expand(rows)):
            for teacher_grad in (False, True):
                torch.library.opcheck(ops.cosine_distance_backward, (g, s, t, stats, dim, 1e-8, teacher_grad))


def test_torch_compile_fullgraph():
    torch.manual_seed(7)
    fn = torch.compile(pycosdist.cosine_distance_loss, fullgraph=True)
    for dim, teacher_grad in ((-1, False), (1, True)):
        s = torch.randn(4, 24, 10, requires_grad=True)
        t = torch.randn(4, 24, 10, requires_grad=teacher_grad)
        out = fn(s, t, dim)
        out.backward()
        s2, t2 = s.detach().requires_grad_(), t.detach().requires_grad_(teacher_grad)
        eager = pycosdist.cosine_distance_loss(s2, t2, dim)
        eager.backward()
        torch.testing.assert_close(out, eager)
        torch.testing.assert_close(s.grad, s2.grad)
        if teacher_grad:
            torch.testing.assert_close(t.grad, t2.grad)
        else:
            assert t.grad is None


def test_nn_module():
    torch.manual_seed(8)
    loss = CosineDistanceLoss(dim=1, reduction="sum")
    assert "dim=1" in repr(loss) and "'sum'" in repr(loss)
    s, t = torch.randn(3, 8, 5), torch.randn(3, 8, 5)
    torch.testing.assert_close(loss(s, t), reference.cosine_distance_loss(s, t, 1, reduction="sum"))


# ---------------------------------------------------------------- errors

def test_error_shape_mismatch():
    with pytest.raises(RuntimeError, match=r"`student` and `teacher` must have the same shape, got \[4, 8\] and \[4, 9\]"):
        pycosdist.cosine_distance_loss(torch.randn(4, 8), torch.randn(4, 9))


def test_error_dtype_mismatch():
    with pytest.raises(RuntimeError, match=r"`teacher` must have the same dtype as `student` \(Float\), got Double"):
        pycosdist.cosine_distance_loss(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64))


def test_error_device_mismatch():
    with pytest.raises(RuntimeError, match=r"`teacher` must be on the same device as `student` \(cpu\), got meta"):
        pycosdist.cosine_distance_loss(torch.randn(4, 8), torch.randn(4, 8, device="meta"))


def test_error_integer_input():
    with pytest.raises(RuntimeError, match=r"`student` must be a floating-point tensor .* got Long with shape \[4, 8\]"):
        pycosdist.cosine_distance_loss(torch.ones(4, 8, dtype=torch.long), torch.ones(4, 8, dtype=torch.long))


def test_error_bad_dim():
    with pytest.raises(RuntimeError, match=r"`dim` must be in \[-2, 1\] for `student` of shape \[4, 8\], got 2"):
        pycosdist.cosine_distance_loss(torch.randn(4, 8), torch.randn(4, 8), dim=2)


def test_error_bad_reduction():
    with pytest.raises(ValueError, match=r"`reduction` must be one of \('mean', 'sum', 'none'\), got 'max'"):
        pycosdist.cosine_distance_loss(torch.randn(4, 8), torch.randn(4, 8), reduction="max")


def test_error_negative_eps():
    with pytest.raises(RuntimeError, match=r"`eps` must be >= 0, got -1"):
        pycosdist.cosine_distance_loss(torch.randn(4, 8), torch.randn(4, 8), eps=-1.0)


def test_error_backward_row_stats_shape():
    s, t = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(RuntimeError, match=r"`row_stats` must have shape \[4, 3\], got \[4, 2\]"):
        ops.cosine_distance_backward(torch.ones(4), s, t, torch.zeros(4, 2), -1, 1e-8, False)
