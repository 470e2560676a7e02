"""Audio I/O: read any soundfile-supported file, mix to mono 16 kHz, write atomically."""

from __future__ import annotations

import os
from math import gcd
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy.signal import resample_poly

SAMPLE_RATE = 16000
# The file suffixes `pycosdist enhance` picks up in a folder (decoded by soundfile / libsndfile).
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".aiff", ".aif", ".mp3", ".opus")


class AudioError(Exception):
    """An audio file could not be used; ``path`` names it and ``reason`` says why."""

    def __init__(self, path, reason: str):
        self.path = str(path)
        self.reason = reason
        super().__init__(f"cannot use audio file {self.path}: {reason}")


def read_audio(path) -> tuple[np.ndarray, int]:
    """Decodes ``path`` to float32 ``(channels, samples)`` in [-1, 1] and its sample rate.

    Raises :class:`AudioError` for a missing, unreadable, non-audio, empty or non-finite file.
    """
    path = Path(path)
    if not path.is_file():
        raise AudioError(path, "no such file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)  # (samples, channels)
    except Exception as e:  # libsndfile raises LibsndfileError/RuntimeError/TypeError for junk
        raise AudioError(path, f"not a readable audio file ({type(e).__name__}: {e})") from None
    if data.shape[0] == 0:
        raise AudioError(path, "empty (0 samples)")
    if not np.isfinite(data).all():
        raise AudioError(path, "contains NaN/Inf samples")
    return np.ascontiguousarray(data.T), int(sr)


def to_mono_16k(x: np.ndarray, sr: int) -> np.ndarray:
    """Mixes ``x`` (samples,) or (channels, samples) to mono and resamples it to 16 kHz.

    Polyphase resampling by the exact rational ratio 16000/sr (e.g. 1/3 from 48 kHz,
    320/441 from 22.05 kHz). Returns float32 (samples,).
    """
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2:
        x = x.mean(axis=0)
    elif x.ndim != 1:
        raise ValueError(f"x: expected shape (samples,) or (channels, samples), got {x.shape}")
    if int(sr) != sr or sr <= 0:
        raise ValueError(f"sr: expected a positive integer sample rate, got {sr!r}")
    sr = int(sr)
    if sr == SAMPLE_RATE:
        return x.copy()
    g = gcd(SAMPLE_RATE, sr)
    return resample_poly(x, SAMPLE_RATE // g, sr // g).astype(np.float32)


def write_text_atomic(path, text: str) -> Path:
    """Writes ``text`` to ``path`` through a temporary file and ``os.replace``: readers (and a crash)
    see the old file or the new one, never a partial one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_audio(path, x: np.ndarray, sr: int = SAMPLE_RATE, subtype: str | None = None) -> Path:
    """Writes ``x`` (samples,) or (channels, samples) to ``path`` atomically (tmp file + os.replace).

    ``subtype=None`` picks 16-bit PCM when the peak fits in [-1, 1] and 32-bit float otherwise,
    so nothing is ever clipped silently. The format follows the file extension (.wav, .flac).
    """
    path = Path(path)
    x = np.asarray(x, dtype=np.float32)
    if x.ndim not in (1, 2) or x.size == 0:
        raise ValueError(f"x: expected a non-empty (samples,) or (channels, samples) array, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"x: refusing to write NaN/Inf samples to {path}")
    if subtype is None:
        subtype = "PCM_16" if np.abs(x).max() <= 1.0 else "FLOAT"
    data = x.T if x.ndim == 2 else x  # soundfile wants (samples, channels)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        sf.write(str(tmp), data, int(sr), subtype=subtype, format=path.suffix.lstrip(".").upper())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
