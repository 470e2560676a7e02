"""The end-to-end demo (``pycosdist demo``, the main job of ``make demo``).

The demo synthesizes the default corpus, trains the demo teacher, distills one student preset with
no KD, the similarity-preserving baseline and the cosine/LIB loss, evaluates everything (and the
noisy input) on the synthetic test set, and writes to the report folder: ``results.md`` /
``results.csv`` / ``results.json`` (model, params, MACs, PESQ, STOI, SI-SDR), ``spectrograms.png``
plus one ``spec_<row>.png`` per row (input, teacher, each student, clean) and ``training_curves.png``.
Work files (corpus, runs, per-file scores) go to ``<report>/work``; rerunning resumes every stage.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from . import config as config_mod
from .report import evaluate_checkpoints, paired_gain, plot_spectrograms, plot_training_curves, text_table, write_results

# The demo recipe (also in configs/teacher_demo.toml and configs/student_demo.toml; a test keeps
# them equal). kd.lambda was chosen on the VALIDATION split only (best valid PESQ of cosine_lib
# over lambda in {0.1, 0.3, 1, 3, 10} with this teacher and student; see README).
DEMO_TEACHER = {
    "model": {"preset": "teacher"},
    "data": {"remix": True},  # issue 10: new noise/SNR/gain combinations every step, for real voices
    "train": {"epochs": 8, "batch_size": 8, "lr": 3e-3, "valid_metric": "pesq"},
}
DEMO_STUDENT = {
    "model": {"preset": "student_quarter"},
    "train": {"epochs": 8, "batch_size": 8, "lr": 3e-3, "valid_metric": "pesq"},
    "kd": {"lambda": 0.1, "expansion": 4},
}
DEMO_METHODS = ("none", "similarity_preserving", "cosine_lib")


def demo_config(kind: str) -> dict:
    """The full configuration of the demo's ``"teacher"`` or ``"student"`` run (KD method unset)."""
    if kind not in ("teacher", "student"):
        raise ValueError(f"kind: expected 'teacher' or 'student', got {kind!r}")
    return config_mod.merge(config_mod.DEFAULTS, DEMO_TEACHER if kind == "teacher" else DEMO_STUDENT)

# --- the demo --------------------------------------------------------------------------------------
def run_demo(out="report", progress: bool = True, workers: int = 2, log=print) -> dict:
    """Runs the whole demo (see the module docstring); returns the results dict."""
    from . import data, synth, training

    t_start = time.perf_counter()
    out = Path(out)
    work = out / "work"
    timings = {}

    def stage(name, fn):
        t0 = time.perf_counter()
        log(f"== {name}")
        result = fn()
        timings[name] = round(time.perf_counter() - t0, 1)
        log(f"== {name}: {timings[name]:.1f} s")
        return result

    corpus_dir = stage("synthesize corpus", lambda: synth.synthesize_corpus(work / "corpus", seed=0))
    teacher_dir = work / "runs" / "teacher"
    runs = {"teacher": stage("train teacher", lambda: training.train(
        demo_config("teacher"), corpus_dir, teacher_dir, progress=progress, log=log))}
    teacher_ckpt = teacher_dir / "best.pt"
    student_preset = DEMO_STUDENT["model"]["preset"]
    checkpoints = {"teacher": teacher_ckpt}
    for method in DEMO_METHODS:
        cfg = config_mod.merge(demo_config("student"), {"kd": {"method": method, "teacher": str(teacher_ckpt)}})
        label = f"student {method}"
        run_dir = work / "runs" / f"student_{method}"
        runs[label] = stage(f"distill {student_preset} with {method}", lambda: training.train(
            cfg, corpus_dir, run_dir, progress=progress, log=log))
        checkpoints[label] = run_dir / "best.pt"

    test = data.load_corpus(corpus_dir).test
    rows = stage("evaluate on the test set", lambda: evaluate_checkpoints(
        checkpoints, test, work / "eval", workers=workers, progress=progress))

    def figures():
        out.mkdir(parents=True, exist_ok=True)
        i = int(np.argmax([len(test[k][0]) for k in range(len(test))]))  # the longest test file
        noisy, clean = test[i]
        waves = {"noisy input": noisy.numpy()}
        for label, path in checkpoints.items():
            model = training.load_model(path)[0]
            with torch.no_grad():
                waves[label] = model(noisy[None])[0].numpy()
        waves["clean"] = clean.numpy()
        plot_spectrograms(waves, out, title=f"test file {test.names[i]}")
        plot_training_curves({k: v["history"] for k, v in runs.items()}, out / "training_curves.png")

    stage("figures", figures)
    wall = round(time.perf_counter() - t_start, 1)
    gain = paired_gain(work / "eval", "student none", "student cosine_lib")
    kd_gain = gain[0] if gain else None
    notes = (f"Student preset `{student_preset}`; each row is its run's best.pt (best validation "
             f"{DEMO_STUDENT['train']['valid_metric']}). PESQ gain of cosine_lib over no KD: "
             + (f"{gain[0]:+.3f} (paired standard error {gain[1]:.3f} over {gain[2]} files)" if gain else "n/a")
             + f". Wall time {wall:.0f} s (stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ").")
    extra = {"notes": notes, "wall_seconds": wall, "stage_seconds": timings, "torch_threads": torch.get_num_threads(),
             "teacher_config": demo_config("teacher"), "student_config": demo_config("student"),
             "pesq_gain_cosine_lib_over_none": kd_gain,
             "pesq_gain_standard_error": gain[1] if gain else None}
    write_results(out, rows, extra)
    log("\n" + text_table(rows) + "\n\n" + notes)
    log(f"report written to {out}/ (results.md/.csv/.json, spectrograms.png, training_curves.png)")
    return {"rows": rows, **extra}


# --- the real-speech tables (issue 10) ---------------------------------------------------------------
def realspeech_report(checkpoints: dict, out="report", workers: int = 2, progress: bool = True, log=print,
                      seed: int = 0) -> dict | None:
    """Scores ``{label: checkpoint path}`` (plus the noisy input and spectral gating) on the
    real-speech TEST set (:mod:`pycosdist.denoise.realspeech`, built once under ``<out>/work/realtest``):
    one table for stationary noises, one for the babble interferer, each with a gains table (paired
    per-file differences ± standard error). Writes ``<out>/realspeech/{stationary,babble}/results.*``
    and ``<out>/realspeech/results.md``; returns ``{subset: {"rows", "gains"}}``, or None (with a
    message) when the recordings (Debian's ``ktuberling-data``) are not installed."""
    from . import data, realspeech
    from .report import GAIN_COLUMNS, gain_rows, markdown_table

    out = Path(out)
    try:
        root = realspeech.build_realtest(out / "work" / "realtest", seed=seed, split="test")
    except FileNotFoundError as e:
        log(f"real-speech tables skipped: {e}")
        return None
    results, md = {}, ["# Results on real human speech (ktuberling-data recordings, test speakers)\n"]
    for subset in realspeech.SUBSETS:
        eval_dir = out / "work" / "eval_realspeech" / subset
        rows = evaluate_checkpoints(checkpoints, data.load_corpus(root / subset).test, eval_dir,
                                    workers=workers, progress=progress)
        gains = gain_rows(rows, eval_dir)
        write_results(out / "realspeech" / subset, rows, {"gains": gains, "subset": subset})
        results[subset] = {"rows": rows, "gains": gains}
        title = ("white/pink/brown noise (generated, stationary)" if subset == "stationary"
                 else "babble of other real speakers (speech-like interferer)")
        md += [f"\n## {subset}: {title}, SNR 0/5/10 dB, {rows[0]['n_ok']} files\n\n", markdown_table(rows),
               "\nGains (mean per-file difference ± paired standard error):\n\n",
               markdown_table(gains, GAIN_COLUMNS)]
        log(f"\nreal speech, {subset}:\n" + text_table(rows) + "\n" + text_table(gains, GAIN_COLUMNS))
    (out / "realspeech").mkdir(parents=True, exist_ok=True)
    from .audio import write_text_atomic

    write_text_atomic(out / "realspeech" / "results.md", "".join(md))
    return results
