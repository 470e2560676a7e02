"""Export of a trained student (TorchScript, ONNX): same output as the PyTorch model; enhance uses it."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from pycosdist.denoise import export, training
from pycosdist.denoise.cli import main
from pycosdist.denoise.models import UNetConfig, UNetDenoiser


def _as_after_training(m: torch.nn.Module) -> torch.nn.Module:
    """``m`` in eval mode with non-trivial BatchNorm statistics, as after training."""
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return _as_after_training(UNetDenoiser(UNetConfig(channels=(4, 8, 8), kernel_size=(3, 3), bottleneck_layers=2)))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_matches_pytorch(model, fmt, tmp_path):
    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    path = export.export(model, tmp_path, [fmt])[fmt]
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["files"] == {fmt: path.name} and info["hop"] == 128 and info["input"]["name"] == "features"
    denoiser = export.ExportedDenoiser(path)
    g = torch.Generator().manual_seed(1)
    for shape in [(16000,), (3, 12345), (1, 700)]:  # batch and frames are dynamic
        x = 0.1 * torch.randn(shape, generator=g)
        with torch.no_grad():
            want = model(x if x.dim() == 2 else x[None])
        got = denoiser(x)
        assert got.shape == x.shape
        torch.testing.assert_close(got.reshape(want.shape), want, atol=1e-5, rtol=1e-4)


def test_export_cli_and_enhance_with_the_exported_model(model, tmp_path):
    ckpt = tmp_path / "run" / "best.pt"
    training.save_checkpoint({"format": "pycosdist", "model_config": model.config.to_dict(),
                              "model": model.state_dict()}, ckpt)
    assert main(["export", "--checkpoint", str(ckpt), "-o", str(tmp_path / "exported")]) == 0
    n = 22050  # 1 s at 22.05 kHz, stereo: converted to 16 kHz mono before enhancement
    stereo = 0.1 * np.random.default_rng(0).standard_normal((n, 2))
    sf.write(tmp_path / "noisy.wav", stereo, 22050)
    outs = {}
    for name in ("best.pt", "model.ts", "model.onnx"):
        src = ckpt if name == "best.pt" else tmp_path / "exported" / name
        assert main(["enhance", str(tmp_path / "noisy.wav"), "-o", str(tmp_path / name), "--checkpoint", str(src)]) == 0
        outs[name], sr = sf.read(tmp_path / name / "noisy.wav", dtype="float32")
        assert sr == 16000 and outs[name].shape == (16000,)
    for name in ("model.ts", "model.onnx"):
        np.testing.assert_allclose(outs[name], outs["best.pt"], atol=1e-5)


def test_bad_export_arguments(model, tmp_path):
    with pytest.raises(ValueError, match=r"unknown export format\(s\) \['tflite'\]"):
        export.export(model, tmp_path, ["tflite"])
    (tmp_path / "m.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"expected a .ts \(TorchScript\) or .onnx file"):
        export.ExportedDenoiser(tmp_path / "m.bin")
    with pytest.raises(FileNotFoundError, match="no such file"):
        export.ExportedDenoiser(tmp_path / "nope.onnx")


# --- streaming export ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def causal_model():
    from pycosdist.denoise.models import preset

    torch.manual_seed(2)
    return _as_after_training(UNetDenoiser(preset("causal_student_quarter", mask_floor=0.05)))


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_stream_runs_hop_by_hop_like_the_pytorch_stream(causal_model, fmt, tmp_path):
    """onnxruntime / TorchScript, fed hop by hop with their own state outputs, give the PyTorch stream's
    output, and so the offline model's (batch 1 and 3: the batch is dynamic)."""
    from pycosdist.denoise.streaming import StreamingDenoiser

    if fmt == "onnx":
        pytest.importorskip("onnxruntime")
    path = export.export_stream(causal_model, tmp_path, [fmt])[fmt]
    info = json.loads((tmp_path / "stream.json").read_text())
    assert info["files"] == {fmt: path.name} and info["hop"] == 128 and info["algorithmic_latency_ms"] == 16.0
    assert [s["input"] for s in info["state"]][:2] == ["analysis", "enc0"] and info["state"][-1]["input"] == "overlap"
    assert info["state"][1]["shape"] == ["batch", 1, 129, 2] and all(s["initial"] == "zeros" for s in info["state"])
    exported = StreamingDenoiser(step=export.ExportedStream(path))
    reference = StreamingDenoiser(causal_model)
    g = torch.Generator().manual_seed(4)
    for shape in [(5000,), (3, 1111)]:
        x = 0.2 * torch.randn(shape, generator=g)
        torch.testing.assert_close(exported.enhance(x), reference.enhance(x), atol=2e-5, rtol=1e-4)
        with torch.no_grad():
            offline = causal_model(x if x.dim() == 2 else x[None])
        torch.testing.assert_close(exported.enhance(x).reshape(offline.shape), offline, atol=2e-5, rtol=1e-4)
    # hop by hop, with the state carried by the caller through the exported graph's own outputs
    step = export.ExportedStream(path)
    state = step.initial_state(1)
    hops = 0.2 * torch.randn(6, 1, 128, generator=g)
    reference.reset()
    for hop in hops:
        out, *state = step(hop, *state)
        torch.testing.assert_close(out, reference.process_hop(hop), atol=2e-5, rtol=1e-4)


def test_stream_export_refuses_a_non_causal_model(model, tmp_path):
    with pytest.raises(ValueError, match="model: streaming needs a causal model"):
        export.export_stream(model, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    (tmp_path / "lonely.onnx").write_bytes(b"x")
    with pytest.raises(ValueError, match="no stream.json next to it"):
        export.ExportedStream(tmp_path / "lonely.onnx")


def test_a_stream_export_is_not_taken_for_a_whole_clip_model(causal_model, tmp_path):
    path = export.export_stream(causal_model, tmp_path, ["torchscript"])["torchscript"]
    with pytest.raises(ValueError, match="a one-hop stream export.*--stream"):
        export.ExportedDenoiser(path)


def test_offline_export_of_a_causal_model(causal_model, tmp_path):
    """The whole-clip mask-net export works for causal models too: model.json carries n_fft/hop/causal."""
    path = export.export(causal_model, tmp_path, ["torchscript"])["torchscript"]
    info = json.loads((tmp_path / "model.json").read_text())
    assert info["n_fft"] == 256 and info["center"] is False and info["input"]["shape"][2] == 129
    x = 0.1 * torch.randn(2, 3000)
    with torch.no_grad():
        torch.testing.assert_close(export.ExportedDenoiser(path)(x), causal_model(x), atol=1e-5, rtol=1e-4)


def test_export_cli_stream(causal_model, model, tmp_path, capsys):
    """`pycosdist export --stream` writes the one-hop stream that `enhance --stream` then runs (same
    output as the causal checkpoint); a non-causal checkpoint exits 2 with one line, writing nothing."""
    ckpts = {}
    for name, m in (("causal", causal_model), ("offline", model)):
        ckpts[name] = tmp_path / name / "best.pt"
        training.save_checkpoint({"format": "pycosdist", "model_config": m.config.to_dict(), "model": m.state_dict()},
                                 ckpts[name])
    assert main(["export", "--stream", "--checkpoint", str(ckpts["offline"]), "-o", str(tmp_path / "bad")]) == 2
    assert "not a causal model" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    assert main(["export", "--stream", "--checkpoint", str(ckpts["causal"]), "-o", str(tmp_path / "exp"),
                 "--format", "torchscript"]) == 0
    assert (tmp_path / "exp" / "stream.ts").is_file() and (tmp_path / "exp" / "stream.json").is_file()
    sf.write(tmp_path / "noisy.wav", 0.1 * np.random.default_rng(1).standard_normal(7000), 16000)
    outs = {}
    for name, src in (("pt", ckpts["causal"]), ("ts", tmp_path / "exp" / "stream.ts")):
        assert main(["enhance", "--stream", str(tmp_path / "noisy.wav"), "-o", str(tmp_path / name),
                     "--checkpoint", str(src)]) == 0
        outs[name] = sf.read(tmp_path / name / "noisy.wav", dtype="float32")[0]
    np.testing.assert_allclose(outs["ts"], outs["pt"], atol=1e-4)
