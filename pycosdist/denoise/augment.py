"""Speech augmentation for the synthetic training corpus: make synthesized voices less uniform.

espeak-ng voices are spectrally cleaner and more alike than real people recorded through real
microphones in real rooms; a model trained on them alone learns what "speech" is too narrowly and
suppresses parts of a real voice (measured in issue 10: STOI fell on real speech). Each function
takes float64 (samples,) at 16 kHz and a ``numpy.random.Generator``; the output follows from the
generator's state alone (used per utterance with a seeded generator, so the corpus stays
deterministic).
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from scipy.signal import fftconvolve, resample_poly

from .audio import SAMPLE_RATE


def random_eq(x: np.ndarray, rng: np.random.Generator, max_tilt_db_per_octave: float = 3.0,
              max_peak_db: float = 8.0) -> np.ndarray:
    """``x`` through a random smooth EQ: a spectral tilt of up to +-``max_tilt_db_per_octave`` around
    1 kHz plus one peak/notch of up to +-``max_peak_db`` (centre 200 Hz-5 kHz, 0.5-1.5 octaves
    wide), like different microphones, mouths and distances. Zero-phase (applied in the DFT)."""
    f = np.maximum(np.fft.rfftfreq(len(x), 1.0 / SAMPLE_RATE), 50.0)
    octaves = np.log2(f / 1000.0)
    centre = np.log2(rng.uniform(200.0, 5000.0) / 1000.0)
    gain_db = (rng.uniform(-max_tilt_db_per_octave, max_tilt_db_per_octave) * octaves
               + rng.uniform(-max_peak_db, max_peak_db) * np.exp(-0.5 * ((octaves - centre) / rng.uniform(0.5, 1.5)) ** 2))
    return np.fft.irfft(np.fft.rfft(x) * 10 ** (np.clip(gain_db, -20, 20) / 20), len(x))


def simulated_rir(rng: np.random.Generator, rt60: float) -> np.ndarray:
    """A room impulse response (samples,): the direct path (1.0) then, after a 1-10 ms gap,
    exponentially decaying noise whose energy falls 60 dB in ``rt60`` seconds, at a random
    direct-to-reverberant ratio of 3-12 dB (a talker near the microphone)."""
    if not rt60 > 0:
        raise ValueError(f"rt60: expected seconds > 0, got {rt60!r}")
    gap = int(rng.uniform(0.001, 0.010) * SAMPLE_RATE)
    t = np.arange(int(rt60 * SAMPLE_RATE)) / SAMPLE_RATE
    tail = rng.standard_normal(len(t)) * 10 ** (-3 * t / rt60)  # amplitude: -60 dB of energy at rt60
    tail *= 10 ** (-rng.uniform(3, 12) / 20) / (np.sqrt(np.sum(tail ** 2)) + 1e-12)
    return np.concatenate([[1.0], np.zeros(gap), tail])


def reverberate(x: np.ndarray, rir: np.ndarray) -> np.ndarray:
    """``x`` convolved with ``rir``, cut to ``len(x)`` (the direct path keeps its timing)."""
    return fftconvolve(x, rir)[:len(x)]


def speed_perturb(x: np.ndarray, factor: float) -> np.ndarray:
    """``x`` played ``factor`` times faster (tempo and pitch together), by polyphase resampling with
    the ratio ``factor`` rounded to a fraction of denominator <= 50 (e.g. 0.9 = 9/10)."""
    if not 0.5 <= factor <= 2.0:
        raise ValueError(f"factor: expected 0.5..2.0, got {factor!r}")
    ratio = Fraction(factor).limit_denominator(50)
    return resample_poly(x, ratio.denominator, ratio.numerator)


def augment_speech(x: np.ndarray, rng: np.random.Generator, p_speed: float = 0.5, p_reverb: float = 0.3) -> np.ndarray:
    """The corpus's clean-speech augmentation: with probability ``p_speed`` a speed change of
    0.9-1.1, always :func:`random_eq`, with probability ``p_reverb`` a small room (RT60 0.1-0.4 s).
    The result is the clean TARGET as well as the source of the noisy input (we denoise; a
    slightly reverberant or coloured voice is still the voice to keep)."""
    if rng.uniform() < p_speed:
        x = speed_perturb(x, float(rng.choice([0.9, 0.95, 1.05, 1.1])))
    x = random_eq(x, rng)
    if rng.uniform() < p_reverb:
        x = reverberate(x, simulated_rir(rng, rng.uniform(0.1, 0.4)))
    return x
