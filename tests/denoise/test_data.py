"""Audio I/O, corpus discovery/pairing/splitting/preparation, the paired dataset, and the synthesizer."""

import hashlib
import json
import os
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from pycosdist.denoise import audio, data
from pycosdist.denoise.audio import AudioError, read_audio, to_mono_16k, write_audio
from pycosdist.denoise.data import (PairedAudioDataset, Pair, find_split_dirs, load_corpus, pair_files, prepare_16k,
                            speaker_split)
from pycosdist.denoise import augment, synth
from pycosdist.denoise.synth import synthesize_corpus


def _wav(path, x, sr=16000, subtype="FLOAT"):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), np.asarray(x, dtype=np.float32).T, sr, subtype=subtype)
    return path


def _tone(seconds, sr=16000, f=440.0):
    t = np.arange(int(seconds * sr)) / sr
    return 0.5 * np.sin(2 * np.pi * f * t)


def _make_split(root, split, names, sr=16000, suffix="", seconds=0.5):
    clean_name, noisy_name = data.SPLIT_DIRS[split]
    for n in names:
        _wav(root / (clean_name + suffix) / f"{n}.wav", _tone(seconds, sr), sr)
        _wav(root / (noisy_name + suffix) / f"{n}.wav", _tone(seconds, sr) + 0.01, sr)
    return root / (clean_name + suffix), root / (noisy_name + suffix)


# --- audio -----------------------------------------------------------------------------------
def test_read_audio_shapes_and_errors(tmp_path):
    st = np.stack([_tone(0.3), -_tone(0.3)])
    x, sr = read_audio(_wav(tmp_path / "st.wav", st, 8000))
    assert sr == 8000 and x.shape == (2, 4800) and x.dtype == np.float32
    np.testing.assert_allclose(x, st, atol=1e-7)

    (tmp_path / "text.wav").write_text("this is not audio")
    _wav(tmp_path / "empty.wav", np.zeros(0))
    for name, reason in (("missing.wav", "no such file"), ("text.wav", "not a readable audio file"),
                         ("empty.wav", "empty")):
        with pytest.raises(AudioError, match=reason) as e:
            read_audio(tmp_path / name)
        assert e.value.path.endswith(name)


def test_to_mono_16k_exact_ratios():
    x = np.random.default_rng(0).standard_normal((2, 44100)).astype(np.float32)
    assert to_mono_16k(x, 48000).shape == (14700,)  # 1/3
    assert to_mono_16k(x, 22050).shape == (32000,)  # 320/441: 44100 * 320 / 441
    same = to_mono_16k(x, 16000)
    np.testing.assert_allclose(same, x.mean(0), rtol=1e-6)
    # A 1 kHz tone keeps its frequency through 48k -> 16k.
    y = to_mono_16k(_tone(1.0, 48000, 1000.0), 48000)
    assert np.argmax(np.abs(np.fft.rfft(y))) == 1000
    with pytest.raises(ValueError, match="sr"):
        to_mono_16k(x, 0)
    with pytest.raises(ValueError, match="shape"):
        to_mono_16k(np.zeros((1, 2, 3)), 16000)


def test_write_audio_atomic_never_clips(tmp_path):
    loud = np.array([0.0, 1.5, -2.0, 0.25] * 100)
    write_audio(tmp_path / "loud.wav", loud)
    assert sf.info(str(tmp_path / "loud.wav")).subtype == "FLOAT"  # peak > 1: float, not clipped
    np.testing.assert_allclose(read_audio(tmp_path / "loud.wav")[0][0], loud, atol=1e-7)
    write_audio(tmp_path / "ok.wav", loud / 4)
    assert sf.info(str(tmp_path / "ok.wav")).subtype == "PCM_16"
    with pytest.raises(ValueError, match="NaN"):
        write_audio(tmp_path / "bad.wav", np.array([0.0, np.nan]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loud.wav", "ok.wav"]  # no temporaries left


# --- discovery, pairing, preparation ---------------------------------------------------------
def test_find_split_dirs_prefers_16k(tmp_path):
    with pytest.raises(FileNotFoundError, match="clean_testset_wav_16k.*clean_testset_wav"):
        find_split_dirs(tmp_path, "test")
    with pytest.raises(ValueError, match="split"):
        find_split_dirs(tmp_path, "valid")
    plain = _make_split(tmp_path, "train", ["p1_001"])
    assert find_split_dirs(tmp_path, "train") == plain
    (tmp_path / "clean_trainset_28spk_wav_16k").mkdir()  # half a _16k pair is not used
    assert find_split_dirs(tmp_path, "train") == plain
    (tmp_path / "noisy_trainset_28spk_wav_16k").mkdir()
    assert find_split_dirs(tmp_path, "train") == (tmp_path / "clean_trainset_28spk_wav_16k",
                                                   tmp_path / "noisy_trainset_28spk_wav_16k")


def test_pair_files_and_mismatch(tmp_path):
    clean, noisy = _make_split(tmp_path, "test", ["p2_002", "p1_001", "p1_002", "a_b_003"])
    (clean / "notes.txt").write_text("ignored")
    pairs = pair_files(clean, noisy)
    assert [p.name for p in pairs] == ["a_b_003", "p1_001", "p1_002", "p2_002"]
    assert [p.speaker for p in pairs] == ["a_b", "p1", "p1", "p2"]
    assert pairs[1] == Pair("p1_001", "p1", clean / "p1_001.wav", noisy / "p1_001.wav")
    os.remove(noisy / "p1_002.wav")
    _wav(noisy / "p9_009.wav", _tone(0.5))
    with pytest.raises(ValueError, match=r"missing from .*noisy_testset_wav: p1_002.wav.*missing from .*p9_009.wav"):
        pair_files(clean, noisy)


def test_prepare_16k_resamples_once(tmp_path, monkeypatch):
    _make_split(tmp_path, "train", ["p1_001", "p2_001"], sr=48000)
    _make_split(tmp_path, "test", ["p3_001"], sr=48000)
    (tmp_path / "clean_testset_wav" / "p3_002.wav").write_bytes(b"RIFF garbage")
    (tmp_path / "noisy_testset_wav" / "p3_002.wav").write_bytes(b"RIFF garbage")
    with pytest.warns(UserWarning, match="p3_002.wav"):
        assert prepare_16k(tmp_path) == tmp_path
    clean16, noisy16 = find_split_dirs(tmp_path, "train")
    assert clean16.name == "clean_trainset_28spk_wav_16k"
    x, sr = read_audio(clean16 / "p1_001.wav")
    assert sr == 16000 and x.shape == (1, 8000)
    assert np.argmax(np.abs(np.fft.rfft(x[0]))) == 440 * 8000 // 16000
    # Cached: a second run writes nothing; a deleted file is redone.
    calls = []
    monkeypatch.setattr(data, "write_audio", lambda *a, **k: calls.append(a[0]) or audio.write_audio(*a, **k))
    prepare_16k(tmp_path)
    assert calls == []
    os.remove(noisy16 / "p2_001.wav")
    prepare_16k(tmp_path)
    assert calls == [noisy16 / "p2_001.wav"]
    # The unreadable file was carried over so pairing still matches; the dataset skips it.
    with pytest.warns(UserWarning, match="p3_002.wav"):
        ds = PairedAudioDataset(pair_files(*find_split_dirs(tmp_path, "test")))
    assert ds.names == ["p3_001"]


def test_speaker_split():
    pairs = [Pair(f"{s}_{u}", s, None, None) for s in ("p3", "p1", "p2") for u in ("001", "002")]
    train, valid = speaker_split(pairs, 1)
    assert {p.speaker for p in valid} == {"p3"} and {p.speaker for p in train} == {"p1", "p2"}
    train, valid = speaker_split(pairs, 2)
    assert {p.speaker for p in valid} == {"p2", "p3"} and len(train) == 2
    train, valid = speaker_split(pairs, ["p1"])
    assert [p.name for p in valid] == ["p1_001", "p1_002"] and len(train) == 4
    assert speaker_split(pairs, 0) == (pairs, [])
    with pytest.raises(ValueError, match="valid_speakers.*3"):
        speaker_split(pairs, 3)
    with pytest.raises(ValueError, match="unknown speaker.*p7"):
        speaker_split(pairs, ["p7"])
    with pytest.raises(ValueError, match="no training data"):
        speaker_split(pairs, ["p1", "p2", "p3"])


# --- dataset ---------------------------------------------------------------------------------
@pytest.fixture
def ramp_pairs(tmp_path):
    """Clean = a ramp whose value encodes the sample index; noisy = 2 * clean: a crop's offset is
    readable from its first value and noisy/clean alignment is checkable."""
    pairs = []
    for name, n in (("p1_001", 16000), ("p1_002", 24000), ("p2_001", 3000 + 5000)):
        clean = (np.arange(n) + 1) / 2**20
        c = _wav(tmp_path / "c" / f"{name}.wav", clean)
        z = _wav(tmp_path / "n" / f"{name}.wav", 2 * clean)
        pairs.append(Pair(name, name[:2], c, z))
    return pairs


def test_crop_determinism(ramp_pairs):
    ds = PairedAudioDataset(ramp_pairs, segment_seconds=0.25, seed=3)
    assert ds.names == ["p1_001", "p1_002", "p2_001"] and len(ds) == 3
    noisy, clean = ds[1]
    assert noisy.shape == clean.shape == (4000,) and clean.dtype == torch.float32
    off = round(clean[0].item() * 2**20) - 1
    torch.testing.assert_close(clean, torch.arange(off + 1, off + 4001, dtype=torch.float32) / 2**20)
    torch.testing.assert_close(noisy, 2 * clean)  # same offset in both

    def offsets(dataset, epoch):
        dataset.set_epoch(epoch)
        return [round(dataset[i][1][0].item() * 2**20) for i in range(len(dataset))]

    first = [offsets(ds, e) for e in range(4)]
    again = PairedAudioDataset(ramp_pairs, segment_seconds=0.25, seed=3)
    assert [offsets(again, e) for e in (3, 0, 2, 1)] == [first[e] for e in (3, 0, 2, 1)]  # resumable, any order
    assert len({tuple(o) for o in first}) == 4  # epochs differ
    other = PairedAudioDataset(ramp_pairs, segment_seconds=0.25, seed=4)
    assert offsets(other, 0) != first[0]  # seeds differ
    # Whole files: noisy/clean aligned, full length; short files zero-padded to the segment.
    full = PairedAudioDataset(ramp_pairs)
    assert full[0][1].shape == (16000,) and full[-1][0].shape == (8000,)
    padded = PairedAudioDataset(ramp_pairs, segment_seconds=0.75)
    noisy, clean = padded[2]
    assert clean.shape == (12000,) and torch.all(clean[8000:] == 0) and clean[7999] > 0
    with pytest.raises(IndexError):
        full[3]
    with pytest.raises(ValueError, match="seed"):
        PairedAudioDataset(ramp_pairs, seed=-1)
    with pytest.raises(ValueError, match="epoch"):
        full.set_epoch(-2)
    with pytest.raises(ValueError, match="segment_seconds"):
        PairedAudioDataset(ramp_pairs, segment_seconds=0)


def test_bad_files_skipped_with_warning(tmp_path, ramp_pairs):
    bad = []
    for name, content in (("corrupt", b"RIFF\x24\x00\x00\x00WAVEfmt garbage" * 4), ("text", b"hello")):
        (tmp_path / f"{name}.wav").write_bytes(content)
        bad.append(Pair(name, "px", tmp_path / f"{name}.wav", ramp_pairs[0].noisy_path))
    bad.append(Pair("empty", "px", ramp_pairs[0].clean_path, _wav(tmp_path / "empty.wav", np.zeros(0))))
    bad.append(Pair("short", "px", _wav(tmp_path / "short.wav", _tone(0.2)), ramp_pairs[0].noisy_path))
    bad.append(Pair("gone", "px", tmp_path / "gone.wav", ramp_pairs[0].noisy_path))
    with pytest.warns(UserWarning) as record:
        ds = PairedAudioDataset(bad[:2] + ramp_pairs + bad[2:], segment_seconds=0.25)
    msg = " ".join(str(w.message) for w in record)
    for name in ("corrupt.wav", "text.wav", "empty.wav (empty", "short.wav (too short", "gone.wav"):
        assert name in msg
    assert ds.names == [p.name for p in ramp_pairs]
    assert all(ds[i][0].shape == (4000,) for i in range(len(ds)))


# --- synthetic corpus ------------------------------------------------------------------------
def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


TINY = dict(n_train_speakers=2, n_test_speakers=1, utts_per_speaker=2, test_utts_per_speaker=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return synthesize_corpus(tmp_path_factory.mktemp("synth") / "corpus", seed=5, **TINY)


def test_synth_layout_and_manifest(tiny):
    names = {"clean_trainset_28spk_wav_16k": ["spk01_001", "spk01_002", "spk02_001", "spk02_002"],
             "noisy_trainset_28spk_wav_16k": ["spk01_001", "spk01_002", "spk02_001", "spk02_002"],
             "clean_testset_wav_16k": ["spk03_001", "spk03_002"], "noisy_testset_wav_16k": ["spk03_001", "spk03_002"]}
    assert sorted(p.name for p in tiny.iterdir()) == sorted([*names, "manifest.json"])
    for d, files in names.items():
        assert sorted(p.stem for p in (tiny / d).iterdir()) == files
    manifest = json.loads((tiny / "manifest.json").read_text())
    assert len({(s["voice"], s["variant"]) for s in manifest["speakers"].values()}) == 3
    assert len({f["text"] for f in manifest["files"]}) == 6
    for f in manifest["files"]:
        split = "trainset_28spk_wav_16k" if f["split"] == "train" else "testset_wav_16k"
        clean, sr = read_audio(tiny / f"clean_{split}" / f"{f['name']}.wav")
        noisy, _ = read_audio(tiny / f"noisy_{split}" / f"{f['name']}.wav")
        assert sr == 16000 and clean.shape == noisy.shape and 1.0 < clean.shape[1] / sr < 6.0
        assert np.abs(noisy).max() < 1.0 and np.abs(clean).max() < 1.0
        snr = 10 * np.log10(np.mean(clean**2) / np.mean((noisy - clean) ** 2))
        assert abs(snr - f["snr_db"]) < 0.1, (f, snr)
        assert f["snr_db"] in ((-5, 0, 5, 10, 15) if f["split"] == "train" else (2.5, 7.5, 12.5, 17.5))
    assert {f["noise"] for f in manifest["files"]} <= set(synth.NOISE_TYPES)
    assert manifest["params"]["augment"] is True


def test_synth_deterministic(tiny, tmp_path):
    again = synthesize_corpus(tmp_path / "again", seed=5, workers=1, **TINY)
    assert _digest(again) == _digest(tiny)  # same seed -> identical bytes, whatever the worker count
    other = synthesize_corpus(tmp_path / "other", seed=6, **TINY)
    assert _digest(other) != _digest(tiny)
    # Reuse: same parameters return at once; different ones need overwrite=True.
    assert synthesize_corpus(again, seed=5, **TINY) == again and _digest(again) == _digest(tiny)
    with pytest.raises(FileExistsError, match="overwrite"):
        synthesize_corpus(again, seed=6, **TINY)
    synthesize_corpus(again, seed=6, overwrite=True, **TINY)
    assert _digest(again) == _digest(other)
    with pytest.raises(ValueError, match="utts_per_speaker"):
        synthesize_corpus(tmp_path / "bad", utts_per_speaker=0)
    with pytest.raises(ValueError, match="seed"):
        synthesize_corpus(tmp_path / "bad", seed=-3)
    with pytest.raises(ValueError, match="noise_types"):
        synthesize_corpus(tmp_path / "bad", noise_types=["rain"])


def test_load_corpus_on_synth(tiny):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        corpus = load_corpus(tiny, valid_speakers=1, segment_seconds=0.5, seed=1)
    assert corpus.train.names == ["spk01_001", "spk01_002"]
    assert corpus.valid.names == ["spk02_001", "spk02_002"]
    assert corpus.test.names == ["spk03_001", "spk03_002"]
    noisy, clean = corpus.train[0]
    assert noisy.shape == clean.shape == (8000,)
    noisy, clean = corpus.test[1]
    assert noisy.shape == clean.shape and noisy.shape[0] > 16000
    assert not torch.equal(noisy, clean)
    with pytest.raises(FileNotFoundError, match="root"):
        load_corpus(tiny / "nope")


def test_synth_augments_training_speech_only(tiny, tmp_path):
    plain = synthesize_corpus(tmp_path / "plain", seed=5, augment=False, **TINY)
    for split_dir, same in (("clean_testset_wav_16k", True), ("clean_trainset_28spk_wav_16k", False)):
        a, b = sorted((tiny / split_dir).iterdir()), sorted((plain / split_dir).iterdir())
        assert [p.read_bytes() == q.read_bytes() for p, q in zip(a, b)] == [same] * len(a)


def test_load_corpus_test_only_root(tmp_path):
    _make_split(tmp_path, "test", ["a_1", "b_1"], suffix="_16k")
    corpus = load_corpus(tmp_path)
    assert len(corpus.train) == len(corpus.valid) == 0 and corpus.test.names == ["a_1", "b_1"]


# --- augmentation and the new noises ------------------------------------------------------------
def test_augment_transforms_against_references():
    rng = np.random.default_rng(0)
    x = rng.standard_normal(16000)
    # No tilt, no peak: the EQ is the identity.
    np.testing.assert_allclose(augment.random_eq(x, np.random.default_rng(1), 0.0, 0.0), x, atol=1e-12)
    # The EQ's gain at a frequency is what its formula says (checked on a pure tone at 1 kHz, where
    # the tilt term is 0 and only the peak acts).
    tone = np.sin(2 * np.pi * 1000 * np.arange(16000) / 16000)
    eq_rng = np.random.default_rng(3)
    y = augment.random_eq(tone, np.random.default_rng(3), 0.0, 8.0)
    centre = np.log2(eq_rng.uniform(200.0, 5000.0) / 1000.0)
    eq_rng.uniform(-0.0, 0.0)  # the tilt draw
    peak, width = eq_rng.uniform(-8.0, 8.0), None
    width = eq_rng.uniform(0.5, 1.5)
    expected_db = peak * np.exp(-0.5 * ((0.0 - centre) / width) ** 2)
    assert abs(20 * np.log10(np.std(y) / np.std(tone)) - expected_db) < 1e-6
    # A direct path alone is the identity; a reverberated signal keeps its length.
    np.testing.assert_allclose(augment.reverberate(x, np.array([1.0])), x, atol=1e-9)
    rir = augment.simulated_rir(np.random.default_rng(2), 0.3)
    assert rir[0] == 1.0 and len(augment.reverberate(x, rir)) == len(x)
    tail = rir[np.flatnonzero(rir[1:])[0] + 1:]
    t = np.arange(len(tail)) / 16000
    slope = np.polyfit(t, 10 * np.log10(np.convolve(tail ** 2, np.ones(400) / 400, "same") + 1e-30)[:len(t)], 1)[0]
    assert -60 / 0.3 * 1.3 < slope < -60 / 0.3 * 0.7  # about 60 dB of decay per RT60
    # Speed: 0.9x tempo is 10/9 as long, and a 1 kHz tone becomes 900 Hz.
    slow = augment.speed_perturb(tone, 0.9)
    assert len(slow) == round(16000 / 0.9)
    assert abs(np.argmax(np.abs(np.fft.rfft(slow))) * 16000 / len(slow) - 900) < 2
    with pytest.raises(ValueError, match="factor"):
        augment.speed_perturb(x, 3.0)
    with pytest.raises(ValueError, match="rt60"):
        augment.simulated_rir(rng, 0.0)


def test_new_noises_are_unit_rms_and_have_their_character():
    n, pool = 32000, [np.sin(2 * np.pi * 200 * np.arange(16000) / 16000) * (1 + k) for k in range(5)]
    spectra = {}
    for kind in synth.NOISE_TYPES:
        x = synth.make_noise(kind, n, np.random.default_rng(4), pool)
        assert x.shape == (n,) and np.isfinite(x).all() and abs(np.sqrt(np.mean(x ** 2)) - 1) < 1e-6
        np.testing.assert_array_equal(x, synth.make_noise(kind, n, np.random.default_rng(4), pool))
        spectra[kind] = np.abs(np.fft.rfft(x)) ** 2
    f = np.fft.rfftfreq(n, 1 / 16000)
    centroid = {k: float((f * s).sum() / s.sum()) for k, s in spectra.items()}
    assert centroid["traffic"] < 800 < centroid["white"]  # rumble
    assert centroid["speech_shaped"] < 1000  # shaped like the (200 Hz) pool
    clicks = synth.make_noise("clicks", n, np.random.default_rng(4))
    assert np.mean(clicks ** 4) / np.mean(clicks ** 2) ** 2 > 10  # impulsive: far heavier tails than Gaussian (3)
    with pytest.raises(ValueError, match="babble_pool"):
        synth.make_noise("speech_shaped", n, np.random.default_rng(0))
