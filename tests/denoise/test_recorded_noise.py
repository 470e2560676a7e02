"""Recorded noise: the catalog finds files (plain and inside zip archives) under any root, splits
them by whole recording, never lets held-out evaluation recordings into training, and the noise
bank draws unit-RMS noise of the requested length from the right recordings."""

import io
import json
import zipfile

import numpy as np
import pytest
import soundfile as sf

from pycosdist.denoise import recorded_noise as rn
from pycosdist.denoise.synth import synthesize_corpus

SR = 22050
WEATHER = rn.NoiseSource("pkg-a", "usr/share/a", ("weather/*.ogg",), "weather", "GPL-2+")
CLICKS = rn.NoiseSource("pkg-b", "usr/share/b", ("sfx/*.ogg",), "clicks", "CC0", archive="data.zip",
                        exclude=("sfx/voice*",))
HELD_OUT = rn.NoiseSource("pkg-c", "usr/share/c", ("amb/*.ogg",), "ambience", "GPL-2+", role="eval",
                          eval_valid=("birds",))
SOURCES = (WEATHER, CLICKS, HELD_OUT)


def _ogg(x) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, SR, format="OGG")
    return buf.getvalue()


def _tone(hz, seconds, level=0.3):
    t = np.arange(int(seconds * SR)) / SR
    return level * np.sin(2 * np.pi * hz * t)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    (root / "usr/share/a/weather").mkdir(parents=True)
    for k in range(12):  # long recordings, one tone each
        (root / f"usr/share/a/weather/rain{k:02d}.ogg").write_bytes(_ogg(_tone(300 + 100 * k, 4.0)))
    (root / "usr/share/a/weather/broken.ogg").write_text("not audio")  # skipped, never fatal
    (root / "usr/share/b").mkdir(parents=True)
    with zipfile.ZipFile(root / "usr/share/b/data.zip", "w") as z:
        for k in range(3):  # short events
            z.writestr(f"sfx/knock{k}.ogg", _ogg(_tone(2000 + 500 * k, 0.15, 0.8)))
        z.writestr("sfx/voice0.ogg", _ogg(_tone(150, 1.0)))  # excluded by the source
        z.writestr("sfx/voices/pirate/hello.ogg", _ogg(_tone(150, 1.0)))  # a sub-folder: "sfx/*.ogg" is not it
    (root / "usr/share/c/amb").mkdir(parents=True)
    for name, hz in (("fire", 4100), ("birds", 5300)):
        (root / f"usr/share/c/amb/{name}.ogg").write_bytes(_ogg(_tone(hz, 3.0)))
    return root


def test_catalog_finds_plain_and_archived_recordings_and_splits_by_source(root, tmp_path):
    recs = rn.find_recordings([root], SOURCES)
    names = sorted(r.name.rsplit("/", 1)[-1] for r in recs)
    assert len(recs) == 12 + 1 + 3 + 2 and "voice0.ogg" not in names and "hello.ogg" not in names
    assert {r.member for r in recs if r.package == "pkg-b"} == {f"sfx/knock{k}.ogg" for k in range(3)}
    by_split = {s: {r.name for r in recs if r.split == s} for s in rn.SPLITS}
    assert not (by_split["train"] & by_split["valid"]) and not (by_split["train"] & by_split["test"])
    held_out = {r.name: r.split for r in recs if r.package == "pkg-c"}
    assert sorted(held_out.values()) == ["test", "valid"]  # eval sources never train
    assert all(r.split in ("train", "valid") for r in recs if r.package != "pkg-c")
    # The split of a recording depends on it alone: adding files moves no other file.
    assert rn.split_of(WEATHER, "weather/rain03.ogg") == next(r.split for r in recs if r.path.endswith("rain03.ogg"))
    assert rn.find_recordings([tmp_path / "empty"], SOURCES) == []
    assert rn.missing_packages(recs[:1], SOURCES) == ["pkg-b", "pkg-c"]


def test_bank_draws_unit_rms_noise_from_its_split_and_caches(root, tmp_path):
    recs = rn.find_recordings([root], SOURCES)
    bank = rn.load_bank(recs, "train", cache_dir=tmp_path)
    assert set(bank.families) <= {"weather", "clicks"} and "ambience" not in bank.families
    assert any("broken" in k for k in bank.skipped) or not any(r.path.endswith("broken.ogg") and r.split == "train"
                                                                for r in recs)
    train_tones = {300 + 100 * k for k in range(12) if any(r.path.endswith(f"rain{k:02d}.ogg") and r.split == "train"
                                                           for r in recs)}
    rng = np.random.default_rng(0)
    for _ in range(5):
        noise, name = bank.sample(16000, rng, family="weather")
        assert noise.shape == (16000,) and np.sqrt(np.mean(noise ** 2)) == pytest.approx(1.0, rel=1e-6)
        peak = np.fft.rfftfreq(16000, 1 / 16000)[np.argmax(np.abs(np.fft.rfft(noise)))]
        assert min(abs(peak - hz) for hz in train_tones) < 5  # an excerpt of a TRAIN recording
    cached = rn.load_bank(recs, "train", cache_dir=tmp_path)  # read back from the .npz
    assert cached.seconds() == bank.seconds() and (tmp_path / "noise_bank_train.npz").is_file()
    a = bank.sample(8000, np.random.default_rng(3))[0]
    np.testing.assert_array_equal(a, cached.sample(8000, np.random.default_rng(3))[0])  # seeded: same draw


def test_short_events_become_a_sequence_over_a_floor(root):
    bank = rn.load_bank(rn.find_recordings([root], (CLICKS,)), "train") if any(
        r.split == "train" for r in rn.find_recordings([root], (CLICKS,))) else None
    if bank is None:
        pytest.skip("every click landed in valid for this seed")
    noise, _ = bank.sample(3 * 16000, np.random.default_rng(1), family="clicks")
    frames = (noise.reshape(-1, 160) ** 2).mean(1)
    assert frames.max() / np.median(frames) > 100  # loud events over a quiet floor, not a stationary hum
    assert np.sqrt(np.mean(noise ** 2)) == pytest.approx(1.0, rel=1e-6)


def test_bank_argument_errors(root):
    with pytest.raises(ValueError, match="split: expected one of"):
        rn.load_bank([], "training")
    with pytest.raises(ValueError, match="recordings: the noise bank is empty"):
        rn.load_bank([], "train")
    bank = rn.load_bank(rn.find_recordings([root], SOURCES), "valid")
    with pytest.raises(ValueError, match="family: expected one of"):
        bank.sample(100, np.random.default_rng(0), family="thunder")


def test_corpus_with_recorded_noise(root, tmp_path, monkeypatch):
    """data synth --noise-root: a share of the files gets recorded noise, the training split from train
    recordings only, the manifest names each file's recording and every package's license."""
    monkeypatch.setattr(rn, "SOURCES", SOURCES)
    out = synthesize_corpus(tmp_path / "c", n_train_speakers=2, n_test_speakers=1, utts_per_speaker=4,
                            test_utts_per_speaker=2, workers=1, noise_roots=[root], recorded_fraction=0.7)
    manifest = json.loads((out / "manifest.json").read_text())
    recs = {r.name: r for r in rn.find_recordings([root], SOURCES)}
    recorded = [f for f in manifest["files"] if f["noise"].startswith("recorded:")]
    assert recorded and len(recorded) < len(manifest["files"])
    for f in recorded:
        rec = recs[f["noise_source"]]
        assert f["noise"] == f"recorded:{rec.family}"
        assert rec.split == ("train" if f["split"] == "train" else "valid")
        assert rec.package != HELD_OUT.package  # not even the corpus's test split uses held-out recordings
    assert manifest["recorded_noise"]["packages"]["pkg-a"]["license"] == "GPL-2+"
    assert manifest["params"]["recorded_noise"]["fraction"] == 0.7
    with pytest.raises(ValueError, match="recorded_fraction"):
        synthesize_corpus(tmp_path / "d", noise_roots=[root], recorded_fraction=1.5)
    with pytest.raises(FileNotFoundError, match="noise_roots: no recorded noise"):
        synthesize_corpus(tmp_path / "e", n_train_speakers=1, n_test_speakers=1, utts_per_speaker=1,
                          test_utts_per_speaker=1, workers=1, noise_roots=[tmp_path / "nothing"])
