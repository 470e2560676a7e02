"""Linear inverted bottleneck ops (lib_projection, fused lib_cosine_distance_loss): values and
all parameter gradients against the float64 pure-PyTorch reference, gradcheck, opcheck,
torch.compile, the nn modules and argument errors."""

from __future__ import annotations

import pytest
import torch

import pycosdist
from pycosdist import reference
from pycosdist.nn import CosineLIBDistillationLoss, LinearInvertedBottleneck

ops = torch.ops.pycosdist
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Max error relative to the largest reference value (per tensor).
TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 3e-2, torch.float16: 4e-3}
D_S, D_T, E = 12, 20, 48


def make(n=50, d_s=D_S, d_t=D_T, e=E, dtype=torch.float32, bias=True, lead=None, seed=0):
    """student (n, d_s) (or (*lead, d_s)), teacher, w1, b1, w2, b2; scaled so p has O(1) entries."""
    g = torch.Generator().manual_seed(seed)
    lead = (n,) if lead is None else lead
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)  # noqa
    s, t = rnd(*lead, d_s), rnd(*lead, d_t)
    w1, w2 = rnd(e, d_s, scale=d_s ** -0.5), rnd(d_t, e, scale=e ** -0.5)
    b1, b2 = (rnd(e, scale=0.3), rnd(d_t, scale=0.3)) if bias else (None, None)
    return s, t, w1, b1, w2, b2


def leaves(*xs, dtype=None):
    return [None if x is None else x.detach().to(dtype or x.dtype).requires_grad_() for x in xs]


def assert_close(got, want, dtype, what=""):
    assert got.shape == want.shape, what
    if want.numel() == 0:
        return
    scale = max(want.abs().max().item(), 1e-30)
    err = (got.double() - want).abs().max().item()
    assert err <= TOL[dtype] * scale, f"{what}: max error {err:.3g} > {TOL[dtype]:.1g} * {scale:.3g}"


def check_grads(out, ref, ours, refs, dtype, reduction, seed=1):
    """Backward of out and ref with the same upstream gradient (a random scalar for a reduced
    loss, which checks the scaling by grad_output) and compare every gradient."""
    g = torch.Generator().manual_seed(seed)
    up = torch.rand(ref.shape, generator=g, dtype=torch.float64) + 0.5
    (out.double() * up).sum().backward()
    (ref * up).sum().backward()
    for name, x, r in zip(("student", "w1", "b1", "w2", "b2"), ours, refs):
        if x is None:
            continue
        assert x.grad is not None and x.grad.dtype == dtype, name
        assert_close(x.grad, r.grad, dtype, f"grad {name} ({reduction})")


# ---------------------------------------------------------------- fused loss vs reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 25, 1000])  # auto, 1, not dividing 50, dividing, > N
def test_loss_matches_reference(dtype, bias, reduction, chunk_size):
    s, t, w1, b1, w2, b2 = make(dtype=dtype, bias=bias)
    ours = leaves(s, w1, b1, w2, b2)
    refs = leaves(s, w1, b1, w2, b2, dtype=torch.float64)
    out = pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], reduction=reduction, chunk_size=chunk_size)
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), *refs[1:], reduction=reduction)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "loss")
    check_grads(out, ref, ours, refs, dtype, reduction)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_only_some_inputs_need_grad(reduction):
    s, t, w1, b1, w2, b2 = make()
    w2 = w2.requires_grad_()
    pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2, reduction=reduction).sum().backward()
    w2_ref = w2.detach().double().requires_grad_()
    reference.lib_cosine_distance_loss(s.double(), t.double(), w1.double(), b1.double(), w2_ref, b2.double(),
                                       reduction=reduction).sum().backward()
    assert_close(w2.grad, w2_ref.grad, torch.float32, "grad w2")


def test_loss_none_with_expanded_upstream_grad():
    # loss.sum() hands the backward op a stride-0 (N,) gradient
    s, t, w1, b1, w2, b2 = make()
    ours, refs = leaves(s, w1, b1, w2, b2), leaves(s, w1, b1, w2, b2, dtype=torch.float64)
    pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], reduction="none", chunk_size=7).sum().backward()
    reference.lib_cosine_distance_loss(refs[0], t.double(), *refs[1:], reduction="none").sum().backward()
    for x, r in zip(ours, refs):
        assert_close(x.grad, r.grad, torch.float32)


def test_loss_no_grad_and_eps():
    # a zero projection row (|p| < eps) and a zero teacher row: same values and grads as the reference
    s, t, w1, b1, w2, b2 = make(n=6, bias=False)
    s[2] = 0
    t[4] = 0
    ours, refs = leaves(s, w1, w2), leaves(s, w1, w2, dtype=torch.float64)
    out = pycosdist.lib_cosine_distance_loss(ours[0], t, ours[1], None, ours[2], None, eps=1e-3, reduction="none")
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), refs[1], None, refs[2], None, eps=1e-3,
                                             reduction="none")
    assert_close(out, ref, torch.float32)
    check_grads(out, ref, [ours[0], ours[1], None, ours[2], None], [refs[0], refs[1], None, refs[2], None],
                torch.float32, "none")
    with torch.no_grad():
        assert_close(pycosdist.lib_cosine_distance_loss(s, t, w1, None, w2, None), ref.mean(), torch.float32)


def test_loss_empty():
    s, t, w1, b1, w2, b2 = make(n=0)
    ours = leaves(s, w1, b1, w2, b2)
    for reduction in ("mean", "sum", "none"):
        out = pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], reduction=reduction)
        ref = reference.lib_cosine_distance_loss(s, t, w1, b1, w2, b2, reduction=reduction)
        torch.testing.assert_close(out, ref, equal_nan=True)  # mean: nan, sum: 0, none: (0,)
        grads = torch.autograd.grad(out.sum(), ours)
        assert grads[0].shape == (0, D_S)
        for g, x in zip(grads[1:], ours[1:]):
            assert g.shape == x.shape and not g.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", ["nd", "bcft"])
def test_loss_layouts(layout, dtype):
    b, t_frames = 3, 11
    if layout == "nd":  # (B, T, D)
        s, t, *_ = make(dtype=dtype, lead=(b, t_frames))
        d_s, d_t = D_S, D_T
    else:  # (B, C, F, T): C*F per frame
        g = torch.Generator().manual_seed(3)
        s = torch.randn(b, 4, 3, t_frames, generator=g).to(dtype)
        t = torch.randn(b, 5, 4, t_frames, generator=g).to(dtype)
        d_s, d_t = 12, 20
    _, _, w1, b1, w2, b2 = make(dtype=dtype, d_s=d_s, d_t=d_t)
    ours, refs = leaves(s, w1, b1, w2, b2), leaves(s, w1, b1, w2, b2, dtype=torch.float64)
    for reduction in ("mean", "none"):
        for x in ours + refs:
            x.grad = None
        out = pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], reduction=reduction, layout=layout,
                                                 chunk_size=8)
        ref = reference.lib_cosine_distance_loss(refs[0], t.double(), *refs[1:], reduction=reduction, layout=layout)
        assert_close(out, ref, dtype, layout)
        check_grads(out, ref, ours, refs, dtype, reduction)
        assert ours[0].grad.shape == s.shape


def test_teacher_gets_no_gradient():
    s, t, w1, b1, w2, b2 = make()
    t.requires_grad_()
    s.requires_grad_()
    pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2).backward()
    assert t.grad is None and s.grad is not None


def test_loss_is_deterministic():
    # several chunks per thread, weight gradients summed over threads in a fixed order
    s, t, w1, b1, w2, b2 = make(n=200)
    runs = []
    for _ in range(2):
        ours = leaves(s, w1, b1, w2, b2)
        pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], chunk_size=8).backward()
        runs.append([x.grad for x in ours])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ---------------------------------------------------------------- lib_projection vs reference

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(50,), (2, 3, 7), (0,)])
def test_projection_matches_reference(dtype, bias, lead):
    s, _, w1, b1, w2, b2 = make(dtype=dtype, bias=bias, lead=lead)
    ours, refs = leaves(s, w1, b1, w2, b2), leaves(s, w1, b1, w2, b2, dtype=torch.float64)
    out = pycosdist.lib_projection(*ours)
    ref = reference.lib_projection(*refs)
    assert out.dtype == dtype and out.shape == (*lead, D_T)
    assert_close(out, ref, dtype, "output")
    check_grads(out, ref, ours, refs, dtype, "projection")


def test_projection_bias_grads_only_when_asked():
    s, _, w1, b1, w2, b2 = make()
    h = s @ w1.T + b1
    g = torch.randn(50, D_T)
    gi, gw1, gb1, gw2, gb2 = ops.lib_projection_backward(g, s, h, w1, w2, False, True)
    assert gb1.numel() == 0 and gb2.shape == (D_T,)
    assert gi.shape == s.shape and gw1.shape == w1.shape and gw2.shape == w2.shape


# ---------------------------------------------------------------- gradcheck, opcheck, compile

@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_projection(bias):
    s, _, w1, b1, w2, b2 = make(n=5, d_s=3, d_t=4, e=6, dtype=torch.float64, bias=bias, lead=(2, 3))
    args = leaves(s, w1, b1, w2, b2)
    assert torch.autograd.gradcheck(pycosdist.lib_projection, args)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_loss(reduction, bias):
    s, t, w1, b1, w2, b2 = make(n=7, d_s=3, d_t=4, e=6, dtype=torch.float64, bias=bias)
    args = leaves(s, w1, b1, w2, b2)
    fn = lambda s, w1, b1, w2, b2: pycosdist.lib_cosine_distance_loss(  # noqa: E731
        s, t, w1, b1, w2, b2, reduction=reduction, chunk_size=3)
    assert torch.autograd.gradcheck(fn, args)


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck(bias):
    s, t, w1, b1, w2, b2 = make(n=9, bias=bias)
    h = s @ w1.T
    g_out = torch.randn(9, D_T)
    cases = [
        (ops.lib_projection_forward.default, (s, w1, b1, w2, b2)),
        (ops.lib_projection_forward.default, (s.view(3, 3, D_S), w1, b1, w2, b2)),
        (ops.lib_projection_backward.default, (g_out, s, h, w1, w2, bias, bias)),
        (ops.lib_cosine_distance_forward.default, (s, t, w1, b1, w2, b2, 1e-8, 4, 0.5, True)),
        (ops.lib_cosine_distance_forward.default, (s, t, w1, b1, w2, b2, 1e-8, 0, 1.0, False)),
        (ops.lib_cosine_distance_backward.default, (torch.rand(9), s, t, w1, b1, w2, b2, 1e-8, 4)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_compile_fullgraph_forward_backward(reduction):
    torch._dynamo.reset()
    s, t, w1, b1, w2, b2 = make()
    loss_fn = lambda *a: pycosdist.lib_cosine_distance_loss(*a, reduction=reduction, chunk_size=16).sum()  # noqa
    compiled = torch.compile(loss_fn, fullgraph=True)
    ours, eager = leaves(s, w1, b1, w2, b2), leaves(s, w1, b1, w2, b2)
    (compiled(ours[0], t, *ours[1:]) * 0.5).backward()
    (loss_fn(eager[0], t, *eager[1:]) * 0.5).backward()
    for x, y in zip(ours, eager):
        torch.testing.assert_close(x.grad, y.grad)


def test_compile_fullgraph_module():
    torch._dynamo.reset()
    torch.manual_seed(0)
    lib = LinearInvertedBottleneck(D_S, D_T)
    x = torch.randn(4, 5, D_S, requires_grad=True)
    out = torch.compile(lib, fullgraph=True)(x)
    out.square().sum().backward()
    torch.testing.assert_close(out, reference.lib_projection(x, lib.expand.weight, lib.expand.bias,
                                                             lib.project.weight, lib.project.bias))
    assert lib.expand.weight.grad is not None and x.grad is not None


# ---------------------------------------------------------------- modules

@pytest.mark.parametrize("bias", [True, False])
def test_module_folded_and_state_dict(bias):
    torch.manual_seed(0)
    lib = LinearInvertedBottleneck(D_S, D_T, expansion=3, bias=bias)
    names = {"expand.weight", "project.weight"} | ({"expand.bias", "project.bias"} if bias else set())
    assert set(lib.state_dict()) == names
    assert lib.expand.weight.shape == (3 * D_S, D_S) and lib.project.weight.shape == (D_T, 3 * D_S)
    x = torch.randn(2, 7, D_S)
    folded = lib.folded()
    assert isinstance(folded, torch.nn.Linear) and folded.weight.shape == (D_T, D_S)
    torch.testing.assert_close(folded(x), lib(x), rtol=1e-5, atol=1e-5)
    other = LinearInvertedBottleneck(D_S, D_T, expansion=3, bias=bias)
    other.load_state_dict(lib.state_dict())
    torch.testing.assert_close(other(x), lib(x), rtol=0, atol=0)


def test_distillation_loss_module():
    torch.manual_seed(0)
    loss_fn = CosineLIBDistillationLoss(D_S, D_T, expansion=2, layout="nd", chunk_size=5)
    params = dict(loss_fn.named_parameters())
    assert set(params) == {"lib.expand.weight", "lib.expand.bias", "lib.project.weight", "lib.project.bias"}
    assert set(loss_fn.state_dict()) == set(params)
    s, t, *_ = make(lead=(2, 9))
    s.requires_grad_()
    t.requires_grad_()
    loss = loss_fn(s, t)
    lib = loss_fn.lib
    ref = reference.lib_cosine_distance_loss(s, t, lib.expand.weight, lib.expand.bias, lib.project.weight,
                                             lib.project.bias)
    torch.testing.assert_close(loss, ref)
    loss.backward()
    assert t.grad is None and s.grad is not None
    assert all(p.grad is not None for p in loss_fn.parameters())
    torch.optim.SGD(loss_fn.parameters(), lr=1.0).step()  # the optimizer sees (and moves) the projection
    assert loss_fn(s, t).item() < loss.item()


# ---------------------------------------------------------------- errors

def shapes_in(msg, *shapes):
    return all(str(list(s)) in msg for s in shapes)


def test_error_student_dim_vs_w1():
    s, t, w1, b1, w2, b2 = make()
    w1 = torch.randn(E, D_S + 1)
    with pytest.raises(ValueError, match="student_latent") as e:
        pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2)
    assert shapes_in(str(e.value), s.shape, w1.shape) and "D_s" in str(e.value)
    with pytest.raises(RuntimeError, match="`student` has D_s") as e:  # the op itself
        ops.lib_cosine_distance_forward(s, t, w1, b1, w2, b2, 1e-8, 0, 1.0, False)
    assert shapes_in(str(e.value), s.shape, w1.shape)


def test_error_teacher_dim_vs_w2():
    s, t, w1, b1, w2, b2 = make()
    t = torch.randn(50, D_T + 3)
    with pytest.raises(ValueError, match="teacher_latent") as e:
        pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2)
    assert shapes_in(str(e.value), t.shape, w2.shape) and "D_t" in str(e.value)
    with pytest.raises(RuntimeError, match="`teacher` has D_t") as e:  # the op itself
        ops.lib_cosine_distance_forward(s, t, w1, b1, w2, b2, 1e-8, 0, 1.0, False)
    assert shapes_in(str(e.value), t.shape, w2.shape)


def test_error_bcft_feature_size():
    s, t = torch.randn(2, 3, 4, 10), torch.randn(2, 5, 4, 10)  # D_s = 12, D_t = 20
    _, _, w1, b1, w2, b2 = make(d_s=13)
    with pytest.raises(ValueError, match="C\\*F = 3\\*4") as e:
        pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2, layout="bcft")
    assert shapes_in(str(e.value), s.shape, w1.shape)


def test_error_rows_mismatch_in_op():
    s, t, w1, b1, w2, b2 = make()
    with pytest.raises(RuntimeError, match="same number of rows") as e:
        ops.lib_cosine_distance_forward(s, t[:7], w1, b1, w2, b2, 1e-8, 0, 1.0, False)
    assert shapes_in(str(e.value), s.shape, t[:7].shape)


def test_error_w2_vs_w1():
    s, t, w1, b1, w2, b2 = make()
    w2 = torch.randn(D_T, E - 1)
    with pytest.raises(RuntimeError, match="w2") as e:
        pycosdist.lib_projection(s, w1, b1, w2, b2)
    assert shapes_in(str(e.value), w1.shape, w2.shape)


def test_error_bias_shape():
    s, t, w1, b1, w2, b2 = make()
    b1 = torch.randn(E + 2)
    with pytest.raises(RuntimeError, match="b1") as e:
        pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2)
    assert shapes_in(str(e.value), b1.shape, w1.shape)


def test_error_projection_input_vs_w1():
    s, _, w1, b1, w2, b2 = make(lead=(2, 3))
    w1 = torch.randn(E, 5)
    with pytest.raises(RuntimeError, match="input") as e:
        pycosdist.lib_projection(s, w1, b1, w2, b2)
    assert shapes_in(str(e.value), s.shape, w1.shape)


def test_error_frames_mismatch():
    s, t, w1, b1, w2, b2 = make()
    t = t[:49]
    with pytest.raises(ValueError, match="student_latent") as e:
        pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2)
    assert shapes_in(str(e.value), s.shape, t.shape)


def test_error_bcft_needs_4d():
    s, t, w1, b1, w2, b2 = make()
    with pytest.raises(ValueError, match="student_latent.*4-D") as e:
        pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2, layout="bcft")
    assert shapes_in(str(e.value), s.shape)


def test_error_bcft_frames_mismatch():
    s, t = torch.randn(2, 3, 4, 10), torch.randn(2, 5, 4, 9)
    _, _, w1, b1, w2, b2 = make()
    with pytest.raises(ValueError, match="teacher_latent") as e:
        pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2, layout="bcft")
    assert shapes_in(str(e.value), s.shape, t.shape)


def test_error_dtype_mismatch():
    s, t, w1, b1, w2, b2 = make()
    with pytest.raises(RuntimeError, match="`w2` must have the same dtype as `student`"):
        pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2.double(), b2)


@pytest.mark.parametrize("kwargs,match", [
    (dict(reduction="avg"), "reduction"), (dict(layout="btf"), "layout"), (dict(chunk_size=0), "chunk_size"),
    (dict(eps=-1.0), "eps")])
def test_error_options(kwargs, match):
    s, t, w1, b1, w2, b2 = make()
    with pytest.raises((ValueError, RuntimeError), match=match):
        pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2, **kwargs)

