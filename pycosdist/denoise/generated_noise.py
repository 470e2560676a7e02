"""Generated noises: colored, hum, bursts, babble, speech-shaped, traffic-like, music-like, clicks.

Each is unit-RMS float64 at 16 kHz and follows from the ``numpy.random.Generator`` it is given, so a
corpus built from them is deterministic. They complement the recorded noise of
:mod:`pycosdist.denoise.recorded_noise`: generated noise covers the stationary extremes (white,
brown, hum) exactly; recordings bring what real rooms and streets sound like.
"""

from __future__ import annotations

import numpy as np

from .audio import SAMPLE_RATE

NOISE_TYPES = ("white", "pink", "brown", "babble", "hum", "bursts", "speech_shaped", "traffic", "tones", "clicks")


def _colored(n: int, rng: np.random.Generator, alpha: float) -> np.ndarray:
    """Noise with power spectrum ~ 1/f^alpha (flattened below 20 Hz so brown noise has no drift)."""
    spec = np.fft.rfft(rng.standard_normal(n))
    f = np.maximum(np.fft.rfftfreq(n, 1.0 / SAMPLE_RATE), 20.0)
    spec *= f ** (-alpha / 2)
    spec[0] = 0
    return np.fft.irfft(spec, n)


def _hum(n: int, rng: np.random.Generator) -> np.ndarray:
    f0 = rng.choice([50.0, 60.0]) * (1 + rng.uniform(-0.005, 0.005))
    t = np.arange(n) / SAMPLE_RATE
    decay = rng.uniform(0.5, 1.5)
    x = sum(h ** -decay * np.sin(2 * np.pi * f0 * h * t + rng.uniform(0, 2 * np.pi)) for h in range(1, 11))
    return x + 0.02 * rng.standard_normal(n)  # a faint broadband floor, like real mains-powered gear


def _bursts(n: int, rng: np.random.Generator) -> np.ndarray:
    """Band-limited noise bursts (50-400 ms, Hann envelopes) over a faint floor: non-stationary."""
    x = 0.02 * rng.standard_normal(n)
    for _ in range(int(rng.integers(3, 9))):
        length = min(n, int(rng.uniform(0.05, 0.4) * SAMPLE_RATE))
        start = int(rng.integers(0, n - length + 1))
        lo = rng.uniform(100, 3000)
        spec = np.fft.rfft(rng.standard_normal(length))
        f = np.fft.rfftfreq(length, 1.0 / SAMPLE_RATE)
        spec[(f < lo) | (f > lo * rng.uniform(1.5, 4))] = 0
        x[start:start + length] += rng.uniform(0.3, 1.0) * np.fft.irfft(spec, length) * np.hanning(length)
    return x


def _babble(n: int, rng: np.random.Generator, pool: list[np.ndarray]) -> np.ndarray:
    """Sum of 3-5 utterances from ``pool`` (other speakers), each looped from a random start."""
    x = np.zeros(n)
    for k in rng.choice(len(pool), size=min(len(pool), int(rng.integers(3, 6))), replace=False):
        s = pool[k]
        s = np.resize(np.roll(s, int(rng.integers(len(s)))), n)  # np.resize tiles cyclically
        x += s / (np.sqrt(np.mean(s ** 2)) + 1e-8)
    return x


def _speech_shaped(n: int, rng: np.random.Generator, pool: list[np.ndarray]) -> np.ndarray:
    """Stationary noise with the long-term average spectrum of a few utterances of ``pool``."""
    picks = [pool[k] for k in rng.choice(len(pool), size=min(len(pool), 4), replace=False)]
    lta = np.mean([np.abs(np.fft.rfft(np.resize(p, n))) ** 2 for p in picks], axis=0)
    smooth = np.convolve(lta, np.ones(65) / 65, mode="same")  # no harmonic lines: a spectral envelope
    return np.fft.irfft(np.fft.rfft(rng.standard_normal(n)) * np.sqrt(smooth), n)


def _traffic(n: int, rng: np.random.Generator) -> np.ndarray:
    """Low rumble (brown noise) swelling slowly as vehicles pass (0.05-0.3 Hz), plus a faint hiss."""
    t = np.arange(n) / SAMPLE_RATE
    swell = 1.0 + 0.8 * np.sin(2 * np.pi * rng.uniform(0.05, 0.3) * t + rng.uniform(0, 2 * np.pi))
    rumble = _colored(n, rng, 2.0)
    return swell * rumble / (np.sqrt(np.mean(rumble ** 2)) + 1e-12) + 0.1 * rng.standard_normal(n)


def _tones(n: int, rng: np.random.Generator) -> np.ndarray:
    """Music-like: a sequence of 150-600 ms notes (random pitches of a scale, 1-3 voices, decaying
    harmonics, short fades)."""
    x = np.zeros(n)
    start = 0
    while start < n:
        length = min(n - start, int(rng.uniform(0.15, 0.6) * SAMPLE_RATE))
        t = np.arange(length) / SAMPLE_RATE
        env = np.minimum(1.0, np.minimum(t, t[::-1]) / 0.01) * np.exp(-t * rng.uniform(0.5, 4))
        for _ in range(int(rng.integers(1, 4))):
            f0 = 110.0 * 2 ** (int(rng.integers(0, 36)) / 12)
            x[start:start + length] += env * sum(0.6 ** h * np.sin(2 * np.pi * f0 * (h + 1) * t)
                                                 for h in range(6) if f0 * (h + 1) < 7000)
        start += length
    return x + 0.01 * rng.standard_normal(n)


def _clicks(n: int, rng: np.random.Generator) -> np.ndarray:
    """Sparse clicks and short knocks (decaying resonances, 5-40 per second) over a faint floor."""
    x = 0.02 * rng.standard_normal(n)
    for _ in range(max(1, int(n / SAMPLE_RATE * rng.uniform(5, 40)))):
        length = min(n, int(rng.uniform(0.002, 0.03) * SAMPLE_RATE))
        start = int(rng.integers(0, n - length + 1))
        t = np.arange(length) / SAMPLE_RATE
        x[start:start + length] += (rng.uniform(0.2, 1.0) * np.exp(-t * rng.uniform(200, 2000))
                                    * np.sin(2 * np.pi * rng.uniform(300, 6000) * t + rng.uniform(0, 2 * np.pi)))
    return x


def make_noise(kind: str, n: int, rng: np.random.Generator, babble_pool: list[np.ndarray] | None = None) -> np.ndarray:
    """Unit-RMS float64 noise of ``kind`` (one of :data:`NOISE_TYPES`) and length ``n``."""
    if kind == "white":
        x = rng.standard_normal(n)
    elif kind == "pink":
        x = _colored(n, rng, 1.0)
    elif kind == "brown":
        x = _colored(n, rng, 2.0)
    elif kind == "hum":
        x = _hum(n, rng)
    elif kind == "bursts":
        x = _bursts(n, rng)
    elif kind in ("babble", "speech_shaped"):
        if not babble_pool:
            raise ValueError(f"{kind} noise needs a non-empty babble_pool of other speakers' speech")
        x = (_babble if kind == "babble" else _speech_shaped)(n, rng, babble_pool)
    elif kind == "traffic":
        x = _traffic(n, rng)
    elif kind == "tones":
        x = _tones(n, rng)
    elif kind == "clicks":
        x = _clicks(n, rng)
    else:
        raise ValueError(f"kind: expected one of {NOISE_TYPES}, got {kind!r}")
    return x / (np.sqrt(np.mean(x ** 2)) + 1e-12)


def mix_at_snr(clean: np.ndarray, noise: np.ndarray, snr_db: float) -> np.ndarray:
    """clean + g * noise with g chosen so that 10 log10(P_clean / P_noise) = snr_db."""
    p_clean = np.mean(clean.astype(np.float64) ** 2)
    p_noise = np.mean(noise.astype(np.float64) ** 2)
    return clean + noise * np.sqrt(p_clean / (p_noise * 10 ** (snr_db / 10)))
