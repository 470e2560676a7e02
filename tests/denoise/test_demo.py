"""The demo's seed-paired KD gains: checked against scipy.stats on known per-file scores, and the whole
demo end to end on a tiny corpus (several seeds per method, paired)."""

import csv
import json

import numpy as np
import pytest

scipy_stats = pytest.importorskip("scipy.stats")

import torch

from pycosdist.denoise import demo, training
from run_helpers import corpus, teacher_ckpt  # noqa: F401 (fixtures)


def _write_scores(eval_dir, label, scores: dict):
    lines = ["name,pesq,stoi,si_sdr,error"] + [f"{k},{v},0.9,10.0," for k, v in scores.items()]
    lines.append("broken,,,,NoUtterancesError")  # a failed file counts for neither side
    (eval_dir / f"{label.replace(' ', '_')}_per_file.csv").write_text("\n".join(lines) + "\n")


def test_seed_paired_gains_match_scipy(tmp_path):
    rng = np.random.default_rng(0)
    files = [f"f{i}" for i in range(11)]
    seeds = [0, 1, 2, 3]
    truth = {}
    for k in seeds:
        base = rng.uniform(1.5, 2.5, len(files))
        for method, shift in (("none", 0.0), ("cosine_lib", 0.02), ("similarity_preserving", -0.01)):
            vals = base + shift + rng.normal(0, 0.05, len(files))
            truth[(method, k)] = dict(zip(files, vals))
            _write_scores(tmp_path, f"student {method} seed{k}", truth[(method, k)])
    gains = demo.seed_paired_gains(tmp_path, ("none", "similarity_preserving", "cosine_lib"), seeds)
    assert [g["method"] for g in gains] == ["similarity_preserving", "cosine_lib"]
    for g in gains:
        diff = np.array([[truth[(g["method"], k)][f] - truth[("none", k)][f] for f in files] for k in seeds])
        over_seeds = scipy_stats.ttest_1samp(diff.mean(axis=1), 0.0).confidence_interval(0.95)
        over_files = scipy_stats.ttest_1samp(diff.mean(axis=0), 0.0).confidence_interval(0.95)
        assert g["gain"] == pytest.approx(diff.mean())
        assert (g["seeds_n"], g["files_n"]) == (4, 11)
        assert (g["seeds_ci_low"], g["seeds_ci_high"]) == (pytest.approx(over_seeds.low), pytest.approx(over_seeds.high))
        assert (g["files_ci_low"], g["files_ci_high"]) == (pytest.approx(over_files.low), pytest.approx(over_files.high))
    md = demo.gains_markdown(gains)
    assert "95% CI over seeds" in md and f"{gains[1]['gain']:+.3f}" in md


def test_demo_end_to_end_reports_paired_seeds(tmp_path):
    tiny_model = {"channels": [6, 8], "kernel_size": [3, 3], "bottleneck_layers": 1}
    tiny_train = {"epochs": 1, "batch_size": 2, "threads": 1, "eval_workers": 0}
    small_data = {"segment_seconds": 0.5, "valid_speakers": 1}
    result = demo.run_demo(
        tmp_path / "report", progress=False, workers=0, log=lambda *_: None, seeds=2,
        corpus_kwargs={"n_train_speakers": 3, "n_test_speakers": 1, "utts_per_speaker": 3, "test_utts_per_speaker": 3},
        teacher_overrides={"model": tiny_model, "train": tiny_train, "data": small_data},
        student_overrides={"train": tiny_train, "data": small_data}, real_speech=False, train_teacher=True, recorded_noise=False)
    work = tmp_path / "report" / "work"
    students = [r for r in result["rows"] if r["model"].startswith("student ")]
    assert sorted(r["model"] for r in students) == sorted(
        f"student {m} seed{k}" for m in demo.DEMO_METHODS for k in (0, 1))
    for k in (0, 1):  # within a seed: the same student init for every method (read back from the runs)
        cfgs = [training.load_checkpoint(work / "runs" / f"student_{m}_seed{k}" / "best.pt")["config"]
                for m in demo.DEMO_METHODS]
        assert {c["train"]["seed"] for c in cfgs} == {k}
        assert {c["train"]["epochs"] for c in cfgs} == {1}
    saved = json.loads((tmp_path / "report" / "results.json").read_text())
    again = demo.seed_paired_gains(work / "eval", demo.DEMO_METHODS, [0, 1])
    assert saved["pesq_gains"] == json.loads(json.dumps(again))
    assert [g["method"] for g in again] == ["similarity_preserving", "cosine_lib"]
    assert all(g["seeds_n"] == 2 and g["files_n"] >= 2 for g in again)
    md = (tmp_path / "report" / "results.md").read_text()
    assert "Mean ± std over seeds" in md and "95% CI over test files" in md
    with open(tmp_path / "report" / "results.csv", newline="") as f:
        models = [r["model"] for r in csv.DictReader(f)]
    baselines = [m for m in models if m not in ("noisy input", "teacher") and not m.startswith("student ")]
    assert len(baselines) <= 3  # spectral gating, RNNoise, DeepFilterNet3: when their packages are installed
    assert len(models) == 2 + len(baselines) + 2 * len(demo.DEMO_METHODS)  # noisy, teacher, students


def test_concurrent_student_runs_match_runs_one_after_the_other(corpus, teacher_ckpt, tmp_path):
    from pycosdist.denoise import config
    from run_helpers import TINY

    jobs = {}
    for method in ("none", "cosine_lib"):
        cfg = config.load_config(overrides=TINY + ["train.epochs=2", f"kd.method={method}", f"kd.teacher={teacher_ckpt}"])
        jobs[f"student {method}"] = (cfg, tmp_path / "concurrent" / method)
    summaries = training.train_concurrently(jobs, corpus, workers=2)
    assert set(summaries) == set(jobs) and all(s["seconds"] > 0 for s in summaries.values())
    for label, (cfg, run_dir) in jobs.items():
        threads = training.load_checkpoint(run_dir / "last.pt")["config"]["train"]["threads"]
        alone = training.train(config.merge(cfg, {"train": {"threads": threads}}), corpus, tmp_path / "alone" / label,
                               progress=False, log=lambda *_: None)
        assert [r["train_loss"] for r in alone["history"]] == pytest.approx(
            [r["train_loss"] for r in summaries[label]["history"]], rel=1e-5)
        a = training.load_checkpoint(run_dir / "best.pt")["model"]
        b = training.load_checkpoint(tmp_path / "alone" / label / "best.pt")["model"]
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
