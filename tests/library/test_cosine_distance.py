"""cosine_distance op: values and gradients against the float64 pure-PyTorch reference,
gradcheck, opcheck, torch.compile, the nn module and argument errors."""

from __future__ import annotations

import pytest
import torch

import pycosdist
from pycosdist import reference
from pycosdist.nn import CosineDistanceLoss
from cosine_check import TOL, check_cosine_against_reference as _check_against_reference

ops = torch.ops.pycosdist
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


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


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_large_streamed_gradients(reduction):
    """Gradients >= 32 MiB take the non-temporal store path (one pass for 'mean', two for
    'none'): check them, and that a live gradient is never overwritten by the next call."""
    torch.manual_seed(5)
    for dtype, shape, dim in ((torch.float32, (16384, 512), -1), (torch.bfloat16, (32768, 512), -1),
                              (torch.float32, (16, 512, 1024), 1), (torch.bfloat16, (64, 512, 512), 1)):
        student, teacher = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
        out, grad_s, grad_t = _check_against_reference(student, teacher, dim, reduction=reduction)
        kept = grad_s.clone()
        _check_against_reference(teacher, student, dim, reduction=reduction)
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scale_grad_multiplies_unless_one(dtype):
    """scale_grad_ (the one-pass losses' backward): x *= factor, and x untouched for exactly 1."""
    x = torch.randn(5, 7).to(dtype)
    before = x.clone()
    ops.scale_grad_(x, torch.tensor(1.0))
    assert torch.equal(x, before)
    ops.scale_grad_(x, torch.tensor([0.375], dtype=torch.float64))
    torch.testing.assert_close(x, (before.double() * 0.375).to(dtype))
    torch.library.opcheck(ops.scale_grad_.default, (torch.randn(4, 3).to(dtype), torch.tensor(2.0)))


def test_scale_grad_errors_name_the_argument():
    with pytest.raises(RuntimeError, match="`factor` must have exactly one element"):
        ops.scale_grad_(torch.randn(3), torch.ones(2))
    with pytest.raises(RuntimeError, match="`grad` must be a floating-point tensor"):
        ops.scale_grad_(torch.ones(3, dtype=torch.int64), torch.tensor(2.0))


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


# ---------------------------------------------------------------- one pass (issue 12)

class _OpLog(torch.utils._python_dispatch.TorchDispatchMode):
    """Records the pycosdist ops (and their arguments) dispatched while active."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "pycosdist":
            self.calls.append((func.__name__.split(".")[0], args))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("student_grad,teacher_grad", [(True, False), (True, True), (False, True), (False, False)])
def test_one_pass_path(reduction, student_grad, teacher_grad):
    """'mean' / 'sum' with a gradient: one forward op that also returns exactly the gradients asked
    for, and a backward that only scales them (scale_grad_, once per gradient: nothing is
    recomputed); otherwise the two-pass ops."""
    s = torch.randn(6, 10, requires_grad=student_grad)
    t = torch.randn(6, 10, requires_grad=teacher_grad)
    with _OpLog() as fwd:
        loss = pycosdist.cosine_distance_loss(s, t, reduction=reduction)
    one_pass = reduction != "none" and (student_grad or teacher_grad)
    if one_pass:
        [(name, args)] = fwd.calls
        assert name == "cosine_distance_forward_with_grad" and args[-2:] == (student_grad, teacher_grad)
        with _OpLog() as bwd:
            loss.backward(torch.tensor(0.7))
        assert [name for name, _ in bwd.calls] == ["scale_grad_"] * (student_grad + teacher_grad)
        s64, t64 = (x.detach().double().requires_grad_(x.requires_grad) for x in (s, t))
        (0.7 * reference.cosine_distance_loss(s64, t64, reduction=reduction)).backward()
        for x, x64 in ((s, s64), (t, t64)):
            assert (x.grad is None) == (not x.requires_grad)
            if x.requires_grad:
                torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-7)
    else:
        assert [name for name, _ in fwd.calls] == ["cosine_distance_forward"]


def test_no_gradient_work_without_grad_mode():
    s = torch.randn(6, 10, requires_grad=True)
    with torch.no_grad(), _OpLog() as log:
        pycosdist.cosine_distance_loss(s, torch.randn(6, 10))
    assert [name for name, _ in log.calls] == ["cosine_distance_forward"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((37, 77), -1), ((2, 6, 9, 70), 1), ((3, 130, 2), -2), ((5, 0), -1)])
def test_forward_with_grad_op(dtype, shape, dim):
    """The op itself: distances and grad_scale * d(sum distance)/d(input) against float64."""
    torch.manual_seed(9)
    s, t = torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype)
    s64, t64 = (x.double().requires_grad_() for x in (s, t))
    rows = reference.cosine_distance(s64, t64, dim)
    (0.25 * rows.sum()).backward()
    for student_grad, teacher_grad in ((True, True), (True, False), (False, True)):
        distance, grad_s, grad_t = ops.cosine_distance_forward_with_grad(s, t, dim, 1e-8, 0.25, student_grad,
                                                                          teacher_grad)
        atol = rtol = TOL[dtype]
        assert distance.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        torch.testing.assert_close(distance.double(), rows.detach(), atol=atol, rtol=atol)
        for wanted, got, want in ((student_grad, grad_s, s64.grad), (teacher_grad, grad_t, t64.grad)):
            if not wanted:
                assert got.numel() == 0
                continue
            assert got.dtype == dtype and got.shape == want.shape and got.is_contiguous()
            scale = want.abs().max().item() if want.numel() else 1.0
            torch.testing.assert_close(got.double(), want, atol=rtol * scale, rtol=0)


def test_opcheck_forward_with_grad():
    torch.manual_seed(10)
    for shape, dim in (((6, 20), -1), ((2, 5, 7), 1), ((4, 33), 0)):
        s, t = torch.randn(shape), torch.randn(shape)
        for flags in ((True, False), (True, True), (False, True), (False, False)):
            torch.library.opcheck(ops.cosine_distance_forward_with_grad, (s, t, dim, 1e-8, 0.5, *flags))


def test_retain_graph_second_backward():
    """The one-pass gradients are handed out (and scaled in place) once; a second backward through
    a retained graph recomputes them, so the accumulated gradient is exact."""
    torch.manual_seed(11)
    s, t = torch.randn(9, 31, requires_grad=True), torch.randn(9, 31, requires_grad=True)
    loss = pycosdist.cosine_distance_loss(s, t)
    loss.backward(torch.tensor(2.0), retain_graph=True)
    first = s.grad.clone()
    s.grad.zero_()  # the user owns the handed-out gradient: changing it must not leak into the next backward
    loss.backward(torch.tensor(3.0))
    s64, t64 = (x.detach().double().requires_grad_() for x in (s, t))
    reference.cosine_distance_loss(s64, t64).backward()
    torch.testing.assert_close(first.double(), 2 * s64.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(s.grad.double(), 3 * s64.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(t.grad.double(), 5 * t64.grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("dtype,rtol", [(torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)])
@pytest.mark.parametrize("dim", [-1, 1])
def test_half_mean_large_n_grad_scaler(dim, dtype, rtol):
    """float16 'mean' over N = 65536 rows with a GradScaler-sized upstream gradient
    (2**15: float16's largest power of two; a float16 loss times GradScaler's 2**16 is inf): most of the
    true gradient / N is below float16's subnormals (~3e-8), so a design that rounds it to float16
    before the scale arrives returns zeros. Ours keeps the 'sum' scale until the backward
    (bfloat16, with float32's exponent range, is checked the same way)."""
    torch.manual_seed(12)
    shape = (65536, 8) if dim == -1 else (256, 8, 256)
    s = (torch.randn(shape) * 100).to(dtype).requires_grad_()
    t = torch.randn(shape).to(dtype)
    pycosdist.cosine_distance_loss(s, t, dim=dim).backward(torch.tensor(32768.0, dtype=dtype))
    s64 = s.detach().double().requires_grad_()
    (32768 * reference.cosine_distance_loss(s64, t.double(), dim=dim)).backward()
    unscaled = s64.grad / 32768
    # Most elements would round to 0 in float16 (below half its smallest subnormal) before the scale.
    assert (unscaled.abs() < 2.9e-8).double().mean() > 0.5
    assert torch.isfinite(s.grad).all()
    err = (s.grad.double() - s64.grad).abs()
    assert (err <= rtol * s64.grad.abs() + 1e-4 * s64.grad.abs().max()).all(), err.max()


# ---------------------------------------------------------------- double backward (issue 13)

@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("teacher_grad", [False, True])
@pytest.mark.parametrize("dim", [-1, 1])
def test_double_backward(reduction, teacher_grad, dim):
    """A gradient penalty through the loss keeps the op's second-order part (vs float64)."""
    torch.manual_seed(13)
    x0, t0 = torch.randn(4, 6, 5, dtype=torch.float64), torch.randn(4, 6, 5, dtype=torch.float64)
    results = []
    for loss_fn in (pycosdist.cosine_distance_loss, reference.cosine_distance_loss):
        x, t = x0.clone().requires_grad_(), t0.clone().requires_grad_(teacher_grad)
        out = loss_fn(x, t, dim, 1e-8, reduction)
        loss = (out.sum() if reduction == "none" else out) + 1e-3 * (x ** 3).sum()
        inputs = (x, t) if teacher_grad else (x,)
        grads = torch.autograd.grad(loss, inputs, create_graph=True)
        sum(((g ** 2).sum() for g in grads)).backward()
        results.append((x.grad, t.grad))
    (xg, tg), (xg_ref, tg_ref) = results
    torch.testing.assert_close(xg, xg_ref, rtol=1e-9, atol=1e-12)
    if teacher_grad:
        torch.testing.assert_close(tg, tg_ref, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_double_backward_op_alone(reduction):
    """The op alone under create_graph gives a differentiable gradient (not the misleading
    'element 0 of tensors does not require grad'), and gradgradcheck holds."""
    torch.manual_seed(14)
    x = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    out = pycosdist.cosine_distance_loss(x, t, reduction=reduction)
    g, = torch.autograd.grad(out.sum(), x, create_graph=True)
    assert g.requires_grad
    (g ** 2).sum().backward()
    x64 = x.detach().clone().requires_grad_()
    g64, = torch.autograd.grad(reference.cosine_distance_loss(x64, t, reduction=reduction).sum(), x64, create_graph=True)
    (g64 ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x64.grad, rtol=1e-9, atol=1e-12)
    assert torch.autograd.gradgradcheck(lambda s, u: pycosdist.cosine_distance_loss(s, u, reduction=reduction),
                                        (x.detach().requires_grad_(), t.detach().requires_grad_()))


# ---------------------------------------------------------------- range (issue 13)

@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e19), (torch.float32, 1e30), (torch.bfloat16, 1e19),
                                         (torch.float32, 1e-25), (torch.float64, 1e160), (torch.float64, 1e-160)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dim", [-1, 0])
def test_extreme_magnitudes(dtype, scale, reduction, dim):
    """Rows whose squared norms overflow / underflow the accumulator match the float64 reference
    (computed on the same values divided by `scale`: the distance is scale-invariant and the
    gradients scale by 1/scale), instead of NaN or a finite wrong answer."""
    torch.manual_seed(15)
    unit = torch.randn(12, 300, dtype=torch.float64)
    unit_t = torch.randn(12, 300, dtype=torch.float64)
    unit_t[0] = 0.5 * unit[0]                       # parallel rows: distance 0
    if dim == 0:
        unit, unit_t = unit.t(), unit_t.t()
    s = (unit * scale).to(dtype).requires_grad_()
    t = (unit_t * scale).to(dtype).requires_grad_()
    out = pycosdist.cosine_distance_loss(s, t, dim, 0.0, reduction)
    (out.sum()).backward()
    s64 = (s.detach().double() / scale).requires_grad_()
    t64 = (t.detach().double() / scale).requires_grad_()
    ref = reference.cosine_distance_loss(s64, t64, dim, 0.0, reduction)
    ref.sum().backward()
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(out.double(), ref, atol=tol, rtol=tol)
    for got, want in ((s.grad, s64.grad / scale), (t.grad, t64.grad / scale)):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.double(), want, atol=tol * want.abs().max().item(), rtol=0)


def test_non_finite_input_gives_nan_row():
    s, t = torch.randn(3, 40), torch.randn(3, 40)
    s[1, 5] = float("inf")
    t[2, 7] = float("nan")
    out = pycosdist.cosine_distance_loss(s, t, reduction="none")
    assert torch.isfinite(out[0]) and out[1:].isnan().all()


# ---------------------------------------------------------------- eps = 0 (issue 13)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("dim", [-1, 0])
def test_eps_zero_zero_row_is_nan(dtype, reduction, dim):
    """eps=0: a zero row's cosine is 0/0. Documented behaviour, shared with the reference in every
    dtype: that row's distance and its student and teacher gradients are NaN; other rows exact."""
    torch.manual_seed(16)
    s, t = torch.randn(5, 24, dtype=torch.float64), torch.randn(5, 24, dtype=torch.float64)
    s[1] = 0
    t[3] = 0
    if dim == 0:
        s, t = s.t(), t.t()
    rows_dim = 1 if dim == 0 else 0
    bad = torch.tensor([1, 3])
    good = torch.tensor([0, 2, 4])
    results = []
    for loss_fn, dt in ((pycosdist.cosine_distance_loss, dtype), (reference.cosine_distance_loss, dtype),
                        (reference.cosine_distance_loss, torch.float64)):
        a, b = s.to(dt).requires_grad_(), t.to(dt).requires_grad_()
        per_row = loss_fn(a, b, dim, 0.0, "none")
        (per_row.mean() if reduction == "mean" else per_row.sum()).backward()
        results.append((per_row.detach().double(), a.grad.double(), b.grad.double()))
    for per_row, gs, gt in results:
        assert per_row[bad].isnan().all() and torch.isfinite(per_row[good]).all()
        for g in (gs, gt):
            assert g.index_select(rows_dim, bad).isnan().all()
            assert torch.isfinite(g.index_select(rows_dim, good)).all()
    ours, ref = results[0], results[2]
    atol = rtol = TOL[dtype]
    torch.testing.assert_close(ours[0][good], ref[0][good], atol=atol, rtol=atol)
    for got, want in zip(ours[1:], ref[1:]):
        got, want = got.index_select(rows_dim, good), want.index_select(rows_dim, good)
        torch.testing.assert_close(got, want, atol=rtol * want.abs().max().item(), rtol=0)


# ---------------------------------------------------------------- autocast (issue 13)

@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("teacher_grad", [False, True])
def test_autocast_mixed_dtypes(reduction, teacher_grad):
    """Under CPU autocast a bfloat16 student and a float32 teacher run in float32 (as
    F.cosine_similarity does); gradients flow back in each input's dtype."""
    torch.manual_seed(17)
    s = torch.randn(16, 40).bfloat16().requires_grad_()
    t = torch.randn(16, 40).requires_grad_(teacher_grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = pycosdist.cosine_distance_loss(s, t, reduction=reduction)
    assert out.dtype == torch.float32
    out.sum().backward()
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_(teacher_grad)
    ref = reference.cosine_distance_loss(s64, t64, reduction=reduction)
    ref.sum().backward()
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    assert s.grad.dtype == torch.bfloat16
    torch.testing.assert_close(s.grad.double(), s64.grad, atol=1e-2 * s64.grad.abs().max().item(), rtol=0)
    if teacher_grad:
        assert t.grad.dtype == torch.float32
        torch.testing.assert_close(t.grad.double(), t64.grad, atol=1e-5 * t64.grad.abs().max().item(), rtol=0)
    with pytest.raises(RuntimeError, match=r"`teacher` must have the same dtype as `student` \(BFloat16\)"):
        pycosdist.cosine_distance_loss(s, t)  # outside autocast, mixed dtypes stay an error
