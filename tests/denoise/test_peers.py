"""The peers (RNNoise, DeepFilterNet3, spectral gating): their measured delays are compensated, so
``enhance`` returns output aligned with the input (cross-correlation peak at lag 0 on speech)."""

import numpy as np
import pytest

from pycosdist.denoise import peers

pytest.importorskip("scipy")


def _installed(name):
    return peers.available_peers()[name] is None


STREAMING = [pytest.param(n, marks=pytest.mark.skipif(not _installed(n), reason=f"{n}: {peers.available_peers()[n]}"))
             for n in ("rnnoise", "deepfilternet3")]


@pytest.fixture(scope="module")
def speech_16k():
    """Two seconds of espeak-ng speech at 16 kHz with a little white noise (speech-like, not periodic)."""
    pytest.importorskip("espeakng_loader")
    from pycosdist.denoise.synth import _Espeak

    es = _Espeak.get()
    s = es.synth("Please carry the golden basket across the station before Laura arrives.", "en-us", "m3", 170, 45, 3)
    x = peers._resample(s, es.sample_rate, 16000)
    return x + 0.003 * np.random.default_rng(0).standard_normal(x.size).astype(np.float32)


def _lag(y, x):
    """The lag (samples) at which ``y`` best matches ``x`` (positive: y is late), by full cross-correlation."""
    c = np.correlate(y, x, mode="full")
    return int(c.argmax()) - (x.size - 1)


def test_available_peers_and_unknown_name():
    avail = peers.available_peers()
    assert tuple(avail) == peers.PEERS
    assert all(v is None or v.startswith("pip install") for v in avail.values())
    with pytest.raises(ValueError, match="name: unknown peer 'nope'"):
        peers.load_peer("nope")


@pytest.mark.parametrize("name", STREAMING)
def test_stream_delay_is_the_measured_one(name, speech_16k):
    """Raw frame-by-frame output lags the input by exactly ``delay_samples`` (at 48 kHz)."""
    peer = peers.load_peer(name)
    x = peers._resample(speech_16k, 16000, peer.sample_rate)
    x = x[:x.size // peer.frame_length * peer.frame_length]
    peer.reset()
    y = np.concatenate([peer.process_frame(f) for f in x.reshape(-1, peer.frame_length)])
    assert y.dtype == np.float32 and y.shape == x.shape
    assert _lag(y, x) == peer.delay_samples


@pytest.mark.parametrize("name", STREAMING + ["spectral_gating"])
def test_enhance_is_aligned_and_same_length(name, speech_16k):
    peer = peers.load_peer(name)
    y = peer.enhance(speech_16k, 16000)
    assert y.dtype == np.float32 and y.shape == speech_16k.shape and np.isfinite(y).all()
    assert _lag(y, speech_16k) == 0
    # it denoises, it does not pass the input through: the output differs from the input
    assert np.abs(y - speech_16k).max() > 1e-3
    # a fresh stream per clip: the same clip twice gives the same output
    np.testing.assert_array_equal(peer.enhance(speech_16k, 16000), y)


@pytest.mark.parametrize("name", STREAMING)
def test_bad_frame_and_bad_wave(name):
    peer = peers.load_peer(name)
    with pytest.raises(ValueError, match=r"frame: expected shape \(480,\)"):
        peer.process_frame(np.zeros(100, np.float32))
    with pytest.raises(ValueError, match="wave: expected a non-empty"):
        peer.enhance(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="sample_rate"):
        peer.enhance(np.zeros(100, np.float32), sample_rate=0)


@pytest.mark.parametrize("name", STREAMING + ["spectral_gating"])
def test_peer_enhancer_pickles_without_its_state(name, speech_16k):
    """What evaluate(enhance_in_workers=True) ships to its workers: a callable that pickles after use
    (its C state left behind) and gives the peer's own output, in this process and after the trip."""
    import pickle

    enhancer = peers.PeerEnhancer(name)
    y = enhancer(speech_16k)
    np.testing.assert_array_equal(y, peers.load_peer(name).enhance(speech_16k, 16000))
    copy = pickle.loads(pickle.dumps(enhancer))
    assert copy._peer is None
    np.testing.assert_array_equal(copy(speech_16k), y)
    with pytest.raises(ValueError, match="name: unknown peer 'nope'"):
        peers.PeerEnhancer("nope")
