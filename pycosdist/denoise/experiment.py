"""The paper's experiment: repeated runs over teacher/student mismatch scenarios (``pycosdist experiment``).

For each scenario (a student preset), each KD method and each seed, a student is distilled from
one teacher and evaluated on the test set; the table gives mean ± std (sample std, ddof=1, over the
seeds) of PESQ, STOI and SI-SDR per scenario and method, and a plot shows PESQ against student size.

The configuration (TOML, see ``configs/experiment.toml``) has the sections:

- ``[experiment]``: ``scenarios`` (student presets), ``methods``, ``seeds`` (count: seeds 0..N-1),
  ``corpus`` (an existing corpus root; empty: synthesize one into ``OUT/corpus``), ``eval_workers``.
- ``[corpus]``: :func:`pycosdist.synth.synthesize_corpus` arguments for the synthesized corpus.
- ``[lambda]``: KD weight per method (``kd.lambda`` of its runs).
- ``[teacher.<section>]`` / ``[student.<section>]``: training-config overrides
  (:data:`pycosdist.config.DEFAULTS` keys) for the teacher run and for every student run.

Every key is checked (an unknown key is an error that lists the valid ones). Layout of ``OUT``:
``corpus/``, ``teacher/`` (a training run), ``runs/<scenario>/<method>/seed<k>/`` (training run +
``eval/``), ``runs.csv`` (one row per finished cell), ``results.md`` / ``results.csv`` /
``results.json`` and ``pesq_vs_size.png``. A cell is finished when its test summary exists; rerunning
skips finished cells and resumes an interrupted one from its ``last.pt``.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import time
import tomllib
from pathlib import Path

import numpy as np

from . import config as config_mod
from .audio import write_text_atomic
from .distill import METHODS

METRICS = ("pesq", "stoi", "si_sdr")

EXPERIMENT_DEFAULTS: dict[str, dict] = {
    "experiment": {
        "scenarios": ["student_half", "student_quarter", "student_eighth", "student_shallow"],
        "methods": list(METHODS),
        "seeds": 3,
        "corpus": "",
        "eval_workers": 2,
    },
    "corpus": {"n_train_speakers": 8, "n_test_speakers": 2, "utts_per_speaker": 25, "test_utts_per_speaker": 15,
               "seed": 0},
    # cosine_lib: chosen on the demo's validation split. The other two are scaled so that lambda * KD
    # starts at the size of cosine_lib's (measured on the demo: cosine ~0.45 -> 0.1, SP ~0.003 -> 0.001).
    "lambda": {"fitnet_mse": 0.1, "similarity_preserving": 10.0, "cosine_lib": 0.1},
    "teacher": {},
    "student": {},
}

# The --small preset: on our 2-core CPU, corpus + teacher + 48 student runs + evaluation in ~40 min.
SMALL = {
    "corpus": {"n_train_speakers": 6, "n_test_speakers": 2, "utts_per_speaker": 20, "test_utts_per_speaker": 12},
    "teacher": {"train": {"epochs": 6, "lr": 3e-3}, "data": {"valid_speakers": 1}},
    "student": {"train": {"epochs": 6, "lr": 3e-3, "valid_metric": "loss"}, "data": {"valid_speakers": 1}},
}


def _unknown(key: str, valid) -> KeyError:
    return KeyError(f"unknown experiment config key {key!r}; valid keys: {', '.join(valid)}")


def _merge(base: dict, updates: dict) -> dict:
    """``base`` with ``updates`` applied; every key checked and typed."""
    out = copy.deepcopy(base)
    for section, keys in updates.items():
        if section in ("teacher", "student"):
            if not isinstance(keys, dict):
                raise ValueError(f"{section}: expected a table of training-config sections, got {keys!r}")
            out[section] = config_mod.merge(config_mod.merge(config_mod.DEFAULTS, out[section]), keys)
            continue
        if section not in EXPERIMENT_DEFAULTS:
            raise _unknown(section, [*EXPERIMENT_DEFAULTS, *(f"{s}.<training key>" for s in ("teacher", "student"))])
        if not isinstance(keys, dict):
            raise _unknown(section, EXPERIMENT_DEFAULTS)
        for name, value in keys.items():
            valid = EXPERIMENT_DEFAULTS[section]
            if name not in valid and section != "lambda":
                raise _unknown(f"{section}.{name}", [f"{section}.{k}" for k in valid])
            if section == "lambda" and name not in METHODS:
                raise _unknown(f"lambda.{name}", [f"lambda.{m}" for m in METHODS if m != "none"])
            default = valid.get(name, 0.0)
            if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if type(value) is not type(default):
                raise ValueError(f"{section}.{name}: expected a {type(default).__name__}, got {value!r}")
            out[section][name] = copy.deepcopy(value)
    return out


def load_config(path=None, small: bool = False, overrides: dict | None = None) -> dict:
    """:data:`EXPERIMENT_DEFAULTS`, then :data:`SMALL` if ``small``, then the TOML file ``path``, then
    ``overrides`` (same layout, e.g. ``{"experiment": {"seeds": 5}}``: the CLI's ``--seeds``); checked."""
    cfg = _merge(EXPERIMENT_DEFAULTS, SMALL) if small else _merge(EXPERIMENT_DEFAULTS, {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"config: no such file {path}")
        try:
            cfg = _merge(cfg, tomllib.loads(path.read_text()))
        except tomllib.TOMLDecodeError as e:
            raise ValueError(f"config {path}: not valid TOML ({e})") from None
    cfg = _merge(cfg, overrides or {})
    ex = cfg["experiment"]
    from .models import PRESETS

    for s in ex["scenarios"]:
        if s not in PRESETS:
            raise ValueError(f"experiment.scenarios: unknown model preset {s!r}; expected some of {sorted(PRESETS)}")
    for m in ex["methods"]:
        if m not in METHODS:
            raise ValueError(f"experiment.methods: unknown KD method {m!r}; expected some of {list(METHODS)}")
    if ex["seeds"] < 1:
        raise ValueError(f"experiment.seeds: expected >= 1, got {ex['seeds']}")
    if ex["eval_workers"] < 0:
        raise ValueError(f"experiment.eval_workers: expected >= 0 (0: evaluate in this process), got {ex['eval_workers']}")
    if not ex["scenarios"] or not ex["methods"]:
        raise ValueError("experiment: scenarios and methods must not be empty")
    return cfg


def student_config(cfg: dict, scenario: str, method: str, seed: int, teacher_ckpt) -> dict:
    """The training configuration of one cell."""
    kd = {"method": method, "teacher": "" if method == "none" else str(teacher_ckpt)}
    if method != "none":
        kd["lambda"] = cfg["lambda"][method]
    return config_mod.merge(config_mod.merge(config_mod.DEFAULTS, cfg["student"]),
                            {"model": {"preset": scenario}, "train": {"seed": seed}, "kd": kd})


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (scenario, method) in first-seen order: params, seeds, and for each metric its mean
    and sample std (ddof=1; None for a single seed) over the runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["method"]), []).append(r)
    rows = []
    for (scenario, method), rs in groups.items():
        row = {"scenario": scenario, "method": method, "params": rs[0]["params"], "seeds": len(rs)}
        for m in METRICS:
            vals = np.array([r[m] for r in rs if r[m] is not None], dtype=float)
            row[f"{m}_mean"] = float(vals.mean()) if len(vals) else None
            row[f"{m}_std"] = float(vals.std(ddof=1)) if len(vals) > 1 else None
        rows.append(row)
    return rows


def markdown(rows: list[dict], reference_rows: list[dict]) -> str:
    def pm(r, m):
        mean, std = r[f"{m}_mean"], r[f"{m}_std"]
        digits = 1 if m == "si_sdr" else 3
        if mean is None:
            return "-"
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    out = ["| scenario | method | params | seeds | PESQ | STOI | SI-SDR (dB) |", "|---|---|---|---|---|---|---|"]
    for r in reference_rows + rows:
        out.append(f"| {r['scenario']} | {r['method']} | {r['params']:,} | {r['seeds']} | "
                   + " | ".join(pm(r, m) for m in METRICS) + " |")
    return "\n".join(out) + "\n"


def _csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plot_pesq_vs_size(rows: list[dict], out_path, teacher: dict | None = None, noisy: float | None = None) -> Path:
    from .report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        pts = sorted((r["params"], r["pesq_mean"], r["pesq_std"] or 0.0) for r in rows
                     if r["method"] == method and r["pesq_mean"] is not None)
        if pts:
            x, y, e = zip(*pts)
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=method)
    if teacher is not None:
        ax.scatter([teacher["params"]], [teacher["pesq_mean"]], marker="*", s=120, color="k", label="teacher")
    if noisy is not None:
        ax.axhline(noisy, color="gray", ls="--", lw=1, label="noisy input")
    ax.set(xscale="log", xlabel="student parameters", ylabel="PESQ-WB (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return Path(out_path)


def run_experiment(cfg: dict, out, progress: bool = False, log=print) -> dict:
    """Runs (or resumes) every cell of ``cfg`` (from :func:`load_config`) into ``out``; writes the tables
    and the plot; returns ``{"rows", "runs", "seconds"}``."""
    from . import data, evaluation, synth, training
    from .models import count_parameters

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "experiment.json", json.dumps(cfg, indent=1))
    ex = cfg["experiment"]
    corpus_dir = Path(ex["corpus"]) if ex["corpus"] else synth.synthesize_corpus(out / "corpus", **cfg["corpus"])
    teacher_cfg = config_mod.merge(config_mod.merge(config_mod.DEFAULTS, cfg["teacher"]), {"kd": {"method": "none"}})
    log("== teacher")
    training.train(teacher_cfg, corpus_dir, out / "teacher", progress=progress, log=log)
    teacher_ckpt = out / "teacher" / "best.pt"
    test = data.load_corpus(corpus_dir).test

    def evaluated(label, ckpt_path, eval_dir):
        summary_path = eval_dir / f"{label}_summary.json"
        if not summary_path.is_file():
            if ckpt_path is None:
                evaluation.evaluate_noisy(test, eval_dir, workers=ex["eval_workers"])
            else:
                model = training.load_model(ckpt_path)[0]
                evaluation.evaluate(lambda x: model(x[None])[0], test, eval_dir, label, workers=ex["eval_workers"])
        return json.loads(summary_path.read_text())

    def ref_row(name, params, s):
        return {"scenario": name, "method": "-", "params": params, "seeds": 1,
                **{k: v for m in METRICS for k, v in ((f"{m}_mean", s[m]), (f"{m}_std", None))}}

    noisy = evaluated("noisy", None, out / "eval")
    teacher_model = training.load_model(teacher_ckpt)[0]
    teacher_row = ref_row("teacher", count_parameters(teacher_model), evaluated("teacher", teacher_ckpt, out / "eval"))
    reference_rows = [ref_row("noisy input", 0, noisy), teacher_row]

    runs = []
    cells = [(s, m, k) for s in ex["scenarios"] for m in ex["methods"] for k in range(ex["seeds"])]
    for i, (scenario, method, seed) in enumerate(cells, 1):
        run_dir = out / "runs" / scenario / method / f"seed{seed}"
        if not (run_dir / "eval" / "test_summary.json").is_file():
            t_cell = time.perf_counter()
            log(f"== cell {i}/{len(cells)}: {scenario} / {method} / seed {seed}")
            training.train(student_config(cfg, scenario, method, seed, teacher_ckpt), corpus_dir, run_dir,
                           progress=progress, log=log)
            evaluated("test", run_dir / "best.pt", run_dir / "eval")
            log(f"== cell {i}/{len(cells)} done in {time.perf_counter() - t_cell:.0f} s")
        s = json.loads((run_dir / "eval" / "test_summary.json").read_text())
        params = count_parameters(training.load_model(run_dir / "best.pt")[0])
        runs.append({"scenario": scenario, "method": method, "seed": seed, "params": params,
                     **{m: s[m] for m in METRICS}, "n_failed": s["n_failed"]})

    rows = summarize(runs)
    write_text_atomic(out / "runs.csv", _csv(runs))
    write_text_atomic(out / "results.csv", _csv(rows))
    seconds = round(time.perf_counter() - t0, 1)
    md = (f"# Experiment: mean ± std over {ex['seeds']} seeds (test set, {len(test)} files)\n\n"
          + markdown(rows, reference_rows)
          + f"\nKD weights: {cfg['lambda']}. Wall time of this invocation: {seconds:.0f} s.\n")
    write_text_atomic(out / "results.md", md)
    write_text_atomic(out / "results.json", json.dumps({"rows": rows, "reference": reference_rows, "runs": runs,
                                                    "seconds": seconds, "config": cfg}, indent=1))
    plot_pesq_vs_size(rows, out / "pesq_vs_size.png", teacher_row, noisy["pesq"])
    log(md)
    return {"rows": rows, "runs": runs, "seconds": seconds}
