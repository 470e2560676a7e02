"""U-Net denoisers: shapes, frequency-only downsampling, bounded mask, presets, parameter/MAC counts."""

from dataclasses import replace

import pytest
import torch
from torch import nn

from pycosdist.denoise.models import (HOP, N_FFT, PRESETS, FrameNorm, UNetConfig, UNetDenoiser, build_model, count_macs,
                              count_parameters, preset)

TINY = UNetConfig(channels=(4, 6, 8), kernel_size=(3, 3), bottleneck_layers=2)


@pytest.mark.parametrize("n", [16000, 12345, 700])
def test_forward_keeps_length_and_latent_has_all_frames(n):
    torch.manual_seed(0)
    model = UNetDenoiser(TINY).eval()
    x = 0.1 * torch.randn(3, n)
    y, latent, spec = model.enhance_with_latent(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    frames = n // HOP + 1
    f = N_FFT // 2 + 1
    for _ in TINY.channels:
        f = (f + 1) // 2  # ceil(f / 2): stride-2 conv with "same" padding
    assert latent.shape == (3, TINY.channels[-1], f, frames) == (3, *model.latent_shape(frames))
    assert spec.shape == (3, f_bins := N_FFT // 2 + 1, frames) and f_bins == 257
    assert torch.equal(model(x), y)


def test_downsampling_is_frequency_only():
    model = UNetDenoiser(TINY)
    x = torch.randn(2, 4000)
    frames = 4000 // HOP + 1
    seen = []
    hooks = [m.register_forward_hook(lambda m, i, o: seen.append((m, o.shape)))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d))]
    model(x)
    for h in hooks:
        h.remove()
    assert len(seen) == 2 * len(TINY.channels) + TINY.bottleneck_layers + 1
    assert all(shape[-1] == frames for _, shape in seen), "a layer changed the number of frames"
    strides = [m.stride for m, _ in seen if isinstance(m, nn.Conv2d) and m.stride != (1, 1)]
    assert strides == [(2, 1)] * len(TINY.channels)
    freq = [shape[-2] for _, shape in seen]
    assert freq[:3] == [129, 65, 33] and freq[-1] == 257  # encoder halves F, decoder restores it


def test_mask_is_bounded_and_keeps_noisy_phase():
    torch.manual_seed(1)
    model = UNetDenoiser(TINY)
    x = torch.randn(2, 8000)
    _, _, spec = model.enhance_with_latent(x)
    noisy = model.stft(x)
    ratio = spec / noisy  # the mask, a real number in [0, 1] per bin
    assert ratio.imag.abs().max() < 1e-4
    assert ratio.real.min() >= 0 and ratio.real.max() <= 1 + 1e-5


def test_mask_floor_bounds_the_gain_from_below():
    torch.manual_seed(1)
    plain = UNetDenoiser(TINY)
    floored = UNetDenoiser(replace(TINY, mask_floor=0.25))
    floored.load_state_dict(plain.state_dict())  # the floor adds no parameters
    x = torch.randn(2, 8000)
    features = plain._features(x)[1]
    m0, m1 = plain.mask_and_latent(features)[0], floored.mask_and_latent(features)[0]
    torch.testing.assert_close(m1, 0.25 + 0.75 * m0)
    assert m1.min() >= 0.25 and m1.max() <= 1
    for bad in (1.0, -0.1):
        with pytest.raises(ValueError, match=r"mask_floor: expected a gain in \[0, 1\)"):
            replace(TINY, mask_floor=bad)


def test_checkpoint_configs_without_mask_floor_still_build():
    old = TINY.to_dict()
    del old["mask_floor"]  # a 0.2 checkpoint's model_config
    assert build_model(old).config.mask_floor == 0.0


def test_presets_mismatch_scenarios():
    t = build_model("teacher")
    frames = 10
    ct, ft, _ = t.latent_shape(frames)
    for name, div in (("student_half", 2), ("student_quarter", 4), ("student_eighth", 8)):
        c, f, tt = build_model(name).latent_shape(frames)
        assert (c, f, tt) == (ct // div, ft, frames)
        assert count_parameters(build_model(name)) < count_parameters(t)
    c, f, _ = build_model("student_shallow").latent_shape(frames)
    assert f != ft and len(PRESETS["student_shallow"].channels) == len(PRESETS["teacher"].channels) - 1
    assert count_parameters(build_model("paper_teacher")) > count_parameters(t)
    assert preset("teacher", channels=(2, 3)).channels == (2, 3)
    with pytest.raises(ValueError, match="preset.*'nope'.*teacher"):
        preset("nope")


def test_bad_inputs_are_named():
    model = UNetDenoiser(TINY)
    with pytest.raises(ValueError, match=r"noisy: expected a \(batch, samples\).*\(16000,\)"):
        model(torch.zeros(16000))
    with pytest.raises(ValueError, match="noisy: expected a floating-point.*int64"):
        model(torch.zeros(1, 16000, dtype=torch.int64))
    with pytest.raises(ValueError, match="channels"):
        UNetConfig(channels=())
    with pytest.raises(ValueError, match="kernel_size"):
        UNetConfig(kernel_size=(4, 3))


def test_count_parameters_and_macs():
    model = UNetDenoiser(TINY)
    assert count_parameters(model) == sum(p.numel() for p in model.parameters())
    # MACs by hand for 1 s: T frames, F halves per level; encoder conv = F_out*T*C_out*C_in*kf*kt,
    # bottleneck same at F', transposed conv = F_in*T*C_in*C_out*kf*kt, head = 257*T*C1.
    T, k = 16000 // HOP + 1, 9
    chans = (1,) + TINY.channels
    fs = [257, 129, 65, 33]
    expected = sum(fs[i + 1] * T * chans[i + 1] * chans[i] * k for i in range(3))
    expected += TINY.bottleneck_layers * fs[3] * T * 8 * 8 * k
    dec_in = [(8 + 8, fs[3], 6), (6 + 6, fs[2], 4), (4 + 4, fs[1], 4)]  # (C_in, F_in, C_out)
    expected += sum(f * T * c_in * c_out * k for c_in, f, c_out in dec_in)
    expected += 257 * T * 4
    assert count_macs(model, 1.0) == expected
    assert model.training  # count_macs restores the mode


# --- causal models ---------------------------------------------------------------------------------
CAUSAL_TINY = UNetConfig(channels=(4, 6, 8), kernel_size=(3, 3), bottleneck_layers=2, causal=True, n_fft=256, hop=128)


def _randomize_norms(model):
    """Non-trivial BatchNorm statistics and affines, so that a wrong folding or ordering shows."""
    g = torch.Generator().manual_seed(5)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, (nn.BatchNorm2d, FrameNorm)):
            m.weight.data.copy_(torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(torch.randn(m.bias.shape, generator=g))
    return model


@pytest.mark.parametrize("config", [CAUSAL_TINY, replace(CAUSAL_TINY, norm="frame", kernel_size=(5, 5)),
                                    replace(CAUSAL_TINY, n_fft=512), PRESETS["causal_student_quarter"]],
                         ids=["tiny", "frame_norm_k5", "nfft512", "preset"])
def test_causal_model_uses_no_future_sample(config):
    """Changing the input from sample s on leaves every output sample before s - n_fft + 1 and every
    latent frame that ends before s unchanged (frame t ends at sample t*hop + hop - 1); a non-causal
    model changes outputs long before s."""
    torch.manual_seed(0)
    model = _randomize_norms(UNetDenoiser(config)).eval().double()
    n, s = 6000, 4000
    x = 0.3 * torch.randn(2, n, dtype=torch.float64)
    x2 = x.clone()
    x2[:, s:] += torch.randn(2, n - s, dtype=torch.float64)
    with torch.no_grad():
        y, lat, _ = model.enhance_with_latent(x)
        y2, lat2, _ = model.enhance_with_latent(x2)
    cut = s - config.n_fft + 1
    assert torch.equal(y[:, :cut], y2[:, :cut])
    assert (y[:, s:] - y2[:, s:]).abs().max() > 1e-3  # the change does reach the output
    frames = s // config.hop  # frames 0 .. s//hop - 1 end before s
    assert torch.equal(lat[..., :frames], lat2[..., :frames])
    noncausal = UNetDenoiser(replace(config, causal=False, norm="batch")).eval().double()
    with torch.no_grad():
        assert (noncausal(x)[:, :cut] - noncausal(x2)[:, :cut]).abs().max() > 1e-6


@pytest.mark.parametrize("n", [1, 127, 128, 300, 5000, 5120])
@pytest.mark.parametrize("n_fft,hop", [(256, 128), (512, 128), (320, 160)])
def test_causal_stft_reconstructs_to_the_last_sample(n, n_fft, hop):
    """The causal iSTFT (overlap-add with the synthesis window) inverts the causal STFT exactly, up to
    the float32 rounding of the stored window, at every sample including the first and the last."""
    from pycosdist.denoise.models import STFT

    stft = STFT(n_fft, hop, causal=True).double()
    x = torch.randn(3, n, dtype=torch.float64)
    spec = stft(x)
    assert spec.shape == (3, n_fft // 2 + 1, stft.frames(n)) and stft.frames(n) == -(-n // hop) + n_fft // hop - 1
    torch.testing.assert_close(stft.inverse(spec, n), x, atol=1e-6, rtol=0)
    # frame t is the Hann-windowed samples [t*hop - (n_fft - hop), t*hop + hop) (zeros outside the clip)
    t = min(2, spec.shape[-1] - 1)
    padded = torch.nn.functional.pad(x, (n_fft - hop, n_fft))
    frame = padded[:, t * hop:t * hop + n_fft] * torch.hann_window(n_fft, dtype=torch.float64)
    torch.testing.assert_close(spec[..., t], torch.fft.rfft(frame), atol=1e-5, rtol=0)  # float32 window


def test_causal_preset_frames_match_the_teacher():
    """n_fft 256 / hop 128: a hop-aligned clip (training crops are) has the teacher's T frames."""
    teacher, student = build_model("teacher").eval(), build_model("causal_student_quarter").eval()
    x = torch.randn(1, 128 * 40)
    with torch.no_grad():
        assert teacher.latent(x).shape[-1] == student.latent(x).shape[-1] == 41
        y, lat, spec = student.enhance_with_latent(x)
    assert y.shape == x.shape and spec.shape == (1, 129, 41)
    assert lat.shape == (1, *student.latent_shape(41)) == (1, 4 * 4, 9, 41)
    assert student.config.latency_ms == 16.0 and teacher.config.latency_ms == float("inf")
    assert count_macs(student) < count_macs(build_model("student_quarter"))
    assert count_parameters(build_model("causal_student_half")) > count_parameters(student)


def test_causal_config_errors_and_old_configs():
    with pytest.raises(ValueError, match="norm: 'group' normalizes over the whole time axis.*causal"):
        UNetConfig(causal=True, norm="group")
    with pytest.raises(ValueError, match="hop: a causal model needs a hop that divides n_fft = 256, got 96"):
        UNetConfig(causal=True, n_fft=256, hop=96)
    with pytest.raises(ValueError, match="hop: expected 1..n_fft/2 = 128"):
        UNetConfig(n_fft=256, hop=200)
    with pytest.raises(ValueError, match="n_fft: expected an even"):
        UNetConfig(n_fft=255)
    old = TINY.to_dict()
    for key in ("causal", "n_fft", "hop"):
        del old[key]  # a 0.2 checkpoint's model_config
    cfg = build_model(old).config
    assert (cfg.causal, cfg.n_fft, cfg.hop) == (False, N_FFT, HOP)
