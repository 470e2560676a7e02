"""The demo students' epochs once the demo no longer trains its teacher (issue 25), chosen on the
real-speech VALID speakers only.

With the shipped teacher, `make demo` spends no time on a teacher, so its students may train longer.
This trains no-KD students (no teacher takes part, so the choice favours no KD method) for each
number of epochs and seeds 0-2 on the study corpus of ``realnoise_kd.py``, one at a time on one
thread, and scores them on the valid subsets (stationary, babble, held-out recorded ambiences):

    python bench/denoise/realnoise_budget.py REALTEST_VALID WORK OUT [EPOCHS ...]   (default 4 6 8)

WORK: the work folder of realnoise_kd.py (its corpus is reused; runs in WORK/budget/e<N>_seed<k>).
Results: OUT/student_budget.md.
"""
import json
import sys
from pathlib import Path

from pycosdist.denoise import config as config_mod
from pycosdist.denoise import data, demo, realspeech, synth, training
from pycosdist.denoise.report import evaluate_checkpoints, markdown_table

SEEDS = (0, 1, 2)


def main():
    valid_root, work, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    epochs = [int(e) for e in sys.argv[4:]] or [4, 6, 8]
    kwargs = {**demo._real_training_speech(realspeech.KTUBERLING_DIR, print), **demo._recorded_noise(work, print)}
    corpus = synth.synthesize_corpus(work / "corpus", seed=0, **kwargs)
    runs = {}
    for n in epochs:
        for seed in SEEDS:
            cfg = config_mod.merge(demo.demo_student_config("none", seed, ""), {"train": {"epochs": n, "threads": 1}})
            runs[f"e{n} seed{seed}"] = run_dir = work / "budget" / f"e{n}_seed{seed}"
            training.train(cfg, corpus, run_dir, progress=False, log=lambda *_: None)
    seconds = {k: sum(row["seconds"] for row in json.loads((v / "history.json").read_text())) for k, v in runs.items()}
    table = []
    for subset in json.loads((valid_root / realspeech.MANIFEST).read_text())["subsets"]:
        rows = evaluate_checkpoints({k: v / "best.pt" for k, v in runs.items()},
                                    data.load_corpus(valid_root / subset).test, work / "budget_eval" / subset, workers=1)
        table.append({"subset": subset, "epochs": "noisy input", "pesq": rows[0]["pesq"], "stoi": rows[0]["stoi"]})
        for n in epochs:
            picks = [r for r in rows if r["model"].startswith(f"e{n} seed")]
            table.append({"subset": subset, "epochs": n, "pesq": sum(r["pesq"] for r in picks) / len(picks),
                          "pesq_worst_seed": min(r["pesq"] for r in picks), "stoi": sum(r["stoi"] for r in picks) / len(picks),
                          "train_s": sum(seconds[r["model"]] for r in picks) / len(picks)})
    out.mkdir(parents=True, exist_ok=True)
    md = ("# Demo student epochs with the shipped teacher, on the VALID speakers (no KD, seeds 0-2)\n\n"
          "pesq, stoi: means over the seeds; pesq_worst_seed: the lowest seed; train_s: seconds per student "
          "(one thread, the sum of the epochs' times in its history).\n\n"
          + markdown_table(table, ("subset", "epochs", "pesq", "pesq_worst_seed", "stoi", "train_s")))
    (out / "student_budget.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
