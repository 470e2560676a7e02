"""The experiment runner on a tiny corpus: mean ± std from the per-run rows, resume skips finished cells."""

import csv

import numpy as np
import pytest

from pycosdist.denoise import experiment, training
from pycosdist.denoise.cli import main

TINY = """
[experiment]
scenarios = ["student_eighth", "student_shallow"]
methods = ["none", "cosine_lib"]
[corpus]
n_train_speakers = 3
n_test_speakers = 1
utts_per_speaker = 3
test_utts_per_speaker = 2
[teacher.model]
channels = [6, 8]
kernel_size = [3, 3]
bottleneck_layers = 1
[teacher.train]
epochs = 1
batch_size = 2
threads = 1
[teacher.data]
segment_seconds = 0.5
valid_speakers = 1
[student.train]
epochs = 1
batch_size = 2
threads = 1
[student.data]
segment_seconds = 0.5
valid_speakers = 1
"""


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    d = tmp_path_factory.mktemp("exp")
    (d / "tiny.toml").write_text(TINY)
    assert main(["experiment", str(d / "tiny.toml"), "--out", str(d / "out"), "--no-progress",
                 "--seeds", "2", "--workers", "0"]) == 0
    return d


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_table_is_mean_and_std_of_the_runs(done):
    runs, rows = _read(done / "out" / "runs.csv"), _read(done / "out" / "results.csv")
    assert len(runs) == 2 * 2 * 2 and len(rows) == 2 * 2
    for row in rows:
        mine = [r for r in runs if (r["scenario"], r["method"]) == (row["scenario"], row["method"])]
        assert len(mine) == 2 and int(row["seeds"]) == 2
        for m in experiment.METRICS:
            vals = np.array([float(r[m]) for r in mine])
            assert np.isclose(float(row[f"{m}_mean"]), vals.mean())
            assert np.isclose(float(row[f"{m}_std"]), vals.std(ddof=1))
    # seeds differ, so the runs differ
    assert len({r["pesq"] for r in runs if r["scenario"] == "student_eighth" and r["method"] == "none"}) == 2
    md = (done / "out" / "results.md").read_text()
    assert "±" in md and "teacher" in md and "noisy input" in md
    assert (done / "out" / "pesq_vs_size.png").stat().st_size > 0
    text = (done / "out" / "runs" / "student_eighth" / "cosine_lib" / "seed1" / "config.toml").read_text()
    assert 'preset = "student_eighth"' in text and "seed = 1" in text and "lambda = 0.1" in text


def test_rerun_skips_finished_cells(done, monkeypatch):
    trained = []
    real = training.train

    def spy(cfg, data_dir, out_dir, **kw):
        trained.append(str(out_dir))
        return real(cfg, data_dir, out_dir, **kw)

    monkeypatch.setattr(training, "train", spy)
    before = (done / "out" / "runs.csv").read_text()
    cfg = experiment.load_config(done / "tiny.toml", overrides={"experiment": {"seeds": 2, "eval_workers": 0}})
    experiment.run_experiment(cfg, done / "out", log=lambda *_: None)
    assert [p for p in trained if "runs" in p] == []  # only the (finished) teacher is revisited
    assert (done / "out" / "runs.csv").read_text() == before


def test_config_errors_name_the_key(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[experiment]\nseed = 3\n")
    with pytest.raises(KeyError, match=r"unknown experiment config key 'experiment.seed'; valid keys: .*experiment.seeds"):
        experiment.load_config(bad)
    bad.write_text("[student.train]\nepoch = 3\n")
    with pytest.raises(KeyError, match="unknown config key 'train.epoch'"):
        experiment.load_config(bad)
    bad.write_text('[experiment]\nscenarios = ["student_tiny"]\n')
    with pytest.raises(ValueError, match="unknown model preset 'student_tiny'"):
        experiment.load_config(bad)
    bad.write_text("[lambda]\ncosine = 1.0\n")
    with pytest.raises(KeyError, match="lambda.cosine"):
        experiment.load_config(bad)
    with pytest.raises(ValueError, match="experiment.seeds: expected >= 1, got 0"):
        experiment.load_config(overrides={"experiment": {"seeds": 0}})
    with pytest.raises(ValueError, match="experiment.eval_workers: expected >= 0"):
        experiment.load_config(overrides={"experiment": {"eval_workers": -1}})
    with pytest.raises(ValueError, match="experiment.seeds: expected a int"):
        experiment.load_config(overrides={"experiment": {"seeds": "3"}})
    assert experiment.load_config(small=True)["student"]["train"]["epochs"] == 6
