"""Wall time of the experiment's student cells trained one at a time vs 2 at a time.

The `--small` experiment with one seed and 2 scenarios x 2 methods (4 cells). A first run makes the
corpus and the teacher (not timed); then the same cells run twice more on that corpus and teacher,
with experiment.train_workers = 1 and = 0 (automatic: 2 at a time on a multi-core CPU), each timed
from start to end (training and evaluation of the 4 cells). Prints the times and both runs.csv.

    python bench/denoise/experiment_concurrency.py OUT

The recorded result: bench/results/experiment_concurrency/result.json.
"""
import csv
import json
import sys
import time
from pathlib import Path

from pycosdist.denoise import experiment

CELLS = {"seeds": 1, "scenarios": ["student_quarter", "student_shallow"], "methods": ["none", "cosine_lib"],
         "eval_workers": 2}


def run(out: Path, workers: int, shared: Path | None) -> float:
    overrides = {"experiment": {**CELLS, "train_workers": workers}}
    if shared is not None:  # the same corpus and teacher
        overrides["experiment"]["corpus"] = str(shared / "corpus")
        out.mkdir(parents=True, exist_ok=True)
        if not (out / "teacher").exists():
            (out / "teacher").symlink_to((shared / "teacher").resolve())
    t0 = time.perf_counter()
    experiment.run_experiment(experiment.load_config(small=True, overrides=overrides), out, log=lambda *_: None)
    return time.perf_counter() - t0


def main():
    out = Path(sys.argv[1])
    run(out / "setup", 1, None)  # corpus, teacher (and these cells once): not timed
    times = {w: run(out / f"train_workers_{w}", w, out / "setup") for w in (1, 0)}
    rows = {w: list(csv.DictReader(open(out / f"train_workers_{w}" / "runs.csv"))) for w in times}
    result = {"seconds": {f"train_workers={w}": round(t, 1) for w, t in times.items()},
              "speedup": round(times[1] / times[0], 2),
              "runs": {f"train_workers={w}": [{k: r[k] for k in ("scenario", "variant", "pesq", "stoi", "train_seconds")}
                                               for r in rows[w]] for w in rows}}
    (out / "result.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
