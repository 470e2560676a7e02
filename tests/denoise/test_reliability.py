"""The command line as a user runs it: bad input gives one line and an exit code, never a traceback,
and nothing the user had is overwritten or lost (enhance, export, evaluate, data synth, config)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

import pycosdist
from pycosdist.denoise import config, export, training
from pycosdist.denoise.models import UNetConfig, UNetDenoiser
from pycosdist.denoise.synth import synthesize_corpus

# Runs `python -m pycosdist ARGS` with the modules named in argv[1] made unimportable (as when an
# optional extra is not installed): sys.modules[name] = None makes `import name` raise ImportError.
BLOCKING_MAIN = ("import runpy, sys\n"
                 "for name in filter(None, sys.argv[1].split(',')):\n"
                 "    sys.modules[name] = None\n"
                 "sys.argv = ['pycosdist', *sys.argv[2:]]\n"
                 "runpy.run_module('pycosdist', run_name='__main__')\n")


def cli(*args, block=()) -> tuple[int, str]:
    """Exit code and stdout + stderr of the CLI run in a new process; fails on any traceback."""
    env = {**os.environ, "PYTHONPATH": str(Path(pycosdist.__file__).parents[1])}  # the pycosdist imported here
    argv = [str(a) for a in args]
    cmd = ([sys.executable, "-c", BLOCKING_MAIN, ",".join(block), *argv] if block
           else [sys.executable, "-m", "pycosdist", *argv])
    # cwd: the imported package's parent, so `-m pycosdist` cannot pick up the source tree's copy
    # (which has no built extension when the tests run against the installed package).
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                          cwd=Path(pycosdist.__file__).parents[1])
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    return proc.returncode, output


def files_under(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def tiny_model(channels=(4, 8)) -> UNetDenoiser:
    torch.manual_seed(0)
    return UNetDenoiser(UNetConfig(channels=channels, kernel_size=(3, 3), bottleneck_layers=1)).eval()


def save(path: Path, model: UNetDenoiser, model_config: dict | None = None) -> Path:
    training.save_checkpoint({"format": "pycosdist", "model_config": model_config or model.config.to_dict(),
                              "model": model.state_dict(), "epoch": 1,
                              "config": config.merge(config.DEFAULTS, {})}, path)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Checkpoints: a good one, its TorchScript export, NaN weights, weights of another shape, junk files."""
    d = tmp_path_factory.mktemp("models")
    model = tiny_model()
    nan_model = tiny_model()
    with torch.no_grad():
        for p in nan_model.parameters():
            p.fill_(math.nan)
    ts = export.export(model, d / "exported", ["torchscript"])["torchscript"]
    (d / "corrupt.ts").write_bytes(ts.read_bytes()[:1000])
    (d / "corrupt.pt").write_bytes(b"not a checkpoint")
    (d / "model.onnx").write_bytes(b"not onnx either")
    return {"model": model, "pt": save(d / "good" / "best.pt", model), "ts": ts,
            "nan": save(d / "nan" / "best.pt", nan_model),
            "mismatch": save(d / "mismatch" / "best.pt", model, tiny_model((6, 8)).config.to_dict()),
            "corrupt_ts": d / "corrupt.ts", "corrupt_pt": d / "corrupt.pt", "onnx": d / "model.onnx"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return synthesize_corpus(tmp_path_factory.mktemp("corpus"), n_train_speakers=3, n_test_speakers=1,
                             utts_per_speaker=1, test_utts_per_speaker=2, seed=0)


def write_noise(path: Path, n: int, sr: int = 16000, seed: int = 0) -> np.ndarray:
    x = (0.1 * np.random.default_rng(seed).standard_normal(n)).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x, sr, subtype="FLOAT" if path.suffix == ".wav" else None)
    return x


# --- 1. clips shorter than the STFT ---------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["pt", "ts"])
def test_enhance_clips_shorter_than_the_stft(models, kind, tmp_path):
    lengths = {"one_sample.wav": 1, "ten_ms.wav": 160, "just_short.wav": 256}
    clips = {name: write_noise(tmp_path / "in" / name, n, seed=n) for name, n in lengths.items()}
    code, out = cli("enhance", tmp_path / "in", "-o", tmp_path / "out", "--checkpoint", models[kind])
    assert code == 0, out
    for name, x in clips.items():
        y, sr = sf.read(tmp_path / "out" / "in" / name, dtype="float32")
        # Reference: the PyTorch model on the clip zero-padded to the 257 samples the STFT needs, trimmed back.
        with torch.no_grad():
            want = models["model"](torch.nn.functional.pad(torch.from_numpy(x), (0, 257 - len(x)))[None])[0, :len(x)]
        assert sr == 16000 and y.shape == x.shape
        np.testing.assert_allclose(y, want.numpy(), atol=1e-4)  # 16-bit PCM output


# --- 2. no output lost, no input overwritten ------------------------------------------------------------
def test_enhance_refuses_two_inputs_with_one_output_name(models, tmp_path):
    write_noise(tmp_path / "a" / "x.wav", 4000)
    write_noise(tmp_path / "b" / "x.wav", 4000, seed=1)
    write_noise(tmp_path / "c" / "x.flac", 4000, seed=2)
    for inputs in ([tmp_path / "a" / "x.wav", tmp_path / "b" / "x.wav"], [tmp_path / "a" / "x.wav", tmp_path / "c" / "x.flac"]):
        code, out = cli("enhance", *inputs, "-o", tmp_path / "out", "--checkpoint", models["pt"])
        assert code == 2 and "would both be written to" in out and str(inputs[1]) in out, out
        assert files_under(tmp_path / "out") == []  # refused before anything was written
    write_noise(tmp_path / "c" / "x.wav", 4000, seed=3)  # x.wav and x.flac in one folder
    code, out = cli("enhance", tmp_path / "c", "-o", tmp_path / "out", "--checkpoint", models["pt"])
    assert code == 2 and "would both be written to" in out and files_under(tmp_path / "out") == []


def test_enhance_never_overwrites_an_input(models, tmp_path):
    src = tmp_path / "in" / "x.wav"
    write_noise(src, 4000)
    before = src.read_bytes()
    for out_dir, extra in ((src.parent, []), (src.parent, ["--overwrite"]), (tmp_path, ["--overwrite"])):
        inputs = [src] if out_dir == src.parent else [src.parent]  # file -> IN/x.wav; folder IN -> TMP/in/x.wav
        code, out = cli("enhance", *inputs, "-o", out_dir, "--checkpoint", models["pt"], *extra)
        assert code == 2 and f"would overwrite the input {src}" in out, out
        assert src.read_bytes() == before and files_under(tmp_path) == ["in/x.wav"]
    write_noise(src.with_suffix(".flac"), 4000, seed=1)  # its output IN/x.wav is the other input
    code, out = cli("enhance", src.with_suffix(".flac"), src, "-o", src.parent, "--checkpoint", models["pt"],
                    "--overwrite")
    assert code == 2 and f"the output of {src.with_suffix('.flac')} would overwrite the input {src}" in out, out
    assert src.read_bytes() == before


def test_enhance_never_overwrites_an_output_without_overwrite(models, tmp_path):
    write_noise(tmp_path / "x.wav", 4000)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x.wav").write_bytes(b"the user's file")
    code, out = cli("enhance", tmp_path / "x.wav", "-o", tmp_path / "out", "--checkpoint", models["pt"])
    assert code == 2 and "already exist" in out and "--overwrite" in out, out
    assert (tmp_path / "out" / "x.wav").read_bytes() == b"the user's file"
    code, out = cli("enhance", tmp_path / "x.wav", "-o", tmp_path / "out", "--checkpoint", models["pt"], "--overwrite")
    assert code == 0, out
    assert sf.info(tmp_path / "out" / "x.wav").frames == 4000


def test_enhance_skips_a_bad_file_and_goes_on(models, tmp_path):
    write_noise(tmp_path / "in" / "a.wav", 4000)
    (tmp_path / "in" / "b.wav").write_bytes(b"not audio")
    write_noise(tmp_path / "in" / "c.wav", 4000, seed=1)
    (tmp_path / "in" / "notes.txt").write_text("not an audio file name: ignored")
    code, out = cli("enhance", tmp_path / "in", "-o", tmp_path / "out", "--checkpoint", models["pt"])
    assert code == 1, out
    assert files_under(tmp_path / "out") == ["in/a.wav", "in/c.wav"]
    assert "1 of 3 file(s) skipped" in out and "b.wav: not a readable audio file" in out


# --- 3. export without the [export] extra ---------------------------------------------------------------
def test_export_without_the_onnx_extra_says_what_to_install(models, tmp_path):
    code, out = cli("export", "--checkpoint", models["pt"], "-o", tmp_path / "exp", block=("onnx", "onnxscript"))
    assert code == 2 and "pip install 'pycosdist[export]'" in out and "--format torchscript" in out, out
    assert files_under(tmp_path / "exp") == []  # no model.ts without its model.json
    code, out = cli("export", "--checkpoint", models["pt"], "-o", tmp_path / "exp", "--format", "torchscript",
                    block=("onnx", "onnxscript", "onnxruntime"))
    assert code == 0, out
    assert files_under(tmp_path / "exp") == ["model.json", "model.ts"]


def test_a_failed_export_leaves_the_folder_as_it_was(models, tmp_path, monkeypatch):
    pytest.importorskip("onnxscript")
    (tmp_path / "model.json").write_text("an earlier export")

    def fail(*args, **kwargs):
        raise RuntimeError("onnx exporter crashed")

    monkeypatch.setattr(torch.onnx, "export", fail)
    with pytest.raises(RuntimeError, match="crashed"):
        export.export(models["model"], tmp_path)  # torchscript is written first, then onnx fails
    assert [p.name for p in tmp_path.iterdir()] == ["model.json"]  # no model.ts, no staging folder
    assert (tmp_path / "model.json").read_text() == "an earlier export"


# --- 4. one-line errors, exit code 2 ---------------------------------------------------------------------
def unwritable_folders(tmp_path: Path) -> list[Path]:
    """A folder below a regular file, and a folder that exists but cannot be written to."""
    (tmp_path / "a_file").write_text("x")
    folders = [tmp_path / "a_file" / "out"]
    if os.geteuid() == 0:  # root writes anywhere a mode allows nothing; sysfs refuses mkdir even to root
        if Path("/sys/kernel").is_dir():
            folders.append(Path("/sys/kernel/pycosdist-test-out"))
    else:
        (tmp_path / "read_only").mkdir(mode=0o555)
        folders.append(tmp_path / "read_only")
    return folders


@pytest.mark.parametrize("command", ["enhance", "export", "evaluate", "data synth", "train-teacher"])
def test_unwritable_output_folder(models, corpus, command, tmp_path):
    write_noise(tmp_path / "x.wav", 4000)
    for out in unwritable_folders(tmp_path):
        args = {"enhance": ["enhance", tmp_path / "x.wav", "-o", out, "--checkpoint", models["pt"]],
                "export": ["export", "--checkpoint", models["pt"], "-o", out, "--format", "torchscript"],
                "evaluate": ["evaluate", "--checkpoint", models["pt"], "--data", corpus, "--out", out, "--workers", "0"],
                "data synth": ["data", "synth", out, "--utts", "1", "--test-utts", "1"],
                "train-teacher": ["train-teacher", "--data", corpus, "--out", out, "--no-progress"]}[command]
        code, text = cli(*args)
        assert code == 2 and "cannot write to folder" in text and str(out) in text, text
        assert len(text.strip().splitlines()) == 1, text


def test_data_synth_given_a_file(tmp_path):
    (tmp_path / "corpus.wav").write_bytes(b"the user's file")
    code, out = cli("data", "synth", tmp_path / "corpus.wav")
    assert code == 2 and "is a file; expected a folder" in out, out
    assert (tmp_path / "corpus.wav").read_bytes() == b"the user's file"


def test_unreadable_models_give_one_line(models, tmp_path):
    write_noise(tmp_path / "x.wav", 4000)
    for key, block, expected in (("corrupt_ts", (), "not a readable TorchScript file"),
                                 ("onnx", ("onnxruntime",), "needs onnxruntime (the [export] extra)"),
                                 ("corrupt_pt", (), "not a readable pycosdist checkpoint"),
                                 ("mismatch", (), "do not match its model_config (20 tensor shape(s) differ, first "
                                                  "encoder.0.0.weight: [4, 1, 3, 3] in the file, [6, 1, 3, 3]")):
        code, out = cli("enhance", tmp_path / "x.wav", "-o", tmp_path / "out", "--checkpoint", models[key], block=block)
        assert code == 2 and expected in out and len(out.strip().splitlines()) == 1, out
        assert files_under(tmp_path / "out") == []


# --- 6. evaluate: every checkpoint checked first; a model that failed everywhere exits 1 -----------------
@pytest.mark.parametrize("bad", ["mismatch", "corrupt_pt"])
def test_evaluate_checks_every_checkpoint_before_scoring(models, corpus, bad, tmp_path):
    code, out = cli("evaluate", "--checkpoint", models["pt"], models[bad], "--data", corpus, "--out", tmp_path / "ev",
                    "--workers", "0")
    assert code == 2 and str(models[bad]) in out and len(out.strip().splitlines()) == 1, out
    assert files_under(tmp_path / "ev") == []  # not even the noisy row was scored


def test_evaluate_exits_1_when_every_file_of_a_model_failed(models, corpus, tmp_path):
    code, out = cli("evaluate", "--checkpoint", models["nan"], "--data", corpus, "--out", tmp_path / "ev",
                    "--workers", "0")
    assert code == 1 and "every file failed for nan" in out, out
    rows = {r["model"]: r for r in json.loads((tmp_path / "ev" / "results.json").read_text())["rows"]}
    assert rows["noisy input"]["n_ok"] == 2 and rows["nan"]["n_ok"] == 0 and rows["nan"]["n_failed"] == 2
    failed = json.loads((tmp_path / "ev" / "nan_summary.json").read_text())["failed"]
    assert len(failed) == 2 and all(reason == "estimate contains NaN/Inf" for reason in failed.values())


# --- 5. config values that cannot work ------------------------------------------------------------------
@pytest.mark.parametrize("override, expected", [
    ("train.lr=inf", "train.lr: expected a finite number > 0, got inf"),
    ("train.lr=0", "train.lr: expected a finite number > 0, got 0.0"),
    ("loss.wave_weight=nan", "loss.wave_weight: expected a finite number >= 0, got nan"),
    ("train.min_lr_ratio=5", "train.min_lr_ratio: expected a finite number in [0, 1], got 5.0"),
    ("train.warmup_steps=-10", "train.warmup_steps: expected an integer >= 0, got -10"),
    ("train.threads=-5", "train.threads: expected an integer >= 0, got -5"),
    ("train.grad_clip=-1", "train.grad_clip: expected a finite number >= 0, got -1.0"),
    ("train.epochs=0", "train.epochs: expected an integer >= 1, got 0"),
    ("train.batch_size=0", "train.batch_size: expected an integer >= 1, got 0"),
    ("train.eval_workers=-1", "train.eval_workers: expected an integer >= 0, got -1"),
    ("kd.expansion=0", "kd.expansion: expected an integer >= 1, got 0"),
    ("kd.lambda=-inf", "kd.lambda: expected a finite number >= 0, got -inf"),
    ("kd.eps=-1e-8", "kd.eps: expected a finite number >= 0, got -1e-08"),
    ("data.segment_seconds=0", "data.segment_seconds: expected a finite number > 0, got 0.0"),
    ("data.valid_speakers=0", "data.valid_speakers: expected an integer >= 1, got 0"),
    ("model.channels=[8,'a']", "model.channels: expected [] (the preset's) or a list of positive integers, got [8, 'a']"),
    ("model.channels=[8, 0]", "model.channels: expected [] (the preset's) or a list of positive integers, got [8, 0]"),
    ("model.kernel_size=[3]", "model.kernel_size: expected [] (the preset's) or a list of 2 positive integers, got [3]"),
    ("model.norm=layer", "model.norm: expected one of ['', 'batch', 'group'], got 'layer'"),
    ("model.mask_floor=1", "model.mask_floor: expected a finite number in [0, 1), got 1.0"),
    ("model.mask_floor=-0.1", "model.mask_floor: expected a finite number in [0, 1), got -0.1"),
    ("loss.sisdr_weight=-1", "loss.sisdr_weight: expected a finite number >= 0, got -1.0"),
])
def test_config_values_that_cannot_work_are_rejected_when_loaded(override, expected, tmp_path):
    with pytest.raises(ValueError) as info:
        config.load_config(overrides=[override])
    assert str(info.value) == expected
    key, _, value = override.partition("=")
    section, name = key.split(".")
    if isinstance(config.DEFAULTS[section][name], str):
        value = f'"{value}"'
    (tmp_path / "c.toml").write_text(f"[{section}]\n{name} = {value}\n")  # the same value from a file
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config.load_config(tmp_path / "c.toml")


def test_every_numeric_and_list_key_has_a_range():
    unchecked = [f"{s}.{k}" for s, keys in config.DEFAULTS.items() for k, v in keys.items()
                 if type(v) in (int, float, list) and f"{s}.{k}" not in config.CHECKS]
    assert unchecked == []
    config.check(config.DEFAULTS)  # the defaults pass their own checks
    for path in (Path(__file__).parents[2] / "configs").glob("*.toml"):
        if not path.name.startswith("experiment"):
            config.load_config(path)


def test_train_rejects_a_bad_config_before_touching_data(tmp_path):
    code, out = cli("train-teacher", "--data", tmp_path / "no_corpus", "--out", tmp_path / "run", "--set", "train.lr=inf")
    assert code == 2 and "train.lr: expected a finite number > 0, got inf" in out, out
    assert not (tmp_path / "run").exists()
