"""One KD method against another, paired by seed, from the per-file scores of the recorded-noise
study (issue 25 asks which of the paper's claims hold; one is "better than the state-of-the-art
baseline", here similarity-preserving KD).

    python bench/denoise/paired_methods.py EVAL_ROOT BASELINE TREATMENT OUT_MD [--seeds 5]

EVAL_ROOT: bench/results/realnoise_kd/eval (one folder per split and noise family); BASELINE and
TREATMENT: method names as in the files (``student_<method>_seed<k>_per_file.csv``), e.g.
similarity_preserving cosine_lib. Per seed, the mean over files of (treatment - baseline) on the same files
(:func:`pycosdist.denoise.demo.seed_paired_gains`, as the study's gains over no KD); the table gives
its mean over seeds and 95% Student-t CI over seeds.
"""
import argparse
from pathlib import Path

from pycosdist.denoise.demo import seed_paired_gains
from pycosdist.denoise.report import markdown_table


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
            (g,) = seed_paired_gains(folder, [args.baseline, args.treatment], range(args.seeds),
                                     baseline=args.baseline, metric=metric)
            row[metric] = f"{g['gain']:+.3f} [{g['seeds_ci_low']:+.3f}, {g['seeds_ci_high']:+.3f}]"
        rows.append(row)
    md = (f"# {args.treatment} minus {args.baseline}, paired by seed ({args.seeds} seeds)\n\n"
          "Per seed, the mean over files of the per-file difference; its mean over seeds [95% CI over seeds].\n\n"
          + markdown_table(rows, ["split_family", "pesq", "stoi"]))
    args.out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
