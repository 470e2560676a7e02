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
    w1, w2 = rnd(e, d_s, scale=max(d_s, 1) ** -0.5), rnd(d_t, e, scale=max(e, 1) ** -0.5)
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



# ---------------------------------------------------------------- folding (issue 12)

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", ["both", "b1", "b2", "none"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("d_s,d_t,e", [(12, 20, 48), (24, 10, 96), (3, 7, 2)])  # D_t > D_s, D_t < D_s, E < D_s
def test_folded_loss_matches_unfolded_reference(dtype, bias, reduction, d_s, d_t, e):
    # every combination of biases (the folded bias is W2 b1 + b2, W2 b1 or b2), both D_t vs D_s orders
    s, t, w1, b1, w2, b2 = make(n=40, d_s=d_s, d_t=d_t, e=e, dtype=dtype)
    b1, b2 = (b1 if bias in ("both", "b1") else None), (b2 if bias in ("both", "b2") else None)
    ours, refs = leaves(s, w1, b1, w2, b2), leaves(s, w1, b1, w2, b2, dtype=torch.float64)
    out = pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], reduction=reduction, chunk_size=16)
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), *refs[1:], reduction=reduction)
    assert out.dtype == dtype
    assert_close(out, ref, dtype, "loss")
    check_grads(out, ref, ours, refs, dtype, reduction)


def test_fold_lib_is_the_projection_and_folded_uses_it():
    s, t, w1, b1, w2, b2 = make(dtype=torch.float64)
    w, b = reference.fold_lib(w1, b1, w2, b2)
    torch.testing.assert_close(s @ w.T + b, reference.lib_projection(s, w1, b1, w2, b2))
    assert reference.fold_lib(w1, None, w2, None)[1] is None
    torch.testing.assert_close(reference.fold_lib(w1, b1, w2, None)[1], w2 @ b1)
    lib = LinearInvertedBottleneck(D_S, D_T, expansion=E // D_S).double()
    with torch.no_grad():
        for p, v in zip((lib.expand.weight, lib.expand.bias, lib.project.weight, lib.project.bias), (w1, b1, w2, b2)):
            p.copy_(v)
    folded = lib.folded()
    torch.testing.assert_close(folded.weight, w, rtol=0, atol=0)
    torch.testing.assert_close(folded.bias, b, rtol=0, atol=0)
    # the fused loss is the cosine distance of the folded projection
    torch.testing.assert_close(pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w2, b2, reduction="none"),
                               reference.cosine_distance(folded(s), t))


@pytest.mark.parametrize("dtype,reduction", [(torch.float16, "mean"), (torch.bfloat16, "mean"),
                                             (torch.bfloat16, "sum")])  # a float16 sum of N rows overflows
def test_half_large_n_against_float64(dtype, reduction):
    # N = 65536 rows: 1/N (times a GradScaler-like upstream factor) must not pass through a half
    # buffer; every gradient within half precision of the float64 reference.
    n = 65536
    s, t, w1, b1, w2, b2 = make(n=n, d_s=8, d_t=12, e=32, dtype=dtype)
    ours, refs = leaves(s, w1, b1, w2, b2), leaves(s, w1, b1, w2, b2, dtype=torch.float64)
    out = pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], reduction=reduction)
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), *refs[1:], reduction=reduction)
    assert_close(out, ref, dtype, "loss")
    up = 1024.0 if reduction == "mean" else 1 / 64  # keeps the sum's gradients in half range
    (out * up).backward()
    (ref * up).backward()
    for name, x, r in zip(("student", "w1", "b1", "w2", "b2"), ours, refs):
        assert_close(x.grad, r.grad, dtype, f"grad {name}")


def test_loss_with_no_student_features():
    # D_s = 0: every projected row is the folded bias W2 b1 + b2
    s, t, w1, b1, w2, b2 = make(n=6, d_s=0, e=5)
    ours, refs = leaves(s, w1, b1, w2, b2), leaves(s, w1, b1, w2, b2, dtype=torch.float64)
    out = pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], reduction="none")
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), *refs[1:], reduction="none")
    assert_close(out, ref, torch.float32, "loss")
    check_grads(out, ref, ours, refs, torch.float32, "none")


# ---------------------------------------------------------------- reliability (issue 13)

def _double_backward(fn, x):
    g, = torch.autograd.grad(fn(x) + 1e-3 * (x ** 3).sum(), x, create_graph=True)
    (g ** 2).sum().backward()


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_loss_double_backward_raises(reduction):
    s, t, w1, b1, w2, b2 = make(n=9, dtype=torch.float64)
    x = s.requires_grad_()
    loss = lambda x: pycosdist.lib_cosine_distance_loss(x, t, w1, b1, w2, b2, reduction=reduction).sum()  # noqa
    with pytest.raises(RuntimeError, match="lib_cosine_distance_loss does not support double backward"):
        _double_backward(loss, x)
    # the op's gradient alone under create_graph: the same error, not "does not require grad"
    g, = torch.autograd.grad(loss(x), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        g.sum().backward()
    # create_graph=True without differentiating the gradient again still works
    w = w2.clone().requires_grad_()
    gw, = torch.autograd.grad(pycosdist.lib_cosine_distance_loss(s, t, w1, b1, w, b2, reduction=reduction).sum(),
                              w, create_graph=True)
    w_ref = w2.clone().requires_grad_()
    gw_ref, = torch.autograd.grad(reference.lib_cosine_distance_loss(s, t, w1, b1, w_ref, b2, reduction=reduction)
                                  .sum(), w_ref)
    torch.testing.assert_close(gw.detach(), gw_ref)


def test_projection_double_backward_raises():
    s, _, w1, b1, w2, b2 = make(n=9, dtype=torch.float64)
    x = s.requires_grad_()
    out = lambda x: pycosdist.lib_projection(x, w1, b1, w2, b2).square().sum()  # noqa: E731
    with pytest.raises(RuntimeError, match="lib_projection does not support double backward"):
        _double_backward(out, x)
    g, = torch.autograd.grad(pycosdist.lib_projection(x, w1, b1, w2, b2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        g.sum().backward()


@pytest.mark.parametrize("scale,eps", [(1e19, 1e-8), (1e30, 1e-8), (1e-20, 0.0)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_extreme_magnitudes_match_float64(scale, eps, reduction):
    # float32 rows whose squared norms overflow (1e19 * sqrt(D) squared > 3.4e38) or underflow:
    # the float64 reference's values and gradients, not cos = 1 with zero gradients
    s, t, w1, b1, w2, b2 = make(n=30, bias=False)
    s, t = s * scale, t * scale
    ours, refs = leaves(s, w1, w2), leaves(s, w1, w2, dtype=torch.float64)
    out = pycosdist.lib_cosine_distance_loss(ours[0], t, ours[1], None, ours[2], None, eps=eps, reduction=reduction,
                                             chunk_size=8)
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), refs[1], None, refs[2], None, eps=eps,
                                             reduction=reduction)
    assert torch.isfinite(out).all()
    assert_close(out, ref, torch.float32, "loss")
    check_grads(out, ref, [ours[0], ours[1], None, ours[2], None], [refs[0], refs[1], None, refs[2], None],
                torch.float32, reduction)


@pytest.mark.parametrize("lead", [(5,), (2, 3), (0,)])
def test_projection_with_no_input_features(lead):
    # D_s = 0: every output row is W2 b1 + b2 (used to fail with an internal reshape error)
    s, _, w1, b1, w2, b2 = make(d_s=0, lead=lead)
    ours, refs = leaves(s, w1, b1, w2, b2), leaves(s, w1, b1, w2, b2, dtype=torch.float64)
    out = pycosdist.lib_projection(*ours)
    ref = reference.lib_projection(*refs)
    assert out.shape == (*lead, D_T)
    assert_close(out, ref, torch.float32, "output")
    if out.numel():
        check_grads(out, ref, ours, refs, torch.float32, "projection")


def _bad_op_calls():
    s, t, w1, b1, w2, b2 = make(n=6)
    h, g_out = s @ w1.T, torch.randn(6, D_T)
    fwd, bwd = ops.lib_cosine_distance_forward, ops.lib_cosine_distance_backward
    return {
        "int student": (fwd, (s.int(), t, w1, b1, w2, b2, 1e-8, 0, 1.0, True)),
        "int teacher": (fwd, (s, t.long(), w1, b1, w2, b2, 1e-8, 0, 1.0, False)),
        "w2 columns": (fwd, (s, t, w1, b1, w2[:, :-1], b2, 1e-8, 0, 1.0, True)),
        "w2 dtype": (fwd, (s, t, w1, b1, w2.double(), b2, 1e-8, 0, 1.0, True)),
        "b1 shape": (fwd, (s, t, w1, b1[:-1], w2, b2, 1e-8, 0, 1.0, True)),
        "teacher D_t": (fwd, (s, t[:, :-1], w1, b1, w2, b2, 1e-8, 0, 1.0, True)),
        "rows": (fwd, (s, t[:5], w1, b1, w2, b2, 1e-8, 0, 1.0, True)),
        "eps": (fwd, (s, t, w1, b1, w2, b2, -1.0, 0, 1.0, True)),
        "student 3-D": (bwd, (torch.rand(6), s.view(2, 3, D_S), t, w1, b1, w2, b2, 1e-8, 0)),
        "grad_distance shape": (bwd, (torch.rand(5), s, t, w1, b1, w2, b2, 1e-8, 0)),
        "int grad_distance": (bwd, (torch.ones(6, dtype=torch.int32), s, t, w1, b1, w2, b2, 1e-8, 0)),
        "projection int input": (ops.lib_projection_forward, (s.int(), w1, b1, w2, b2)),
        "projection w2": (ops.lib_projection_forward, (s, w1, b1, w2[:, :-1], b2)),
        "projection b2": (ops.lib_projection_forward, (s, w1, b1, w2, b2[:-1])),
        "projection hidden": (ops.lib_projection_backward, (g_out, s, h[:, :-1], w1, w2, True, True)),
        "projection grad_output": (ops.lib_projection_backward, (g_out[:5], s, h, w1, w2, True, True)),
    }


@pytest.mark.parametrize("case", list(_bad_op_calls()))
def test_fake_kernels_check_like_the_real_ones(case):
    op, args = _bad_op_calls()[case]
    with pytest.raises(RuntimeError) as real:
        op(*args)
    meta = [x.to("meta") if isinstance(x, torch.Tensor) else x for x in args]
    with pytest.raises(RuntimeError) as fake:
        op(*meta)
    assert str(fake.value) == str(real.value)
    assert str(real.value).startswith("pycosdist: `")


@pytest.mark.parametrize("kwargs,name", [(dict(layout="xyz"), "layout"), (dict(reduction="xyz"), "reduction"),
                                         (dict(eps=-1.0), "eps"), (dict(eps=float("nan")), "eps"),
                                         (dict(chunk_size=0), "chunk_size"), (dict(chunk_size=2.5), "chunk_size")])
def test_distillation_loss_module_checks_arguments_at_construction(kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be .*got {kwargs[name]!r}"):
        CosineLIBDistillationLoss(D_S, D_T, **kwargs)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("zero", ["student", "teacher"])
def test_eps_zero_with_zero_row_is_nan_like_float64(reduction, zero):
    # documented: eps = 0 and an all-zero projected (or teacher) row give 0 / 0 = NaN, with the
    # same NaN pattern in every gradient as the float64 reference
    s, t, w1, b1, w2, b2 = make(n=6, bias=False)
    (s if zero == "student" else t)[2] = 0
    ours, refs = leaves(s, w1, w2), leaves(s, w1, w2, dtype=torch.float64)
    out = pycosdist.lib_cosine_distance_loss(ours[0], t, ours[1], None, ours[2], None, eps=0.0, reduction=reduction)
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), refs[1], None, refs[2], None, eps=0.0,
                                             reduction=reduction)
    assert torch.isnan(out).any()
    torch.testing.assert_close(out.double(), ref, equal_nan=True, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    for x, r in zip(ours, refs):
        torch.testing.assert_close(x.grad.double(), r.grad, equal_nan=True, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_bf16_student_with_fp32_teacher_and_weights(reduction):
    torch.manual_seed(0)
    loss_fn = CosineLIBDistillationLoss(D_S, D_T, expansion=2, reduction=reduction)
    s, t, *_ = make(lead=(3, 9))
    s = s.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_fn(s, t)
        funct = pycosdist.lib_cosine_distance_loss(s, t, *[p for p in loss_fn.lib.parameters()],
                                                   reduction=reduction)
    torch.testing.assert_close(out, funct)
    params = list(loss_fn.parameters())
    refs = leaves(s, *params, dtype=torch.float64)
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), *refs[1:], reduction=reduction)
    assert_close(out, ref, torch.float32, "loss")  # computed in float32 from the exact bf16 values
    (out.sum() * 2).backward()
    (ref.sum() * 2).backward()
    assert s.grad.dtype == torch.bfloat16 and all(p.grad.dtype == torch.float32 for p in params)
    assert_close(s.grad, refs[0].grad, torch.bfloat16, "grad student")
    for name, p, r in zip(("w1", "b1", "w2", "b2"), params, refs[1:]):
        assert_close(p.grad, r.grad, torch.float32, f"grad {name}")


def test_autocast_projection_runs_in_the_autocast_dtype():
    torch.manual_seed(0)
    lib = LinearInvertedBottleneck(D_S, D_T)
    x = torch.randn(4, 5, D_S).bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lib(x)
        ref = reference.lib_projection(x, lib.expand.weight, lib.expand.bias, lib.project.weight, lib.project.bias)
    assert out.dtype == ref.dtype == torch.bfloat16
    params = leaves(x, *lib.parameters(), dtype=torch.float64)
    assert_close(out, reference.lib_projection(*params), torch.bfloat16, "output")
    out.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and lib.expand.weight.grad.dtype == torch.float32


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_loss_backward_twice_with_retain_graph(reduction):
    # the first backward hands over the forward's gradients (scaled in place); the second recomputes
    s, t, w1, b1, w2, b2 = make()
    ours, refs = leaves(s, w1, b1, w2, b2), leaves(s, w1, b1, w2, b2, dtype=torch.float64)
    out = pycosdist.lib_cosine_distance_loss(ours[0], t, *ours[1:], reduction=reduction)
    ref = reference.lib_cosine_distance_loss(refs[0], t.double(), *refs[1:], reduction=reduction)
    for up in (0.7, 1.3):
        (out * up).backward(retain_graph=True)
        (ref * up).backward(retain_graph=True)
    for name, x, r in zip(("student", "w1", "b1", "w2", "b2"), ours, refs):
        assert_close(x.grad, r.grad, torch.float32, f"grad {name}")
