"""Streaming: a causal model run hop by hop (pycosdist.denoise.streaming) gives the offline output.

The reference is the offline model (whole-clip torch.stft, convolutions with past padding, transposed
convolutions cropped, fold-based overlap-add), an independently written computation of the same
function; in float64 the two agree to ~1e-12, so any off-by-one frame, wrong tap order, wrong
BatchNorm folding or state mix-up fails."""

from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from pycosdist.denoise.models import PRESETS, FrameNorm, UNetConfig, UNetDenoiser
from pycosdist.denoise.streaming import StreamingDenoiser, StreamStep
from run_helpers import corpus, teacher_ckpt  # noqa: F401 (fixtures)

CONFIGS = {
    "preset_quarter": PRESETS["causal_student_quarter"],
    "frame_norm_floor": replace(PRESETS["causal_student_quarter"], norm="frame", mask_floor=0.1),
    "nfft512_k5_3bott": UNetConfig(channels=(4, 6, 8), kernel_size=(3, 5), bottleneck_layers=3, causal=True,
                                   n_fft=512, hop=128),
    "nfft320_hop160_wide_bott": UNetConfig(channels=(4, 6), kernel_size=(5, 3), bottleneck_channels=10, causal=True,
                                           n_fft=320, hop=160),
}


def _model(config, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = UNetDenoiser(config)
    g = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():  # non-trivial statistics and affines: a wrong BatchNorm folding shows
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(0.5 * torch.randn(m.num_features, generator=g))
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        if isinstance(m, (nn.BatchNorm2d, FrameNorm)):
            m.weight.data.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
            m.bias.data.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
    return model.eval().to(dtype)


@pytest.fixture(scope="module")
def models64():
    return {name: _model(cfg) for name, cfg in CONFIGS.items()}


@settings(max_examples=12, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)), n=st.integers(1, 2500), batch=st.integers(1, 2),
       seed=st.integers(0, 2**16))
def test_enhance_streamed_equals_offline(models64, name, n, batch, seed):
    model = models64[name]
    x = 0.5 * torch.randn(batch, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        offline = model(x)
    streamed = StreamingDenoiser(model).enhance(x)
    assert streamed.shape == x.shape and streamed.dtype == torch.float64
    torch.testing.assert_close(streamed, offline, atol=1e-10, rtol=0)


@settings(max_examples=8, deadline=None)
@given(name=st.sampled_from(sorted(CONFIGS)), hops=st.integers(1, 25), seed=st.integers(0, 2**16))
def test_process_hop_is_the_offline_output_delayed(models64, name, hops, seed):
    """Pushed one hop at a time (1-D hops), the output is the offline output of the clip so far,
    delayed by n_fft - hop samples: every hop is final when it is returned."""
    model = models64[name]
    stream = StreamingDenoiser(model)
    hop, delay = stream.hop, stream.delay_samples
    x = torch.randn(hops * hop, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    out = torch.cat([stream.process_hop(x[k * hop:(k + 1) * hop]) for k in range(hops)])
    with torch.no_grad():
        offline = model(x[None])[0]
    # output sample j is offline sample j - delay (the first `delay` ones precede the clip's output)
    torch.testing.assert_close(out[delay:], offline[:hops * hop - delay], atol=1e-10, rtol=0)


def test_float32_stream_matches_float64_offline():
    config = PRESETS["causal_student_half"]
    model64 = _model(config, torch.float64, seed=3)
    model32 = _model(config, torch.float32, seed=3)
    x = 0.3 * torch.randn(2, 7000, dtype=torch.float64)
    with torch.no_grad():
        offline = model64(x)
    streamed = StreamingDenoiser(model32).enhance(x.float())
    assert streamed.dtype == torch.float32
    torch.testing.assert_close(streamed.double(), offline, atol=2e-5, rtol=0)


def test_stream_state_layout(models64):
    step = StreamStep(models64["preset_quarter"])
    names = step.state_names
    assert names == ["analysis", "enc0", "enc1", "enc2", "enc3", "bott0", "bott1", "dec0", "dec1", "dec2", "dec3",
                     "overlap"]
    shapes = dict(zip(names, (tuple(s.shape) for s in step.initial_state(3))))
    assert shapes["analysis"] == shapes["overlap"] == (3, 128)
    assert shapes["enc0"] == (3, 1, 129, 2) and shapes["enc3"] == (3, 12, 17, 2)
    assert shapes["bott0"] == (3, 16, 9, 2) and shapes["bott1"] == (3, 16, 9, 4)  # dilation 2: 4 past frames
    assert shapes["dec0"] == (3, 32, 9, 2) and shapes["dec3"] == (3, 8, 65, 2)


def test_a_stream_reset_forgets_the_past(models64):
    stream = StreamingDenoiser(models64["preset_quarter"])
    hop = torch.randn(2, 128, dtype=torch.float64)
    first = stream.process_hop(hop)
    stream.process_hop(torch.randn(2, 128, dtype=torch.float64))
    stream.reset()
    torch.testing.assert_close(stream.process_hop(hop), first, atol=0, rtol=0)


def test_bad_models_and_hops_are_refused(models64):
    with pytest.raises(ValueError, match="model: streaming needs a causal model"):
        StreamingDenoiser(UNetDenoiser(UNetConfig(channels=(4, 6))))
    stream = StreamingDenoiser(models64["preset_quarter"])
    with pytest.raises(ValueError, match=r"x: expected one hop, \(128,\) or \(batch, 128\) samples, got shape \(100,\)"):
        stream.process_hop(torch.zeros(100, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: expected floating-point"):
        stream.process_hop(torch.zeros(128, dtype=torch.int32))
    stream.process_hop(torch.zeros(2, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="x: this stream has batch size 2, got 3"):
        stream.process_hop(torch.zeros(3, 128, dtype=torch.float64))
    with pytest.raises(ValueError, match="wave: expected a non-empty"):
        stream.enhance(torch.zeros(0))


def test_cli_enhance_stream_equals_offline_on_real_files(tmp_path, capsys):
    """``pycosdist enhance --stream`` on files written here (stereo 22.05 kHz and mono 16 kHz, one
    shorter than a window) gives the offline command's output; the exported stream.onnx too."""
    import numpy as np
    import soundfile as sf

    from pycosdist.denoise import export, training
    from pycosdist.denoise.cli import main

    model = _model(PRESETS["causal_student_quarter"], torch.float32, seed=7)
    ckpt = tmp_path / "run" / "best.pt"
    training.save_checkpoint({"format": "pycosdist", "model_config": model.config.to_dict(),
                              "model": model.state_dict()}, ckpt)
    rng = np.random.default_rng(0)
    (tmp_path / "in").mkdir()
    sf.write(tmp_path / "in" / "stereo.wav", 0.1 * rng.standard_normal((33075, 2)), 22050)
    sf.write(tmp_path / "in" / "short.flac", 0.1 * rng.standard_normal(200), 16000)
    runs = {"offline": ["--checkpoint", str(ckpt)], "stream": ["--checkpoint", str(ckpt), "--stream"]}
    try:
        import onnxruntime  # noqa: F401  the exported stream runs under onnxruntime
        runs["onnx"] = ["--checkpoint", str(export.export_stream(model, tmp_path / "exported", ["onnx"])["onnx"]),
                        "--stream"]
    except ImportError:
        pass
    outs = {}
    for label, args in runs.items():
        assert main(["enhance", str(tmp_path / "in"), "-o", str(tmp_path / label), *args]) == 0
        outs[label] = {name: sf.read(tmp_path / label / "in" / f"{name}.wav", dtype="float32")
                       for name in ("stereo", "short")}
    for name, n in (("stereo", 24000), ("short", 200)):
        want, sr = outs["offline"][name]
        assert sr == 16000 and want.shape == (n,) and np.abs(want).max() > 1e-3
        for label in set(runs) - {"offline"}:
            got, _ = outs[label][name]
            np.testing.assert_allclose(got, want, atol=2 / 32768)  # 16-bit files: at most a rounding step apart


def test_cli_enhance_stream_refuses_a_non_causal_checkpoint(tmp_path, capsys):
    import numpy as np
    import soundfile as sf

    from pycosdist.denoise import training
    from pycosdist.denoise.cli import main

    model = UNetDenoiser(UNetConfig(channels=(4, 6)))
    ckpt = tmp_path / "best.pt"
    training.save_checkpoint({"format": "pycosdist", "model_config": model.config.to_dict(),
                              "model": model.state_dict()}, ckpt)
    sf.write(tmp_path / "a.wav", np.zeros(1600), 16000)
    capsys.readouterr()
    assert main(["enhance", str(tmp_path / "a.wav"), "-o", str(tmp_path / "out"), "--checkpoint", str(ckpt),
                 "--stream"]) == 2
    err = capsys.readouterr().err
    assert "pycosdist enhance: error: --stream: checkpoint" in err and "non-causal" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "a.wav").exists()


def test_configs_student_causal_distills_and_streams(corpus, teacher_ckpt, tmp_path):  # noqa: F811
    """configs/student_causal.toml trains a causal student with KD from the (non-causal, centred, hop 128)
    teacher for one tiny epoch: their latents are frame-aligned; the result streams like it runs offline."""
    from pathlib import Path

    from pycosdist.denoise import config, training

    root = Path(__file__).resolve().parents[2]
    tiny = ["data.segment_seconds=0.5", "data.valid_speakers=1", "train.batch_size=2", "train.threads=1",
            "train.warmup_steps=1", "train.epochs=1", "kd.method=cosine_lib", f"kd.teacher={teacher_ckpt}"]
    cfg = training.check_train_config(config.load_config(root / "configs" / "student_causal.toml", tiny))
    assert cfg["model"]["preset"] == "causal_student_quarter"
    result = training.train(cfg, corpus, tmp_path / "run", progress=False, log=lambda *_: None)
    assert result["best"]["epoch"] == 1
    model, _ = training.load_model(tmp_path / "run" / "best.pt")
    assert model.config.causal and model.config.latency_ms == 16.0
    x = 0.1 * torch.randn(1, 4000)
    with torch.no_grad():
        offline = model(x)
    torch.testing.assert_close(StreamingDenoiser(model).enhance(x), offline, atol=1e-5, rtol=0)
