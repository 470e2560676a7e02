"""Objective speech-enhancement metrics (wideband PESQ, STOI, SI-SDR) and a robust evaluator.

Scoring never raises for a bad file: :func:`safe_score` turns every problem (silent or too short
reference, NaN/Inf or all-zero estimate, a large length mismatch, an exception from pesq/pystoi)
into a FAILED :class:`ScoreResult` with a reason; :func:`evaluate` reports them per file and in the
summary, and also counts a file whose loading or enhancement raised as failed.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np

from .audio import write_text_atomic
from .devices import available_cores

SAMPLE_RATE = 16000
MIN_SECONDS = 0.25  # PESQ's own minimum
# Estimates within this many samples of the reference length are trimmed to the shorter one (an
# STFT round trip may drop a partial hop); a larger mismatch is a bug and the file fails.
MAX_TRIM = 1024
METRICS = ("pesq", "stoi", "si_sdr")
SILENCE_RMS = 1e-5  # -100 dBFS: a reference this quiet has nothing to score against


class ScoreResult(NamedTuple):
    name: str
    metrics: dict | None  # {"pesq", "stoi", "si_sdr"} when scored, else None
    error: str | None  # why the file failed, else None
    note: str | None = None  # e.g. that the estimate was trimmed to the reference length


def _as_array(x, arg: str) -> np.ndarray:
    if hasattr(x, "detach"):  # a torch tensor; this module does not need torch otherwise
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{arg}: expected a 1-D signal (samples,), got shape {x.shape}")
    return x


def si_sdr(estimate, reference, eps: float = 1e-8) -> float:
    """Scale-invariant SDR in dB of ``estimate`` against ``reference`` (both (samples,), made
    zero-mean): 10 log10(|a r|^2 / |e - a r|^2) with a = <e, r> / |r|^2. ``eps`` keeps silent
    inputs finite."""
    e, r = _as_array(estimate, "estimate"), _as_array(reference, "reference")
    if e.shape != r.shape:
        raise ValueError(f"estimate and reference: expected equal shapes, got {e.shape} and {r.shape}")
    e, r = e - e.mean(), r - r.mean()
    target = (np.dot(e, r) / (np.dot(r, r) + eps)) * r
    noise = e - target
    return float(10 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))


def pesq_wb(reference, estimate, sr: int = SAMPLE_RATE) -> float:
    """Wideband PESQ (MOS-LQO, about 1.0-4.64). Raises pesq's errors unchanged."""
    from pesq import pesq

    return float(pesq(sr, _as_array(reference, "reference"), _as_array(estimate, "estimate"), "wb"))


def stoi(reference, estimate, sr: int = SAMPLE_RATE) -> float:
    """STOI (0-1). Raises ValueError where pystoi would only warn and return a placeholder."""
    from pystoi import stoi as _stoi

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # "Not enough STFT frames ... Returning 1e-5"
        try:
            value = float(_stoi(_as_array(reference, "reference"), _as_array(estimate, "estimate"), sr, extended=False))
        except RuntimeWarning as w:
            raise ValueError(f"STOI undefined: {w}") from None
    if not math.isfinite(value):
        raise ValueError(f"STOI is {value}")
    return value


def score_pair(clean, estimate, sr: int = SAMPLE_RATE) -> dict:
    """``{"pesq", "stoi", "si_sdr"}`` of ``estimate`` against ``clean`` (equal-length (samples,)
    signals at 16 kHz). Raises on unscorable input; see :func:`safe_score` for the robust form."""
    if sr != SAMPLE_RATE:
        raise ValueError(f"sr: wideband PESQ needs {SAMPLE_RATE} Hz, got {sr}")
    return {"pesq": pesq_wb(clean, estimate, sr), "stoi": stoi(clean, estimate, sr), "si_sdr": si_sdr(estimate, clean)}


def _problem(clean: np.ndarray, estimate: np.ndarray) -> str | None:
    if not np.isfinite(clean).all():
        return "reference contains NaN/Inf"
    if not np.isfinite(estimate).all():
        return "estimate contains NaN/Inf"
    if len(clean) < MIN_SECONDS * SAMPLE_RATE:
        return f"too short: {len(clean)} samples (< {MIN_SECONDS} s = {int(MIN_SECONDS * SAMPLE_RATE)})"
    if np.sqrt(np.mean(clean**2)) < SILENCE_RMS:
        return f"silent reference (RMS < {SILENCE_RMS:g})"
    if not np.any(estimate):
        return "estimate is all zeros"
    return None


def safe_score(name: str, clean, estimate) -> ScoreResult:
    """Scores one file; never raises. Problems come back as ``metrics=None`` and an ``error``."""
    try:
        clean, estimate = _as_array(clean, "clean"), _as_array(estimate, "estimate")
    except Exception as e:
        return ScoreResult(name, None, str(e))
    note = None
    if len(clean) != len(estimate):
        if abs(len(clean) - len(estimate)) > MAX_TRIM:
            return ScoreResult(name, None, f"length mismatch: clean {len(clean)} vs estimate {len(estimate)} "
                                           f"samples (more than {MAX_TRIM} apart)")
        note = f"trimmed to {min(len(clean), len(estimate))} samples (clean {len(clean)}, estimate {len(estimate)})"
        n = min(len(clean), len(estimate))
        clean, estimate = clean[:n], estimate[:n]
    problem = _problem(clean, estimate)
    if problem:
        return ScoreResult(name, None, problem, note)
    try:
        return ScoreResult(name, score_pair(clean, estimate), None, note)
    except Exception as e:  # pesq: NoUtterancesError, BufferTooShortError, ValueError, ...
        msg = e.args[0].decode() if e.args and isinstance(e.args[0], bytes) else str(e)
        return ScoreResult(name, None, f"{type(e).__name__}: {msg}", note)


_WORKER_ENHANCE: Callable | None = None  # a scoring worker's enhancer (evaluate's enhance_in_workers)


def _init_worker(enhance_fn: Callable | None = None) -> None:
    """Worker initializer: one BLAS thread per process (pystoi's matmuls otherwise spin up a thread
    per core that burns CPU without speeding up these small products, so parallel workers would
    just fight over the cores), and the enhancer this worker runs, if any."""
    from threadpoolctl import threadpool_limits

    global _WORKER_ENHANCE
    threadpool_limits(1)
    _WORKER_ENHANCE = enhance_fn


def _enhance_and_score(name: str, noisy: np.ndarray, clean: np.ndarray) -> ScoreResult:
    """What a worker does with ``enhance_in_workers``: enhance one file, then score it."""
    try:
        estimate = _WORKER_ENHANCE(noisy)
    except Exception as e:
        return ScoreResult(name, None, f"enhancement failed: {type(e).__name__}: {e}")
    return safe_score(name, clean, estimate)



def _mean(values):
    return float(np.mean(values)) if values else None


def evaluate(enhance_fn: Callable, dataset, out_dir, label: str, workers: int = 2, progress: bool = False,
             enhance_in_workers: bool = False) -> dict:
    """Enhances every file of ``dataset`` (items ``(noisy, clean)``, names in ``dataset.names``) with
    ``enhance_fn(noisy (samples,)) -> (samples,)`` under ``torch.no_grad()`` and scores it.

    Scoring runs in ``workers`` processes (0 or 1: in this process) while the next file is being
    enhanced; the enhancement here then gets the cores the workers leave as torch threads.
    ``enhance_in_workers``: those processes enhance too (``enhance_fn`` gets a float32 numpy
    array; under the "spawn" start method it must pickle), for a single-threaded enhancer that
    would otherwise leave cores idle, such as a peer's C runtime (:class:`peers.PeerEnhancer`). It
    must not run torch: the workers are forked from a process whose torch thread pools are not
    fork-safe. Writes ``out_dir/<label>_per_file.csv`` (name, pesq, stoi, si_sdr, error) and
    ``out_dir/<label>_summary.json``, atomically, and returns the summary: ``label``, ``n_files``,
    ``n_ok``, ``n_failed``, means ``pesq``/``stoi``/``si_sdr`` over the files that scored (None if
    none did), ``failed`` {name: reason}, ``trimmed`` {name: note}, ``seconds``.
    """
    import torch

    if not label or any(c in label for c in "/\\") or label.startswith("."):
        raise ValueError(f"label: expected a plain file-name prefix, got {label!r}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(dataset.names)
    start = time.perf_counter()
    results: list[ScoreResult | None] = [None] * len(names)
    pending = {}
    pool = None
    torch_threads = torch.get_num_threads()
    if workers > 1:
        import multiprocessing as mp

        # fork where there is one: no re-import of __main__ (spawn needs an `if __name__ == "__main__"`
        # guard in the caller's script) and no start-up cost. Safe although the parent runs torch
        # thread pools: the workers only run numpy, pesq, pystoi and (enhance_in_workers) C code, never torch.
        method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
        pool = ProcessPoolExecutor(workers, mp_context=mp.get_context(method), initializer=_init_worker,
                                   initargs=(enhance_fn if enhance_in_workers else None,))
        if not enhance_in_workers:
            # the scoring workers keep `workers` cores busy: the model here gets the others (at least
            # one); more torch threads than free cores spin and slow everyone (a student's file: 1.3x)
            torch.set_num_threads(max(1, min(torch_threads, available_cores() - workers)))
    try:
        indices = range(len(names))
        if progress:
            from tqdm import tqdm

            indices = tqdm(indices, desc=f"evaluate {label}", unit="file")
        for i in indices:
            try:
                noisy, clean = dataset[i]
            except Exception as e:
                results[i] = ScoreResult(names[i], None, f"loading failed: {type(e).__name__}: {e}")
                continue
            if pool is not None and enhance_in_workers:
                noisy, clean = (np.asarray(v, dtype=np.float32) for v in (noisy, clean))
                pending[i] = pool.submit(_enhance_and_score, names[i], noisy, clean)
                continue
            try:
                with torch.no_grad():
                    estimate = enhance_fn(noisy)
                if hasattr(estimate, "detach"):
                    estimate = estimate.detach().cpu().double().numpy()
            except Exception as e:
                results[i] = ScoreResult(names[i], None, f"enhancement failed: {type(e).__name__}: {e}")
                continue
            clean = clean.numpy() if hasattr(clean, "numpy") else clean
            if pool is None:
                results[i] = safe_score(names[i], clean, estimate)
            else:
                pending[i] = pool.submit(safe_score, names[i], clean, estimate)
        for i, future in pending.items():
            try:
                results[i] = future.result()
            except Exception as e:  # e.g. a worker killed by a crash inside pesq
                results[i] = ScoreResult(names[i], None, f"scoring failed: {type(e).__name__}: {e}")
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
        torch.set_num_threads(torch_threads)

    ok = [r for r in results if r.metrics is not None]
    summary = {
        "label": label,
        "n_files": len(results),
        "n_ok": len(ok),
        "n_failed": len(results) - len(ok),
        **{m: _mean([r.metrics[m] for r in ok]) for m in METRICS},
        "failed": {r.name: r.error for r in results if r.metrics is None},
        "trimmed": {r.name: r.note for r in results if r.note},
        "seconds": round(time.perf_counter() - start, 3),
    }
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["name", *METRICS, "error"])
    for r in results:
        values = [f"{r.metrics[m]:.6f}" for m in METRICS] if r.metrics else [""] * len(METRICS)
        writer.writerow([r.name, *values, r.error or ""])
    write_text_atomic(out_dir / f"{label}_per_file.csv", buf.getvalue())
    write_text_atomic(out_dir / f"{label}_summary.json", json.dumps(summary, indent=1))
    return summary


def evaluate_noisy(dataset, out_dir, workers: int = 2, progress: bool = False) -> dict:
    """The unprocessed-input row: scores the noisy input itself (label ``noisy``)."""
    return evaluate(lambda noisy: noisy, dataset, out_dir, "noisy", workers=workers, progress=progress)


# --- non-learned baseline --------------------------------------------------------------------------
SPECTRAL_GATING = "spectral gating (noisereduce)"


def spectral_gating(noisy, sr: int = SAMPLE_RATE) -> np.ndarray:
    """Stationary spectral gating of ``noisy`` (samples,) with ``noisereduce`` (its defaults: the noise
    profile is the per-frequency mean + 1.5 std of the file's own dB spectrogram; bins under it are
    gated): the classical, non-learned baseline row. Needs the optional ``noisereduce`` package."""
    import noisereduce

    x = _as_array(noisy, "noisy")
    return np.asarray(noisereduce.reduce_noise(y=x, sr=sr, stationary=True), dtype=np.float64)


def evaluate_enhancer(enhance_fn: Callable, dataset, out_dir, label: str, workers: int = 2,
                      progress: bool = False, enhance_in_workers: bool = False) -> dict:
    """Scores any callable enhancer ``enhance_fn(noisy (samples,)) -> (samples,)`` (a classical method,
    an exported model, ...) on ``dataset`` like a checkpoint: same files, same metrics, same summary
    as :func:`evaluate` (files named after ``label`` with spaces as underscores)."""
    return evaluate(enhance_fn, dataset, out_dir, label.replace(" ", "_"), workers=workers, progress=progress,
                    enhance_in_workers=enhance_in_workers)
