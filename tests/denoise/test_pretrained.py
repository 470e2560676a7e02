"""The shipped pretrained models: they load like any checkpoint, `enhance` uses the student by default,
the demo distills from the shipped teacher, and slim checkpoints keep the model and drop the rest."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from pycosdist.denoise import demo, pretrained, training
from pycosdist.denoise.cli import main
from pycosdist.denoise.models import UNetConfig, UNetDenoiser


def _training_checkpoint(path, seed=0):
    torch.manual_seed(seed)
    model = UNetDenoiser(UNetConfig(channels=(4, 8), kernel_size=(3, 3), bottleneck_layers=1)).eval()
    cfg = {"model": {"preset": "teacher"}, "kd": {"method": "none"}, "train": {"seed": seed}}
    training.save_checkpoint({"format": "pycosdist", "version": 1, "config": cfg, "model_config": model.config.to_dict(),
                              "model": model.state_dict(), "optimizer": {"state": {}}, "kd": None, "epoch": 3,
                              "history": [{"epoch": 1, "valid_loss": 0.5}], "best": {"epoch": 1}}, path)
    return model


@pytest.fixture
def weights(tmp_path, monkeypatch):
    """A weights folder with a slim teacher and student, in place of the package's."""
    folder = tmp_path / "weights"
    for name, seed in (("teacher", 1), ("student", 2)):
        _training_checkpoint(tmp_path / f"{name}_train.pt", seed)
        pretrained.slim_checkpoint(tmp_path / f"{name}_train.pt", folder / pretrained.MODELS[name])
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", folder)
    return folder


def test_slim_checkpoint_keeps_the_model_and_drops_training_state(tmp_path):
    model = _training_checkpoint(tmp_path / "train.pt")
    slim = pretrained.slim_checkpoint(tmp_path / "train.pt", tmp_path / "slim.pt")
    loaded, ckpt = training.load_model(slim)
    assert set(ckpt) == {"format", "version", "config", "model_config", "model", "epoch", "history", "best"}
    x = 0.1 * torch.randn(1, 4000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(ValueError, match="junk.pt"):
        pretrained.slim_checkpoint(tmp_path / "junk.pt", tmp_path / "out.pt")
    with pytest.raises(ValueError, match="name: expected one of"):
        pretrained.path("teachr")


def test_enhance_uses_the_shipped_student_by_default(weights, tmp_path):
    sf.write(tmp_path / "noisy.wav", 0.1 * np.random.default_rng(0).standard_normal(8000), 16000)
    assert main(["enhance", str(tmp_path / "noisy.wav"), "-o", str(tmp_path / "default")]) == 0
    assert main(["enhance", str(tmp_path / "noisy.wav"), "-o", str(tmp_path / "explicit"),
                 "--checkpoint", str(pretrained.path("student"))]) == 0
    a, b = (sf.read(tmp_path / d / "noisy.wav")[0] for d in ("default", "explicit"))
    np.testing.assert_array_equal(a, b)
    noisy = sf.read(tmp_path / "noisy.wav")[0]
    assert not np.allclose(a, noisy)  # the model did something


def test_pretrained_name_works_wherever_a_checkpoint_is_asked_for(weights, tmp_path, capsys):
    sf.write(tmp_path / "noisy.wav", 0.1 * np.random.default_rng(0).standard_normal(8000), 16000)
    for name in ("teacher", "student"):
        assert main(["enhance", str(tmp_path / "noisy.wav"), "-o", str(tmp_path / f"by_name_{name}"),
                     "--checkpoint", f"pretrained:{name}"]) == 0
        assert main(["enhance", str(tmp_path / "noisy.wav"), "-o", str(tmp_path / f"by_path_{name}"),
                     "--checkpoint", str(pretrained.path(name))]) == 0
        a, b = (sf.read(tmp_path / f"{d}_{name}" / "noisy.wav")[0] for d in ("by_name", "by_path"))
        np.testing.assert_array_equal(a, b)
    teacher, student = (sf.read(tmp_path / f"by_name_{n}" / "noisy.wav")[0] for n in ("teacher", "student"))
    assert not np.allclose(teacher, student)  # each name picks its own model
    assert pretrained.resolve("runs/x/best.pt") == Path("runs/x/best.pt")
    capsys.readouterr()
    for argv in (["enhance", str(tmp_path / "noisy.wav"), "-o", str(tmp_path / "bad"), "--checkpoint", "pretrained:teachr"],
                 ["distill", "--method", "cosine_lib", "--teacher", "pretrained:teachr", "--data", str(tmp_path),
                  "--out", str(tmp_path / "run")]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "teachr" in err and ("--checkpoint" in err or "--teacher" in err) and "'student', 'teacher'" in err
    assert not (tmp_path / "bad").exists() and not (tmp_path / "run").exists()


def test_enhance_without_a_shipped_model_says_what_to_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrained, "WEIGHTS_DIR", tmp_path / "empty")
    sf.write(tmp_path / "noisy.wav", np.zeros(1600), 16000)
    assert main(["enhance", str(tmp_path / "noisy.wav"), "-o", str(tmp_path / "out")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_demo_takes_the_shipped_teacher(weights, tmp_path):
    summary = demo._shipped_teacher(tmp_path / "runs" / "teacher")
    copied = tmp_path / "runs" / "teacher" / "best.pt"
    assert copied.read_bytes() == pretrained.path("teacher").read_bytes()
    assert summary["history"] == [{"epoch": 1, "valid_loss": 0.5}] and summary["config"]["kd"]["method"] == "none"


@pytest.mark.skipif(not pretrained.available(), reason="this installation ships no pretrained model")
def test_the_shipped_models_load_and_denoise():
    for name in pretrained.available():
        model, ckpt = training.load_model(pretrained.path(name))
        assert set(ckpt) <= set(pretrained.KEPT_KEYS) and "optimizer" not in ckpt
        x = 0.05 * torch.randn(1, 16000, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            y = model(x)
        assert y.shape == x.shape and torch.isfinite(y).all() and y.pow(2).mean() < x.pow(2).mean()
