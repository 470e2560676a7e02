"""The paper's experiment and its ablation: repeated, seed-paired runs over teacher/student mismatch
scenarios and KD methods (``pycosdist experiment``).

For each scenario (a student preset), each variant (a KD method, and for the LIB methods each
expansion factor) and each seed, a student is distilled from one teacher and evaluated on the test
set. Within a seed every variant starts from the same student initialization and sees the same
crops in the same order (training seeds both from ``train.seed`` alone; the KD module is built after
the student), so variant minus no KD, per seed, is a paired difference. Tables:

- mean ± std (sample std, ddof=1, over the seeds) of PESQ, STOI and SI-SDR per scenario and variant;
- the paired gain over no KD: mean of (variant - none) over the seeds both finished, its std, the
  Student-t 95% CI (:mod:`pycosdist.denoise.stats`), and the number of seeds a paired t-test would
  need to resolve ``experiment.effect`` PESQ at 80% power given that std;
- a plot of PESQ against student size.

The configuration (TOML, see ``configs/experiment.toml`` and ``configs/experiment_ablation.toml``)
has the sections:

- ``[experiment]``: ``scenarios`` (student presets), ``methods``, ``expansions`` (LIB expansion
  factors; each LIB method (``cosine_lib``, ``mse_lib``) runs once per factor; the variant is named
  ``<method>_e<e>`` except at the default e = 4, which keeps the plain name), ``seeds`` (count:
  seeds 0..N-1), ``corpus`` (an existing corpus root; empty: synthesize one into ``OUT/corpus``),
  ``teacher`` (an existing teacher checkpoint; empty: train one into ``OUT/teacher`` from ``[teacher]``),
  ``eval_workers``, ``train_workers`` (student runs trained at once, each on its share of the
  cores; 0: :func:`pycosdist.denoise.training.concurrent_runs`, 2 on a multi-core CPU), ``torchrun``
  (processes per cell: N > 0 trains each cell with ``torchrun --standalone --nproc-per-node N``, e.g.
  one per GPU of the machine, see :func:`train_cell`; 0: in this process), ``effect`` (the PESQ
  difference the power column is sized for).
- ``[corpus]``: :func:`pycosdist.synth.synthesize_corpus` arguments for the synthesized corpus.
- ``[lambda]``: KD weight per method (``kd.lambda`` of its runs).
- ``[tuning]``: ``factors`` (empty: no tuning) and ``seeds``. With factors, every KD variant first
  trains ``len(factors) x seeds`` runs at ``lambda[method] x factor`` (seeds 1000, 1001, ...: never
  an evaluation seed) and keeps the factor with the best mean VALIDATION score (``student.train.
  valid_metric``; the test set is not looked at): the same tuning budget for every method.
- ``[teacher.<section>]`` / ``[student.<section>]``: training-config overrides
  (:data:`pycosdist.config.DEFAULTS` keys) for the teacher run and for every student run.

Every key is checked (an unknown key is an error that lists the valid ones). Layout of ``OUT``:
``corpus/``, ``teacher/`` (a training run), ``tune/<scenario>/<variant>/x<factor>/seed<k>/``,
``runs/<scenario>/<variant>/seed<k>/`` (training run + ``eval/``), ``runs.csv`` (one row per
finished cell), ``results.*`` (mean ± std), ``gains.*`` (paired gains), ``tuning.csv`` and
``pesq_vs_size.png``; with ablation variants also ``contrasts.csv`` (:data:`CONTRASTS`: cosine vs
MSE at a fixed adapter, LIB vs linear at a fixed loss, expansion e vs 4). A cell is finished when its test summary exists; rerunning skips finished
cells (a killed run loses only the cell in progress, which resumes from its ``last.pt``). A finished
cell whose recorded KD weight differs from the one now planned is an error, never silently reused.

Across machines: ``shard=(K, N)`` (the CLI's ``--shard K/N``) runs only the cells of the seeds k with
k mod N = K - 1 (:func:`shard_seeds`; a seed's paired cells stay together) after the same corpus,
teacher, tuning and reference scores as a whole run, and writes the shard's own tables.
:func:`merge_shards` (``pycosdist experiment merge``) checks that N such outputs are one experiment
(same configuration, teacher scores and KD weights; every cell exactly once) and writes the tables
the whole run would have written. See ``docs/distributed.md`` for a Slurm array job.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np

from . import config as config_mod
from .audio import write_text_atomic
from . import stats
from .distill import LIB_METHODS, METHODS

METRICS = ("pesq", "stoi", "si_sdr")

EXPERIMENT_DEFAULTS: dict[str, dict] = {
    "experiment": {
        "scenarios": ["student_half", "student_quarter", "student_eighth", "student_shallow"],
        "methods": ["none", "fitnet_mse", "similarity_preserving", "cosine_lib"],
        "expansions": [4],
        "seeds": 3,
        "corpus": "",
        "teacher": "",
        "eval_workers": 2,
        "train_workers": 0,
        "torchrun": 0,
        "effect": 0.03,
    },
    "corpus": {"n_train_speakers": 8, "n_test_speakers": 2, "utts_per_speaker": 25, "test_utts_per_speaker": 15,
               "seed": 0},
    # cosine_lib: chosen on the demo's validation split. The others are scaled so that lambda * KD
    # starts at the size of cosine_lib's (measured on the demo: cosine ~0.45 -> 0.1, SP ~0.003 -> 0.001;
    # the MSEs start near the cosine's size). [tuning] gives every method the same search around these.
    "lambda": {"fitnet_mse": 0.1, "similarity_preserving": 10.0, "cosine_lib": 0.1, "cosine_linear": 0.1,
               "mse_lib": 0.1},
    "tuning": {"factors": [], "seeds": 1},
    "teacher": {},
    "student": {},
}

# The --small preset: on our 2-core CPU, corpus + teacher + 80 student runs (4 scenarios x 4 methods
# x 5 seeds) + evaluation: 53 min measured with another experiment sharing the 2 cores (3 seeds
# alone: 26 min, 29 s per cell). 5 paired seeds resolve
# only large effects (CI half-width ~0.05 PESQ at a paired std of 0.04); the full preset is sized for 0.03.
SMALL = {
    "experiment": {"seeds": 5},
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
    _check(cfg)
    return cfg


def _check(cfg: dict) -> None:
    ex, tune = cfg["experiment"], cfg["tuning"]
    from .models import PRESETS

    for s in ex["scenarios"]:
        if s not in PRESETS:
            raise ValueError(f"experiment.scenarios: unknown model preset {s!r}; expected some of {sorted(PRESETS)}")
    for m in ex["methods"]:
        if m not in METHODS:
            raise ValueError(f"experiment.methods: unknown KD method {m!r}; expected some of {list(METHODS)}")
    if not ex["scenarios"] or not ex["methods"] or not ex["expansions"]:
        raise ValueError("experiment: scenarios, methods and expansions must not be empty")
    if len(set(ex["methods"])) != len(ex["methods"]) or len(set(ex["expansions"])) != len(ex["expansions"]):
        raise ValueError(f"experiment: methods {ex['methods']} and expansions {ex['expansions']} must not repeat")
    for e in ex["expansions"]:
        if type(e) is not int or e < 1:
            raise ValueError(f"experiment.expansions: expected integers >= 1, got {ex['expansions']!r}")
    if ex["seeds"] < 1:
        raise ValueError(f"experiment.seeds: expected >= 1, got {ex['seeds']}")
    if ex["eval_workers"] < 0:
        raise ValueError(f"experiment.eval_workers: expected >= 0 (0: evaluate in this process), got {ex['eval_workers']}")
    if ex["torchrun"] < 0:
        raise ValueError(f"experiment.torchrun: expected >= 0 (processes per cell; 0: train in this process), "
                         f"got {ex['torchrun']}")
    if ex["train_workers"] < 0:
        raise ValueError(f"experiment.train_workers: expected >= 0 (0: automatic, 1: one run at a time), "
                         f"got {ex['train_workers']}")
    if not ex["effect"] > 0:
        raise ValueError(f"experiment.effect: expected a PESQ difference > 0, got {ex['effect']}")
    for f in tune["factors"]:
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0:
            raise ValueError(f"tuning.factors: expected numbers > 0 (multipliers of [lambda]), got {tune['factors']!r}")
    tune["factors"] = [float(f) for f in tune["factors"]]
    if tune["seeds"] < 1:
        raise ValueError(f"tuning.seeds: expected >= 1, got {tune['seeds']}")


def parse_assignments(assignments) -> dict:
    """``["student.train.device=cuda", "experiment.seeds=4", ...]`` (the CLI's ``--set``) as an
    ``overrides`` dict for :func:`load_config`. ``teacher.`` / ``student.`` keys take a training-config
    key (typed like :data:`pycosdist.config.DEFAULTS`); other values are TOML literals (a bare word is
    a string)."""
    out: dict = {}
    for text in assignments:
        key, sep, value = text.partition("=")
        parts = key.strip().split(".")
        if not sep or any(not p for p in parts):
            raise ValueError(f"--set {text!r}: expected KEY=VALUE, e.g. student.train.device=cuda or experiment.seeds=4")
        value = value.strip()
        if parts[0] in ("teacher", "student"):
            if len(parts) != 3:
                raise _unknown(key, [f"{parts[0]}.{k}" for k in config_mod.valid_keys()])
            out.setdefault(parts[0], {}).setdefault(parts[1], {})[parts[2]] = config_mod.coerce(".".join(parts[1:]), value)
            continue
        if len(parts) != 2:
            raise _unknown(key, [f"{s}.{k}" for s, keys in EXPERIMENT_DEFAULTS.items() for k in keys])
        try:
            parsed = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            parsed = value
        out.setdefault(parts[0], {})[parts[1]] = parsed
    return out


DEFAULT_EXPANSION = config_mod.DEFAULTS["kd"]["expansion"]
TUNING_SEED0 = 1000  # tuning runs use seeds 1000, 1001, ...: never an evaluation seed


def variants(cfg: dict) -> list[tuple[str, str, int]]:
    """``(label, method, expansion)`` of every variant: each method, and each LIB method once per
    expansion factor (label ``<method>_e<e>``; the default factor keeps the plain method name)."""
    out = []
    for method in cfg["experiment"]["methods"]:
        for e in cfg["experiment"]["expansions"] if method in LIB_METHODS else [DEFAULT_EXPANSION]:
            out.append((method if e == DEFAULT_EXPANSION else f"{method}_e{e}", method, e))
    return out


def parse_shard(text: str) -> tuple[int, int]:
    """``"K/N"`` (the CLI's ``--shard``) as ``(K, N)``, 1 <= K <= N."""
    k, sep, n = str(text).partition("/")
    if not sep or not k.strip().isdigit() or not n.strip().isdigit() or not 1 <= int(k) <= int(n):
        raise ValueError(f"--shard: expected K/N with 1 <= K <= N (shard K of N), e.g. 2/4; got {text!r}")
    return int(k), int(n)


def shard_seeds(seeds: int, shard: tuple[int, int] | None) -> list[int]:
    """The seeds shard ``(K, N)`` runs: k in 0..seeds-1 with k mod N = K - 1 (all of them for None).
    Whole seeds, so that every paired difference (variant - none, same seed) is computed in one shard."""
    if shard is None:
        return list(range(seeds))
    k, n = shard
    if n > seeds:
        raise ValueError(f"--shard: {k}/{n} splits {seeds} seed(s) {n} ways; a shard runs whole seeds, so N must "
                         f"be at most experiment.seeds ({seeds})")
    return [s for s in range(seeds) if s % n == k - 1]


def cells(cfg: dict, seeds: list[int]) -> list[tuple[int, str, tuple[str, str, int]]]:
    """``(seed, scenario, variant)`` of every cell of ``seeds``, seed-major (a seed's cells are adjacent)."""
    return [(k, s, v) for k in seeds for s in cfg["experiment"]["scenarios"] for v in variants(cfg)]


def student_config(cfg: dict, scenario: str, method: str, seed: int, teacher_ckpt,
                   expansion: int = DEFAULT_EXPANSION, lam: float | None = None) -> dict:
    """The training configuration of one cell (``lam``: the KD weight; default ``cfg["lambda"][method]``)."""
    kd = {"method": method, "teacher": "" if method == "none" else str(teacher_ckpt)}
    if method != "none":
        kd["lambda"] = cfg["lambda"][method] if lam is None else lam
    if method in LIB_METHODS:
        kd["expansion"] = expansion
    return config_mod.merge(config_mod.merge(config_mod.DEFAULTS, cfg["student"]),
                            {"model": {"preset": scenario}, "train": {"seed": seed}, "kd": kd})


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (scenario, variant) in first-seen order: params, seeds, and for each metric its mean
    and sample std (ddof=1; None for a single seed) over the runs."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["variant"]), []).append(r)
    rows = []
    for (scenario, variant), rs in groups.items():
        row = {"scenario": scenario, "variant": variant, "method": rs[0]["method"], "expansion": rs[0]["expansion"],
               "params": rs[0]["params"], "seeds": len(rs)}
        for m in METRICS:
            summary = stats.summarize([r[m] for r in rs])
            row[f"{m}_mean"], row[f"{m}_std"] = summary.mean, summary.std
        rows.append(row)
    return rows


def paired_gains(runs: list[dict], effect: float, baseline: str = "none", confidence: float = 0.95) -> list[dict]:
    """Per scenario and variant (other than ``baseline``): the paired difference variant - baseline
    over the seeds both finished, for each metric its mean, sample std and t CI; and the number of
    seeds a paired t-test needs to detect a PESQ difference of ``effect`` with 80% power at this std."""
    by_key = {(r["scenario"], r["variant"]): {} for r in runs}
    for r in runs:
        by_key[(r["scenario"], r["variant"])][r["seed"]] = r
    rows = []
    for (scenario, variant), seeds in by_key.items():
        base = by_key.get((scenario, baseline))
        if variant == baseline or base is None:
            continue
        row = {"scenario": scenario, "variant": variant}
        for m in METRICS:
            s = stats.paired_summary({k: r[m] for k, r in base.items()}, {k: r[m] for k, r in seeds.items()},
                                     confidence)
            row["seeds"] = s.n
            row.update({f"{m}_gain": s.mean, f"{m}_std": s.std, f"{m}_ci_low": s.ci_low, f"{m}_ci_high": s.ci_high})
        std = row["pesq_std"]
        row["seeds_needed"] = stats.required_pairs(effect, std, confidence=confidence) if std else None
        rows.append(row)
    return rows


def markdown(rows: list[dict], reference_rows: list[dict]) -> str:
    def pm(r, m):
        mean, std = r[f"{m}_mean"], r[f"{m}_std"]
        digits = 1 if m == "si_sdr" else 3
        if mean is None:
            return "-"
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")

    out = ["| scenario | variant | params | seeds | PESQ | STOI | SI-SDR (dB) |", "|---|---|---|---|---|---|---|"]
    for r in reference_rows + rows:
        out.append(f"| {r['scenario']} | {r['variant']} | {r['params']:,} | {r['seeds']} | "
                   + " | ".join(pm(r, m) for m in METRICS) + " |")
    return "\n".join(out) + "\n"


def _csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    buf = io.StringIO()
    w = csv.DictWriter(buf, list(rows[0]), lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def plot_pesq_vs_size(rows: list[dict], out_path, teacher: dict | None = None, noisy: float | None = None) -> Path:
    from .report import _plt

    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["variant"] for r in rows):
        pts = sorted((r["params"], r["pesq_mean"], r["pesq_std"] or 0.0) for r in rows
                     if r["variant"] == method and r["pesq_mean"] is not None)
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


# The ablation's paired contrasts (a - b, same seed): which of the paper's two ideas does the work.
CONTRASTS = (
    ("cosine_lib", "mse_lib", "cosine vs MSE, both through the LIB"),
    ("cosine_linear", "fitnet_mse", "cosine vs MSE, both through one linear adapter"),
    ("cosine_lib", "cosine_linear", "LIB vs one linear adapter, both cosine"),
    ("mse_lib", "fitnet_mse", "LIB vs one linear adapter, both MSE"),
    ("cosine_lib", "similarity_preserving", "ours vs the similarity-preserving baseline"),
    *((f"cosine_lib_e{e}", "cosine_lib", f"cosine LIB expansion {e} vs 4") for e in (1, 2, 8)),
    *((f"mse_lib_e{e}", "mse_lib", f"MSE LIB expansion {e} vs 4") for e in (1, 2, 8)),
)


def paired_contrasts(runs: list[dict], confidence: float = 0.95) -> list[dict]:
    """The PESQ difference a - b (paired by seed) of every :data:`CONTRASTS` pair present in ``runs``,
    per scenario: mean, sample std and t CI over the seeds both finished."""
    pesq = {}
    for r in runs:
        pesq.setdefault((r["scenario"], r["variant"]), {})[r["seed"]] = r["pesq"]
    rows = []
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        for a, b, meaning in CONTRASTS:
            if (scenario, a) in pesq and (scenario, b) in pesq:
                s = stats.paired_summary(pesq[(scenario, b)], pesq[(scenario, a)], confidence)
                rows.append({"scenario": scenario, "contrast": f"{a} - {b}", "meaning": meaning, "seeds": s.n,
                             "pesq_diff": s.mean, "pesq_std": s.std, "pesq_ci_low": s.ci_low, "pesq_ci_high": s.ci_high})
    return rows


def contrasts_markdown(rows: list[dict]) -> str:
    out = ["| scenario | contrast (same seed) | what it isolates | paired seeds | PESQ difference [95% CI] |",
           "|---|---|---|---|---|"]
    for r in rows:
        text = "-" if r["pesq_diff"] is None else f"{r['pesq_diff']:+.3f}"
        if r["pesq_ci_low"] is not None:
            text += f" [{r['pesq_ci_low']:+.3f}, {r['pesq_ci_high']:+.3f}]"
            if r["pesq_ci_low"] > 0 or r["pesq_ci_high"] < 0:
                text = f"**{text}**"
        out.append(f"| {r['scenario']} | {r['contrast']} | {r['meaning']} | {r['seeds']} | {text} |")
    return "\n".join(out) + "\n"


def gains_markdown(rows: list[dict], effect: float) -> str:
    """The paired-gain table; a CI that excludes 0 is in bold (resolved at 95%)."""
    def ci(r, m):
        digits = 1 if m == "si_sdr" else 3
        if r[f"{m}_gain"] is None:
            return "-"
        text = f"{r[f'{m}_gain']:+.{digits}f}"
        if r[f"{m}_ci_low"] is not None:
            text += f" [{r[f'{m}_ci_low']:+.{digits}f}, {r[f'{m}_ci_high']:+.{digits}f}]"
            if r[f"{m}_ci_low"] > 0 or r[f"{m}_ci_high"] < 0:
                text = f"**{text}**"
        return text

    out = ["| scenario | variant | paired seeds | PESQ gain [95% CI] | std of PESQ diff | "
           f"seeds for {effect:g} PESQ at 80% power | STOI gain [95% CI] | SI-SDR gain (dB) [95% CI] |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        std = "-" if r["pesq_std"] is None else f"{r['pesq_std']:.3f}"
        need = "-" if r["seeds_needed"] is None else str(r["seeds_needed"])
        out.append(f"| {r['scenario']} | {r['variant']} | {r['seeds']} | {ci(r, 'pesq')} | {std} | {need} | "
                   f"{ci(r, 'stoi')} | {ci(r, 'si_sdr')} |")
    return "\n".join(out) + "\n"


def tune_lambdas(cfg: dict, corpus_dir, teacher_ckpt, out: Path, progress: bool, log) -> tuple[dict, list[dict]]:
    """``{(scenario, label): lambda}`` chosen on the validation split (see ``[tuning]``), and one row
    per tuning run. Without ``tuning.factors``: the ``[lambda]`` values, no runs."""
    from . import training

    factors, n_seeds = cfg["tuning"]["factors"], cfg["tuning"]["seeds"]
    chosen, rows = {}, []
    metric = config_mod.merge(config_mod.DEFAULTS, cfg["student"])["train"]["valid_metric"]
    for scenario in cfg["experiment"]["scenarios"]:
        for label, method, e in variants(cfg):
            if method == "none":
                continue
            base = cfg["lambda"][method]
            if not factors:
                chosen[(scenario, label)] = base
                continue
            plans = {(f, k): (student_config(cfg, scenario, method, TUNING_SEED0 + k, teacher_ckpt, e, base * f),
                              out / "tune" / scenario / label / f"x{f:g}" / f"seed{TUNING_SEED0 + k}")
                     for f in factors for k in range(n_seeds)}
            train_together(list(plans.values()), corpus_dir, cfg, f"tuning {scenario} / {label}", log)
            scores = {}
            for f in factors:
                for k in range(n_seeds):
                    planned, run_dir = plans[(f, k)]
                    log(f"== tuning {scenario} / {label} / lambda {base * f:g} / seed {TUNING_SEED0 + k}")
                    summary = training.train(planned, corpus_dir, run_dir, progress=progress, log=log)
                    score = summary["best"]["score"] if summary["best"] else float("nan")
                    scores.setdefault(f, []).append(score)
                    rows.append({"scenario": scenario, "variant": label, "factor": f, "lambda": base * f,
                                 "seed": TUNING_SEED0 + k, f"valid_{metric}": score})
            sign = -1.0 if metric == "loss" else 1.0  # loss: lower is better
            best = max(factors, key=lambda f: sign * float(np.nanmean(scores[f])))
            chosen[(scenario, label)] = base * best
            for r in rows:
                if (r["scenario"], r["variant"]) == (scenario, label):
                    r["chosen"] = r["factor"] == best
    return chosen, rows


def train_together(plans: list[tuple[dict, Path]], corpus_dir, cfg: dict, what: str, log) -> None:
    """Trains the unfinished ``(config, run folder)`` plans ``experiment.train_workers`` at a time
    (:func:`pycosdist.denoise.training.train_concurrently`); with one worker, or one plan, it leaves
    them to the caller's own ``training.train`` calls, which then resume finished runs at once."""
    from . import training

    workers = cfg["experiment"]["train_workers"] or training.concurrent_runs()
    pending = {"/".join(run_dir.parts[-4:]): (planned, run_dir) for planned, run_dir in plans
               if not _run_finished(run_dir, planned["train"]["epochs"])}
    if workers > 1 and len(pending) > 1:
        log(f"== {what}: training {len(pending)} runs, {workers} at a time")
        training.train_concurrently(pending, corpus_dir, workers)


def train_cell(planned: dict, corpus_dir, run_dir: Path, cfg: dict, progress: bool, log) -> None:
    """Trains (or resumes) one cell into ``run_dir``: in this process, or with ``experiment.torchrun``
    = N > 0 as ``torchrun --standalone --nproc-per-node N -m pycosdist {distill,train-teacher}`` on the
    cell's configuration (written to ``run_dir/cell.toml``): a DDP run over N processes (one per GPU,
    or gloo on CPU) whose checkpoint the experiment then evaluates like any other."""
    from . import training

    n = cfg["experiment"]["torchrun"]
    if n == 0:
        training.train(planned, corpus_dir, run_dir, progress=progress, log=log)
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(run_dir / "cell.toml", config_mod.to_toml(planned))
    method = planned["kd"]["method"]
    command = ["train-teacher"] if method == "none" else ["distill", "--method", method, "--teacher",
                                                          str(Path(planned["kd"]["teacher"]).resolve())]
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n), "-m",
            "pycosdist", *command, "--config", str((run_dir / "cell.toml").resolve()), "--data",
            str(Path(corpus_dir).resolve()), "--out", str(Path(run_dir).resolve()),
            *([] if progress else ["--no-progress"])]
    # The children import this pycosdist (installed or a source tree), whatever their sys.path would say:
    # `-m` puts the working folder first on sys.path, so they run from the folder that holds this package
    # (a source checkout in the caller's folder would otherwise shadow an installed package).
    package_root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
    log("== " + " ".join(argv[2:]))
    done = subprocess.run(argv, env=env, cwd=package_root)
    if done.returncode != 0:
        raise ChildProcessError(f"{run_dir}: torchrun exited with status {done.returncode} (its output is above); "
                                "run the experiment again to resume the cell")


def _run_finished(run_dir: Path, epochs: int) -> bool:
    """Whether ``run_dir`` holds a run that has trained all its ``epochs``."""
    from .training import load_checkpoint

    last = run_dir / "last.pt"
    return last.is_file() and load_checkpoint(last)["epoch"] >= epochs


def _finished_cell(run_dir: Path, planned: dict) -> dict:
    """The checkpoint of a finished cell, after checking it was trained with the planned KD settings."""
    from . import training

    model, ckpt = training.load_model(run_dir / "best.pt")
    # kd.teacher is always this experiment's teacher/best.pt; its path changes when OUT is moved
    diff = config_mod.differences(ckpt["config"], planned, ignore=(*config_mod.RESUMABLE_KEYS, "kd.teacher"))
    if diff:
        raise ValueError(f"{run_dir} was trained with another configuration than the one now planned "
                         f"({'; '.join(diff)}); use another --out, or the original configuration")
    return {"model": model, "ckpt": ckpt}


def write_tables(out: Path, cfg: dict, runs: list[dict], reference_rows: list[dict], n_test: int, seconds: float,
                 lambdas: dict, tuning_rows: list[dict], shard: tuple[int, int] | None = None,
                 timing: str | None = None) -> tuple[list[dict], list[dict]]:
    """runs.csv, results.{md,csv,json}, gains.csv, contrasts.csv and tuning.csv from the finished runs.
    ``shard``: the (K, N) these runs are a share of; ``timing``: the wall-time sentence of results.md
    (default: this invocation's ``seconds``)."""
    ex = cfg["experiment"]
    seeds = f"seeds 0..{ex['seeds'] - 1}"
    if shard is not None:
        seeds = (f"shard {shard[0]}/{shard[1]}: seeds {', '.join(map(str, shard_seeds(ex['seeds'], shard)))} "
                 f"of 0..{ex['seeds'] - 1}")
    rows = summarize(runs)
    gains = paired_gains(runs, ex["effect"])
    write_text_atomic(out / "runs.csv", _csv(runs))
    write_text_atomic(out / "results.csv", _csv(rows))
    write_text_atomic(out / "gains.csv", _csv(gains))
    contrasts = paired_contrasts(runs)
    if contrasts:
        write_text_atomic(out / "contrasts.csv", _csv(contrasts))
    if tuning_rows:
        write_text_atomic(out / "tuning.csv", _csv(tuning_rows))
    lam_text = ", ".join(f"{s}/{v} {lam:g}" for (s, v), lam in lambdas.items())
    tuned = (f"chosen on the validation split over factors {cfg['tuning']['factors']} x [lambda] "
             f"({cfg['tuning']['seeds']} tuning seed(s) per factor, the same for every method)"
             if cfg["tuning"]["factors"] else "the [lambda] values, not tuned in this run")
    md = (f"# Experiment: test set ({n_test} files), {seeds}\n\n"
          "## Mean ± std over seeds\n\n" + markdown(rows, reference_rows)
          + "\n## Paired gain over no KD (same seed: same initialization and data order)\n\n"
          + "Mean of (variant - none) over the seeds both finished, its sample std, and the Student-t 95% CI "
            "over seeds; bold: the CI excludes 0. The seeds column next to it is what a paired t-test would "
            f"need to resolve {ex['effect']:g} PESQ with 80% power at the measured std.\n\n"
          + gains_markdown(gains, ex["effect"])
          + ("\n## Ablation contrasts (paired by seed)\n\n" + contrasts_markdown(contrasts) if contrasts else "")
          + f"\nKD weights ({tuned}): {lam_text}. {timing or f'Wall time of this invocation: {seconds:.0f} s.'}\n")
    write_text_atomic(out / "results.md", md)
    write_text_atomic(out / "results.json", json.dumps({"rows": rows, "gains": gains, "contrasts": contrasts,
                                                        "reference": reference_rows,
                                                        "runs": runs, "tuning": tuning_rows, "seconds": seconds,
                                                        "lambdas": {f"{s}/{v}": lam for (s, v), lam in lambdas.items()},
                                                        "config": cfg, "n_test": n_test,
                                                        "shard": list(shard) if shard else None}, indent=1))
    return rows, gains


def run_experiment(cfg: dict, out, progress: bool = False, log=print, shard: tuple[int, int] | None = None) -> dict:
    """Runs (or resumes) every cell of ``cfg`` (from :func:`load_config`) into ``out``, seed by seed
    (so that a stopped run leaves every variant with about as many paired seeds); rewrites the tables
    after every cell and draws the plot at the end; returns ``{"rows", "gains", "runs", "seconds"}``.
    ``shard=(K, N)``: only the cells of :func:`shard_seeds` (see the module docstring)."""
    from . import data, evaluation, synth, training
    from .models import count_parameters

    t0 = time.perf_counter()
    out = Path(out)
    ex = cfg["experiment"]
    seeds = shard_seeds(ex["seeds"], shard)  # a bad shard fails before anything is written
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "experiment.json", json.dumps(cfg, indent=1))
    corpus_dir = Path(ex["corpus"]) if ex["corpus"] else synth.synthesize_corpus(out / "corpus", **cfg["corpus"])
    if ex["teacher"]:
        teacher_ckpt = Path(ex["teacher"])
        training.load_model(teacher_ckpt)  # a missing or broken file fails here, not in the first cell
    else:
        teacher_cfg = config_mod.merge(config_mod.merge(config_mod.DEFAULTS, cfg["teacher"]), {"kd": {"method": "none"}})
        log("== teacher")
        training.train(teacher_cfg, corpus_dir, out / "teacher", progress=progress, log=log)
        teacher_ckpt = out / "teacher" / "best.pt"
    test = data.load_corpus(corpus_dir).test

    def evaluated(label, model, eval_dir):
        summary_path = eval_dir / f"{label}_summary.json"
        if not summary_path.is_file():
            if model is None:
                evaluation.evaluate_noisy(test, eval_dir, workers=ex["eval_workers"])
            else:
                evaluation.evaluate(lambda x: model(x[None])[0], test, eval_dir, label, workers=ex["eval_workers"])
        return json.loads(summary_path.read_text())

    def ref_row(name, params, s):
        return {"scenario": name, "variant": "-", "params": params, "seeds": 1,
                **{k: v for m in METRICS for k, v in ((f"{m}_mean", s[m]), (f"{m}_std", None))}}

    noisy = evaluated("noisy", None, out / "eval")
    teacher_model = training.load_model(teacher_ckpt)[0]
    teacher_row = ref_row("teacher", count_parameters(teacher_model),
                          evaluated("teacher", teacher_model, out / "eval"))
    reference_rows = [ref_row("noisy input", 0, noisy), teacher_row]
    lambdas, tuning_rows = tune_lambdas(cfg, corpus_dir, teacher_ckpt, out, progress, log)

    runs = []
    planned_cells = cells(cfg, seeds)
    plans = [(student_config(cfg, scenario, method, seed, teacher_ckpt, e, lambdas.get((scenario, label))),
              out / "runs" / scenario / label / f"seed{seed}") for seed, scenario, (label, method, e) in planned_cells]
    per_seed = len(planned_cells) // len(seeds)  # cells are seed-major

    def evaluated_cell(run_dir: Path) -> bool:
        return (run_dir / "eval" / "test_summary.json").is_file()

    for i, (seed, scenario, (label, method, e)) in enumerate(planned_cells, 1):
        planned, run_dir = plans[i - 1]
        if (i - 1) % per_seed == 0 and not ex["torchrun"]:  # a seed's first cell: its unevaluated cells train together
            train_together([p for p in plans[i - 1:i - 1 + per_seed] if not evaluated_cell(p[1])],
                           corpus_dir, cfg, f"seed {seed}", log)
        if not evaluated_cell(run_dir):
            t_cell = time.perf_counter()
            log(f"== cell {i}/{len(planned_cells)}: {scenario} / {label} / seed {seed}")
            train_cell(planned, corpus_dir, run_dir, cfg, progress, log)
            evaluated("test", training.load_model(run_dir / "best.pt")[0], run_dir / "eval")
            log(f"== cell {i}/{len(planned_cells)} done in {time.perf_counter() - t_cell:.0f} s")
        cell = _finished_cell(run_dir, planned)
        s = json.loads((run_dir / "eval" / "test_summary.json").read_text())
        runs.append({"scenario": scenario, "variant": label, "method": method,
                     "expansion": e if method in LIB_METHODS else None, "seed": seed,
                     "params": count_parameters(cell["model"]), **{m: s[m] for m in METRICS},
                     "n_failed": s["n_failed"],
                     "train_seconds": round(sum(r["seconds"] for r in cell["ckpt"]["history"]), 1)})
        rows, gains = write_tables(out, cfg, runs, reference_rows, len(test), round(time.perf_counter() - t0, 1),
                                   lambdas, tuning_rows, shard)
    seconds = round(time.perf_counter() - t0, 1)
    rows, gains = write_tables(out, cfg, runs, reference_rows, len(test), seconds, lambdas, tuning_rows, shard)
    plot_pesq_vs_size(rows, out / "pesq_vs_size.png", teacher_row, noisy["pesq"])
    log((out / "results.md").read_text())
    return {"rows": rows, "gains": gains, "runs": runs, "seconds": seconds, "lambdas": lambdas}


# --- merging shards --------------------------------------------------------------------------------
# Keys that may differ between the shards of one experiment: where the shared inputs are mounted and
# how many processes a machine used. That the inputs were the same is checked on what they produced
# (the noisy and teacher test scores, the KD weights and the tuning runs).
SHARD_LOCAL_KEYS = ("experiment.corpus", "experiment.teacher", "experiment.eval_workers", "experiment.train_workers")


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _load_shard(d: Path) -> dict:
    path = d / "results.json"
    if not path.is_file():
        raise ValueError(f"{d}: no results.json; not an experiment output folder, or none of its cells has finished")
    try:
        res = json.loads(path.read_text())
        shard = tuple(res["shard"]) if res.get("shard") else (1, 1)  # an unsharded run is shard 1/1
        return {"dir": d, "shard": shard, "config": res["config"], "runs": res["runs"], "reference": res["reference"],
                "lambdas": res["lambdas"], "tuning": res["tuning"], "n_test": res["n_test"], "seconds": res["seconds"]}
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not the results of this pycosdist's `experiment` (missing {e}); rerun that "
                         "shard to rewrite it") from None


def _check_same_experiment(shards: list[dict]) -> None:
    """Every shard has the first one's configuration (up to :data:`SHARD_LOCAL_KEYS`), split N, and
    reference scores, KD weights and tuning runs."""
    first = shards[0]
    base = _flat(first["config"])
    for s in shards[1:]:
        other = _flat(s["config"])
        diff = [f"{k}: {base.get(k)!r} -> {other.get(k)!r}" for k in sorted(set(base) | set(other))
                if k not in SHARD_LOCAL_KEYS and base.get(k) != other.get(k)]
        if diff:
            raise ValueError(f"{first['dir']} and {s['dir']} are shards of different experiments ({'; '.join(diff)})")
        if s["shard"][1] != first["shard"][1]:
            raise ValueError(f"{first['dir']} is shard {first['shard'][0]}/{first['shard'][1]} but {s['dir']} is shard "
                             f"{s['shard'][0]}/{s['shard'][1]}: merge the shards of one split")
        for key, what in (("reference", "noisy-input and teacher test scores (another corpus or teacher)"),
                          ("lambdas", "KD weights"), ("tuning", "tuning runs"), ("n_test", "test-set size")):
            if s[key] != first[key]:
                raise ValueError(f"{first['dir']} and {s['dir']} differ in their {what}; their cells do not belong "
                                 "in one table (give every shard the same experiment.corpus and experiment.teacher, "
                                 "on the same software and thread counts)")


def merge_shards(dirs, out, log=print) -> dict:
    """Combines the outputs of the shards ``1/N .. N/N`` of one experiment (``dirs``: their ``--out``
    folders, in any order) into ``out``: the tables a single run of the whole grid writes (runs.csv,
    results.*, gains.csv, contrasts.csv, tuning.csv, pesq_vs_size.png), and ``merged.json`` (which
    folders). Refuses shards of different experiments, a shard given twice or missing, and unfinished
    cells. ``out`` must be new, empty, or an earlier merge's output."""
    dirs = [Path(d) for d in dirs]
    out = Path(out)
    if not dirs:
        raise ValueError("merge: expected the output folders of the shards, got none")
    if any(out.resolve() == d.resolve() for d in dirs):
        raise ValueError(f"--out: {out} is one of the shards; write the merge to a folder of its own")
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "merged.json").is_file())):
        raise ValueError(f"--out: {out} already holds files that are not a merge's output; give a new or empty folder")
    shards = [_load_shard(d) for d in dirs]
    _check_same_experiment(shards)
    cfg, n = shards[0]["config"], shards[0]["shard"][1]
    by_k = {}
    for s in shards:
        k = s["shard"][0]
        if k in by_k:
            raise ValueError(f"{by_k[k]['dir']} and {s['dir']} are both shard {k}/{n}: their cells overlap")
        by_k[k] = s
    missing = [k for k in range(1, n + 1) if k not in by_k]
    if missing:
        raise ValueError(f"missing shard(s) {', '.join(f'{k}/{n}' for k in missing)} (seeds "
                         f"{', '.join(str(x) for k in missing for x in shard_seeds(cfg['experiment']['seeds'], (k, n)))})")
    found = {}
    for k, s in sorted(by_k.items()):
        planned = {(seed, sc, v[0]) for seed, sc, v in cells(cfg, shard_seeds(cfg["experiment"]["seeds"], (k, n)))}
        got = {(r["seed"], r["scenario"], r["variant"]): r for r in s["runs"]}
        unfinished = sorted(planned - set(got))
        if unfinished:
            seed, sc, v = unfinished[0]
            raise ValueError(f"{s['dir']} (shard {k}/{n}) has {len(unfinished)} unfinished cell(s), first "
                             f"{sc}/{v}/seed{seed}; rerun that shard to finish it")
        if set(got) - planned:
            raise ValueError(f"{s['dir']} (shard {k}/{n}) holds cells outside its share: "
                             f"{sorted(set(got) - planned)[:3]}")
        found.update(got)
    runs = [found[(seed, sc, v[0])] for seed, sc, v in cells(cfg, list(range(cfg["experiment"]["seeds"])))]
    first = shards[0]
    lambdas = {tuple(key.split("/", 1)): lam for key, lam in first["lambdas"].items()}
    seconds = [by_k[k]["seconds"] for k in sorted(by_k)]
    timing = (f"Merged from {n} shard(s); their wall times: {', '.join(f'{t:.0f}' for t in seconds)} s "
              f"({sum(seconds):.0f} s in all).")
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "experiment.json", json.dumps(cfg, indent=1))
    rows, gains = write_tables(out, cfg, runs, first["reference"], first["n_test"], round(sum(seconds), 1), lambdas,
                               first["tuning"], timing=timing)
    noisy_row, teacher_row = first["reference"]
    plot_pesq_vs_size(rows, out / "pesq_vs_size.png", teacher_row, noisy_row["pesq_mean"])
    write_text_atomic(out / "merged.json", json.dumps(
        {"shards": [{"dir": str(by_k[k]["dir"]), "shard": f"{k}/{n}", "seconds": by_k[k]["seconds"]} for k in sorted(by_k)]},
        indent=1))
    log((out / "results.md").read_text())
    return {"rows": rows, "gains": gains, "runs": runs, "seconds": round(sum(seconds), 1), "lambdas": lambdas}
