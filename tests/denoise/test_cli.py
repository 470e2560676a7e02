"""Command-line smoke runs on a tiny synthesized corpus, and the shipped configs."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from pycosdist.denoise import config, demo, report
from pycosdist.denoise.cli import main
from pycosdist.denoise.evaluation import SPECTRAL_GATING

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--set", "model.channels=[4, 8]", "--set", "model.kernel_size=[3, 3]", "--set", "model.bottleneck_layers=1",
        "--set", "data.segment_seconds=0.5", "--set", "data.valid_speakers=1", "--set", "train.batch_size=2",
        "--set", "train.epochs=1", "--set", "train.threads=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """synth -> train-teacher -> distill, through the CLI; returns the directory holding them."""
    d = tmp_path_factory.mktemp("cli")
    assert main(["data", "synth", str(d / "corpus"), "--seed", "1", "--train-speakers", "3", "--test-speakers", "1",
                 "--utts", "3", "--test-utts", "2"]) == 0
    assert main(["train-teacher", "--data", str(d / "corpus"), "--out", str(d / "teacher"), "--no-progress", *TINY,
                 "--set", "model.channels=[6, 8]"]) == 0
    assert main(["distill", "--method", "cosine_lib", "--teacher", str(d / "teacher" / "best.pt"), "--data",
                 str(d / "corpus"), "--out", str(d / "student"), "--no-progress", *TINY]) == 0
    return d


def test_train_and_distill_outputs(runs):
    for run in ("teacher", "student"):
        assert {"last.pt", "best.pt", "history.csv", "history.json", "config.toml"} <= {p.name for p in (runs / run).iterdir()}
    cfg = config.load_config(runs / "student" / "config.toml")
    assert cfg["kd"]["method"] == "cosine_lib" and cfg["kd"]["teacher"].endswith("best.pt")
    assert cfg["model"]["channels"] == [4, 8] and cfg["model"]["preset"] == "student_quarter"
    assert json.loads((runs / "student" / "history.json").read_text())[0]["train_kd"] > 0


def test_evaluate_prints_noisy_row(runs, capsys, monkeypatch):
    from pycosdist.denoise import training

    reads = []
    real_load = training.load_model
    monkeypatch.setattr(training, "load_model", lambda path: reads.append(path) or real_load(path))
    out = runs / "eval"
    assert main(["evaluate", "--checkpoint", str(runs / "teacher" / "best.pt"), str(runs / "student" / "best.pt"),
                 "--data", str(runs / "corpus"), "--out", str(out), "--workers", "0"]) == 0
    text = capsys.readouterr().out
    assert "noisy input" in text and "teacher" in text and "student" in text
    assert len(reads) == 2  # each checkpoint is read once: checked up front, then scored
    rows = json.loads((out / "results.json").read_text())["rows"]
    # The non-learned baseline row comes with the [train] extra's noisereduce (left out without it).
    from pycosdist.denoise import peers
    from pycosdist.denoise.report import PEER_LABELS

    gating = [SPECTRAL_GATING] if importlib.util.find_spec("noisereduce") else []
    installed = [label for name, label in PEER_LABELS.items() if not peers.available_peers()[name]]
    assert [r["model"] for r in rows] == ["noisy input", *gating, *installed, "teacher", "student"]
    assert all(r["n_ok"] == 2 and r["pesq"] > 1.0 for r in rows)
    assert (out / "results.md").read_text().count("\n| ") == 1 + len(rows)  # separator + rows after the header


def test_enhance_any_rate_and_channels(runs):
    sr, n = 44100, 44100  # 1 s of 44.1 kHz stereo
    t = np.arange(n) / sr
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 300 * t), 0.1 * np.random.default_rng(0).standard_normal(n)], 1)
    src = runs / "in" / "song.wav"
    src.parent.mkdir()
    sf.write(src, stereo, sr)
    sf.write(runs / "in" / "other.flac", stereo[:, 0], 22050)
    out = runs / "enhanced"
    ckpt = str(runs / "student" / "best.pt")
    assert main(["enhance", str(src), "-o", str(out), "--checkpoint", ckpt]) == 0
    y, y_sr = sf.read(out / "song.wav")
    assert y_sr == 16000 and y.ndim == 1 and len(y) == 16000 and np.isfinite(y).all() and np.abs(y).max() > 0
    assert main(["enhance", str(runs / "in"), "-o", str(out), "--checkpoint", ckpt]) == 0
    assert sorted(p.name for p in (out / "in").iterdir()) == ["other.wav", "song.wav"]
    assert sf.info(out / "in" / "other.wav").frames == 2 * 16000


def test_cli_errors_name_the_problem(runs, capsys):
    assert main(["train-teacher", "--data", str(runs / "corpus"), "--out", str(runs / "x"),
                 "--set", "train.lrate=1"]) == 2
    assert "unknown config key 'train.lrate'; valid keys:" in capsys.readouterr().err
    assert main(["enhance", str(runs / "missing.wav"), "-o", str(runs / "y"),
                 "--checkpoint", str(runs / "student" / "best.pt")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    (runs / "bad.wav").write_bytes(b"not audio")  # skipped and reported: exit 1, not a usage error
    assert main(["enhance", str(runs / "bad.wav"), "-o", str(runs / "y"),
                 "--checkpoint", str(runs / "student" / "best.pt")]) == 1
    assert "bad.wav: not a readable audio file" in capsys.readouterr().err


def test_shipped_configs_load_and_match_the_demo_recipe():
    from pycosdist.denoise import experiment

    configs = sorted((ROOT / "configs").glob("*.toml"))
    assert configs
    for path in configs:  # every key known and typed
        experiment.load_config(path) if path.name.startswith("experiment") else config.load_config(path)
    assert config.load_config(ROOT / "configs" / "teacher_demo.toml") == demo.demo_config("teacher")
    assert config.load_config(ROOT / "configs" / "student_demo.toml") == demo.demo_config("student")


def test_paired_gain_matches_numpy_and_skips_failed_files(tmp_path):
    rng = np.random.default_rng(0)
    a, b = rng.uniform(1, 4, 12), rng.uniform(1, 4, 12)
    for label, vals in (("student none", a), ("student cosine_lib", b)):
        lines = ["name,pesq,stoi,si_sdr,error"] + [f"f{i},{v},0.9,10.0," for i, v in enumerate(vals)]
        lines.append("bad,,,,NoUtterancesError")  # a failed file counts for neither
        (tmp_path / f"{label.replace(' ', '_')}_per_file.csv").write_text("\n".join(lines) + "\n")
    mean, se, n = report.paired_gain(tmp_path, "student none", "student cosine_lib")
    d = b - a
    assert n == 12 and np.isclose(mean, d.mean()) and np.isclose(se, d.std(ddof=1) / np.sqrt(12))
