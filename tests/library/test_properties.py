"""Property-based tests (hypothesis): the ops against the float64 pure-PyTorch reference over random
shapes, dtypes, strides (transposed and sliced views) and scales (including zero rows).

The reference runs in float64 on the very same (rounded) inputs, so only the kernels' own error is
measured: values and every gradient, relative to the largest reference entry of each tensor."""

from __future__ import annotations

import math

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import pycosdist  # noqa: E402
from pycosdist import reference  # noqa: E402

DTYPES = [torch.float64, torch.float32, torch.bfloat16, torch.float16]
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# log10 of the input scale: float16 overflows past 65504 (inputs, or gradients ~ 1/scale).
SCALES = {torch.float64: (-6, 6), torch.float32: (-6, 6), torch.bfloat16: (-6, 6), torch.float16: (-2, 3)}
# The cosine op is scale-invariant and rescues rows whose float32 sums over/underflow: any magnitude.
COSINE_SCALES = {torch.float64: (-150, 150), torch.float32: (-20, 20), torch.bfloat16: (-20, 20),
                 torch.float16: (-2, 3)}
SETTINGS = settings(max_examples=150, deadline=None, derandomize=True)


def close(got: torch.Tensor, want: torch.Tensor, dtype, what: str, floor: float = 1e-300) -> None:
    """Max error <= TOL * max(largest reference entry, floor); ``floor``: the tensor's natural scale,
    for references that vanish (e.g. parallel rows, whose exact gradient is 0)."""
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    if want.numel():
        scale = max(want.abs().max().item(), floor)
        err = (got.double() - want).abs().max().item()
        assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:.0e} * {scale:.3g}"


@st.composite
def layouts(draw, ndim_max=4, size_max=9):
    """(shape, view): ``view(base)`` turns a contiguous ``base`` tensor into a (maybe strided) view of shape."""
    ndim = draw(st.integers(1, ndim_max))
    shape = [draw(st.integers(1, size_max)) for _ in range(ndim)]
    kind = draw(st.sampled_from(["contiguous", "transposed", "sliced"] if ndim > 1 else ["contiguous", "sliced"]))
    if kind == "transposed":
        i, j = draw(st.permutations(range(ndim)))[:2]
        base = list(shape)
        base[i], base[j] = base[j], base[i]
        return base, (lambda x: x.transpose(i, j)), shape
    if kind == "sliced":
        k = draw(st.integers(0, ndim - 1))
        base = list(shape)
        base[k] = 2 * shape[k]
        return base, (lambda x: x[(slice(None),) * k + (slice(None, None, 2),)]), shape
    return shape, (lambda x: x), shape


def random(base_shape, view, dtype, scale, seed, zero_rows=None, dim=-1):
    g = torch.Generator().manual_seed(seed)
    x = view(torch.randn(base_shape, generator=g, dtype=torch.float64) * scale)
    if zero_rows is not None and x.numel():
        mask = torch.rand(x.movedim(dim, -1).shape[:-1], generator=g) < zero_rows
        x = x.movedim(dim, -1).masked_fill(mask[..., None], 0).movedim(-1, dim)
    return x.to(dtype)


@SETTINGS
@given(layout=layouts(), data=st.data(), dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**16))
def test_cosine_distance(layout, data, dtype, seed):
    base, view, shape = layout
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    lo, hi = COSINE_SCALES[dtype]
    s_scale, t_scale = (10.0 ** data.draw(st.floats(lo, hi)) for _ in range(2))
    zero = 0.0 if dtype == torch.float16 else data.draw(st.sampled_from([0.0, 0.3]))
    # eps = 0 only without zero rows (those are NaN by definition: test_cosine_distance.py).
    eps = 1e-8 if zero else data.draw(st.sampled_from([1e-8, 0.0]))
    reduction = data.draw(st.sampled_from(["none", "mean", "sum"]))
    student = random(base, view, dtype, s_scale, seed, zero, dim).requires_grad_()
    teacher = random(base, view, dtype, t_scale, seed + 1, zero, dim)
    teacher_grad = data.draw(st.booleans())
    teacher.requires_grad_(teacher_grad)
    s64, t64 = (x.detach().double().requires_grad_() for x in (student, teacher))

    out = pycosdist.cosine_distance_loss(student, teacher, dim=dim, eps=eps, reduction=reduction)
    ref = reference.cosine_distance_loss(s64, t64, dim=dim, eps=eps, reduction=reduction)
    close(out, ref, dtype, "value", 1.0)  # distances live in [0, 2]
    up = torch.rand(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    (out.double() * up).sum().backward()
    (ref * up).sum().backward()
    # A row's gradient is of size upstream / |row|: the scale of a vanishing reference gradient.
    natural = lambda x: up.max().item() / max(torch.linalg.vector_norm(x.detach(), dim=dim).max().item(), eps, 1e-300)
    close(student.grad, s64.grad, dtype, "grad student", natural(s64))
    assert (teacher.grad is not None) == teacher_grad
    if teacher_grad:
        close(teacher.grad, t64.grad, dtype, "grad teacher", natural(t64))


@st.composite
def lib_case(draw):
    lead = [draw(st.integers(1, 7)) for _ in range(draw(st.integers(1, 3)))]
    d_s, d_t = draw(st.integers(1, 17)), draw(st.integers(2, 17))  # D_t = 1: cos = +-1, a 0 gradient
    e = d_s * draw(st.integers(1, 4))
    return lead, d_s, e, d_t, draw(st.booleans()), draw(st.sampled_from(DTYPES)), draw(st.integers(0, 2**16))


def lib_inputs(lead, d_s, e, d_t, bias, dtype, seed, scale, transposed):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, s=1.0: torch.randn(*shape, generator=g, dtype=torch.float64) * s  # noqa: E731
    x = rnd(*lead, d_s, s=scale)
    if transposed and len(lead) >= 1:  # a non-contiguous (..., D_s) view with the same values
        x = x.movedim(-1, 0).contiguous().movedim(0, -1)
    t = rnd(*lead, d_t)
    params = [rnd(e, d_s, s=d_s ** -0.5), rnd(e, s=0.3) if bias else None, rnd(d_t, e, s=e ** -0.5),
              rnd(d_t, s=0.3) if bias else None]
    return x.to(dtype), t.to(dtype), [None if p is None else p.to(dtype) for p in params]


def leaves(xs, dtype=None):
    return [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]


@SETTINGS
@given(case=lib_case(), data=st.data())
def test_lib_projection(case, data):
    lead, d_s, e, d_t, bias, dtype, seed = case
    lo, hi = SCALES[dtype]
    scale = 10.0 ** data.draw(st.floats(max(lo, -3), min(hi, 3)))
    x, _, params = lib_inputs(lead, d_s, e, d_t, bias, dtype, seed, scale, data.draw(st.booleans()))
    ours = leaves([x, *params])
    refs = leaves([x, *params], torch.float64)
    out = pycosdist.lib_projection(*ours)
    ref = reference.lib_projection(*refs)
    close(out, ref, dtype, "value")
    up = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    (out.double() * up).sum().backward()
    (ref * up).sum().backward()
    for name, a, b in zip(("input", "w1", "b1", "w2", "b2"), ours, refs):
        if a is not None:
            close(a.grad, b.grad, dtype, f"grad {name}")


@torch.no_grad()
def natural_grad_scales(refs, up: float) -> dict:
    """Natural gradient scales, for references that vanish where cos(p, t) does not depend on a parameter
    (D_s = 1 or E = 1 without biases: only signs matter): |dd/dp| ~ upstream / |p| times |dp/dparam|."""
    xs, w1, b1, w2, b2 = (None if r is None else r.detach() for r in refs)
    hidden = torch.nn.functional.linear(xs, w1, b1)
    p = torch.nn.functional.linear(hidden, w2, b2)
    g = up / max(torch.linalg.vector_norm(p, dim=-1).max().item(), 1e-300)
    w2_norm = torch.linalg.matrix_norm(w2, 2).item()
    return {"student": g * torch.linalg.matrix_norm(w2 @ w1, 2).item(), "w1": g * w2_norm * xs.abs().max().item(),
            "b1": g * w2_norm, "w2": g * hidden.abs().max().item(), "b2": g}


@SETTINGS
@given(case=lib_case(), data=st.data())
def test_lib_cosine_distance_loss(case, data):
    lead, d_s, e, d_t, bias, dtype, seed = case
    lo, hi = SCALES[dtype]
    scale = 10.0 ** data.draw(st.floats(max(lo, -3), min(hi, 3)))
    x, t, params = lib_inputs(lead, d_s, e, d_t, bias, dtype, seed, scale, data.draw(st.booleans()))
    reduction = data.draw(st.sampled_from(["none", "mean", "sum"]))
    n = math.prod(lead)
    chunk = data.draw(st.one_of(st.none(), st.integers(1, n + 2)))
    ours = leaves([x, *params])
    refs = leaves([x, *params], torch.float64)
    out = pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], reduction=reduction, chunk_size=chunk)
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), *refs[1:], reduction=reduction)
    close(out, ref, dtype, "value", 1.0)  # distances live in [0, 2]
    up = torch.rand(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) + 0.5
    (out.double() * up).sum().backward()
    (ref * up).sum().backward()
    natural = natural_grad_scales(refs, up.max().item())
    for name, a, b in zip(("student", "w1", "b1", "w2", "b2"), ours, refs):
        if a is not None:
            close(a.grad, b.grad, dtype, f"grad {name}", natural[name])


@SETTINGS
@given(case=lib_case(), data=st.data())
def test_lib_cosine_distance_loss_float32_extreme_scales(case, data):
    # float32 rows whose squared norms over- or underflow float32 (student and teacher scaled
    # independently by 1e-19 .. 1e19): the float64 reference's values and gradients
    lead, d_s, e, d_t, bias, _, seed = case
    scale_s, scale_t = (10.0 ** data.draw(st.floats(-19, 19)) for _ in range(2))
    x, t, params = lib_inputs(lead, d_s, e, d_t, bias, torch.float32, seed, scale_s, False)
    t = t * scale_t
    reduction = data.draw(st.sampled_from(["none", "mean", "sum"]))
    ours, refs = leaves([x, *params]), leaves([x, *params], torch.float64)
    out = pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], reduction=reduction)
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), *refs[1:], reduction=reduction)
    close(out, ref, torch.float32, "value", 1.0)
    out.sum().backward()
    ref.sum().backward()
    natural = natural_grad_scales(refs, 1.0)
    for name, a, b in zip(("student", "w1", "b1", "w2", "b2"), ours, refs):
        if a is not None:
            close(a.grad, b.grad, torch.float32, f"grad {name}", natural[name])
