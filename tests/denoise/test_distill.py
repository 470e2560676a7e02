"""KD losses against independent float64 formulas; teacher freezing; the task loss."""

import math

import numpy as np
import pytest
import torch

from pycosdist.denoise import distill
from pycosdist.denoise.models import UNetConfig, UNetDenoiser, compress

B, CS, FS, CT, FT, T = 2, 3, 5, 4, 3, 7  # D_s = 15, D_t = 12, e * D_s = 60


def _latents(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, CS, FS, T, generator=g), torch.randn(B, CT, FT, T, generator=g)


def _frames64(x):
    """(B, C, F, T) -> list over b of the (T, C*F) frame matrix, float64, written out by index."""
    b, c, f, t = x.shape
    return [torch.tensor([[float(x[i, cc, ff, tt]) for cc in range(c) for ff in range(f)] for tt in range(t)],
                         dtype=torch.float64) for i in range(b)]


def test_make_kd_loss_dispatch_and_errors():
    s, t = _latents()
    assert distill.make_kd_loss("none", s.shape, t.shape) is None
    assert isinstance(distill.make_kd_loss("fitnet_mse", s.shape[1:], t.shape[1:]), distill.FitNetMSELoss)
    with pytest.raises(ValueError, match="method.*'bogus'.*cosine_lib"):
        distill.make_kd_loss("bogus", s.shape, t.shape)
    with pytest.raises(ValueError, match="student_latent_shape"):
        distill.make_kd_loss("cosine_lib", (3,), t.shape)
    kd = distill.make_kd_loss("fitnet_mse", s.shape, t.shape)
    with pytest.raises(ValueError, match="same batch size B and frame count T"):
        kd(s, t[..., :-1])
    with pytest.raises(ValueError, match=r"student_latent: expected C\*F = 15"):
        kd(s[:, :2], t)


def test_fitnet_mse_matches_formula():
    s, t = _latents(1)
    kd = distill.make_kd_loss("fitnet_mse", s.shape, t.shape)
    w, b = kd.adapter.weight.detach().double(), kd.adapter.bias.detach().double()
    total, count = 0.0, 0
    for xs, xt in zip(_frames64(s), _frames64(t)):
        for row_s, row_t in zip(xs, xt):
            p = w @ row_s + b
            total += float(((p - row_t) ** 2).sum())
            count += row_t.numel()
    assert float(kd(s, t)) == pytest.approx(total / count, rel=1e-5)


def test_similarity_preserving_matches_formula():
    s, t = _latents(2)
    kd = distill.make_kd_loss("similarity_preserving", s.shape, t.shape)
    per_sample = []
    for xs, xt in zip(_frames64(s), _frames64(t)):
        gs, gt = xs @ xs.T, xt @ xt.T  # (T, T)
        gs = gs / gs.norm(dim=1, keepdim=True)  # row-normalized
        gt = gt / gt.norm(dim=1, keepdim=True)
        per_sample.append(float(((gs - gt) ** 2).sum()) / T ** 2)
    assert float(kd(s, t)) == pytest.approx(sum(per_sample) / B, rel=1e-5)
    assert float(kd(t[:, :, :, :], t)) == pytest.approx(0.0, abs=1e-6)  # same latent: zero loss


def _lib_weights(kd, d_s, d_t, e):
    """(w1, b1, w2, b2) of the KD module's LIB, found by shape (independent of parameter names)."""
    by_shape = {tuple(p.shape): p.detach().double() for p in kd.parameters()}
    return by_shape[(e * d_s, d_s)], by_shape.get((e * d_s,)), by_shape[(d_t, e * d_s)], by_shape.get((d_t,))


def test_cosine_lib_matches_formula():
    s, t = _latents(3)
    kd = distill.make_kd_loss("cosine_lib", s.shape, t.shape, expansion=4)
    w1, b1, w2, b2 = _lib_weights(kd, CS * FS, CT * FT, 4)
    assert b1 is not None and b2 is not None
    dists = []
    for xs, xt in zip(_frames64(s), _frames64(t)):
        for row_s, row_t in zip(xs, xt):
            p = w2 @ (w1 @ row_s + b1) + b2  # no activation between
            dists.append(1 - float(p @ row_t) / (max(float(p.norm()), 1e-8) * max(float(row_t.norm()), 1e-8)))
    assert float(kd(s, t)) == pytest.approx(sum(dists) / len(dists), rel=1e-5)
    nobias = distill.make_kd_loss("cosine_lib", s.shape, t.shape, expansion=2, bias=False)
    assert sum(p.numel() for p in nobias.parameters()) == 2 * 15 * 15 + 12 * 2 * 15


def test_cosine_linear_matches_formula():
    s, t = _latents(6)
    kd = distill.make_kd_loss("cosine_linear", s.shape, t.shape, expansion=8)  # expansion: ignored, one linear map
    params = list(kd.parameters())
    assert sorted(tuple(p.shape) for p in params) == [(12,), (12, 15)]
    w, b = kd.adapter.weight.detach().double(), kd.adapter.bias.detach().double()
    dists = []
    for xs, xt in zip(_frames64(s), _frames64(t)):
        for row_s, row_t in zip(xs, xt):
            p = w @ row_s + b
            dists.append(1 - float(p @ row_t) / (max(float(p.norm()), 1e-8) * max(float(row_t.norm()), 1e-8)))
    assert float(kd(s, t)) == pytest.approx(sum(dists) / len(dists), rel=1e-5)
    assert sum(p.numel() for p in distill.make_kd_loss("cosine_linear", s.shape, t.shape, bias=False).parameters()) == 180


@pytest.mark.parametrize("e", [1, 2, 4, 8])
def test_mse_lib_matches_formula(e):
    s, t = _latents(7)
    kd = distill.make_kd_loss("mse_lib", s.shape, t.shape, expansion=e)
    w1, b1, w2, b2 = _lib_weights(kd, CS * FS, CT * FT, e)
    total, count = 0.0, 0
    for xs, xt in zip(_frames64(s), _frames64(t)):
        for row_s, row_t in zip(xs, xt):
            p = w2 @ (w1 @ row_s + b1) + b2
            total += float(((p - row_t) ** 2).sum())
            count += row_t.numel()
    assert float(kd(s, t)) == pytest.approx(total / count, rel=1e-5)
    with pytest.raises(ValueError, match=r"teacher_latent: expected C\*F = 12"):
        kd(s, t[:, :2])


@pytest.mark.parametrize("e", [1, 2, 8])
def test_cosine_lib_expansion_is_the_hidden_width(e):
    s, t = _latents(8)
    kd = distill.make_kd_loss("cosine_lib", s.shape, t.shape, expansion=e)
    w1, b1, w2, b2 = _lib_weights(kd, CS * FS, CT * FT, e)
    assert w1.shape == (e * 15, 15) and w2.shape == (12, e * 15)


def test_existing_method_names_still_work():
    assert distill.METHODS[:4] == ("none", "fitnet_mse", "similarity_preserving", "cosine_lib")
    assert set(distill.LIB_METHODS) == {"cosine_lib", "mse_lib"}


@pytest.mark.parametrize("method", ["fitnet_mse", "similarity_preserving", "cosine_lib", "cosine_linear", "mse_lib"])
def test_kd_gradient_reaches_student_only(method):
    s, t = _latents(4)
    s.requires_grad_(True)
    t.requires_grad_(True)  # a careless caller: the loss must still treat the teacher as a constant
    kd = distill.make_kd_loss(method, s.shape, t.shape)
    loss = kd(s, t)
    loss.backward()
    assert math.isfinite(float(loss)) and s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_teacher_is_frozen():
    teacher = UNetDenoiser(UNetConfig(channels=(4, 8), kernel_size=(3, 3), bottleneck_layers=1))
    x = torch.randn(2, 3000)
    with pytest.raises(RuntimeError, match="frozen"):
        distill.teacher_latent(teacher, x)
    distill.freeze(teacher)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    lat = distill.teacher_latent(teacher, x)
    assert not lat.requires_grad and lat.grad_fn is None
    assert torch.equal(lat, teacher.latent(x))


def test_task_loss_formula():
    torch.manual_seed(5)
    model = UNetDenoiser(UNetConfig(channels=(4,), kernel_size=(3, 3), bottleneck_layers=1))
    noisy, clean = torch.randn(2, 2000), torch.randn(2, 2000)
    enhanced, _, spec = model.enhance_with_latent(noisy)
    window = torch.hann_window(512, dtype=torch.float64)
    clean_mag = torch.stft(clean.double(), 512, 128, window=window, return_complex=True).abs()
    mag = (spec.abs().double().clamp_min(1e-8) ** 0.3 - clean_mag.clamp_min(1e-8) ** 0.3).abs().mean()
    wave = (enhanced.double() - clean.double()).abs().mean()
    got = distill.task_loss(spec, enhanced, clean, model.stft, wave_weight=3.0)
    assert float(got) == pytest.approx(float(mag + 3.0 * wave), rel=1e-5)
    assert torch.equal(compress(torch.zeros(1)), torch.full((1,), 1e-8) ** 0.3)
    with_sisdr = distill.task_loss(spec, enhanced, clean, model.stft, wave_weight=3.0, sisdr_weight=0.5)
    assert float(with_sisdr - got) == pytest.approx(0.5 * float(distill.neg_si_sdr(enhanced, clean)), rel=1e-5)


def _si_sdr_db_float64(y, s):  # independent reference: numpy, float64, one utterance
    y, s = y - y.mean(), s - s.mean()
    target = np.dot(y, s) / np.dot(s, s) * s
    return 10 * np.log10(np.dot(target, target) / np.dot(y - target, y - target))


def test_neg_si_sdr_matches_the_definition_and_is_scale_invariant():
    torch.manual_seed(2)
    clean = torch.randn(3, 4000)
    enhanced = clean + 0.3 * torch.randn(3, 4000) + 0.5  # an offset: SI-SDR removes the mean
    want = -np.mean([_si_sdr_db_float64(e.double().numpy(), c.double().numpy()) for e, c in zip(enhanced, clean)])
    assert float(distill.neg_si_sdr(enhanced, clean)) == pytest.approx(want, abs=1e-3)
    assert float(distill.neg_si_sdr(4.0 * enhanced, clean)) == pytest.approx(want, abs=1e-3)
    silent = distill.neg_si_sdr(torch.randn(1, 4000, requires_grad=True), torch.zeros(1, 4000))
    silent.backward()  # an all-silent crop stays finite
    assert torch.isfinite(silent)
