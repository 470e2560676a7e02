"""Real-speech evaluation set: recordings of real people from an installable package, mixed with noise.

Source: Debian's ``ktuberling-data`` (``apt-get install ktuberling-data``, GPL-2+, 47 MB download):
about 1,400 readable OGG files, 23 minutes of single words spoken by real people, one folder per
language (we take a folder as one speaker; the ``sr@...`` script variants share a speaker). An
utterance is ``words_per_utt`` words of one speaker, each trimmed of its leading/trailing silence,
joined by 150-350 ms pauses: 3-5 s, long enough for PESQ and STOI. Speakers whose recordings carry
their own background noise are left out (:data:`MIN_DYNAMIC_RANGE_DB`; listed in the manifest).

Two test-only corpora in the VoiceBank+DEMAND layout (see :mod:`pycosdist.denoise.data`), the same
clean utterances in both, for ``pycosdist evaluate --data DIR/stationary`` (or ``DIR/babble``):

- ``stationary/``: white, pink and brown noise at 0, 5 and 10 dB SNR. All three are GENERATED
  (no Debian or PyPI package we found ships recorded stationary noise);
- ``babble/``: a speech-like interferer made of 3-5 OTHER speakers' real words at the same SNRs,
  reported separately.

The speakers are split three ways (:func:`split_speakers`): "valid" (to choose a recipe on),
"train" (:func:`training_utterances`: the only recordings that may enter a training corpus, by
``pycosdist data synth --real-speech``) and "test" (what is reported). No speaker is in two splits,
and this evaluation set is built from the valid or test speakers only. Everything follows from
``seed``; an interrupted build resumes (finished files are kept, the manifest comes last).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .audio import SAMPLE_RATE, AudioError, read_audio, to_mono_16k, write_audio, write_text_atomic
from .data import SPLIT_DIRS, SUFFIX_16K
from .generated_noise import make_noise, mix_at_snr

KTUBERLING_DIR = Path("/usr/share/ktuberling/sounds")
STATIONARY_NOISES = ("white", "pink", "brown")  # generated: see the module docstring
REAL_SNRS = (0.0, 5.0, 10.0)
VALID_SPEAKERS = 8  # speakers of the "valid" split (to choose a recipe on)
TRAIN_SPEAKERS = 6  # speakers whose recordings may be training speech; the rest are "test"
# A speaker whose recordings carry their own background noise is no clean reference: scoring a
# denoiser against it rewards keeping noise. Gate: the median over the speaker's words of the
# level ratio between the loud (95th percentile) and quiet (10th) 10 ms frames of the raw file must
# reach this. (ktuberling: gl 12 dB, sr 14 dB, nl 18 dB fail; the others have 25-86 dB.)
MIN_DYNAMIC_RANGE_DB = 20.0
SPLITS = ("test", "valid")  # the evaluation sets; "train" speakers only feed training_utterances
SUBSETS = ("stationary", "babble", "recorded")
# Where the held-out evaluation noise (recorded_noise.SOURCES with role "eval": Wesnoth's recorded
# ambiences) is looked for by default: installed with `apt-get install wesnoth-1.16-data`.
NOISE_ROOTS = ("/",)
MANIFEST = "manifest.json"
PARAMS = ".params.json"  # written first, so that a resumed build can check it continues the same set
AUDIO_SUFFIXES = (".ogg", ".wav", ".flac")


def find_speakers(source_dir) -> dict[str, list[Path]]:
    """``{speaker: [audio files]}`` of a ktuberling-like folder (one sub-folder per speaker; ``X@Y``
    folders belong to speaker ``X``), files sorted by path. Raises FileNotFoundError naming the
    package to install when the folder is missing or holds no audio."""
    source_dir = Path(source_dir)
    if not source_dir.is_dir():
        raise FileNotFoundError(f"source_dir: {source_dir} does not exist; install the recordings with "
                                f"`apt-get install ktuberling-data` (Debian/Ubuntu) or pass another folder")
    speakers: dict[str, list[Path]] = {}
    for sub in sorted(p for p in source_dir.iterdir() if p.is_dir()):
        files = sorted(f for f in sub.iterdir() if f.suffix.lower() in AUDIO_SUFFIXES and not f.name.startswith("."))
        if files:
            speakers.setdefault(sub.name.split("@")[0], []).extend(files)
    if not speakers:
        raise FileNotFoundError(f"source_dir: no audio files ({', '.join(AUDIO_SUFFIXES)}) in sub-folders of {source_dir}")
    return speakers


def trim_silence(x: np.ndarray, threshold_db: float = -40.0, margin_s: float = 0.05) -> np.ndarray:
    """``x`` (samples,) without leading/trailing 10 ms frames quieter than ``threshold_db`` below its
    loudest frame (``margin_s`` kept either side)."""
    frame = SAMPLE_RATE // 100
    n = len(x) // frame
    if n == 0:
        return x
    energy = (x[:n * frame].reshape(n, frame).astype(np.float64) ** 2).mean(1)
    loud = np.flatnonzero(energy > energy.max() * 10 ** (threshold_db / 10))
    margin = int(margin_s * SAMPLE_RATE)
    return x[max(0, loud[0] * frame - margin):min(len(x), (loud[-1] + 1) * frame + margin)]


def dynamic_range_db(x: np.ndarray) -> float:
    """10 log10 of the 95th over the 10th percentile of the 10 ms frame energies of ``x`` (samples,):
    high for speech over silence, low when a recording's pauses hold noise."""
    frame = SAMPLE_RATE // 100
    n = len(x) // frame
    if n < 2:
        return 0.0
    energy = (np.asarray(x[:n * frame], dtype=np.float64).reshape(n, frame) ** 2).mean(1) + 1e-20
    return float(10 * np.log10(np.percentile(energy, 95) / np.percentile(energy, 10)))


def _load_words(files: list[Path]) -> tuple[list[tuple[str, np.ndarray]], float]:
    """[(file stem, trimmed 16 kHz mono float64)] of each readable file of 0.15-4 s speech (others
    skipped), and the median :func:`dynamic_range_db` of their raw recordings."""
    out, ranges = [], []
    for f in files:
        try:
            raw = to_mono_16k(*read_audio(f)).astype(np.float64)
        except AudioError:
            continue
        x = trim_silence(raw)
        if 0.15 * SAMPLE_RATE <= len(x) <= 4 * SAMPLE_RATE and np.abs(x).max() > 1e-3:
            out.append((f.stem, x))
            ranges.append(dynamic_range_db(raw))
    return out, float(np.median(ranges)) if ranges else 0.0


def split_speakers(speakers, split: str, seed: int = 0) -> list[str]:
    """The speakers of ``split``: a seeded permutation of the sorted ids, whose first
    :data:`VALID_SPEAKERS` are "valid", the next :data:`TRAIN_SPEAKERS` "train" and the rest
    "test" (no two splits share a speaker)."""
    if split not in SPLITS + ("train",):
        raise ValueError(f"split: expected one of {SPLITS + ('train',)}, got {split!r}")
    ids = sorted(speakers)
    if len(ids) <= VALID_SPEAKERS + TRAIN_SPEAKERS + 1:
        raise ValueError(f"source_dir: need more than {VALID_SPEAKERS + TRAIN_SPEAKERS + 1} speakers for separate "
                         f"valid, train and test speakers, found {len(ids)} ({ids})")
    order = [ids[i] for i in np.random.default_rng([seed, 11]).permutation(len(ids))]
    cut = VALID_SPEAKERS + TRAIN_SPEAKERS
    return sorted({"valid": order[:VALID_SPEAKERS], "train": order[VALID_SPEAKERS:cut], "test": order[cut:]}[split])


def training_utterances(source_dir=KTUBERLING_DIR, seed: int = 0, utts_per_speaker: int = 10,
                        words_per_utt: int = 5) -> list[tuple[str, str, np.ndarray]]:
    """Clean utterances of the "train" speakers (never valid or test): [(speaker, words, float64
    16 kHz)], built like the evaluation set's (:func:`build_realtest`), for a training corpus."""
    all_speakers = find_speakers(source_dir)
    speakers = {k: all_speakers[k] for k in split_speakers(all_speakers, "train", int(seed))}
    return _training_utterances(speakers, seed, utts_per_speaker, words_per_utt)


def folder_utterances(source_dir, seed: int = 0, utts_per_speaker: int = 10, words_per_utt: int = 4,
                      exclude=()) -> list[tuple[str, str, np.ndarray]]:
    """Clean utterances of EVERY speaker of a folder used for training only (e.g. Hedgewars' voice
    packs, ``/usr/share/games/hedgewars/Data/Sounds/voices``; one sub-folder per speaker), speakers
    named in ``exclude`` left out: [(speaker, words, float64 16 kHz)], built as :func:`build_realtest` does."""
    speakers = {k: v for k, v in find_speakers(source_dir).items() if k not in set(exclude)}
    return _training_utterances(speakers, seed, utts_per_speaker, words_per_utt)


def _training_utterances(speakers: dict[str, list[Path]], seed, utts_per_speaker, words_per_utt):
    """[(speaker, words, float64 16 kHz)] of :func:`_utterances`, as a training corpus takes them."""
    utts, _ = _utterances(speakers, int(seed), int(utts_per_speaker), int(words_per_utt))
    return [(spk, " ".join(words), x) for _, spk, words, x in utts]


def _utterances(speakers: dict[str, list[Path]], seed: int, utts_per_speaker: int, words_per_utt: int):
    """[(name, speaker, words, clean float64)] (each speaker's words shuffled and taken in turn) and
    ``{speaker: reason}`` for the speakers left out."""
    utts, excluded = [], {}
    for spk, files in sorted(speakers.items()):
        k = int.from_bytes(spk.encode()[:8], "little")  # the speaker's own stream: independent of the split
        words, dynamic_range = _load_words(files)
        if len(words) < words_per_utt:
            excluded[spk] = f"{len(words)} usable recordings (< {words_per_utt} words per utterance)"
            continue
        if dynamic_range < MIN_DYNAMIC_RANGE_DB:
            excluded[spk] = f"noisy recordings: dynamic range {dynamic_range:.1f} dB < {MIN_DYNAMIC_RANGE_DB:g} dB"
            continue
        rng = np.random.default_rng([seed, k])
        order = rng.permutation(len(words))
        for j in range(utts_per_speaker):
            pick = [words[order[(j * words_per_utt + w) % len(words)]] for w in range(words_per_utt)]
            parts = []
            for _, x in pick:
                parts += [x / (np.sqrt(np.mean(x ** 2)) + 1e-12),  # words of one file set differ in level
                          np.zeros(int(rng.uniform(0.15, 0.35) * SAMPLE_RATE))]
            utts.append((f"{spk.replace('_', '-')}_{j + 1:03d}", spk, [w for w, _ in pick], np.concatenate(parts[:-1])))
    return utts, excluded


def _babble_noise(n: int, rng: np.random.Generator, others: list[np.ndarray]) -> np.ndarray:
    """Sum of 3-5 other speakers' utterances (unit RMS each, looped from a random start), unit RMS."""
    x = np.zeros(n)
    for k in rng.choice(len(others), size=min(len(others), int(rng.integers(3, 6))), replace=False):
        s = np.resize(np.roll(others[k], int(rng.integers(len(others[k])))), n)
        x += s / (np.sqrt(np.mean(s ** 2)) + 1e-12)
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def _check_params(params: dict, out_dir: Path, overwrite: bool) -> bool:
    """True when ``out_dir`` already holds the finished set of ``params``."""
    manifest, marker = out_dir / MANIFEST, out_dir / PARAMS
    old = json.loads(marker.read_text()) if marker.is_file() else None
    if old is not None and old != params:
        if not overwrite:
            raise FileExistsError(f"{out_dir} holds a real-speech set made with other parameters ({old}); "
                                  f"pass overwrite=True or choose another folder")
        manifest.unlink(missing_ok=True)
        for subset in SUBSETS:
            for split_dir in SPLIT_DIRS["test"]:
                for f in (out_dir / subset / (split_dir + SUFFIX_16K)).glob("*.wav"):
                    f.unlink()
    elif old is not None and manifest.is_file():
        return True
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(marker, json.dumps(params))
    return False


def eval_noise_bank(split: str, noise_roots=None):
    """The held-out recorded noise of ``split`` ("valid" or "test"; recordings no training corpus
    uses), or None when its package is not installed under any of ``noise_roots``."""
    from . import recorded_noise

    sources = [s for s in recorded_noise.SOURCES if s.role == "eval"]
    recordings = [r for r in recorded_noise.find_recordings(noise_roots or NOISE_ROOTS, sources) if r.split == split]
    return recorded_noise.load_bank(recordings, split) if recordings else None


def build_realtest(out_dir, seed: int = 0, source_dir=KTUBERLING_DIR, split: str = "test", utts_per_speaker: int = 3,
                   words_per_utt: int = 5, snrs=REAL_SNRS, overwrite: bool = False, noise_roots=None) -> Path:
    """Writes the real-speech evaluation set (see the module docstring) to ``out_dir``; returns it.

    ``split``: "test" (the set to report) or "valid" (:data:`VALID_SPEAKERS` other speakers, to
    choose a recipe on without looking at the test speakers); see :func:`split_speakers`.

    Utterance ``i`` gets stationary noise ``STATIONARY_NOISES[i % 3]`` and SNR ``snrs[(i // 3) %
    len(snrs)]``, so every (noise, SNR) pair occurs; its babble twin has the same SNR. Clean and
    noisy are scaled together to -30..-20 dBFS clean RMS and never clip. Its ``recorded`` twin gets
    an excerpt of held-out recorded ambience ``i % k`` of the ``k`` recordings of ``split``
    (:func:`eval_noise_bank`; fire, waves and creaking, insects at night... never used in training)
    at the same SNR; without that package (``apt-get install wesnoth-1.16-data``) the recorded
    subset is left out and the manifest says so (``noise_roots``: where to look, default
    :data:`NOISE_ROOTS`). Files already written
    are kept (each follows from ``seed`` and its index alone); a folder made with other
    parameters raises unless ``overwrite=True``.
    """
    out_dir = Path(out_dir)
    if int(seed) != seed or seed < 0:
        raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
    for key, value in (("utts_per_speaker", utts_per_speaker), ("words_per_utt", words_per_utt)):
        if int(value) != value or value < 1:
            raise ValueError(f"{key}: expected an integer >= 1, got {value!r}")
    snrs = [float(s) for s in snrs]
    if not snrs:
        raise ValueError("snrs: expected a non-empty list of SNRs in dB")
    all_speakers = find_speakers(source_dir)
    speakers = {k: all_speakers[k] for k in split_speakers(all_speakers, split, int(seed))}
    params = dict(seed=int(seed), source_dir=str(source_dir), split=split, min_dynamic_range_db=MIN_DYNAMIC_RANGE_DB,
                  valid_speakers=VALID_SPEAKERS, train_speakers=TRAIN_SPEAKERS,
                  utts_per_speaker=int(utts_per_speaker),
                  words_per_utt=int(words_per_utt), snrs=snrs, stationary_noises=list(STATIONARY_NOISES),
                  sample_rate=SAMPLE_RATE)
    bank = eval_noise_bank(split, noise_roots)
    if bank is not None:  # only then, so that sets built without the package stay valid
        params["recorded_noise"] = sorted(name for recs in bank.recordings.values() for name, _ in recs)
    if _check_params(params, out_dir, overwrite):
        return out_dir

    utts, excluded = _utterances(speakers, int(seed), int(utts_per_speaker), int(words_per_utt))
    if len({u[1] for u in utts}) < 2:
        raise ValueError(f"source_dir: {source_dir} needs at least 2 {split} speakers with >= {words_per_utt} usable, "
                         f"clean recordings each (babble is made of other speakers); left out: {excluded}")
    files = []
    for i, (name, spk, words, clean) in enumerate(utts):
        rng = np.random.default_rng([seed, 7_000_003, i])
        snr = snrs[(i // len(STATIONARY_NOISES)) % len(snrs)]
        kind = STATIONARY_NOISES[i % len(STATIONARY_NOISES)]
        clean = clean * 10 ** (rng.uniform(-30, -20) / 20) / (np.sqrt(np.mean(clean ** 2)) + 1e-12)
        others = [u[3] for u in utts if u[1] != spk]
        noises = {"stationary": make_noise(kind, len(clean), rng), "babble": _babble_noise(len(clean), rng, others)}
        recorded_name = None
        if bank is not None:
            family = bank.families[0]
            noises["recorded"], recorded_name = bank.draw(family, i, len(clean), np.random.default_rng([seed, 7_000_019, i]))
        for subset, noise in noises.items():
            noisy = mix_at_snr(clean, noise, snr)
            scale = min(1.0, 0.99 / max(np.abs(noisy).max(), np.abs(clean).max()))
            clean_dir, noisy_dir = (out_dir / subset / (d + SUFFIX_16K) for d in SPLIT_DIRS["test"])
            if not (noisy_dir / f"{name}.wav").is_file():  # resume: a finished pair is kept
                write_audio(clean_dir / f"{name}.wav", clean * scale, SAMPLE_RATE, subtype="PCM_16")
                write_audio(noisy_dir / f"{name}.wav", noisy * scale, SAMPLE_RATE, subtype="PCM_16")
        files.append(dict(name=name, speaker=spk, words=words, stationary_noise=kind, snr_db=snr,
                          seconds=round(len(clean) / SAMPLE_RATE, 3),
                          **({"recorded_noise": Path(recorded_name.split(":", 1)[1]).stem} if recorded_name else {})))
    manifest = dict(params=params, source="ktuberling-data (Debian), GPL-2+: words spoken by real people",
                    speakers=sorted({f["speaker"] for f in files}), excluded_speakers=excluded, files=files,
                    subsets=[k for k in SUBSETS if k != "recorded" or bank is not None],
                    recorded_noise=("wesnoth-1.16-data (Debian), GPL-2+: recorded ambiences held out of training"
                                    if bank is not None else "left out: `apt-get install wesnoth-1.16-data`"))
    write_text_atomic(out_dir / MANIFEST, json.dumps(manifest, indent=1))
    return out_dir
