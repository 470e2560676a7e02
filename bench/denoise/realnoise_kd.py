"""The KD question asked again with the teacher trained on recorded noise (issue 25).

Students of the demo set-up (preset, budget, corpus: espeak voices + the ktuberling "train" speakers,
with recorded noise from the installed packages) are distilled from the shipped teacher with

- ``none`` (no KD), ``similarity_preserving`` and ``cosine_lib``: task + lambda * KD (the demo's lambda);
- ``similarity_preserving two-step`` and ``cosine_lib two-step``: Nathoo et al.'s schedule, the KD loss
  alone for the first K epochs, then the task loss alone; K chosen on the real-speech VALID speakers
  among ``--switch-candidates`` (seeds :data:`TUNING_SEEDS`, mean PESQ over the valid subsets).

Every method gets the same seeds (paired: seed k gives every method the same initialization and data
order). All students, the teacher and the peers (spectral gating, RNNoise, DeepFilterNet3) are scored
on the real-speech TEST set (stationary, babble, held-out recorded ambiences) and on the VALID set,
and each method's PESQ / STOI gain over no KD is reported with 95% CIs over seeds and over files.

    python bench/denoise/realnoise_kd.py TEACHER.pt REALTEST_VALID REALTEST_TEST WORK OUT
        [--seeds 5] [--causal-seeds 3] [--switch-candidates 1 2]

A single switch candidate skips the tuning (its runs are seeds 0 and 1 of the study all the same).

REALTEST_*: outputs of `pycosdist data realtest DIR --split valid|test`. Results: bench/results/realnoise_kd/.
"""
import argparse
import json
import time
from pathlib import Path

from pycosdist.denoise import config as config_mod
from pycosdist.denoise import data, demo, realspeech, synth, training
from pycosdist.denoise.report import evaluate_checkpoints, markdown_table, write_results

JOINT = ("none", "similarity_preserving", "cosine_lib")
# Causal students (issue 24): the same three joint methods for a streaming preset (16 ms latency).
CAUSAL_PRESET = "causal_student_quarter"
TWO_STEP = ("similarity_preserving", "cosine_lib")
TUNING_SEEDS = (0, 1)


def student(method: str, seed: int, teacher, kd_only_epochs: int = 0, preset: str | None = None) -> dict:
    cfg = demo.demo_student_config(method, seed, teacher)
    if preset:
        cfg = config_mod.merge(cfg, {"model": {"preset": preset}})
    return config_mod.merge(cfg, {"kd": {"kd_only_epochs": kd_only_epochs}}) if kd_only_epochs else cfg


def variant(method: str, two_step: bool) -> str:
    return f"{method} two-step" if two_step else method


def train_all(jobs: dict, corpus) -> None:
    todo = {k: v for k, v in jobs.items() if not (v[1] / "best.pt").is_file() or not _finished(v)}
    if todo:
        training.train_concurrently(todo, corpus, training.concurrent_runs())


def _finished(job) -> bool:
    cfg, run_dir = job
    history = run_dir / "history.json"
    return history.is_file() and len(json.loads(history.read_text())) >= cfg["train"]["epochs"]


def score(checkpoints: dict, root: Path, eval_dir: Path, variants: dict) -> list[dict]:
    """Rows of every checkpoint (and the noisy input and the peers) on the set at ``root``; a student
    row's ``method`` is its variant's name (two-step ones included)."""
    rows = evaluate_checkpoints(checkpoints, data.load_corpus(root).test, eval_dir, workers=2)
    for row in rows:
        row["method"] = variants.get(row["model"], row["method"])
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("teacher", "valid_root", "test_root", "work", "out"):
        parser.add_argument(name, type=Path)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--causal-seeds", type=int, default=3, help="0: no causal students")
    parser.add_argument("--switch-candidates", type=int, nargs="+", default=[1, 2],
                        help="KD-only epochs of the two-step schedule to choose among on valid")
    args = parser.parse_args()
    teacher, valid_root, test_root, work, out = args.teacher, args.valid_root, args.test_root, args.work, args.out
    seeds, causal_seeds, switch_candidates = list(range(args.seeds)), args.causal_seeds, args.switch_candidates
    t0 = time.perf_counter()
    kwargs = {**demo._real_training_speech(realspeech.KTUBERLING_DIR, print), **demo._recorded_noise(work, print)}
    corpus = synth.synthesize_corpus(work / "corpus", seed=0, **kwargs)
    valid_sets = json.loads((valid_root / realspeech.MANIFEST).read_text())["subsets"]
    test_sets = json.loads((test_root / realspeech.MANIFEST).read_text())["subsets"]

    # 1. The switch point of the two-step schedule, on the valid speakers.
    tuning, labels = {}, {}
    for method in TWO_STEP:
        for k in switch_candidates:
            for seed in TUNING_SEEDS:
                label = f"tune {method} K{k} seed{seed}"
                tuning[label] = (student(method, seed, teacher, k), work / "runs" / f"tune_{method}_K{k}_seed{seed}")
    train_all(tuning, corpus)
    tune_rows = {s: score({k: v[1] / "best.pt" for k, v in tuning.items()}, valid_root / s, work / "eval_tune" / s, {})
                 for s in valid_sets}
    switch, tune_table = {}, []
    for method in TWO_STEP:
        means = {}
        for k in switch_candidates:
            picks = [r["pesq"] for s in valid_sets for r in tune_rows[s] if r["model"].startswith(f"tune {method} K{k} ")]
            means[k] = sum(picks) / len(picks)
            tune_table.append({"model": f"{method} K={k}", "pesq": means[k], "n_ok": len(picks)})
        switch[method] = max(means, key=means.get)

    # 2. Every method, every seed.
    jobs, variants = {}, {}
    for seed in seeds:
        for method in JOINT:
            jobs[f"student {method} seed{seed}"] = (student(method, seed, teacher),
                                                    work / "runs" / f"student_{method}_seed{seed}")
            variants[f"student {method} seed{seed}"] = method
        for method in TWO_STEP:
            name = variant(method, True)
            label = f"student {name} seed{seed}"
            k = switch[method]
            tuned = work / "runs" / f"tune_{method}_K{k}_seed{seed}"  # the same run when it was a tuning seed
            jobs[label] = (student(method, seed, teacher, k),
                           tuned if seed in TUNING_SEEDS else work / "runs" / f"student_{method}_2step_seed{seed}")
            variants[label] = name
    for seed in seeds[:causal_seeds]:
        for method in JOINT:
            label = f"student causal {method} seed{seed}"
            jobs[label] = (student(method, seed, teacher, preset=CAUSAL_PRESET),
                           work / "runs" / f"causal_{method}_seed{seed}")
            variants[label] = f"causal {method}"
    train_all(jobs, corpus)
    methods = list(JOINT) + [variant(m, True) for m in TWO_STEP]
    causal = [f"causal {m}" for m in JOINT] if causal_seeds else []
    checkpoints = {"teacher": teacher, **{k: v[1] / "best.pt" for k, v in jobs.items()}}

    # 3. Scores, gains over no KD (paired by seed), per set.
    summary = {"switch_points": switch, "tuning": tune_table, "seeds": seeds, "sets": {}}
    md = [f"# KD with the teacher trained on recorded noise: {len(seeds)} paired seeds per method\n\n",
          f"Two-step switch point (KD-only epochs of {demo.DEMO_STUDENT_BUDGET['train']['epochs']}) "
          + ("chosen on the valid speakers: " if len(switch_candidates) > 1 else "given (not tuned in this run): ")
          + ", ".join(f"{m}: K={k}" for m, k in switch.items()) + "\n\n", markdown_table(tune_table, ("model", "pesq", "n_ok"))]
    for split, root, subsets in (("test", test_root, test_sets), ("valid", valid_root, valid_sets)):
        for subset in subsets:
            name = f"{split}_{subset}"
            eval_dir = out / "eval" / name
            rows = score(checkpoints, root / subset, eval_dir, variants)
            gains = [g for metric in ("pesq", "stoi") for g in demo.seed_paired_gains(eval_dir, methods, seeds, metric=metric)]
            causal_gains = [g for metric in ("pesq", "stoi") for g in demo.seed_paired_gains(
                eval_dir, causal, seeds[:causal_seeds], baseline="causal none", metric=metric)] if causal else []
            summary["sets"][name] = {"rows": rows, "kd_gains": gains, "causal_kd_gains": causal_gains}
            write_results(out / name, rows, summary["sets"][name])
            md += [f"\n## {split}, {subset}: {demo.SUBSET_TITLES[subset]} ({rows[0]['n_ok']} files)\n\n",
                   markdown_table([r for r in rows if not r["model"].startswith("student ")]),
                   "\nStudents, mean ± std over seeds:\n\n", demo.method_means(rows, methods + causal),
                   "\nGain over no KD (paired by seed), 95% Student-t CIs:\n\n", demo.gains_markdown(gains)]
            if causal:
                md += [f"\nCausal students ({CAUSAL_PRESET}, 16 ms latency): gain over causal no KD:\n\n",
                       demo.gains_markdown(causal_gains)]
    summary["wall_seconds"] = round(time.perf_counter() - t0, 1)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text("".join(md))
    (out / "results.json").write_text(json.dumps(summary, indent=1, default=str))
    print("".join(md))


# The guard: the students train in spawned worker processes, which import this script again.
if __name__ == "__main__":
    main()
