"""Stage-3 teacher candidates (issue 25) against the shipped stage-2 teacher, on the real-speech
VALID speakers: is a third stage worth shipping, and does more recorded noise in the mix help?

    python bench/denoise/teacher_stage3.py REALTEST_DIR OUT LABEL=CHECKPOINT [LABEL=CHECKPOINT ...]

REALTEST_DIR: a set of ``pycosdist data realtest`` (the VALID split to choose; the test split only
to report the choice). Each candidate and the shipped teacher are scored with the noisy input and the
peers on every subset; the table gives each model's mean gain over the noisy input and its paired
per-file difference from the shipped teacher (mean and 95% CI over files). Results: OUT/results.md,
per-file scores in OUT/eval/<subset>/.
"""
import json
import sys
from pathlib import Path

import numpy as np

from pycosdist.denoise import data, pretrained, realspeech, stats
from pycosdist.denoise.report import evaluate_checkpoints, markdown_table, per_file_scores

SHIPPED = "shipped teacher (stage 2)"


def paired(eval_dir, a: str, b: str, metric: str) -> str:
    """Mean per-file difference b - a of ``metric`` with its 95% Student-t CI over files."""
    s = stats.paired_summary(per_file_scores(eval_dir, a, metric), per_file_scores(eval_dir, b, metric))
    return f"{s.mean:+.3f} [{s.ci_low:+.3f}, {s.ci_high:+.3f}]"


def main():
    root, out = Path(sys.argv[1]), Path(sys.argv[2])
    candidates = dict(arg.split("=", 1) for arg in sys.argv[3:])
    checkpoints = {SHIPPED: pretrained.path("teacher"), **candidates}
    table = []
    for subset in json.loads((root / realspeech.MANIFEST).read_text())["subsets"]:
        eval_dir = out / "eval" / subset
        rows = evaluate_checkpoints(checkpoints, data.load_corpus(root / subset).test, eval_dir, workers=2)
        noisy = rows[0]
        for row in rows[1:]:
            label = row["model"]
            entry = {"subset": subset, "model": label, "files": row["n_ok"],
                     "pesq_gain": f"{row['pesq'] - noisy['pesq']:+.3f}", "stoi_gain": f"{row['stoi'] - noisy['stoi']:+.3f}"}
            if label in candidates:
                entry["pesq_vs_shipped"] = paired(eval_dir, SHIPPED, label, "pesq")
                entry["stoi_vs_shipped"] = paired(eval_dir, SHIPPED, label, "stoi")
            table.append(entry)
    md = (f"# Stage-3 teacher candidates on {root.name}\n\n"
          "Gains over the noisy input (means over the files); vs_shipped: the paired per-file difference "
          "from the shipped stage-2 teacher, mean [95% CI over files].\n\n"
          + markdown_table(table, ("subset", "model", "files", "pesq_gain", "stoi_gain", "pesq_vs_shipped",
                                   "stoi_vs_shipped")))
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
