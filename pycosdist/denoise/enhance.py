"""Denoise audio files with a trained (``.pt``) or exported (``.ts``, ``.onnx``) model: ``pycosdist enhance``.

Output names: a file given on the command line is written as ``OUT/<name>.wav``; the files found
in a folder keep their path relative to it, under the folder's name (``OUT/<folder>/<sub>/<name>.wav``).
Nothing is overwritten by accident: :func:`plan` refuses, before anything is loaded or written, two
inputs that would get the same output name, an output that would replace an input, and (unless
``overwrite``) an output file that already exists. A file that cannot be read or enhanced is skipped
and reported by :func:`enhance_files`; the others are still written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, NamedTuple

from .audio import AUDIO_SUFFIXES
from .models import N_FFT

# The centred STFT reflect-pads n_fft / 2 samples on each side, which needs more input than that.
MIN_SAMPLES = N_FFT // 2 + 1


class Job(NamedTuple):
    source: Path
    output: Path


def _collect(inputs: list[Path], out_dir: Path) -> list[Job]:
    jobs = []
    for item in inputs:
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in AUDIO_SUFFIXES)
            if not files:
                raise FileNotFoundError(f"inputs: folder {item} holds no audio files ({', '.join(AUDIO_SUFFIXES)})")
            folder = item.resolve().name  # resolved: "." has no name of its own
            jobs += [Job(f, out_dir / folder / f.relative_to(item).with_suffix(".wav")) for f in files]
        elif item.is_file():
            jobs.append(Job(item, out_dir / (item.stem + ".wav")))
        else:
            raise FileNotFoundError(f"inputs: no such file or folder {item}")
    return jobs


def plan(inputs: list[Path], out_dir: Path, overwrite: bool = False) -> list[Job]:
    """The (input file, output file) pairs of ``pycosdist enhance INPUTS -o OUT_DIR``, checked so that
    no output is lost or destroys an input (see the module docstring). Raises FileNotFoundError,
    ValueError or FileExistsError with a one-line message."""
    out_dir = Path(out_dir)
    jobs, sources = [], {}
    for job in _collect([Path(p) for p in inputs], out_dir):
        if job.source.resolve() not in sources:  # the same file named twice is enhanced once
            sources[job.source.resolve()] = job
            jobs.append(job)
    by_output: dict[Path, Job] = {}
    for job in jobs:
        target = job.output.resolve()
        if target in sources:
            raise ValueError(f"-o/--out: the output of {job.source} would overwrite the input "
                             f"{sources[target].source}; choose an output folder that holds no input")
        if target in by_output:
            raise ValueError(f"inputs: {by_output[target].source} and {job.source} would both be written to "
                             f"{job.output}; rename one of them or enhance them in separate runs")
        by_output[target] = job
    existing = [job.output for job in jobs if job.output.exists()]
    if existing and not overwrite:
        raise FileExistsError(f"-o/--out: {len(existing)} output file(s) already exist (first: {existing[0]}); "
                              "choose another output folder, or pass --overwrite to replace them")
    return jobs


def load_denoiser(path, device="cpu") -> Callable:
    """``denoise(noisy (samples,) float32 CPU tensor at 16 kHz) -> enhanced (samples,) on the CPU``
    from a training checkpoint (``.pt``, run on ``device``) or an exported model (``.ts``, ``.onnx``:
    always on the CPU). Raises ValueError / FileNotFoundError."""
    import torch

    path, device = Path(path), torch.device(device)
    if path.suffix.lower() in (".ts", ".onnx"):
        from .export import ExportedDenoiser

        if device.type != "cpu":
            raise ValueError(f"--device: exported models (.ts, .onnx) run on the CPU, got {device}")
        return ExportedDenoiser(path)
    from .training import load_model

    model = load_model(path)[0].to(device)
    return lambda noisy: model(noisy[None].to(device))[0].cpu()


def load_stream(path, device="cpu") -> Callable:
    """``denoise(noisy (samples,)) -> enhanced (samples,)`` that streams the clip hop by hop
    (:class:`pycosdist.denoise.streaming.StreamingDenoiser`) from a causal training checkpoint (``.pt``)
    or an exported one-hop stream (``stream.onnx`` / ``stream.ts`` with its ``stream.json``). Same
    output as :func:`load_denoiser`'s to float tolerance. Raises ValueError / FileNotFoundError."""
    import torch

    from .streaming import StreamingDenoiser

    path = Path(path)
    if torch.device(device).type != "cpu":
        raise ValueError(f"--device: --stream runs on the CPU (one hop at a time), got {device}")
    if path.suffix.lower() in (".ts", ".onnx"):
        from .export import ExportedStream

        stream = StreamingDenoiser(step=ExportedStream(path))
    else:
        from .training import load_model

        model = load_model(path)[0]
        if not model.config.causal:
            raise ValueError(f"--stream: checkpoint {path} holds a non-causal model (its convolutions and STFT use "
                             "future frames); stream a causal one (e.g. model preset causal_student_quarter), or "
                             "drop --stream")
        stream = StreamingDenoiser(model.float())
    return stream.enhance


def enhance_waveform(denoise: Callable, noisy):
    """``denoise`` applied to ``noisy`` (samples,) of any length >= 1: a clip shorter than the STFT
    needs is zero-padded to :data:`MIN_SAMPLES` and the result trimmed back to its length."""
    import torch

    n = noisy.shape[-1]
    padded = torch.nn.functional.pad(noisy, (0, MIN_SAMPLES - n)) if n < MIN_SAMPLES else noisy
    with torch.no_grad():
        return denoise(padded)[:n]


def _enhance_one(job: Job, denoise: Callable) -> str:
    import torch

    from . import audio

    x, sr = audio.read_audio(job.source)  # (channels, samples)
    y = enhance_waveform(denoise, torch.from_numpy(audio.to_mono_16k(x, sr))).numpy()
    audio.write_audio(job.output, y, audio.SAMPLE_RATE)
    return f"{job.source} ({x.shape[0]} ch, {sr} Hz) -> {job.output}"


def enhance_files(jobs: list[Job], denoise: Callable, log: Callable[[str], None] = print) -> list[tuple[Path, str]]:
    """Reads, converts to 16 kHz mono, enhances and writes (atomically) each job, logging one line per
    file. A file that cannot be read or enhanced is skipped; returns ``[(source, reason)]`` of those."""
    from .audio import AudioError

    failed = []
    for job in jobs:
        try:
            log(_enhance_one(job, denoise))
        except AudioError as e:
            failed.append((job.source, e.reason))
        except (ValueError, RuntimeError) as e:  # e.g. NaN output, a model that rejects this input
            first_line = (str(e).strip().splitlines() or [""])[0]
            failed.append((job.source, f"{type(e).__name__}: {first_line}"))
    return failed
