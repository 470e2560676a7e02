"""The end-to-end demo (``pycosdist demo``, the main job of ``make demo``).

The demo synthesizes the default corpus, trains the demo teacher, distills one student preset with
no KD, the similarity-preserving baseline and the cosine/LIB loss, each with :data:`DEMO_SEEDS`
seeds, evaluates everything (and the noisy input) on the synthetic test set, and writes to the
report folder: ``results.md`` / ``results.csv`` / ``results.json`` (one row per model and seed:
params, MACs, PESQ, STOI, SI-SDR; then the mean ± std per method and the paired KD gains),
``spectrograms.png`` plus one ``spec_<row>.png`` per row (input, teacher, each student's seed 0,
clean) and ``training_curves.png``. Work files (corpus, runs, per-file scores) go to
``<report>/work``; rerunning resumes every stage.

Seeds are paired: within a seed every method starts from the same student initialization and sees
the same crops in the same order (see :mod:`pycosdist.denoise.experiment`), so the KD effect is
reported as the mean gain over no KD with a Student-t 95% CI computed two ways (:func:`seed_paired_gains`):
over seeds (the per-seed difference of test-set means: what another training run would see) and
over test files (the per-file difference, averaged over the seeds: what another test set would see).
One seed decides nothing: a single run's gain flipped sign between two machines.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from . import config as config_mod
from . import stats
from .synth import REAL_UTTS_PER_SPEAKER
from .report import (evaluate_checkpoints, gain_references, paired_gain, per_file_scores, plot_spectrograms,
                     plot_training_curves, text_table, write_results)

# The demo recipe (also in configs/teacher_demo.toml and configs/student_demo.toml; a test keeps
# them equal). kd.lambda was chosen on the VALIDATION split only (best valid PESQ of cosine_lib
# over lambda in {0.1, 0.3, 1, 3, 10} with this teacher and student; see README).
# The SI-SDR term and best.pt by validation LOSS (issue 10) were chosen on the real-speech VALID
# speakers (stationary noises), among mask floors 0.05-0.2, SI-SDR weights 0.01-0.05, an asymmetric
# speech-removal term, 4 or 6 student epochs and PESQ- or loss-based selection (see README).
DEMO_LOSS = {"sisdr_weight": 0.02}
DEMO_TEACHER = {
    "model": {"preset": "teacher"},
    "data": {"remix": True},  # issue 10: new noise/SNR/gain combinations every step, for real voices
    # 6 epochs (8 before the recorded training voices): the 29% larger corpus must fit the 15-minute
    # demo; on the valid speakers 8 epochs scored +0.04 PESQ more (realspeech_recipe/teacher_epochs.md).
    "train": {"epochs": 6, "batch_size": 8, "lr": 3e-3, "valid_metric": "loss"},
    "loss": DEMO_LOSS,
}
DEMO_STUDENT = {
    "model": {"preset": "student_quarter"},
    "train": {"epochs": 8, "batch_size": 8, "lr": 3e-3, "valid_metric": "loss"},
    "loss": DEMO_LOSS,
    "kd": {"lambda": 0.1, "expansion": 4},
}
DEMO_METHODS = ("none", "similarity_preserving", "cosine_lib")

# The demo's seeds, and the student training budget that makes DEMO_SEEDS x 3 students fit the
# 15-minute `make demo` (the students train for fewer epochs on shorter crops than DEMO_STUDENT's
# recipe; the teacher-latent cache is on). Traded: each student is less trained than the recipe's
# (lower PESQ for every method); bought: 3 paired seeds per method, so the gain comes with a CI.
DEMO_SEEDS = 3
# Recorded human voices in the training corpus (issue 10): utterances per "train" speaker of
# pycosdist.denoise.realspeech (never a valid or test speaker); synth's default, chosen on the valid
# speakers (bench/results/realspeech_recipe/real_training_speech.md).
DEMO_REAL_UTTS = REAL_UTTS_PER_SPEAKER
# Batch 2 (8 in the full recipe): 4x the optimizer steps at about the same cost per epoch; chosen on
# the valid speakers among batch 2, 4 and 8, lr 3e-3 and 6e-3, 6 epochs and student_half
# (bench/results/realspeech_recipe/student_budget.md).
# Utterances per test speaker in the demo's real-speech tables: 8 speakers x 2 = 16 files per noise
# family (3 scored 24, but 14 systems x 3 families x 24 files took 7 of the demo's 15 minutes); the
# study of record (bench/denoise/realnoise_kd.py) scores 48 files per family.
DEMO_REAL_TEST_UTTS = 2
DEMO_STUDENT_BUDGET = {"train": {"epochs": 4, "batch_size": 2}, "data": {"segment_seconds": 1.0},
                       "kd": {"teacher_cache": True}}


def demo_config(kind: str) -> dict:
    """The full configuration of the demo's ``"teacher"`` or ``"student"`` run (KD method unset)."""
    if kind not in ("teacher", "student"):
        raise ValueError(f"kind: expected 'teacher' or 'student', got {kind!r}")
    return config_mod.merge(config_mod.DEFAULTS, DEMO_TEACHER if kind == "teacher" else DEMO_STUDENT)

def demo_student_config(method: str, seed: int, teacher_ckpt) -> dict:
    """One demo student run: :func:`demo_config` ("student") under :data:`DEMO_STUDENT_BUDGET`, with
    ``method`` and ``seed``."""
    return config_mod.merge(config_mod.merge(demo_config("student"), DEMO_STUDENT_BUDGET),
                            {"kd": {"method": method, "teacher": str(teacher_ckpt)}, "train": {"seed": seed}})


def _student_label(method: str, seed: int) -> str:
    return f"student {method} seed{seed}"


def seed_paired_gains(eval_dir, methods, seeds, baseline: str = "none", metric: str = "pesq",
                      confidence: float = 0.95) -> list[dict]:
    """For each method other than ``baseline``, its gain in ``metric`` over ``baseline`` from the
    per-file scores in ``eval_dir`` (``student_<method>_seed<k>_per_file.csv``), with t CIs:

    - over seeds: per seed, the mean over files of (method - baseline) on the files both scored;
      summarized over the seeds (``seeds_*``);
    - over files: per file, (method - baseline) averaged over the seeds; summarized over the
      files (``files_*``).
    """
    scores = {(m, k): per_file_scores(eval_dir, _student_label(m, k), metric) for m in methods for k in seeds}
    out = []
    for method in methods:
        if method == baseline:
            continue
        per_seed, per_file = {}, {}
        for k in seeds:
            diffs = stats.paired_differences(scores[(baseline, k)], scores[(method, k)])
            if diffs:
                per_seed[k] = float(np.mean(list(diffs.values())))
            for name, d in diffs.items():
                per_file.setdefault(name, []).append(d)
        over_seeds = stats.summarize(list(per_seed.values()), confidence)
        over_files = stats.summarize([float(np.mean(v)) for v in per_file.values()], confidence)
        out.append({"method": method, "baseline": baseline, "metric": metric, "gain": over_seeds.mean,
                    **{f"seeds_{k}": v for k, v in over_seeds.as_dict().items()},
                    **{f"files_{k}": v for k, v in over_files.as_dict().items()}})
    return out


def gains_markdown(gains: list[dict]) -> str:
    def ci(g, over):
        if g[f"{over}_ci_low"] is None:
            return "-"
        return f"[{g[f'{over}_ci_low']:+.3f}, {g[f'{over}_ci_high']:+.3f}]"

    lines = ["| method | metric | gain over no KD | 95% CI over seeds | seeds | 95% CI over test files | files |",
             "|---|---|---|---|---|---|---|"]
    for g in gains:
        gain = "-" if g["gain"] is None else f"{g['gain']:+.3f}"
        lines.append(f"| {g['method']} | {g['metric'].upper()} | {gain} | {ci(g, 'seeds')} | {g['seeds_n']} | "
                     f"{ci(g, 'files')} | {g['files_n']} |")
    return "\n".join(lines) + "\n"


def method_means(rows: list[dict], methods) -> str:
    """Markdown: mean ± std over the seeds of each method's PESQ / STOI / SI-SDR."""
    lines = ["| method | seeds | PESQ | STOI | SI-SDR (dB) |", "|---|---|---|---|---|"]
    for method in methods:
        mine = [r for r in rows if r.get("method") == method and r["model"].startswith("student ")]
        cells = []
        for m, digits in (("pesq", 3), ("stoi", 3), ("si_sdr", 1)):
            s = stats.summarize([r[m] for r in mine])
            cells.append("-" if s.mean is None else f"{s.mean:.{digits}f}"
                         + ("" if s.std is None else f" ± {s.std:.{digits}f}"))
        lines.append(f"| {method} | {len(mine)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


METHOD_GAIN_COLUMNS = ("method", "seeds", "pesq_vs_noisy", "stoi_vs_noisy", "pesq_vs_gating")


def method_gain_rows(rows: list[dict], eval_dir, methods) -> list[dict]:
    """Per KD method: each seed's mean per-file gain (PESQ and STOI over the noisy input, PESQ over
    spectral gating), summarized as ``mean over seeds (worst .. best seed)``."""
    references = gain_references({r["model"] for r in rows})
    out = []
    for method in methods:
        labels = [r["model"] for r in rows if r.get("method") == method and r["model"].startswith("student ")]
        row = {"method": method, "seeds": len(labels), **dict.fromkeys(METHOD_GAIN_COLUMNS[2:])}
        for key, ref, metric in references:
            gains = [g[0] for g in (paired_gain(eval_dir, ref, label, metric) for label in labels) if g]
            row[key] = f"{np.mean(gains):+.3f} ({min(gains):+.3f} .. {max(gains):+.3f})" if gains else None
        out.append(row)
    return out


# --- the demo --------------------------------------------------------------------------------------
def _real_training_speech(source_dir, log) -> dict:
    """The corpus arguments that add the recorded training voices of ``source_dir`` (None: none),
    when it is installed."""
    if source_dir is None:
        return {}
    if not Path(source_dir).is_dir():
        log(f"note: {source_dir} is missing (apt-get install ktuberling-data): training on synthetic voices only")
        return {}
    return {"real_speech_dir": source_dir, "real_utts_per_speaker": DEMO_REAL_UTTS}


def _recorded_noise(work: Path, log) -> dict:
    """The corpus arguments that mix recorded noise into the demo corpus, when some of the packages
    of :data:`pycosdist.denoise.recorded_noise.SOURCES` are installed (``make demo`` installs the small
    ones as root); the held-out evaluation ambiences never enter."""
    from . import recorded_noise

    found = {r.package for r in recorded_noise.find_recordings(["/"]) if r.split == "train"}
    if not found:
        log("note: no recorded-noise package is installed (see `make demo`): training on generated noise only")
        return {}
    log(f"recorded noise for training from: {', '.join(sorted(found))}")
    return {"noise_roots": ["/"], "noise_cache": str(work / "noise_cache")}


def _shipped_teacher(teacher_dir: Path) -> dict:
    """Puts the shipped pretrained teacher where the demo's students look for theirs; returns the
    run summary a trained teacher would have (its training history comes with it)."""
    import shutil

    from . import pretrained
    from .checkpoint import load_checkpoint

    src, dst = pretrained.path("teacher"), teacher_dir / "best.pt"
    if not dst.is_file() or dst.read_bytes() != src.read_bytes():
        teacher_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    ckpt = load_checkpoint(dst)
    return {"out_dir": str(teacher_dir), "history": ckpt.get("history", []), "best": ckpt.get("best"),
            "config": ckpt["config"], "shipped": str(src)}


def run_demo(out="report", progress: bool = True, workers: int = 2, log=print, seeds: int = DEMO_SEEDS,
             corpus_kwargs: dict | None = None, teacher_overrides: dict | None = None,
             student_overrides: dict | None = None, real_speech: bool = True,
             student_workers: int | None = None, real_speech_dir=None, train_teacher: bool = False,
             recorded_noise: bool = True) -> dict:
    """Runs the whole demo (see the module docstring); returns the results dict. ``corpus_kwargs``,
    ``teacher_overrides``, ``student_overrides`` (training-config sections) shrink it for tests;
    ``real_speech=False`` skips the real-speech tables and the recorded training voices;
    ``real_speech_dir`` is the recordings' folder (default: ktuberling-data's).
    ``train_teacher``: train the demo teacher (``DEMO_TEACHER``, about 4 minutes) instead of
    distilling from the shipped pretrained one (:mod:`pycosdist.denoise.pretrained`; trained when
    this installation has none). ``recorded_noise``: mix recorded noise into the corpus when its
    packages are installed.
    ``student_workers``: student runs trained at once (default
    :func:`pycosdist.denoise.training.concurrent_runs`); with more than one, their progress is logged
    as epoch lines on stdout, and a script that calls this must do so under
    ``if __name__ == "__main__":`` (the workers are spawned)."""
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

    from .realspeech import KTUBERLING_DIR

    real_speech_dir = (real_speech_dir or KTUBERLING_DIR) if real_speech else None
    from . import pretrained

    corpus_kwargs = {**_real_training_speech(real_speech_dir, log),
                     **(_recorded_noise(work, log) if recorded_noise else {}), **(corpus_kwargs or {})}
    corpus_dir = stage("synthesize corpus", lambda: synth.synthesize_corpus(work / "corpus", seed=0, **corpus_kwargs))
    teacher_dir = work / "runs" / "teacher"
    if train_teacher or "teacher" not in pretrained.available():
        teacher_cfg = config_mod.merge(demo_config("teacher"), teacher_overrides or {})
        runs = {"teacher": stage("train teacher", lambda: training.train(
            teacher_cfg, corpus_dir, teacher_dir, progress=progress, log=log))}
    else:
        runs = {"teacher": stage("shipped pretrained teacher", lambda: _shipped_teacher(teacher_dir))}
        teacher_cfg = runs["teacher"]["config"]
    teacher_ckpt = teacher_dir / "best.pt"
    student_preset = DEMO_STUDENT["model"]["preset"]
    checkpoints = {"teacher": teacher_ckpt}
    seed_list = list(range(seeds))
    jobs = {}  # label -> (config, run folder); seed-major: a stopped demo leaves every method with as many seeds
    # Within a seed the KD students go first: they take longer (teacher latents, KD loss), and the
    # last job trains alone while the other core idles, so the shortest one should be last.
    kd_first = sorted(DEMO_METHODS, key=lambda m: m == "none")
    for seed in seed_list:
        for method in kd_first:
            cfg = config_mod.merge(demo_student_config(method, seed, teacher_ckpt), student_overrides or {})
            jobs[_student_label(method, seed)] = (cfg, work / "runs" / f"student_{method}_seed{seed}")
    checkpoints.update({label: jobs[label][1] / "best.pt"
                        for label in (_student_label(m, s) for s in seed_list for m in DEMO_METHODS)})
    student_workers = training.concurrent_runs() if student_workers is None else student_workers
    if student_workers <= 1:
        for label, (cfg, run_dir) in jobs.items():
            method, seed = cfg["kd"]["method"], cfg["train"]["seed"]
            runs[label] = stage(f"distill {student_preset} with {method}, seed {seed}", lambda: training.train(
                cfg, corpus_dir, run_dir, progress=progress, log=log))
    else:
        student_runs = stage(f"distill {len(jobs)} students, {student_workers} at a time",
                             lambda: training.train_concurrently(jobs, corpus_dir, student_workers))
        for label, summary in student_runs.items():
            runs[label] = summary
            timings[f"{label} (concurrent)"] = summary["seconds"]

    test = data.load_corpus(corpus_dir).test
    rows = stage("evaluate on the test set", lambda: evaluate_checkpoints(
        checkpoints, test, work / "eval", workers=workers, progress=progress))

    def figures():
        out.mkdir(parents=True, exist_ok=True)
        i = int(np.argmax([len(test[k][0]) for k in range(len(test))]))  # the longest test file
        noisy, clean = test[i]
        waves = {"noisy input": noisy.numpy()}
        for label, path in checkpoints.items():
            if label == "teacher" or label.endswith(" seed0"):
                model = training.load_model(path)[0]
                with torch.no_grad():
                    waves[label] = model(noisy[None])[0].numpy()
        waves["clean"] = clean.numpy()
        plot_spectrograms(waves, out, title=f"test file {test.names[i]}")
        plot_training_curves({k: v["history"] for k, v in runs.items() if k == "teacher" or k.endswith(" seed0")},
                             out / "training_curves.png")

    stage("figures", figures)
    # Real human speech (issue 10): the teacher and every student (all seeds: one seed decides nothing).
    real = stage("evaluate on real speech", lambda: realspeech_report(
        checkpoints, out, workers=workers, progress=progress, log=log, source_dir=real_speech_dir,
        student_seeds=seed_list)) if real_speech else None
    wall = round(time.perf_counter() - t_start, 1)
    gains = seed_paired_gains(work / "eval", DEMO_METHODS, seed_list)
    budget = demo_student_config("none", 0, teacher_ckpt)
    voices = json.loads((corpus_dir / synth.MANIFEST).read_text())["speakers"].values()
    recorded = [v["source"].rsplit("/", 1)[-1] for v in voices if "source" in v]
    notes = (f"Training speech: {sum('source' not in v and v['split'] == 'train' for v in voices)} synthetic voices"
             + (f" and {len(recorded)} recorded speakers ({', '.join(recorded)}; never real-speech test speakers)"
                if recorded else "") + ".\n\n"
             f"Student preset `{student_preset}`, {seeds} seeds per method (paired: same initialization and "
             f"data order within a seed), each trained {budget['train']['epochs']} epochs in batches of "
             f"{budget['train']['batch_size']} on {budget['data']['segment_seconds']:g} s crops (the demo's budget); "
             "each row is its run's best.pt (best "
             f"validation {budget['train']['valid_metric']}).\n\n"
             "## Mean ± std over seeds\n\n" + method_means(rows, DEMO_METHODS)
             + "\n## KD gain over no KD (PESQ), 95% Student-t CIs\n\n" + gains_markdown(gains)
             + "\nA CI that contains 0 means this demo cannot tell the method from no KD. "
             + f"Wall time {wall:.0f} s (stages: " + ", ".join(f"{k} {v:.0f} s" for k, v in timings.items()) + ").")
    extra = {"notes": notes, "wall_seconds": wall, "stage_seconds": timings, "torch_threads": torch.get_num_threads(),
             "teacher_config": teacher_cfg, "student_config": budget, "seeds": seeds, "pesq_gains": gains,
             "realspeech": real}
    write_results(out, rows, extra)
    log("\n" + text_table(rows) + "\n\n" + notes)
    log(f"report written to {out}/ (results.md/.csv/.json, spectrograms.png, training_curves.png)")
    return {"rows": rows, **extra}


# --- the real-speech tables (issue 10) ---------------------------------------------------------------
SUBSET_TITLES = {
    "stationary": "white/pink/brown noise (generated, stationary)",
    "babble": "babble of other real speakers (speech-like interferer)",
    "recorded": "recorded non-stationary ambiences never used in training (fire, waves and creaking, insects "
                "at night, morning; Wesnoth's recordings)",
}
def realspeech_report(checkpoints: dict, out="report", workers: int = 2, progress: bool = True, log=print,
                      seed: int = 0, source_dir=None, student_seeds=(),
                      utts_per_speaker: int = DEMO_REAL_TEST_UTTS) -> dict | None:
    """Scores ``{label: checkpoint path}`` (plus the noisy input and spectral gating) on the
    real-speech TEST set (:mod:`pycosdist.denoise.realspeech`, from the recordings in ``source_dir``,
    default ktuberling-data's, ``utts_per_speaker`` utterances per test speaker; built once under
    ``<out>/work/realtest``): one table for stationary
    noises, one for the babble interferer, each with a gains table (paired per-file differences ±
    standard error), and with ``student_seeds`` (the demo students' seeds) each KD method's PESQ and
    STOI gain over no KD with 95% CIs. Writes ``<out>/realspeech/{stationary,babble,recorded}/results.*`` and
    ``<out>/realspeech/results.md``; returns ``{subset: {"rows", "gains", "method_gains", "kd_gains"}}``,
    or None (with a message) when the recordings are not installed."""
    from . import data, realspeech
    from .report import GAIN_COLUMNS, gain_rows, markdown_table

    out = Path(out)
    try:
        # The demo's own work folder: a set made by an older version (other speakers) is rebuilt.
        root = realspeech.build_realtest(out / "work" / "realtest", seed=seed, split="test", overwrite=True,
                                         source_dir=source_dir or realspeech.KTUBERLING_DIR,
                                         utts_per_speaker=utts_per_speaker)
    except FileNotFoundError as e:
        log(f"real-speech tables skipped: {e}")
        return None
    results, md = {}, ["# Results on real human speech (ktuberling-data recordings, test speakers)\n"]
    subsets = json.loads((root / realspeech.MANIFEST).read_text())["subsets"]
    if "recorded" not in subsets:
        log("note: the recorded-noise table is left out: apt-get install wesnoth-1.16-data")
    for subset in subsets:
        eval_dir = out / "work" / "eval_realspeech" / subset
        rows = evaluate_checkpoints(checkpoints, data.load_corpus(root / subset).test, eval_dir,
                                    workers=workers, progress=progress)
        gains = gain_rows(rows, eval_dir)
        per_method = method_gain_rows(rows, eval_dir, DEMO_METHODS)
        kd_gains = [g for metric in ("pesq", "stoi") for g in seed_paired_gains(eval_dir, DEMO_METHODS, student_seeds,
                                                                                 metric=metric)] if student_seeds else []
        results[subset] = {"rows": rows, "gains": gains, "method_gains": per_method, "kd_gains": kd_gains}
        write_results(out / "realspeech" / subset, rows, {**results[subset], "subset": subset})
        title = SUBSET_TITLES[subset]
        md += [f"\n## {subset}: {title}, SNR 0/5/10 dB, {rows[0]['n_ok']} files\n\n", markdown_table(rows),
               "\nGains (mean per-file difference ± paired standard error):\n\n",
               markdown_table(gains, GAIN_COLUMNS),
               "\nPer method over its seeds: mean of the per-seed gains (worst .. best seed):\n\n",
               markdown_table(per_method, METHOD_GAIN_COLUMNS)]
        if kd_gains:
            md += ["\nKD gain over no KD (paired by seed), 95% Student-t CIs:\n\n", gains_markdown(kd_gains)]
        log(f"\nreal speech, {subset}:\n" + text_table(rows) + "\n" + text_table(gains, GAIN_COLUMNS))
    (out / "realspeech").mkdir(parents=True, exist_ok=True)
    from .audio import write_text_atomic

    write_text_atomic(out / "realspeech" / "results.md", "".join(md))
    return results
