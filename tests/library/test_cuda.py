"""CUDA kernels (csrc/*/*_cuda.cpp, *.cu) against the float64 pure-PyTorch reference, gradcheck,
opcheck, torch.compile and streams, through the public API and the raw ops.

Skipped as a whole without a CUDA device, or when the extension was built without its CUDA
kernels (no CUDA compiler at build time).
"""

from __future__ import annotations

import pytest
import torch

import pycosdist
from pycosdist import reference
from cosine_check import TOL, check_cosine_against_reference

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(not pycosdist.build_info()["with_cuda"],
                       reason="pycosdist was built without its CUDA kernels (no CUDA compiler at build time)"),
]

ops = torch.ops.pycosdist
DEV = "cuda"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _randn(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randn(shape, generator=g, device=DEV, dtype=dtype)


def _upstream(shape, seed=9):
    """Upstream gradients exactly representable in every dtype (multiples of 1/8 in [-1, 1])."""
    g = torch.Generator(device=DEV).manual_seed(seed)
    return torch.randint(-8, 9, tuple(shape), generator=g, device=DEV).double() / 8


# ---------------------------------------------------------------- cosine_distance

def _check_cosine(student, teacher, dim=-1, eps=1e-8, reduction="none", teacher_grad=True):
    check_cosine_against_reference(student, teacher, dim, eps, reduction, teacher_grad, upstream=_upstream)


COSINE_SHAPES = [
    ((37, 77), -1),           # odd D: rows in every 16-byte phase (scalar head, packs, scalar tail)
    ((64, 512), -1),          # 16-byte packs, a warp per row
    ((6, 4096), -1),          # few long rows: several warps per row
    ((2, 70001), -1),         # very long odd rows
    ((7, 1), -1),             # D = 1
    ((3, 0), -1),             # D = 0: distance 1
    ((5, 33), 0),             # dim=0: inner = 33, column kernel
    ((2, 6, 9, 70), 1),       # (B, C, F, T), dim=1: inner = 630
    ((4, 6, 5), 0),           # inner < 32
    ((3, 130, 2), -2),        # negative dim, inner = 2
    ((70000, 3), 0),          # long column reduction, inner = 3: D split over blocks
    ((2, 50000, 3), 1),       # the same with outer = 2
    ((1000, 3), -1),          # D < one pack: a thread per row
    ((1000, 64), -1),         # sub-warp row groups (16 lanes in float32)
    ((100000, 64), -1),       # > 100k rows, sub-warp groups, many blocks per SM
    ((70000, 2, 3), 1),       # column kernel with outer > 65535 (grid-stride over outer)
    ((0, 64), -1),            # N = 0
    ((0, 5, 3), 1),           # N = 0, column layout
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", COSINE_SHAPES,
                         ids=["x".join(map(str, shape)) + f"-dim{dim}" for shape, dim in COSINE_SHAPES])
def test_cosine_matches_reference(dtype, shape, dim):
    _check_cosine(_randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype, seed=2), dim)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cosine_large_rows(dtype):
    """(262144, 512): the benchmark's shape, many grid-stride rounds."""
    _check_cosine(_randn(262144, 512, dtype=dtype), _randn(262144, 512, dtype=dtype, seed=2), reduction="mean")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,dim", [((64, 48), -1), ((6, 40, 5), 1)])
def test_cosine_eps_zero(dtype, shape, dim):
    """eps = 0: max(|x|, 0) = |x|, no clamping on non-zero rows."""
    _check_cosine(_randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype, seed=2), dim, eps=0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("make", [
    lambda x: x[:, :128],     # row stride 130: rows alternate between two 16-byte phases
    lambda x: x[:, 1:129],    # every row starts off a 16-byte boundary
    lambda x: x[:, 3:126],    # odd D and an odd start
], ids=["stride130", "offset1", "offset3-odd"])
def test_cosine_misaligned_rows(dtype, make):
    """Rows whose starts are not 16-byte aligned: peeled head, packed body, scalar tail."""
    s, t = make(_randn(1000, 130, dtype=dtype)), make(_randn(1000, 130, dtype=dtype, seed=2))
    _check_cosine(s, t)
    _check_cosine(s, t, reduction="mean", teacher_grad=False)
    _check_cosine(s, t.contiguous())  # student and teacher in different phases: scalar rows


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_properties(0).total_memory < 40 * 2**30,
                    reason="needs a CUDA device with >= 40 GiB (4 bf16 tensors of 2^31+ elements)")
def test_cosine_bf16_above_2_pow_31_elements():
    """(2^22 + 3, 520) bfloat16: 2.18e9 elements per tensor, so element offsets pass 2^31. The
    float64 reference runs on rows around that offset and at both ends."""
    n, d = 2**22 + 3, 520
    s = torch.randn(n, d, device=DEV, dtype=torch.bfloat16, generator=torch.Generator(DEV).manual_seed(0))
    t = torch.randn(n, d, device=DEV, dtype=torch.bfloat16, generator=torch.Generator(DEV).manual_seed(2))
    s.requires_grad_()
    t.requires_grad_()
    out = pycosdist.cosine_distance_loss(s, t, reduction="sum")
    out.backward()
    crossing = 2**31 // d
    rows = torch.tensor([0, 1, crossing - 1, crossing, crossing + 1, n - 2, n - 1], device=DEV)
    s64 = s.detach()[rows].double().requires_grad_()
    t64 = t.detach()[rows].double().requires_grad_()
    ref = reference.cosine_distance(s64, t64)
    ref.sum().backward()
    with torch.no_grad():
        got = ops.cosine_distance_forward(s[rows], t[rows], -1, 1e-8)[0]
    torch.testing.assert_close(got.double(), ref.detach(), atol=1e-5, rtol=1e-5)
    for grad, want in ((s.grad[rows], s64.grad), (t.grad[rows], t64.grad)):
        _assert_scaled_close(grad, want, 2e-2)
    assert torch.isfinite(out) and abs(out.item() - n) < 0.01 * n  # random rows: cos ~ 0


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dim", [-1, 1])
def test_cosine_reductions(reduction, dim):
    _check_cosine(_randn(4, 19, 24), _randn(4, 19, 24, seed=2), dim, reduction=reduction)


# A zero row's gradient is of order 1 / eps: 1e8 overflows float16, so float16 uses eps = 1e-3.
ZERO_ROW_EPS = {torch.float32: 1e-8, torch.float64: 1e-8, torch.bfloat16: 1e-8, torch.float16: 1e-3}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [-1, 1])
def test_cosine_zero_rows_are_finite(dtype, dim):
    s, t = _randn(8, 16, 32, dtype=dtype), _randn(8, 16, 32, dtype=dtype, seed=2)
    sv, tv = s.movedim(dim, -1), t.movedim(dim, -1)  # views: rows along the last dim
    sv[0, 0] = 0   # a zero student row
    sv[1] = 0      # a block of them
    tv[0, 1] = 0   # a zero teacher row
    sv[3, 3] = 0   # both zero
    tv[3, 3] = 0
    _check_cosine(s, t, dim, eps=ZERO_ROW_EPS[dtype])
    _check_cosine(s, t, dim, eps=ZERO_ROW_EPS[dtype], reduction="mean")


@pytest.mark.parametrize("make", [
    lambda x: x.t(),                       # transposed: copied to contiguous
    lambda x: x[:, :128],                  # rows with a larger stride, still 16-byte packs
    lambda x: x[:, 1:129],                 # misaligned rows: scalar head, packed body
    lambda x: x[::2],                      # every other row
    lambda x: x[:1].expand(64, -1),        # one row repeated (stride 0)
], ids=["transposed", "row-stride", "misaligned", "every-other-row", "expanded"])
def test_cosine_noncontiguous(make):
    s, t = make(_randn(192, 192)), make(_randn(192, 192, seed=2))
    _check_cosine(s, t)
    _check_cosine(s, t.contiguous(), teacher_grad=False)


def test_cosine_noncontiguous_dim1():
    s = _randn(4, 40, 30).transpose(1, 2)  # (4, 30, 40), dim=1 has unit stride: copied
    t = _randn(4, 30, 40, seed=2)
    _check_cosine(s, t, dim=1)


def test_cosine_raw_ops_row_stats_and_expanded_grad():
    s, t = _randn(50, 64), _randn(50, 64, seed=2)
    s[3] = 0
    distance, stats = ops.cosine_distance_forward(s, t, -1, 1e-8)
    s64, t64 = s.double(), t.double()
    ns = torch.linalg.vector_norm(s64, dim=-1).clamp_min(1e-8)
    nt = torch.linalg.vector_norm(t64, dim=-1).clamp_min(1e-8)
    cos = (s64 * t64).sum(-1) / (ns * nt)
    assert distance.dtype == stats.dtype == torch.float32 and stats.shape == (50, 3)
    torch.testing.assert_close(distance.double(), 1 - cos, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats.double(), torch.stack([cos, 1 / ns, 1 / nt], -1), atol=1e-6, rtol=1e-6)
    # An expanded scalar upstream gradient (stride 0) and teacher_grad=False.
    grad = torch.full((), 0.5, device=DEV).expand(50)
    gs, gt = ops.cosine_distance_backward(grad, s, t, stats, -1, 1e-8, False)
    assert gt.numel() == 0 and gs.dtype == s.dtype
    s_ref = s64.clone().requires_grad_()
    (0.5 * reference.cosine_distance(s_ref, t64)).sum().backward()
    for rows in ([3], [r for r in range(50) if r != 3]):  # the zero row's gradient is ~1e8 larger
        want = s_ref.grad[rows]
        torch.testing.assert_close(gs[rows].double(), want, atol=1e-5 * want.abs().max().item(), rtol=1e-5)


def _with_grad_reference(student, teacher, dim, eps, grad_scale):
    """float64 distance and the gradients of grad_scale * sum(distance)."""
    s64 = student.detach().double().requires_grad_()
    t64 = teacher.detach().double().requires_grad_()
    rows = reference.cosine_distance(s64, t64, dim, eps)
    (grad_scale * rows.sum()).backward()
    return rows.detach(), s64.grad, t64.grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("flags", [(True, True), (True, False), (False, True), (False, False)],
                         ids=["both", "student", "teacher", "none"])
@pytest.mark.parametrize("shape,dim,make", [
    ((300, 96), -1, None),                       # rows, a warp per row
    ((500, 64), -1, None),                       # sub-warp groups
    ((4, 6000), -1, None),                       # several warps per row
    ((300, 130), -1, lambda x: x[:, 1:129]),     # misaligned rows
    ((5, 33, 7), 1, None),                       # column kernel, one pass
    ((70000, 3), 0, None),                       # column kernel with D split over blocks
    ((9000, 1024), -1, None),                    # rows held in registers, 5-8 packs a lane (or streamed)
], ids=["rows", "subwarp", "long", "misaligned", "cols", "cols-split", "wide-rows"])
def test_forward_with_grad_matches_reference(dtype, flags, shape, dim, make):
    """cosine_distance_forward_with_grad: distance and the gradients of grad_scale * sum(distance)
    in one pass; only the gradients asked for (the others empty)."""
    student_grad, teacher_grad = flags
    s, t = _randn(*shape, dtype=dtype), _randn(*shape, dtype=dtype, seed=2)
    if make is not None:
        s, t = make(s), make(t)
    if dim == -1:
        s[0] = 0  # a zero row: clamped norm, finite gradient
    eps, grad_scale = ZERO_ROW_EPS[dtype], 0.375
    distance, gs, gt = ops.cosine_distance_forward_with_grad(s, t, dim, eps, grad_scale, student_grad, teacher_grad)
    want, want_s, want_t = _with_grad_reference(s, t, dim, eps, grad_scale)
    tol = TOL[dtype]
    assert distance.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch.testing.assert_close(distance.double(), want, atol=tol, rtol=tol)
    for asked, got, ref, x in ((student_grad, gs, want_s, s), (teacher_grad, gt, want_t, t)):
        if not asked:
            assert got.numel() == 0
            continue
        assert got.dtype == dtype and got.shape == s.shape and got.is_contiguous()
        assert torch.isfinite(got).all()
        # Per-row scale, as in _check_cosine (a zero row's gradient is ~1/eps larger than the rest).
        scale = ref.abs().amax(dim, keepdim=True) + grad_scale / torch.linalg.vector_norm(
            x.double(), dim=dim, keepdim=True).clamp_min(eps)
        assert ((got.double() - ref).abs() <= tol * scale).all()


def test_forward_with_grad_equals_forward_then_backward():
    """The one-pass gradients equal the two-pass ops' with an expanded constant upstream gradient."""
    for shape, dim in (((200, 96), -1), ((7, 40, 9), 1), ((70000, 3), 0)):
        s, t = _randn(*shape), _randn(*shape, seed=2)
        distance, stats = ops.cosine_distance_forward(s, t, dim, 1e-8)
        grad = torch.full((), 0.25, device=DEV).expand(distance.shape)
        bs, bt = ops.cosine_distance_backward(grad, s, t, stats, dim, 1e-8, True)
        d1, gs, gt = ops.cosine_distance_forward_with_grad(s, t, dim, 1e-8, 0.25, True, True)
        torch.testing.assert_close(d1, distance, atol=1e-7, rtol=1e-7)  # the same reduction order
        torch.testing.assert_close(gs, bs, atol=1e-7, rtol=1e-6)
        torch.testing.assert_close(gt, bt, atol=1e-7, rtol=1e-6)


def test_forward_with_grad_empty_and_d0():
    for shape, dim in (((0, 16), -1), ((3, 0), -1), ((0, 4, 3), 1), ((2, 0, 3), 1)):
        s, t = _randn(*shape), _randn(*shape, seed=2)
        distance, gs, gt = ops.cosine_distance_forward_with_grad(s, t, dim, 1e-8, 1.0, True, True)
        want, _, _ = _with_grad_reference(s, t, dim, 1e-8, 1.0)
        torch.testing.assert_close(distance.double(), want)
        assert gs.shape == gt.shape == s.shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dim", [-1, 0])
def test_forward_with_grad_opcheck(dtype, dim):
    s, t = _randn(8, 24, dtype=dtype), _randn(8, 24, dtype=dtype, seed=2)
    for student_grad, teacher_grad in ((True, True), (True, False), (False, True)):
        torch.library.opcheck(ops.cosine_distance_forward_with_grad.default,
                              (s, t, dim, 1e-8, 0.5, student_grad, teacher_grad))


@pytest.mark.parametrize("dim", [-1, 1])
def test_cosine_gradcheck(dim):
    s = _randn(3, 5, 7, dtype=torch.float64).requires_grad_()
    t = _randn(3, 5, 7, dtype=torch.float64, seed=2).requires_grad_()
    for reduction in ("none", "mean"):
        assert torch.autograd.gradcheck(lambda a, b: pycosdist.cosine_distance_loss(a, b, dim, 1e-8, reduction), (s, t))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [-1, 0])
def test_cosine_opcheck(dtype, dim):
    s, t = _randn(8, 24, dtype=dtype), _randn(8, 24, dtype=dtype, seed=2)
    torch.library.opcheck(ops.cosine_distance_forward.default, (s, t, dim, 1e-8))
    distance, stats = ops.cosine_distance_forward(s, t, dim, 1e-8)
    for teacher_grad in (False, True):
        torch.library.opcheck(ops.cosine_distance_backward.default,
                              (torch.ones_like(distance), s, t, stats, dim, 1e-8, teacher_grad))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [0, 1, 13, 1000003])
def test_scale_grad_multiplies_unless_one(dtype, n):
    """scale_grad_: x *= factor read on the device, nothing written when it is exactly 1, for
    aligned and misaligned (scalar head / tail) buffers; a non-contiguous one is multiplied too."""
    base = _randn(n + 1, dtype=dtype)
    for x in (base[:n].clone(), base.clone()[1:]):  # 16-byte aligned, then 1 element off
        want = (x.double() * 0.375).to(dtype)  # exact product, rounded once: what the kernel must give
        before = x.clone()
        ops.scale_grad_(x, torch.ones((), device=DEV))
        assert torch.equal(x, before)
        ops.scale_grad_(x, torch.full((1,), 0.375, device=DEV, dtype=torch.float64))
        assert torch.equal(x, want)
    strided = _randn(8, 6, dtype=dtype).t()
    want = strided.double() * -2
    ops.scale_grad_(strided, torch.tensor(-2.0, device=DEV))
    torch.testing.assert_close(strided.double(), want)
    torch.library.opcheck(ops.scale_grad_.default, (_randn(33, dtype=dtype), torch.tensor(0.5, device=DEV)))


def test_cosine_compile_matches_eager():
    fn = torch.compile(pycosdist.cosine_distance_loss, fullgraph=True)
    s = _randn(64, 96).requires_grad_()
    t = _randn(64, 96, seed=2)
    out = fn(s, t)
    out.backward()
    grad, s.grad = s.grad, None
    ref = pycosdist.cosine_distance_loss(s, t)
    ref.backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, s.grad)


def test_runs_on_the_current_stream():
    """Inputs produced on a busy side stream: the kernels must queue behind them on that stream."""
    base_s, base_t = _randn(4096, 256), _randn(4096, 256, seed=2)
    want = pycosdist.cosine_distance_loss(2 * base_s, 3 * base_t, reduction="none")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)  # keep the side stream busy for a while
        s = (2 * base_s).requires_grad_()
        t = 3 * base_t
        got = pycosdist.cosine_distance_loss(s, t, reduction="none")
        got.sum().backward()
    side.synchronize()
    torch.testing.assert_close(got, want)
    s_ref = (2 * base_s).requires_grad_()
    pycosdist.cosine_distance_loss(s_ref, 3 * base_t, reduction="none").sum().backward()
    torch.testing.assert_close(s.grad, s_ref.grad)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_device():
    s, t = _randn(32, 64).to("cuda:1"), _randn(32, 64, seed=2).to("cuda:1")
    out = pycosdist.cosine_distance_loss(s, t, reduction="none")
    assert out.device == torch.device("cuda:1")
    torch.testing.assert_close(out.cpu().double(), reference.cosine_distance(s.cpu().double(), t.cpu().double()),
                               atol=1e-5, rtol=1e-5)


def test_cosine_device_mismatch_is_an_error():
    with pytest.raises((RuntimeError, ValueError), match="teacher"):
        pycosdist.cosine_distance_loss(_randn(4, 8), torch.randn(4, 8))


# ---------------------------------------------------------------- LIB projection and fused loss

def _lib_params(d_s, d_t, e, dtype, bias=True, seed=3):
    w1 = _randn(e, d_s, dtype=dtype, seed=seed) / d_s ** 0.5
    w2 = _randn(d_t, e, dtype=dtype, seed=seed + 1) / e ** 0.5
    b1 = _randn(e, dtype=dtype, seed=seed + 2) if bias else None
    b2 = _randn(d_t, dtype=dtype, seed=seed + 3) if bias else None
    return w1, b1, w2, b2


def _grads(fn, *args):
    """Output of fn(*args) and the gradients of (output * upstream).sum() w.r.t. every tensor arg
    that is a leaf requiring grad (None for the others)."""
    out = fn(*args)
    upstream = _upstream(out.shape).to(out.dtype)
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad((out * upstream).sum(), leaves)
    it = iter(grads)
    return out, [next(it) if isinstance(a, torch.Tensor) and a.requires_grad else None for a in args]


def _assert_scaled_close(got, want, tol):
    assert got.shape == want.shape, (got.shape, want.shape)
    scale = want.abs().max().item() if want.numel() else 1.0
    torch.testing.assert_close(got.double(), want.double(), atol=tol * max(scale, 1e-30), rtol=tol)


LIB_TOL = {torch.float32: 1e-4, torch.float64: 1e-10, torch.bfloat16: 5e-2, torch.float16: 1e-2}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_lib_projection_matches_reference(dtype, bias):
    x = _randn(2, 5, 24, dtype=dtype).requires_grad_()
    params = [p.requires_grad_() if p is not None else None for p in _lib_params(24, 40, 96, dtype, bias)]
    out, grads = _grads(pycosdist.lib_projection, x, *params)
    ref_args = [a.detach().double().requires_grad_() if a is not None else None for a in (x, *params)]
    ref, ref_grads = _grads(reference.lib_projection, *ref_args)
    assert out.dtype == dtype and out.device.type == "cuda" and out.shape == (2, 5, 40)
    _assert_scaled_close(out, ref, LIB_TOL[dtype])
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == dtype
            _assert_scaled_close(got, want, LIB_TOL[dtype])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
def test_lib_loss_matches_reference(dtype, bias, reduction, chunk_size):
    student = _randn(3, 50, 24, dtype=dtype).requires_grad_()   # 'nd': 150 frames of D_s = 24
    teacher = _randn(3, 50, 40, dtype=dtype, seed=2)
    teacher[0, :5] = 0                                           # zero teacher frames: finite grads
    params = [p.requires_grad_() if p is not None else None for p in _lib_params(24, 40, 96, dtype, bias)]

    def ours(s, w1, b1, w2, b2):
        return pycosdist.lib_cosine_distance_loss(s, teacher, w1, b1, w2, b2, 1e-8, reduction, "nd", chunk_size)

    def ref_fn(s, w1, b1, w2, b2):
        return reference.lib_cosine_distance_loss(s, teacher.double(), w1, b1, w2, b2, 1e-8, reduction, "nd")

    out, grads = _grads(ours, student, *params)
    ref_args = [a.detach().double().requires_grad_() if a is not None else None for a in (student, *params)]
    ref, ref_grads = _grads(ref_fn, *ref_args)
    assert out.device.type == "cuda" and out.shape == ref.shape
    _assert_scaled_close(out, ref, LIB_TOL[dtype])
    for got, want in zip(grads, ref_grads):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.dtype == dtype and torch.isfinite(got).all()
            _assert_scaled_close(got, want, LIB_TOL[dtype])


@pytest.mark.parametrize("chunk_size", [None, 5])
def test_lib_loss_bcft_layout(chunk_size):
    b, c, f, t_, ct, ft = 2, 4, 6, 33, 8, 5                     # D_s = 24 frames of (c, f), D_t = 40
    student = _randn(b, c, f, t_).requires_grad_()
    teacher = _randn(b, ct, ft, t_, seed=2)
    params = [p.requires_grad_() for p in _lib_params(c * f, ct * ft, 4 * c * f, torch.float32)]
    out, grads = _grads(lambda s, *p: pycosdist.lib_cosine_distance_loss(s, teacher, *p, 1e-8, "none", "bcft",
                                                                        chunk_size), student, *params)
    ref_args = [a.detach().double().requires_grad_() for a in (student, *params)]
    ref, ref_grads = _grads(lambda s, *p: reference.lib_cosine_distance_loss(s, teacher.double(), *p, 1e-8, "none",
                                                                            "bcft"), *ref_args)
    _assert_scaled_close(out, ref, 1e-4)
    for got, want in zip(grads, ref_grads):
        _assert_scaled_close(got, want, 1e-4)


def test_lib_raw_ops_forward_grads_equal_backward_op():
    """lib_cosine_distance_forward's in-pass gradients (grad_scale * sum) equal the backward op's
    with a constant per-row gradient, and the float64 reference's."""
    s, t = _randn(300, 24, dtype=torch.float64), _randn(300, 40, dtype=torch.float64, seed=2)
    w1, b1, w2, b2 = _lib_params(24, 40, 96, torch.float64)
    fwd = ops.lib_cosine_distance_forward(s, t, w1, b1, w2, b2, 1e-8, 64, 0.25, True)
    bwd = ops.lib_cosine_distance_backward(torch.full((300,), 0.25, device=DEV, dtype=torch.float64), s, t, w1, b1,
                                           w2, b2, 1e-8, 17)
    for a, b in zip(fwd[1:], bwd):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    args = [a.clone().requires_grad_() for a in (s, w1, b1, w2, b2)]
    distance = reference.cosine_distance(reference.lib_projection(args[0], *args[1:]), t)
    torch.testing.assert_close(fwd[0], distance.detach(), atol=1e-12, rtol=1e-12)
    (0.25 * distance.sum()).backward()
    for got, x in zip(fwd[1:], args):
        torch.testing.assert_close(got, x.grad, atol=1e-12, rtol=1e-10)
    # Without compute_grad (and without biases): only the distance, empty gradients.
    out = ops.lib_cosine_distance_forward(s, t, w1, None, w2, None, 1e-8, 0, 1.0, False)
    assert all(g.numel() == 0 for g in out[1:])
    torch.testing.assert_close(out[0], reference.cosine_distance(reference.lib_projection(s, w1, None, w2, None), t))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d_s,d_t,e,n,chunk_size", [
    (24, 41, 96, 300, None),    # D_t not a multiple of the pack width: rows in several 16-byte phases
    (24, 41, 96, 300, 7),
    (64, 4096, 256, 200, 64),   # long projected rows: several warps per row
])
def test_lib_loss_odd_and_wide_teacher(dtype, d_s, d_t, e, n, chunk_size):
    student = _randn(n, d_s, dtype=dtype).requires_grad_()
    teacher = _randn(n, d_t, dtype=dtype, seed=2)
    params = [p.requires_grad_() for p in _lib_params(d_s, d_t, e, dtype)]
    out, grads = _grads(lambda s, *p: pycosdist.lib_cosine_distance_loss(s, teacher, *p, 1e-8, "mean", "nd",
                                                                        chunk_size), student, *params)
    ref_args = [a.detach().double().requires_grad_() for a in (student, *params)]
    ref, ref_grads = _grads(lambda s, *p: reference.lib_cosine_distance_loss(s, teacher.double(), *p, 1e-8, "mean",
                                                                            "nd"), *ref_args)
    _assert_scaled_close(out, ref, LIB_TOL[dtype])
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        _assert_scaled_close(got, want, LIB_TOL[dtype])


@pytest.mark.parametrize("bias", [True, False])
def test_lib_loss_float16_many_rows(bias):
    """float16 at N = 65536 with reduction 'mean': dL/dp carries 1/N (~1.5e-5 times values of
    order 1 / |p|), below float16's normal range; kept in float16 it flushes to zero and the
    weight gradients come out wrong. p, dL/dp and the accumulations stay in float32."""
    n, d_s, d_t, e = 65536, 32, 48, 128
    student = _randn(n, d_s, dtype=torch.float16).requires_grad_()
    teacher = _randn(n, d_t, dtype=torch.float16, seed=2)
    params = [p.requires_grad_() if p is not None else None for p in _lib_params(d_s, d_t, e, torch.float16, bias)]
    out = pycosdist.lib_cosine_distance_loss(student, teacher, *params)  # reduction 'mean'
    out.backward()
    ref_args = [a.detach().double().requires_grad_() if a is not None else None for a in (student, *params)]
    ref = reference.lib_cosine_distance_loss(ref_args[0], teacher.double(), *ref_args[1:])
    ref.backward()
    _assert_scaled_close(out, ref, 1e-3)
    for got, want in zip((student, *params), ref_args):
        assert (got is None) == (want is None)
        if got is not None:
            assert got.grad.dtype == torch.float16 and torch.isfinite(got.grad).all()
            assert want.grad.abs().max() > 0
            # The student's gradient is ~1e-6 (1/N times ~0.1): float16 subnormals, whose spacing
            # 2^-24 bounds how close the rounded result can be; the weights' sums over N are normal.
            floor = 2.0 ** -24 if got is student else 0.0
            torch.testing.assert_close(got.grad.double(), want.grad,
                                       atol=1e-2 * want.grad.abs().max().item() + floor, rtol=1e-2)
    # The raw op's distances (float32) against float64, row by row.
    w1, b1, w2, b2 = (a.detach() if a is not None else None for a in params)
    distance = ops.lib_cosine_distance_forward(student.detach(), teacher, w1, b1, w2, b2, 1e-8, 0, 1.0, False)[0]
    want = reference.cosine_distance(reference.lib_projection(*(a.detach() if a is not None else None
                                                                for a in ref_args)), teacher.double())
    torch.testing.assert_close(distance.double(), want, atol=2e-3, rtol=2e-3)


def test_lib_gradcheck():
    s = _randn(9, 6, dtype=torch.float64).requires_grad_()
    t = _randn(9, 5, dtype=torch.float64, seed=2)
    params = [p.requires_grad_() for p in _lib_params(6, 5, 12, torch.float64)]
    for reduction in ("mean", "none"):
        assert torch.autograd.gradcheck(
            lambda *a: pycosdist.lib_cosine_distance_loss(a[0], t, *a[1:], 1e-8, reduction, "nd", 4), (s, *params))
    assert torch.autograd.gradcheck(pycosdist.lib_projection, (s, *params))


@pytest.mark.parametrize("bias", [True, False])
def test_lib_opcheck(bias):
    s, t = _randn(20, 8), _randn(20, 12, seed=2)
    w1, b1, w2, b2 = _lib_params(8, 12, 32, torch.float32, bias)
    torch.library.opcheck(ops.lib_projection_forward.default, (s, w1, b1, w2, b2))
    out, hidden = ops.lib_projection_forward(s, w1, b1, w2, b2)
    torch.library.opcheck(ops.lib_projection_backward.default, (torch.ones_like(out), s, hidden, w1, w2, bias, bias))
    for compute_grad in (False, True):
        torch.library.opcheck(ops.lib_cosine_distance_forward.default, (s, t, w1, b1, w2, b2, 1e-8, 6, 0.5, compute_grad))
    torch.library.opcheck(ops.lib_cosine_distance_backward.default,
                          (torch.ones(20, device=DEV), s, t, w1, b1, w2, b2, 1e-8, 6))


def test_lib_compile_matches_eager():
    s = _randn(128, 24).requires_grad_()
    t = _randn(128, 40, seed=2)
    params = [p.requires_grad_() for p in _lib_params(24, 40, 96, torch.float32)]
    fn = torch.compile(pycosdist.lib_cosine_distance_loss, fullgraph=True)
    got, got_grads = _grads(lambda *a: fn(a[0], t, *a[1:]), s, *params)
    want, want_grads = _grads(lambda *a: pycosdist.lib_cosine_distance_loss(a[0], t, *a[1:]), s, *params)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b)


def test_lib_module_matches_reference():
    module = pycosdist.nn.CosineLIBDistillationLoss(24, 40, expansion=4, bias=True, chunk_size=16).to(DEV)
    # Find W1, b1, W2, b2 by shape (unique here: E = 96).
    by_shape = {tuple(p.shape): p for p in module.parameters()}
    w1, b1, w2, b2 = (by_shape[(96, 24)], by_shape[(96,)], by_shape[(40, 96)], by_shape[(40,)])
    student = _randn(4, 30, 24).requires_grad_()
    teacher = _randn(4, 30, 40, seed=2)
    loss = module(student, teacher)
    loss.backward()
    ref_args = [a.detach().double().requires_grad_() for a in (student, w1, b1, w2, b2)]
    ref = reference.lib_cosine_distance_loss(ref_args[0], teacher.double(), *ref_args[1:])
    ref.backward()
    _assert_scaled_close(loss, ref, 1e-4)
    for got, want in zip((student, w1, b1, w2, b2), ref_args):
        _assert_scaled_close(got.grad, want.grad, 1e-4)


def test_lib_mismatched_shapes_are_errors():
    s, t = _randn(10, 24), _randn(10, 40, seed=2)
    w1, b1, w2, b2 = _lib_params(24, 40, 96, torch.float32)
    with pytest.raises((RuntimeError, ValueError), match="w1"):
        pycosdist.lib_cosine_distance_loss(s, t, w1[:, :20], b1, w2, b2)
    with pytest.raises((RuntimeError, ValueError), match="teacher"):
        pycosdist.lib_cosine_distance_loss(s, t[:9], w1, b1, w2, b2)
    with pytest.raises((RuntimeError, ValueError), match="device|cuda|cpu"):
        pycosdist.lib_cosine_distance_loss(s, t, w1.cpu(), b1, w2, b2)
