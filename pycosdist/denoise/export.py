"""Export a trained denoiser for small devices: TorchScript and ONNX (``pycosdist export``).

What is exported is the network between the STFT and the iSTFT (the "mask net"), so that a device
can use its own (often hardware-accelerated) FFT:

    features (B, 1, 257, T) float32 = |STFT(noisy)| ** 0.3   ->   mask (B, 257, T) float32 in [0, 1]

with the STFT of :class:`pycosdist.models.STFT`: 16 kHz, 512-point FFT, hop 128, periodic Hann
window, centred (reflect-padded) frames, T = n // 128 + 1. The enhanced signal is
``iSTFT(mask * STFT(noisy))`` (noisy phase kept). B and T are dynamic. The sidecar ``model.json``
records all of this. :class:`ExportedDenoiser` runs an exported file with the same STFT, so Python
users (and ``pycosdist enhance --checkpoint model.onnx``) get the PyTorch model's output.
The LIB and every KD module are training-only: they are not part of the student that is exported.

Streaming export (:func:`export_stream`; causal models only): ONE HOP of
the whole model, STFT and overlap-add included, with its state as explicit named inputs and outputs:

    (samples (B, hop), analysis, enc0.., bott0.., dec0.., overlap) -> (enhanced (B, hop), next_analysis, ...)

to be called once per hop, feeding each ``next_*`` output back as the matching input (zeros at the
start of a stream). ``stream.json`` and ``docs/streaming.md`` give every state tensor's name, shape,
dtype and meaning. :class:`ExportedStream` runs such a file hop by hop.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor, nn

from .models import COMPRESS, SAMPLE_RATE, STFT, UNetDenoiser, compress

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
STREAM_FORMATS = {"torchscript": "stream.ts", "onnx": "stream.onnx"}
# Modules of the [export] extra that writing each format needs (running an .onnx file also needs onnxruntime).
NEEDS = {"torchscript": (), "onnx": ("onnx", "onnxscript")}
INSTALL_EXPORT = "pip install 'pycosdist[export]'"


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except ImportError:
        return False
    return True


def _first_line(e: Exception) -> str:
    """``Type: first sentence`` of an exception whose message runs over several lines of advice."""
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0].split('. ')[0]}"


class MaskNet(nn.Module):
    """features (B, 1, F, T) -> mask (B, F, T): the exported part of a :class:`UNetDenoiser`."""

    def __init__(self, model: UNetDenoiser):
        super().__init__()
        self.model = model

    def forward(self, features: Tensor) -> Tensor:
        return self.model.mask_and_latent(features)[0]


def interface(model: UNetDenoiser) -> dict:
    cfg = model.config
    bins = cfg.freq_bins
    return {"sample_rate": SAMPLE_RATE, "n_fft": cfg.n_fft, "hop": cfg.hop, "window": "hann (periodic)",
            "center": not cfg.causal,
            "frames": ("causal: left zero-padding n_fft - hop, right zero-padding to whole hops + n_fft - hop, "
                       "frame t = samples [t*hop - (n_fft - hop), t*hop + hop); iSTFT: overlap-add of "
                       "irfft(frame) * window / sum of window^2 over offsets equal modulo hop"
                       if cfg.causal else "centred, reflect-padded: torch.stft(center=True)"),
            "compression": COMPRESS, "input": {"name": "features", "shape": ["batch", 1, bins, "frames"],
                                               "dtype": "float32", "is": "|STFT(noisy)| ** compression"},
            "output": {"name": "mask", "shape": ["batch", bins, "frames"], "dtype": "float32",
                       "is": "enhanced = iSTFT(mask * STFT(noisy))"},
            "model_config": cfg.to_dict()}


def check_formats(formats) -> None:
    """Raises ValueError for an unknown format, or one whose optional modules are missing (naming the
    extra to install), before anything is written."""
    unknown = [f for f in formats if f not in FORMATS]
    if unknown:
        raise ValueError(f"formats: unknown export format(s) {unknown}; expected some of {list(FORMATS)}")
    missing = sorted({m for f in formats for m in NEEDS[f] if not _importable(m)})
    if missing:
        raise ValueError(f"formats: ONNX export needs the [export] extra (missing: {', '.join(missing)}); install it "
                         f"with {INSTALL_EXPORT}, or export TorchScript only (CLI: --format torchscript)")


def export(model: UNetDenoiser, out_dir, formats=tuple(FORMATS)) -> dict[str, Path]:
    """Writes the mask net of ``model`` in each of ``formats`` to ``out_dir`` plus ``model.json``;
    returns ``{format: path}``. Every file is written to a temporary folder inside ``out_dir`` first
    and moved into place only when all of them are complete: a failed export leaves ``out_dir`` as it was."""
    check_formats(formats)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    net = MaskNet(model.float().eval()).eval()
    example = torch.rand(2, 1, model.config.freq_bins, 50)
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        with torch.no_grad():
            if "torchscript" in formats:
                # Traced: the only shape-dependent Python (ConvTranspose output sizes) concerns the fixed
                # frequency axis, so the trace is valid for any batch size and number of frames.
                torch.jit.trace(net, example).save(str(staging / FORMATS["torchscript"]))
            if "onnx" in formats:
                frames = torch.export.Dim("frames", min=1)
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(net, (example,), str(staging / FORMATS["onnx"]), input_names=["features"],
                                  output_names=["mask"], dynamic_shapes={"features": {0: batch, 3: frames}},
                                  dynamo=True, external_data=False)
        return _publish(staging, out_dir, {f: FORMATS[f] for f in FORMATS if f in formats}, "model.json",
                        interface(model))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out_dir: Path, files: dict[str, str], sidecar: str, info: dict) -> dict[str, Path]:
    """Writes the interface ``sidecar`` (``info`` plus the file names) beside the complete ``files``
    in ``staging``, then moves them all into ``out_dir``, the interface last (it names the files);
    returns ``{format: path}``."""
    (staging / sidecar).write_text(json.dumps({**info, "files": files}, indent=1))
    for name in [*files.values(), sidecar]:
        os.replace(staging / name, out_dir / name)
    return {f: out_dir / name for f, name in files.items()}


class ExportedDenoiser:
    """An exported mask net (``.ts`` or ``.onnx``) with the STFT around it: ``(B, n)`` or ``(n,)``
    waveform -> enhanced waveform of the same shape."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"exported model: no such file {self.path}")
        stream_files = _read_sidecar(self.path, "stream.json").get("files", {}).values()
        if self.path.name in stream_files:
            raise ValueError(f"exported model {self.path}: a one-hop stream export (see stream.json); run it hop by "
                             "hop (pycosdist enhance --stream, or ExportedStream)")
        suffix = self.path.suffix.lower()
        if suffix == ".ts":
            try:
                self._net = torch.jit.load(str(self.path)).eval()
            except Exception as e:  # RuntimeError for anything that is not a TorchScript archive
                raise ValueError(f"exported model {self.path}: not a readable TorchScript file ({_first_line(e)})") from None
            self._run = lambda f: self._net(f)
        elif suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError:
                raise ValueError(f"exported model {self.path}: running an .onnx model needs onnxruntime (the [export] "
                                 f"extra); install it with {INSTALL_EXPORT}") from None
            try:
                session = onnxruntime.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
            except Exception as e:  # onnxruntime's InvalidProtobuf, Fail, ...
                raise ValueError(f"exported model {self.path}: not a readable ONNX model ({_first_line(e)})") from None
            self._run = lambda f: torch.from_numpy(session.run(["mask"], {"features": f.numpy()})[0])
        else:
            raise ValueError(f"exported model {self.path}: expected a .ts (TorchScript) or .onnx file")
        config = _read_sidecar(self.path).get("model_config", {})
        self.stft = STFT(config.get("n_fft", STFT().n_fft), config.get("hop", STFT().hop), config.get("causal", False))

    @torch.no_grad()
    def __call__(self, noisy: Tensor) -> Tensor:
        single = noisy.dim() == 1
        wave = noisy[None] if single else noisy
        if wave.dim() != 2:
            raise ValueError(f"noisy: expected a (samples,) or (batch, samples) waveform, got shape {tuple(noisy.shape)}")
        spec = self.stft(wave.float())
        mask = self._run(compress(spec.abs()).unsqueeze(1).contiguous())
        out = self.stft.inverse(mask * spec, wave.shape[-1])
        return out[0] if single else out


def _read_sidecar(path: Path, name: str = "model.json") -> dict:
    """The JSON written next to an exported file ({} when there is none: files from before 0.3)."""
    sidecar = path.with_name(name)
    if not sidecar.is_file():
        return {}
    try:
        return json.loads(sidecar.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"exported model {path}: unreadable {sidecar.name} ({_first_line(e)})") from None


# --- streaming export ----------------------------------------------------------------------------------
_STATE_MEANING = {
    "analysis": "the last n_fft - hop input samples (with the new hop they form the STFT frame)",
    "enc": "past input frames of encoder convolution {i} (time kernel k_t: k_t - 1 frames, oldest first)",
    "bott": "past input frames of bottleneck convolution {i} (time dilation d: d * (k_t - 1) frames, oldest first)",
    "dec": "past input frames of decoder transposed convolution {i} ([upper output, skip] channels; k_t - 1 "
           "frames, oldest first)",
    "overlap": "overlap-add tail: partial sums of the next n_fft - hop output samples",
}


def stream_interface(step) -> dict:
    """What an embedder needs to run an exported stream: the call, and every state tensor."""
    state = []
    for name, shape in step.state_shapes.items():
        kind = name.rstrip("0123456789")
        meaning = _STATE_MEANING[kind].format(i=name[len(kind):])
        state.append({"input": name, "output": f"next_{name}", "shape": ["batch", *shape], "dtype": "float32",
                      "initial": "zeros", "holds": meaning})
    cfg = step.config
    return {"kind": "stream", "sample_rate": SAMPLE_RATE, "n_fft": cfg.n_fft, "hop": cfg.hop,
            "algorithmic_latency_ms": 1000.0 * cfg.n_fft / SAMPLE_RATE,
            "output_delay_samples": cfg.n_fft - cfg.hop,
            "call": "once per hop: (samples, *state) -> (enhanced, *next_state); feed next_* back as the inputs",
            "input": {"name": "samples", "shape": ["batch", cfg.hop], "dtype": "float32",
                      "is": "the next hop of 16 kHz mono audio in [-1, 1]"},
            "output": {"name": "enhanced", "shape": ["batch", cfg.hop], "dtype": "float32",
                       "is": "the enhanced hop, delayed by n_fft - hop samples against the input"},
            "state": state, "model_config": cfg.to_dict()}


def export_stream(model: UNetDenoiser, out_dir, formats=tuple(STREAM_FORMATS)) -> dict[str, Path]:
    """Writes ONE HOP of causal ``model`` with explicit state (see the module docstring) in each of
    ``formats`` (``stream.ts``, ``stream.onnx``) to ``out_dir`` plus ``stream.json``; returns
    ``{format: path}``. Atomic like :func:`export`. ValueError for a non-causal model."""
    from .streaming import StreamStep

    check_formats(formats)
    step = StreamStep(model.float().eval()).eval()  # ValueError for a non-causal model, before any file
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = step.state_names
    example = (torch.zeros(2, step.hop), *step.initial_state(2))
    staging = Path(tempfile.mkdtemp(prefix=".export-", dir=out_dir))
    try:
        with torch.no_grad():
            if "torchscript" in formats:
                # Traced: no data-dependent Python; every size but the batch is fixed by the config.
                torch.jit.trace(step, example).save(str(staging / STREAM_FORMATS["torchscript"]))
            if "onnx" in formats:
                batch = torch.export.Dim("batch", min=1)
                torch.onnx.export(step, example, str(staging / STREAM_FORMATS["onnx"]),
                                  input_names=["samples", *names],
                                  output_names=["enhanced", *(f"next_{n}" for n in names)],
                                  dynamic_shapes=({0: batch}, tuple({0: batch} for _ in names)),
                                  dynamo=True, external_data=False)
        return _publish(staging, out_dir, {f: STREAM_FORMATS[f] for f in STREAM_FORMATS if f in formats},
                        "stream.json", stream_interface(step))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class ExportedStream:
    """An exported one-hop stream (``stream.ts`` or ``stream.onnx`` with its ``stream.json``) with the
    call signature of :class:`pycosdist.denoise.streaming.StreamStep`, so that
    ``StreamingDenoiser(step=ExportedStream(path))`` runs it hop by hop (float32 CPU tensors)."""

    def __init__(self, path, threads: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"exported stream: no such file {self.path}")
        meta = _read_sidecar(self.path, "stream.json")
        if meta.get("kind") != "stream":
            raise ValueError(f"exported stream {self.path}: no stream.json next to it (write it with export_stream)")
        self.hop, self.n_fft = int(meta["hop"]), int(meta["n_fft"])
        self.state_names = [s["input"] for s in meta["state"]]
        self.state_shapes = {s["input"]: tuple(s["shape"][1:]) for s in meta["state"]}
        suffix = self.path.suffix.lower()
        if suffix == ".ts":
            self._net = torch.jit.load(str(self.path)).eval()
            self._run = lambda *args: self._net(*args)
        elif suffix == ".onnx":
            try:
                import onnxruntime
            except ImportError:
                raise ValueError(f"exported stream {self.path}: running an .onnx model needs onnxruntime (the "
                                 f"[export] extra); install it with {INSTALL_EXPORT}") from None
            options = onnxruntime.SessionOptions()
            if threads:
                options.intra_op_num_threads = options.inter_op_num_threads = threads
            self.session = onnxruntime.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
            inputs = ["samples", *self.state_names]

            def run(*args):
                outs = self.session.run(None, {n: a.numpy() for n, a in zip(inputs, args)})
                return tuple(torch.from_numpy(o) for o in outs)

            self._run = run
        else:
            raise ValueError(f"exported stream {self.path}: expected a .ts (TorchScript) or .onnx file")

    def initial_state(self, batch: int = 1, dtype=None, device=None) -> list[Tensor]:
        return [torch.zeros((batch, *shape)) for shape in self.state_shapes.values()]

    def __call__(self, samples: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        return self._run(samples.float().contiguous(), *state)
