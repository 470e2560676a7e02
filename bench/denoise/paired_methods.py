"""One KD method against another, paired by seed, from the per-file scores of the recorded-noise
study (issue 25 asks which of the paper's claims hold; one is "better than the state-of-the-art
baseline", here similarity-preserving KD).

    python bench/denoise/paired_methods.py EVAL_ROOT BASELINE TREATMENT OUT_MD [--seeds 5]

EVAL_ROOT: bench/results/realnoise_kd/eval (one folder per split and noise family); BASELINE and
TREATMENT: method names as in the files (``student_<method>_seed<k>_per_file.csv``), e.g.
similarity_preserving cosine_lib. Each seed's mean over the files is paired with the same seed of the
other method; the table gives the mean difference (treatment minus baseline) and its 95% Student-t
CI over seeds.
"""
import argparse
from pathlib import Path

import numpy as np

from pycosdist.denoise import stats
from pycosdist.denoise.report import markdown_table, per_file_scores


def seed_means(folder: Path, method: str, metric: str, seeds: int) -> dict[int, float]:
    return {s: float(np.mean(list(per_file_scores(folder, f"student_{method}_seed{s}", metric).values())))
            for s in range(seeds)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("eval_root", type=Path)
    ap.add_argument("baseline")
    ap.add_argument("treatment")
    ap.add_argument("out", type=Path)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    rows = []
    for folder in sorted(p for p in args.eval_root.iterdir() if p.is_dir()):
        row = {"split_family": folder.name}
        for metric in ("pesq", "stoi"):
            s = stats.paired_summary(seed_means(folder, args.baseline, metric, args.seeds),
                                     seed_means(folder, args.treatment, metric, args.seeds))
            row[metric] = f"{s.mean:+.3f} [{s.ci_low:+.3f}, {s.ci_high:+.3f}]"
        rows.append(row)
    md = (f"# {args.treatment} minus {args.baseline}, paired by seed ({args.seeds} seeds)\n\n"
          "Mean over seeds of the difference of per-seed mean scores, [95% CI over seeds].\n\n"
          + markdown_table(rows, ["split_family", "pesq", "stoi"]))
    args.out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
