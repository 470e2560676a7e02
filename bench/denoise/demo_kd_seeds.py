"""More seeds for the demo's KD comparison on real speech (issue 10's follow-up).

The demo (3 seeds) found cosine+LIB ahead of no KD on the real-speech test speakers. This script
trains further demo students (same teacher, corpus, budget and pairing: seed k gives every method
the same initialization and data order) for seeds 3..N-1, scores every student of seeds 0..N-1 on
the real-speech TEST set (stationary and babble) and on the VALID speakers (never used to choose
anything about KD), and writes the paired KD gains over no KD with 95% CIs.

    python bench/denoise/demo_kd_seeds.py DEMO_REPORT_DIR REAL_VALID_DIR OUT_DIR [N_SEEDS]

DEMO_REPORT_DIR: a finished `pycosdist demo --out` folder; REAL_VALID_DIR: the output of
`pycosdist data realtest DIR --split valid`. The recorded results (8 seeds): bench/results/demo_kd_seeds/.
"""
import json
import sys
from pathlib import Path

from pycosdist.denoise import data, demo, training
from pycosdist.denoise.report import evaluate_checkpoints, markdown_table, write_results


def main():
    report, valid_root, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    n_seeds = int(sys.argv[4]) if len(sys.argv) > 4 else 8
    work = report / "work"
    teacher = work / "runs" / "teacher" / "best.pt"
    corpus = work / "corpus"
    seeds = list(range(n_seeds))

    jobs, checkpoints = {}, {}
    for seed in seeds:
        for method in demo.DEMO_METHODS:
            label = f"student {method} seed{seed}"
            run_dir = work / "runs" / f"student_{method}_seed{seed}"  # seeds 0-2: the demo's own runs
            checkpoints[label] = run_dir / "best.pt"
            if not (run_dir / "best.pt").is_file():
                jobs[label] = (demo.demo_student_config(method, seed, teacher), run_dir)
    if jobs:
        training.train_concurrently(jobs, corpus, training.concurrent_runs())

    sets = {"test_stationary": work / "realtest" / "stationary", "test_babble": work / "realtest" / "babble",
            "valid_stationary": valid_root / "stationary", "valid_babble": valid_root / "babble"}
    summary, md = {}, ["# KD gain over no KD on real speech, demo students, seeds 0-%d\n" % (n_seeds - 1)]
    for name, root in sets.items():
        eval_dir = out / "eval" / name
        rows = evaluate_checkpoints(checkpoints, data.load_corpus(root).test, eval_dir, workers=2)
        gains = [g for m in ("pesq", "stoi") for g in demo.seed_paired_gains(eval_dir, demo.DEMO_METHODS, seeds, metric=m)]
        per_seed = demo.method_gain_rows(rows, eval_dir, demo.DEMO_METHODS)
        summary[name] = {"kd_gains": gains, "method_gains": per_seed}
        write_results(out / name, rows, summary[name])
        md += [f"\n## {name} ({rows[0]['n_ok']} files)\n\n", demo.method_means(rows, demo.DEMO_METHODS), "\n",
               demo.gains_markdown(gains), "\nPer method: mean of the per-seed gains (worst .. best seed):\n\n",
               markdown_table(per_seed, demo.METHOD_GAIN_COLUMNS)]
    (out / "results.md").write_text("".join(md))
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    print("".join(md))


# The guard: the students train in spawned worker processes, which import this script again.
if __name__ == "__main__":
    main()
