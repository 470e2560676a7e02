"""The real-speech evaluation set builder, the spectral-gating baseline row and the gains table.

The builder runs on a tiny fake "package folder" (one sub-folder per speaker, like
/usr/share/ktuberling/sounds) of short tonal "words" at 22.05 kHz, so the tests need no Debian
package and stay fast.
"""

import csv
import hashlib
import importlib.util
import json

import numpy as np
import pytest
import soundfile as sf

from pycosdist.denoise import cli, data, evaluation, peers, realspeech, report
from pycosdist.denoise.audio import read_audio

SPEAKERS = [f"s{k:02d}" for k in range(18)]  # > VALID + TRAIN speakers + 2: every split has 2 clean speakers
NOISY = "s11"  # its recordings carry background noise: never a reference
WORDS = 5  # per speaker: the CLI's default utterance length


def _tone_hz(speaker: int, word: int) -> float:
    return 200.0 + 50 * speaker + 9 * word  # distinct for every (speaker, word)


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    root = tmp_path_factory.mktemp("pkg") / "sounds"
    rng = np.random.default_rng(0)
    sr = 22050
    for k, spk in enumerate(SPEAKERS):
        for w in range(WORDS):
            t = np.arange(int(rng.uniform(0.3, 0.6) * sr)) / sr
            word = np.sin(2 * np.pi * _tone_hz(k, w) * t) * np.hanning(len(t)) * 0.5
            pad = np.zeros(int(0.2 * sr))  # leading/trailing silence, trimmed by the builder
            x = np.concatenate([pad, word, pad])
            if spk == NOISY:
                x = x + 0.05 * rng.standard_normal(len(x))
            (root / spk).mkdir(parents=True, exist_ok=True)
            sf.write(str(root / spk / f"word{w}.ogg"), x, sr)
    (root / "s00@latin").mkdir()  # a script variant: the same speaker as s00
    sf.write(str(root / "s00@latin" / "extra.wav"), 0.3 * np.sin(np.arange(8000) / 5.0), 16000)
    (root / "s01" / "broken.ogg").write_text("not audio")  # skipped, never fatal
    return root


AMBIENT = "usr/share/games/wesnoth/1.16/data/core/sounds/ambient"
AMBIENCES = {"campfire": 3100.0, "night": 4700.0, "birds1": 5900.0}  # test, test, valid: a tone each


@pytest.fixture(scope="module", autouse=True)
def ambiences(tmp_path_factory):
    """Fake held-out recorded ambiences (the layout of wesnoth-1.16-data) where the builder looks, so
    that these tests do not depend on what the machine has installed."""
    root = tmp_path_factory.mktemp("noise_root")
    (root / AMBIENT).mkdir(parents=True)
    t = np.arange(3 * 22050) / 22050
    for name, hz in AMBIENCES.items():
        sf.write(str(root / AMBIENT / f"{name}.ogg"), 0.2 * np.sin(2 * np.pi * hz * t) * (1 + np.sin(t)), 22050)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(realspeech, "NOISE_ROOTS", (str(root),))
        yield root


def _build(out, source, split="test", **kw):
    return realspeech.build_realtest(out, source_dir=source, split=split, utts_per_speaker=1, words_per_utt=2, **kw)


def _digest(root):
    h = hashlib.sha256()
    for p in sorted(root.rglob("*.wav")):
        h.update(str(p.relative_to(root)).encode() + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory, source):
    return _build(tmp_path_factory.mktemp("rt") / "realtest", source)


def test_speakers_and_splits(source):
    speakers = realspeech.find_speakers(source)
    assert sorted(speakers) == SPEAKERS and len(speakers["s00"]) == WORDS + 1
    test, valid, train = (realspeech.split_speakers(speakers, s) for s in ("test", "valid", "train"))
    assert len(valid) == realspeech.VALID_SPEAKERS and len(train) == realspeech.TRAIN_SPEAKERS
    assert not set(test) & set(valid) and not set(test) & set(train) and not set(train) & set(valid)
    assert sorted(test + valid + train) == SPEAKERS
    assert realspeech.split_speakers(speakers, "test", seed=0) == test  # seeded: stable
    with pytest.raises(ValueError, match="split"):
        realspeech.split_speakers(speakers, "training")


def test_training_utterances_come_from_train_speakers_only(source):
    train = realspeech.split_speakers(realspeech.find_speakers(source), "train")
    utts = realspeech.training_utterances(source, utts_per_speaker=2, words_per_utt=2)
    assert {spk for spk, _, _ in utts} == set(train) - {NOISY}  # noisy recordings never enter
    assert all(len(words.split()) == 2 and x.dtype == np.float64 and len(x) > 0.3 * 16000 for _, words, x in utts)


def test_synth_corpus_with_real_training_speech(source, tmp_path):
    """--real-speech: the train speakers' recordings join the TRAINING split only, as extra speakers."""
    from pycosdist.denoise import synth

    kw = dict(n_train_speakers=2, n_test_speakers=1, utts_per_speaker=1, test_utts_per_speaker=1, workers=1)
    out = synth.synthesize_corpus(tmp_path / "c", real_speech_dir=source, real_utts_per_speaker=2, **kw)
    manifest = json.loads((out / "manifest.json").read_text())
    recorded = {k: v for k, v in manifest["speakers"].items() if "source" in v}
    train = realspeech.split_speakers(realspeech.find_speakers(source), "train")
    assert sorted(v["source"].rsplit("/", 1)[1] for v in recorded.values()) == sorted(set(train) - {NOISY})
    assert all(v["split"] == "train" for v in recorded.values())
    files = {f["name"]: f for f in manifest["files"]}
    assert all(files[n]["split"] == "train" for n in files if n.split("_")[0] in recorded)
    assert sum(n.split("_")[0] in recorded for n in files) == 2 * len(recorded)
    assert manifest["params"]["real_speech"] == dict(source_dir=str(source), utts_per_speaker=2)
    train_clean = sorted(p.stem for p in (out / "clean_trainset_28spk_wav_16k").glob("*.wav"))
    assert len(train_clean) == 2 + 2 * len(recorded) and len(data.load_corpus(out).test) == 1


def test_dynamic_range_separates_clean_from_noisy_recordings():
    rng = np.random.default_rng(1)
    word = np.concatenate([np.zeros(3200), 0.5 * np.sin(np.arange(8000) / 3.0), np.zeros(3200)])
    # 95th percentile frame: the tone (power 0.125); 10th: the silence (power 0) or the noise floor.
    assert realspeech.dynamic_range_db(word) > 100
    noisy = word + 0.05 * rng.standard_normal(len(word))
    expected = 10 * np.log10((0.125 + 0.0025) / 0.0025)
    assert abs(realspeech.dynamic_range_db(noisy) - expected) < 1.0
    assert realspeech.dynamic_range_db(noisy) < realspeech.MIN_DYNAMIC_RANGE_DB


def test_trim_silence_keeps_the_word():
    x = np.concatenate([np.zeros(8000), 0.5 * np.ones(4000), np.zeros(8000)])
    y = realspeech.trim_silence(x)
    margin = int(0.05 * 16000)
    assert len(y) == 4000 + 2 * margin and np.abs(y).sum() == np.abs(x).sum()


def test_layout_snr_and_manifest(built, source):
    manifest = json.loads((built / "manifest.json").read_text())
    test_speakers = realspeech.split_speakers(realspeech.find_speakers(source), "test")
    excluded = [NOISY] if NOISY in test_speakers else []
    test_speakers = [s for s in test_speakers if s != NOISY]
    assert manifest["speakers"] == test_speakers and manifest["params"]["split"] == "test"
    assert list(manifest["excluded_speakers"]) == excluded
    names = sorted(f["name"] for f in manifest["files"])
    assert names == sorted(f"{s}_001" for s in test_speakers)
    for subset in realspeech.SUBSETS:
        corpus = data.load_corpus(built / subset)  # the VoiceBank+DEMAND layout, test split only
        assert corpus.test.names == names and len(corpus.train) == 0
    for f in manifest["files"]:
        assert f["snr_db"] in realspeech.REAL_SNRS and f["stationary_noise"] in realspeech.STATIONARY_NOISES
        for subset in realspeech.SUBSETS:
            clean, sr = read_audio(built / subset / "clean_testset_wav_16k" / f"{f['name']}.wav")
            noisy, _ = read_audio(built / subset / "noisy_testset_wav_16k" / f"{f['name']}.wav")
            assert sr == 16000 and clean.shape == noisy.shape and np.abs(noisy).max() < 1.0
            snr = 10 * np.log10(np.mean(clean ** 2) / np.mean((noisy - clean) ** 2))
            assert abs(snr - f["snr_db"]) < 0.1, (subset, f, snr)
        # Both subsets hold the same clean utterance (up to the common no-clip scaling).
        a = read_audio(built / "stationary" / "clean_testset_wav_16k" / f"{f['name']}.wav")[0][0]
        b = read_audio(built / "babble" / "clean_testset_wav_16k" / f"{f['name']}.wav")[0][0]
        assert np.corrcoef(a, b)[0, 1] > 0.999
    # Every (noise, SNR) pair of the stationary subset occurs once the set is large enough.
    assert len({(f["stationary_noise"], f["snr_db"]) for f in manifest["files"]}) == min(9, len(names))


def test_recorded_subset_uses_held_out_ambiences_of_its_split_only(built, source, tmp_path, ambiences):
    """The recorded subset's noise is an excerpt of the split's own held-out recordings (test: campfire,
    night; valid: birds1), never another split's; without the package the subset is left out."""
    def peak_hz(name, root):
        clean = read_audio(root / "recorded" / "clean_testset_wav_16k" / f"{name}.wav")[0][0]
        noisy = read_audio(root / "recorded" / "noisy_testset_wav_16k" / f"{name}.wav")[0][0]
        spec = np.abs(np.fft.rfft(noisy - clean))
        return np.fft.rfftfreq(len(clean), 1 / 16000)[np.argmax(spec)]

    valid = _build(tmp_path / "valid", source, split="valid")
    for root, allowed in ((built, {"campfire", "night"}), (valid, {"birds1"})):
        manifest = json.loads((root / "manifest.json").read_text())
        assert manifest["subsets"] == list(realspeech.SUBSETS)
        assert {f["recorded_noise"] for f in manifest["files"]} <= allowed
        for f in manifest["files"]:
            assert abs(peak_hz(f["name"], root) - AMBIENCES[f["recorded_noise"]]) < 20
    bare = realspeech.build_realtest(tmp_path / "bare", source_dir=source, utts_per_speaker=1, words_per_utt=2,
                                     noise_roots=[str(tmp_path / "nothing")])
    manifest = json.loads((bare / "manifest.json").read_text())
    assert manifest["subsets"] == ["stationary", "babble"] and not (bare / "recorded").exists()
    assert "apt-get install wesnoth-1.16-data" in manifest["recorded_noise"]


def test_babble_is_made_of_other_speakers(built, source):
    """The babble noise of a file is a sum of OTHER speakers' words: its spectrum peaks at their
    (speaker-specific) tone frequencies, never at the target speaker's own."""
    manifest = json.loads((built / "manifest.json").read_text())
    for f in manifest["files"]:
        clean = read_audio(built / "babble" / "clean_testset_wav_16k" / f"{f['name']}.wav")[0][0]
        noisy = read_audio(built / "babble" / "noisy_testset_wav_16k" / f"{f['name']}.wav")[0][0]
        spec = np.abs(np.fft.rfft(noisy - clean)) ** 2
        freqs = np.fft.rfftfreq(len(clean), 1 / 16000)
        k = SPEAKERS.index(f["speaker"])
        own = [_tone_hz(k, w) for w in range(WORDS)]
        own_energy = sum(spec[np.abs(freqs - hz) < 3].sum() for hz in own)
        assert own_energy < 0.05 * spec.sum()


def test_deterministic_resumable_and_checked(built, source, tmp_path):
    again = _build(tmp_path / "again", source)
    assert _digest(again) == _digest(built)
    # Resume: a lost file and manifest are rebuilt identically; finished files are kept as they are.
    victim = next((again / "babble" / "noisy_testset_wav_16k").iterdir())
    victim.unlink()
    (again / "manifest.json").unlink()
    kept = again / "stationary" / "noisy_testset_wav_16k" / victim.name
    mtime = kept.stat().st_mtime_ns
    _build(again, source)
    assert _digest(again) == _digest(built) and kept.stat().st_mtime_ns == mtime
    assert _digest(_build(tmp_path / "seed1", source, seed=1)) != _digest(built)
    valid = _build(tmp_path / "valid", source, split="valid")
    valid_speakers = json.loads((valid / "manifest.json").read_text())["speakers"]
    assert not set(valid_speakers) & set(json.loads((built / "manifest.json").read_text())["speakers"])
    with pytest.raises(FileExistsError, match="other parameters"):
        _build(again, source, seed=1)
    _build(again, source, seed=1, overwrite=True)
    assert _digest(again) == _digest(tmp_path / "seed1")
    with pytest.raises(FileNotFoundError, match="ktuberling-data"):
        _build(tmp_path / "x", tmp_path / "no-such-package")
    with pytest.raises(ValueError, match="seed"):
        _build(tmp_path / "x", source, seed=-1)
    with pytest.raises(ValueError, match="words_per_utt"):
        realspeech.build_realtest(tmp_path / "x", source_dir=source, words_per_utt=0)


def test_cli_realtest(source, tmp_path, capsys):
    assert cli.main(["data", "realtest", str(tmp_path / "rt"), "--source", str(source), "--split", "valid"]) == 0
    assert "stationary" in capsys.readouterr().out
    assert (tmp_path / "rt" / "manifest.json").is_file()
    assert cli.main(["data", "realtest", str(tmp_path / "bad"), "--source", str(tmp_path / "none")]) == 2
    assert "ktuberling-data" in capsys.readouterr().err


# --- the non-learned baseline and the gains table --------------------------------------------------
def test_evaluate_enhancer_and_gains(built, tmp_path):
    dataset = data.load_corpus(built / "stationary").test
    out = tmp_path / "eval"
    noisy = report.evaluate_checkpoints({}, dataset, out, workers=0, with_baseline=False)[0]
    # SI-SDR is scale-invariant, so a halved input scores exactly the noisy input's SI-SDR.
    half = report.enhancer_row("half volume", lambda x: 0.5 * x, dataset, out, workers=0)
    assert half["si_sdr"] == pytest.approx(noisy["si_sdr"], abs=1e-6) and half["params"] == 0
    with open(out / "half_volume_per_file.csv") as f:
        per_file = {r["name"]: float(r["si_sdr"]) for r in csv.DictReader(f)}
    assert sorted(per_file) == dataset.names
    rows = [noisy, half]
    gains = report.gain_rows(rows, out)
    assert [g["model"] for g in gains] == ["half volume"] and "pesq_vs_gating" not in gains[0]
    # The gains are the paired per-file differences, recomputed here from the CSVs.
    def load(label, metric):
        with open(out / f"{label}_per_file.csv") as f:
            return np.array([float(r[metric]) for r in csv.DictReader(f)])
    d = load("half_volume", "stoi") - load("noisy", "stoi")
    assert gains[0]["stoi_vs_noisy"] == f"{d.mean():+.3f} ± {d.std(ddof=1) / np.sqrt(len(d)):.3f}"


@pytest.mark.skipif(importlib.util.find_spec("noisereduce") is None, reason="noisereduce ([train] extra) missing")
def test_spectral_gating_row(built, tmp_path):
    import noisereduce

    dataset = data.load_corpus(built / "stationary").test
    noisy, clean = dataset[0]
    # The baseline is noisereduce's stationary gating with its defaults (independent call).
    expected = noisereduce.reduce_noise(y=noisy.double().numpy(), sr=16000, stationary=True)
    np.testing.assert_allclose(evaluation.spectral_gating(noisy), expected, atol=1e-12)
    rows = report.evaluate_checkpoints({}, dataset, tmp_path, workers=0)
    installed = [label for name, label in report.PEER_LABELS.items() if not peers.available_peers()[name]]
    assert [r["model"] for r in rows] == ["noisy input", evaluation.SPECTRAL_GATING, *installed]
    assert rows[1]["n_ok"] == len(dataset) and rows[1]["si_sdr"] != rows[0]["si_sdr"]
    # Each peer row scores the peer's own aligned output (an independent call on the first file).
    for name, label in report.PEER_LABELS.items():
        if label in installed:
            estimate = peers.load_peer(name).enhance(noisy.numpy())
            with open(tmp_path / f"{label.replace(' ', '_')}_per_file.csv") as f:
                first = next(csv.DictReader(f))
            assert float(first["si_sdr"]) == pytest.approx(evaluation.si_sdr(estimate, clean.numpy()), abs=1e-3)
    gains = report.gain_rows(rows, tmp_path)
    assert gains[0]["model"] == evaluation.SPECTRAL_GATING and "pesq_vs_gating" not in gains[0]


def test_plot_spectrograms_writes_one_png_per_row(tmp_path):
    """The demo's figures stage (it raised NameError: report.py used torch without importing it)."""
    waves = {"noisy input": np.random.default_rng(0).standard_normal(8000), "clean": np.zeros(8000) + 1e-3}
    paths = report.plot_spectrograms(waves, tmp_path, title="t")
    assert [p.name for p in paths] == ["spectrograms.png", "spec_noisy_input.png", "spec_clean.png"]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_method_gain_rows_summarize_each_methods_seeds(built, tmp_path):
    from pycosdist.denoise import demo

    dataset = data.load_corpus(built / "stationary").test
    rows = report.evaluate_checkpoints({}, dataset, tmp_path, workers=0, with_baseline=False)
    for seed, gain in ((0, 0.5), (1, 0.9)):  # two "seeds" of one method: scaled inputs
        row = report.enhancer_row(f"student m seed{seed}", lambda x, g=gain: g * x, dataset, tmp_path, workers=0)
        rows.append({**row, "method": "m"})
    (summary,) = demo.method_gain_rows(rows, tmp_path, ["m"])
    per_seed = [report.paired_gain(tmp_path, "noisy", f"student m seed{k}", "stoi")[0] for k in (0, 1)]
    assert summary["seeds"] == 2 and summary["pesq_vs_gating"] is None  # no gating row scored
    assert summary["stoi_vs_noisy"] == f"{np.mean(per_seed):+.3f} ({min(per_seed):+.3f} .. {max(per_seed):+.3f})"


def test_demo_with_real_speech_end_to_end(source, tmp_path):
    """The demo on the fake recordings: recorded voices of the train speakers in the training corpus
    only, both real-speech tables for every student, and the KD gains over no KD on real speech."""
    from pycosdist.denoise import demo

    tiny_train = {"epochs": 1, "batch_size": 2, "threads": 1, "eval_workers": 0}
    small_data = {"segment_seconds": 0.5, "valid_speakers": 1}
    out = tmp_path / "report"
    result = demo.run_demo(
        out, progress=False, workers=0, log=lambda *_: None, seeds=2, student_workers=1, real_speech_dir=source,
        corpus_kwargs={"n_train_speakers": 3, "n_test_speakers": 1, "utts_per_speaker": 2, "test_utts_per_speaker": 2,
                       "real_utts_per_speaker": 1},
        teacher_overrides={"model": {"channels": [6, 8], "kernel_size": [3, 3], "bottleneck_layers": 1},
                           "train": tiny_train, "data": small_data},
        student_overrides={"train": tiny_train, "data": small_data}, train_teacher=True, recorded_noise=False)
    manifest = json.loads((out / "work" / "corpus" / "manifest.json").read_text())
    recorded = {v["source"].rsplit("/", 1)[-1] for v in manifest["speakers"].values() if "source" in v}
    train_speakers = set(realspeech.split_speakers(realspeech.find_speakers(source), "train"))
    assert NOISY in train_speakers and recorded == train_speakers - {NOISY}  # noisy recordings are left out
    test_speakers = set(realspeech.split_speakers(realspeech.find_speakers(source), "test"))
    md = (out / "realspeech" / "results.md").read_text()
    for subset in realspeech.SUBSETS:
        sub = result["realspeech"][subset]
        names = data.load_corpus(out / "work" / "realtest" / subset).test.names
        assert names and {n.rsplit("_", 1)[0] for n in names} <= test_speakers
        students = [r["model"] for r in sub["rows"] if r["model"].startswith("student ")]
        assert sorted(students) == sorted(f"student {m} seed{k}" for m in demo.DEMO_METHODS for k in (0, 1))
        want = [g for metric in ("pesq", "stoi") for g in demo.seed_paired_gains(
            out / "work" / "eval_realspeech" / subset, demo.DEMO_METHODS, [0, 1], metric=metric)]
        assert sub["kd_gains"] == want and len(want) == 4 and all(g["seeds_n"] == 2 for g in want)
        saved = json.loads((out / "realspeech" / subset / "results.json").read_text())
        assert saved["kd_gains"] == json.loads(json.dumps(want))
    assert md.count("KD gain over no KD") == len(realspeech.SUBSETS) and "| cosine_lib | STOI |" in md
