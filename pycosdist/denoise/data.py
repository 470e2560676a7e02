"""Paired noisy/clean speech corpora in the VoiceBank+DEMAND layout.

Layout (VoiceBank+DEMAND and :mod:`pycosdist.synth` share it)::

    root/clean_trainset_28spk_wav[_16k]/p226_001.wav   root/noisy_trainset_28spk_wav[_16k]/p226_001.wav
    root/clean_testset_wav[_16k]/p232_001.wav          root/noisy_testset_wav[_16k]/p232_001.wav

File names are ``<speaker>_<utt>.wav``. ``_16k`` directories hold 16 kHz copies and are preferred;
:func:`prepare_16k` makes them once from the original (e.g. 48 kHz) directories.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import soundfile as sf
import torch

from .audio import SAMPLE_RATE, AudioError, read_audio, to_mono_16k, write_audio

SPLIT_DIRS = {
    "train": ("clean_trainset_28spk_wav", "noisy_trainset_28spk_wav"),
    "test": ("clean_testset_wav", "noisy_testset_wav"),
}
SUFFIX_16K = "_16k"
# Files shorter than this are skipped: PESQ cannot score under 0.25 s, so they are useless both
# for training crops and for evaluation.
MIN_SECONDS = 0.25


class Pair(NamedTuple):
    name: str  # file stem, e.g. "p226_001"
    speaker: str  # "p226"
    clean_path: Path
    noisy_path: Path


class Corpus(NamedTuple):
    train: "PairedAudioDataset"
    valid: "PairedAudioDataset"
    test: "PairedAudioDataset"


def find_split_dirs(root, split: str) -> tuple[Path, Path]:
    """Returns ``(clean_dir, noisy_dir)`` of ``split`` ('train' | 'test') under ``root``,
    preferring the ``_16k`` pair over the original pair."""
    if split not in SPLIT_DIRS:
        raise ValueError(f"split: expected one of {sorted(SPLIT_DIRS)}, got {split!r}")
    root = Path(root)
    clean, noisy = SPLIT_DIRS[split]
    candidates = [(root / (clean + SUFFIX_16K), root / (noisy + SUFFIX_16K)), (root / clean, root / noisy)]
    for c, n in candidates:
        if c.is_dir() and n.is_dir():
            return c, n
    looked = ", ".join(f"{c.name} + {n.name}" for c, n in candidates)
    raise FileNotFoundError(f"no {split} split under {root}: looked for directory pairs {looked}")


def _has_split(root: Path, split: str) -> bool:
    try:
        find_split_dirs(root, split)
        return True
    except FileNotFoundError:
        return False


def _wav_files(d: Path) -> list[Path]:
    # Hidden files are skipped: they include write_audio's in-flight temporaries.
    return sorted(p for p in d.iterdir() if p.suffix.lower() == ".wav" and not p.name.startswith("."))


def prepare_16k(root) -> Path:
    """Resamples every original (non-``_16k``) split directory under ``root`` to 16 kHz mono
    into its ``_16k`` sibling, once: files already converted are skipped, writes are atomic, so an
    interrupted run resumes where it stopped. Returns ``root``."""
    root = Path(root)
    for names in SPLIT_DIRS.values():
        for name in names:
            src = root / name
            if not src.is_dir():
                continue
            dst = root / (name + SUFFIX_16K)
            dst.mkdir(exist_ok=True)
            for f in _wav_files(src):
                out = dst / f.name
                if out.exists():
                    continue
                try:
                    x, sr = read_audio(f)
                except AudioError as e:
                    # Copied unchanged so pairing still matches; the dataset skips it with a warning.
                    warnings.warn(f"prepare_16k: copying unreadable {e.path} unchanged: {e.reason}")
                    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
                    shutil.copyfile(f, tmp)
                    os.replace(tmp, out)
                    continue
                write_audio(out, to_mono_16k(x, sr), SAMPLE_RATE)
    return root


def _speaker_of(name: str) -> str:
    return name.rsplit("_", 1)[0] if "_" in name else name


def pair_files(clean_dir, noisy_dir) -> list[Pair]:
    """Pairs ``*.wav`` files of the same name in ``clean_dir`` and ``noisy_dir`` (sorted by name).
    Raises ValueError naming the unmatched files when the two sets differ."""
    clean_dir, noisy_dir = Path(clean_dir), Path(noisy_dir)
    for d, arg in ((clean_dir, "clean_dir"), (noisy_dir, "noisy_dir")):
        if not d.is_dir():
            raise FileNotFoundError(f"{arg}: {d} is not a directory")
    clean = {p.name: p for p in _wav_files(clean_dir)}
    noisy = {p.name: p for p in _wav_files(noisy_dir)}
    if clean.keys() != noisy.keys():
        msg = []
        for missing, where in ((sorted(clean.keys() - noisy.keys()), noisy_dir), (sorted(noisy.keys() - clean.keys()), clean_dir)):
            if missing:
                more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
                msg.append(f"{len(missing)} file(s) missing from {where}: {', '.join(missing[:5])}{more}")
        raise ValueError("clean and noisy files do not match: " + "; ".join(msg))
    if not clean:
        raise ValueError(f"no .wav files in {clean_dir}")
    return [Pair(Path(n).stem, _speaker_of(Path(n).stem), clean[n], noisy[n]) for n in sorted(clean)]


def speaker_split(pairs: Sequence[Pair], valid_speakers: int | Sequence[str]) -> tuple[list[Pair], list[Pair]]:
    """Holds out whole speakers: ``valid_speakers`` is a count (the last N speaker ids in sorted
    order) or an explicit list of ids. Returns ``(train_pairs, valid_pairs)``, order preserved."""
    speakers = sorted({p.speaker for p in pairs})
    if isinstance(valid_speakers, (int, np.integer)):
        n = int(valid_speakers)
        if not 0 <= n < len(speakers):
            raise ValueError(f"valid_speakers: expected 0 <= N < {len(speakers)} (the number of speakers), got {n}")
        held = set(speakers[len(speakers) - n:])
    else:
        held = set(valid_speakers)
        unknown = sorted(held - set(speakers))
        if unknown:
            raise ValueError(f"valid_speakers: unknown speaker id(s) {unknown}; known: {speakers}")
        if held == set(speakers):
            raise ValueError("valid_speakers: holding out every speaker leaves no training data")
    return [p for p in pairs if p.speaker not in held], [p for p in pairs if p.speaker in held]


def _check_header(path: Path) -> str | None:
    """Cheap validity check from the file header; returns a reason to skip, or None."""
    try:
        info = sf.info(str(path))
    except Exception as e:
        return f"not a readable audio file ({type(e).__name__})"
    if info.frames <= 0:
        return "empty (0 samples)"
    if info.frames / info.samplerate < MIN_SECONDS:
        return f"too short ({info.frames / info.samplerate:.3f} s < {MIN_SECONDS} s)"
    return None


class PairedAudioDataset(torch.utils.data.Dataset):
    """``(noisy, clean)`` float32 16 kHz mono tensors of shape (samples,).

    - ``segment_seconds=None``: whole files (noisy and clean trimmed to the shorter of the two).
    - ``segment_seconds=s``: a random crop of round(s * 16000) samples at the same offset in both,
      zero-padded at the end when the file is shorter. The offset comes from an RNG seeded by
      ``(seed, epoch, index)``, so a crop is reproducible and a resumed run sees the same crops;
      call :meth:`set_epoch` each epoch (DataLoader workers pick it up when a new iterator starts).

    Construction checks every file's header and skips (with a warning naming it) files that are
    not audio, empty, or shorter than :data:`MIN_SECONDS`. Audio is decoded lazily and cached
    (per process) in memory; a file whose data fails to decode later raises :class:`AudioError`.
    """

    def __init__(self, pairs: Sequence[Pair], segment_seconds: float | None = None, seed: int = 0):
        if segment_seconds is not None and not segment_seconds > 0:
            raise ValueError(f"segment_seconds: expected None or > 0, got {segment_seconds!r}")
        if int(seed) != seed or seed < 0:
            raise ValueError(f"seed: expected a non-negative integer, got {seed!r}")
        self.segment = None if segment_seconds is None else int(round(segment_seconds * SAMPLE_RATE))
        self.seed = int(seed)
        self.epoch = 0
        self.pairs: list[Pair] = []
        skipped = []
        for p in pairs:
            for path in (p.clean_path, p.noisy_path):
                reason = _check_header(path)
                if reason:
                    skipped.append(f"{path} ({reason})")
                    break
            else:
                self.pairs.append(p)
        if skipped:
            warnings.warn(f"PairedAudioDataset: skipped {len(skipped)} unusable file(s): " + "; ".join(skipped))
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.pairs]

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch: expected a non-negative integer, got {epoch!r}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        if i not in self._cache:
            p = self.pairs[i]
            noisy = to_mono_16k(*read_audio(p.noisy_path))
            clean = to_mono_16k(*read_audio(p.clean_path))
            n = min(len(noisy), len(clean))
            self._cache[i] = (noisy[:n], clean[:n])
        return self._cache[i]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"index {i} out of range for dataset of {len(self)}")
        i = i % len(self)
        noisy, clean = self._load(i)
        if self.segment is None:
            return torch.from_numpy(noisy.copy()), torch.from_numpy(clean.copy())
        seg, n = self.segment, len(noisy)
        if n >= seg:
            off = int(np.random.default_rng([self.seed, self.epoch, i]).integers(0, n - seg + 1))
            return torch.from_numpy(noisy[off:off + seg].copy()), torch.from_numpy(clean[off:off + seg].copy())
        pad = lambda x: torch.from_numpy(np.pad(x, (0, seg - n)))
        return pad(noisy), pad(clean)


def load_corpus(root, valid_speakers: int | Sequence[str] = 2, segment_seconds: float | None = 2.0,
                seed: int = 0) -> Corpus:
    """Loads ``root`` (VoiceBank+DEMAND or a synthetic corpus): prepares 16 kHz copies if needed,
    holds out ``valid_speakers`` training speakers for validation. ``train`` yields random crops of
    ``segment_seconds``; ``valid`` and ``test`` yield whole files. A root with a test split only (an
    evaluation set) gives empty ``train`` and ``valid``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"root: corpus directory {root} does not exist")
    prepare_16k(root)
    if _has_split(root, "train"):
        train_pairs, valid_pairs = speaker_split(pair_files(*find_split_dirs(root, "train")), valid_speakers)
    else:  # a test-only set (e.g. pycosdist.denoise.realspeech): nothing to train or validate on
        train_pairs, valid_pairs = [], []
    test_pairs = pair_files(*find_split_dirs(root, "test"))
    return Corpus(
        train=PairedAudioDataset(train_pairs, segment_seconds=segment_seconds, seed=seed),
        valid=PairedAudioDataset(valid_pairs, segment_seconds=None, seed=seed),
        test=PairedAudioDataset(test_pairs, segment_seconds=None, seed=seed),
    )
