"""Metrics (SI-SDR against a hand-derived value, PESQ/STOI sanity) and the robust evaluator."""

import csv
import json
import math

import numpy as np
import pytest
import torch

from pycosdist.denoise import evaluation
from pycosdist.denoise.data import load_corpus
from pycosdist.denoise.evaluation import ScoreResult, evaluate, evaluate_noisy, safe_score, score_pair, si_sdr
from pycosdist.denoise.synth import synthesize_corpus


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    """(noisy, clean) float32 16 kHz synthetic utterances: the test split of a tiny corpus."""
    root = synthesize_corpus(tmp_path_factory.mktemp("eval") / "corpus", n_train_speakers=2, n_test_speakers=1,
                             utts_per_speaker=1, test_utts_per_speaker=4, seed=11)
    return load_corpus(root, valid_speakers=1).test


def test_si_sdr_hand_derived():
    # r and n are sinusoids with whole periods in N samples: zero-mean and orthogonal, |r|^2 = |n|^2 = N/2.
    # For e = a r + c n: the projection of e on r is a r, the residual c n, so SI-SDR = 20 log10(a / c).
    n_samples = 16000
    t = np.arange(n_samples)
    r = np.sin(2 * np.pi * 5 * t / n_samples)
    n = np.cos(2 * np.pi * 7 * t / n_samples)
    for a, c in ((0.5, 0.05), (2.0, 1.0), (1.0, 3.0)):
        expected = 20 * math.log10(a / c)
        assert si_sdr(a * r + c * n, r) == pytest.approx(expected, abs=1e-6)
        assert si_sdr(a * r + c * n + 0.3, r + 1.0) == pytest.approx(expected, abs=1e-6)  # zero-mean
        assert si_sdr(-7 * (a * r + c * n), r) == pytest.approx(expected, abs=1e-6)  # scale-invariant
    assert si_sdr(torch.tensor(r + 0.1 * n), torch.tensor(r)) == pytest.approx(20.0, abs=1e-6)
    assert math.isfinite(si_sdr(np.zeros(100), np.zeros(100)))  # eps-safe
    with pytest.raises(ValueError, match="equal shapes"):
        si_sdr(r[:-1], r)


def test_pesq_stoi_identical_high_noise_low(speech):
    _, clean = speech[0]
    clean = clean.numpy()
    same = score_pair(clean, clean)
    assert same["pesq"] > 4.5 and same["stoi"] > 0.99 and same["si_sdr"] > 60
    noise = 0.05 * np.random.default_rng(0).standard_normal(len(clean))
    bad = score_pair(clean, noise)
    assert bad["pesq"] < 1.2 and bad["stoi"] < 0.5 and bad["si_sdr"] < -20
    noisy, _ = speech[0]
    mid = score_pair(clean, noisy.numpy())
    assert bad["pesq"] < mid["pesq"] < same["pesq"] and bad["stoi"] < mid["stoi"] < same["stoi"]
    with pytest.raises(ValueError, match="sr"):
        score_pair(clean, clean, sr=8000)


def test_safe_score_failure_kinds(speech, monkeypatch):
    _, clean = speech[0]
    clean = clean.numpy().astype(np.float64)
    ok = safe_score("ok", clean, clean)
    assert ok.error is None and ok.note is None and ok.metrics["pesq"] > 4.5
    nan, inf = clean.copy(), clean.copy()
    nan[100], inf[200] = np.nan, np.inf
    cases = {
        "silent reference": (np.zeros_like(clean), clean),
        "silent reference (RMS": (1e-7 * np.random.default_rng(0).standard_normal(len(clean)), clean),
        "too short": (clean[:3000], clean[:3000]),
        "estimate contains NaN": (clean, nan),
        "estimate contains NaN/Inf": (clean, inf),
        "reference contains NaN": (nan, clean),
        "estimate is all zeros": (clean, np.zeros_like(clean)),
        "length mismatch": (clean, clean[: len(clean) // 2]),
        "expected a 1-D": (clean, np.stack([clean, clean])),
    }
    for reason, (ref, est) in cases.items():
        r = safe_score(reason, ref, est)
        assert isinstance(r, ScoreResult) and r.metrics is None and reason in r.error, (reason, r)
    # A small mismatch (an STFT round trip dropping a hop) is trimmed and noted, not failed.
    r = safe_score("trim", clean, clean[:-100])
    assert r.error is None and r.metrics["pesq"] > 4.5 and "trimmed" in r.note
    # A metric that cannot be computed is caught and named: STOI finds too few non-silent frames in
    # a click train (pystoi itself only warns and returns 1e-5) ...
    clicks = np.zeros(16000)
    clicks[::4000] = 1.0
    r = safe_score("clicks", clicks, clean[:16000])
    assert r.metrics is None and r.error.startswith("ValueError: STOI undefined")
    # ... and pesq's exceptions (bytes messages) are reported readably.
    import pesq

    def no_utterances(*args):
        raise pesq.NoUtterancesError(b"No utterances detected")

    monkeypatch.setattr(evaluation, "pesq_wb", no_utterances)
    r = safe_score("quiet", clean, clean)
    assert r == ScoreResult("quiet", None, "NoUtterancesError: No utterances detected")


class _ListDataset:
    def __init__(self, items, names, broken=()):
        self.items, self.names, self.broken = items, names, set(broken)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        if self.names[i] in self.broken:
            raise OSError("disk on fire")
        return self.items[i]


def _enhance(noisy):
    """Identity except for files marked by their first sample (see the test)."""
    tag = round(noisy[0].item() * 1000)
    if tag == 1:
        raise RuntimeError("model exploded")
    if tag == 2:
        return torch.full_like(noisy, float("nan"))
    if tag == 3:
        return torch.zeros_like(noisy)
    if tag == 4:
        return noisy[:-50]  # trimmed
    return 0.5 * noisy + 0.5 * noisy.flip(0) * 0.01


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _enhance_numpy(noisy):
    """:func:`_enhance` on the float32 numpy array that a scoring worker passes."""
    assert isinstance(noisy, np.ndarray) and noisy.dtype == np.float32, type(noisy)
    return _enhance(torch.from_numpy(noisy)).numpy()


def _tagged_dataset(speech):
    """Seven files f0..f6 whose first sample tells :func:`_enhance` how to fail; f5 has a silent
    reference and f6 cannot be loaded."""
    items, names = [], []
    for k, tag in enumerate((0, 1, 2, 3, 4, 0, 0)):
        noisy, clean = speech[k % len(speech)]
        noisy = noisy.clone()
        noisy[0] = tag / 1000
        items.append((noisy, clean))
        names.append(f"f{k}")
    items[5] = (items[5][0], torch.zeros_like(items[5][1]))  # silent reference
    return _ListDataset(items, names, broken={"f6"})


def test_evaluate_reports_failures_and_parallel_equals_serial(speech, tmp_path):
    ds = _tagged_dataset(speech)
    names = ds.names
    serial = evaluate(_enhance, ds, tmp_path / "s", "student", workers=0)
    parallel = evaluate(_enhance, ds, tmp_path / "p", "student", workers=2)
    assert serial["n_files"] == 7 and serial["n_ok"] == 2 and serial["n_failed"] == 5
    assert set(serial["failed"]) == {"f1", "f2", "f3", "f5", "f6"}
    assert "enhancement failed: RuntimeError: model exploded" in serial["failed"]["f1"]
    assert "NaN" in serial["failed"]["f2"] and "all zeros" in serial["failed"]["f3"]
    assert "silent reference" in serial["failed"]["f5"] and "loading failed: OSError" in serial["failed"]["f6"]
    assert list(serial["trimmed"]) == ["f4"]
    for key in ("n_ok", "n_failed", "failed", "trimmed"):
        assert parallel[key] == serial[key]
    for m in ("pesq", "stoi", "si_sdr"):
        assert parallel[m] == pytest.approx(serial[m], rel=1e-9)

    rows = _read_csv(tmp_path / "s" / "student_per_file.csv")
    assert list(rows[0]) == ["name", "pesq", "stoi", "si_sdr", "error"]
    assert [r["name"] for r in rows] == names
    ok = [r for r in rows if not r["error"]]
    assert [r["name"] for r in ok] == ["f0", "f4"] and all(r["pesq"] for r in ok)
    assert all(r["pesq"] == "" for r in rows if r["error"])
    assert np.mean([float(r["stoi"]) for r in ok]) == pytest.approx(serial["stoi"], abs=1e-6)
    assert _read_csv(tmp_path / "p" / "student_per_file.csv") == rows
    on_disk = json.loads((tmp_path / "s" / "student_summary.json").read_text())
    assert on_disk == serial
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["student_per_file.csv", "student_summary.json"]


def test_enhance_in_workers_equals_in_process(speech, tmp_path):
    """The workers enhance (numpy in, numpy out) with the same per-file results and failures as this
    process does, and this process's torch thread count is left as it was."""
    ds = _tagged_dataset(speech)
    here = evaluate(_enhance, ds, tmp_path / "here", "student", workers=0)
    threads = torch.get_num_threads()
    there = evaluate(_enhance_numpy, ds, tmp_path / "there", "student", workers=2, enhance_in_workers=True)
    assert torch.get_num_threads() == threads
    assert "enhancement failed: RuntimeError: model exploded" in there["failed"]["f1"]
    for key in ("n_ok", "n_failed", "failed", "trimmed"):
        assert there[key] == here[key]
    assert (_read_csv(tmp_path / "there" / "student_per_file.csv")
            == _read_csv(tmp_path / "here" / "student_per_file.csv"))


def test_evaluate_noisy_and_all_failed(speech, tmp_path):
    summary = evaluate_noisy(speech, tmp_path, workers=2)
    assert summary["label"] == "noisy" and summary["n_ok"] == len(speech) and summary["n_failed"] == 0
    clean_scores = [score_pair(c.numpy(), n.numpy()) for n, c in (speech[i] for i in range(len(speech)))]
    assert summary["pesq"] == pytest.approx(np.mean([s["pesq"] for s in clean_scores]), rel=1e-9)
    assert (tmp_path / "noisy_summary.json").is_file() and (tmp_path / "noisy_per_file.csv").is_file()
    # Nothing scores: means are None (valid JSON null), not NaN, and nothing raises.
    dead = evaluate(lambda x: torch.zeros_like(x), speech, tmp_path, "dead", workers=0)
    assert dead["n_ok"] == 0 and dead["pesq"] is None
    assert json.loads((tmp_path / "dead_summary.json").read_text())["n_failed"] == len(speech)
    with pytest.raises(ValueError, match="label"):
        evaluate(lambda x: x, speech, tmp_path, "../escape")
