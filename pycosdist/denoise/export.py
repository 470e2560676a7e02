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

from .models import COMPRESS, HOP, N_FFT, SAMPLE_RATE, STFT, UNetDenoiser, compress

FORMATS = {"torchscript": "model.ts", "onnx": "model.onnx"}
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
    return {"sample_rate": SAMPLE_RATE, "n_fft": N_FFT, "hop": HOP, "window": "hann (periodic)", "center": True,
            "compression": COMPRESS, "input": {"name": "features", "shape": ["batch", 1, N_FFT // 2 + 1, "frames"],
                                               "dtype": "float32", "is": "|STFT(noisy)| ** compression"},
            "output": {"name": "mask", "shape": ["batch", N_FFT // 2 + 1, "frames"], "dtype": "float32",
                       "is": "enhanced = iSTFT(mask * STFT(noisy))"},
            "model_config": model.config.to_dict()}


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
    example = torch.rand(2, 1, N_FFT // 2 + 1, 50)
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
        files = {f: FORMATS[f] for f in FORMATS if f in formats}
        (staging / "model.json").write_text(json.dumps({**interface(model), "files": files}, indent=1))
        for name in [*files.values(), "model.json"]:  # the interface last: it names the files
            os.replace(staging / name, out_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {f: out_dir / name for f, name in files.items()}


class ExportedDenoiser:
    """An exported mask net (``.ts`` or ``.onnx``) with the STFT around it: ``(B, n)`` or ``(n,)``
    waveform -> enhanced waveform of the same shape."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"exported model: no such file {self.path}")
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
        self.stft = STFT()

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
