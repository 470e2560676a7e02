"""Benchmark: cosine_distance loss (forward + backward) on CPU: pycosdist vs the pure-PyTorch
reference eager and torch.compile'd, the eager idiom and a hand-written formulation, side by side
in one run, against the copy-bandwidth ceiling.

    PYTHONPATH=. .venv/bin/python bench/library/bench_cosine_distance.py [--quick] [--only DTYPE:NxD]
        [--threads N] [--default-malloc]

Variants (all: mean over rows, student requires grad, teacher a constant, as in distillation):
  pycosdist            loss.backward(): one pass (gradient computed in the forward, upstream 1)
  pycosdist g=0.5      loss.backward(0.5), e.g. a KD weight: the backward scales the gradient in
                       place, one extra read + write of it
  eager / compile      pycosdist.reference.cosine_distance_loss, eager and torch.compile'd
  F.cos_sim            the usual eager idiom (1 - F.cosine_similarity(s, t, dim=-1)).mean()
  hand / hand compile  dot * rsqrt(|s|^2) * rsqrt(|t|^2) from three sums, eager and compiled: the
                       best hand formulation we found (compile fuses it into one forward and one
                       backward loop)

Allocation: every variant pays the same costs. By default glibc is told to keep freed blocks
(bench/common.py reuse_freed_memory), so no variant page-faults fresh memory each step;
--default-malloc measures with glibc's defaults instead (every variant faults its outputs).

Ceiling: effective bandwidth counts the 3 * N * D elements a fused forward + backward must move
(read student and teacher, write the student gradient), against the best of torch's copy_ and a
streaming copy (numpy.copyto of 1 GiB). Every time is a median. Writes
bench/results/cosine_distance_cpu.csv (.md: the table).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import (RESULTS_DIR, copy_bandwidths_gbs, format_table, machine_description, median_time,  # noqa: E402
                    reuse_freed_memory, write_csv)

import pycosdist  # noqa: E402
from pycosdist import reference  # noqa: E402

CONFIGS = [(torch.float32, 65536, 512), (torch.float32, 16384, 256), (torch.float32, 4096, 64),
           (torch.bfloat16, 65536, 512)]


def cosine_similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The usual eager idiom (its eps rule differs slightly)."""
    return (1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()


def hand_loss(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Three row sums and rsqrt: no norm ops, no division; max(|x|, eps) as max(|x|^2, eps^2)."""
    dot = (student * teacher).sum(-1)
    inv = torch.rsqrt((student * student).sum(-1).clamp_min(eps * eps))
    inv = inv * torch.rsqrt((teacher * teacher).sum(-1).clamp_min(eps * eps))
    return (1 - dot * inv).mean()


def implementations() -> dict:
    """name -> (loss function, upstream gradient or None for loss.backward())."""
    # A fresh compile per configuration, specialized to its shapes (the baseline's best case).
    return {
        "pycosdist": (pycosdist.cosine_distance_loss, None),
        "pycosdist g=0.5": (pycosdist.cosine_distance_loss, 0.5),
        "eager": (reference.cosine_distance_loss, None),
        "compile": (torch.compile(reference.cosine_distance_loss, dynamic=False), None),
        "F.cos_sim": (cosine_similarity_loss, None),
        "hand": (hand_loss, None),
        "hand compile": (torch.compile(hand_loss, dynamic=False), None),
    }


def fwd_bwd(fn, student: torch.Tensor, teacher: torch.Tensor, upstream: float | None = None):
    grad = None if upstream is None else torch.tensor(upstream, dtype=student.dtype)

    def step():
        student.grad = None
        fn(student, teacher).backward(grad)
    return step


def time_config(dtype: torch.dtype, n: int, d: int, quick: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    student = torch.randn(n, d, dtype=dtype, requires_grad=True)
    teacher = torch.randn(n, d, dtype=dtype)
    times = {}
    for name, (fn, upstream) in implementations().items():
        step = fwd_bwd(fn, student, teacher, upstream)
        step()  # compile / first touch
        slow = name in ("eager", "F.cos_sim", "hand") and n * d >= 1 << 22
        times[name] = median_time(step, warmup=1 if slow else 3, repeats=3 if quick else (5 if slow else 15))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--only", metavar="DTYPE:NxD", action="append",
                        help="run only these configurations, e.g. float32:65536x512 (repeatable)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's); results get a _threadsN suffix")
    parser.add_argument("--default-malloc", action="store_true",
                        help="glibc's default allocation policy (every variant page-faults its outputs)")
    args = parser.parse_args()
    allocator = "glibc default" if args.default_malloc else "freed blocks reused"
    if not args.default_malloc:
        reuse_freed_memory()

    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    copies = copy_bandwidths_gbs()
    copy_gbs = max(copies.values())
    machine = machine_description()
    rows = []
    configs = CONFIGS
    if args.only:
        configs = [c for c in CONFIGS if f"{str(c[0]).removeprefix('torch.')}:{c[1]}x{c[2]}" in args.only]
        if len(configs) != len(args.only):
            parser.error(f"--only: expected some of {[f'{str(c[0])[6:]}:{c[1]}x{c[2]}' for c in CONFIGS]}, "
                         f"got {args.only}")
    for dtype, n, d in configs:
        t = time_config(dtype, n, d, args.quick)
        nbytes = 3 * n * d * torch.empty((), dtype=dtype).element_size()
        ours = t["pycosdist"]
        row = {"dtype": str(dtype).removeprefix("torch."), "N": n, "D": d}
        row.update({f"{name} ms": v * 1e3 for name, v in t.items()})
        row.update({"x eager": t["eager"] / ours, "x compile": t["compile"] / ours, "x F.cos_sim": t["F.cos_sim"] / ours,
                    "x hand compile": t["hand compile"] / ours,
                    "GB/s": nbytes / ours / 1e9, "% copy": 100 * nbytes / ours / 1e9 / copy_gbs,
                    "% copy g=0.5": 100 * nbytes / t["pycosdist g=0.5"] / 1e9 / copy_gbs})
        rows.append(row)
        print(rows[-1], flush=True)
    load_after = os.getloadavg()[0]
    copy_text = ", ".join(f"{k} {v:.1f}" for k, v in copies.items())
    run = (f"copy ceiling {copy_gbs:.1f} GB/s (best of: {copy_text}); allocation: {allocator}; "
           f"load average {load_before:.2f} before, {load_after:.2f} after")
    print(f"\ncosine_distance forward+backward (mean), median times; {run}; {machine}; torch {torch.__version__}\n")
    print(format_table(rows))
    extra = {"copy GB/s": copy_gbs, **{f"{k} GB/s": v for k, v in copies.items()}, "allocation": allocator,
             "load before": load_before, "load after": load_after, "machine": machine, "torch": torch.__version__}
    name = "cosine_distance_cpu" + ("_default_malloc" if args.default_malloc else "")
    name += f"_threads{args.threads}" if args.threads else ""
    rows = [{**r, **extra} for r in rows]
    if args.only:  # replace those configurations in the previous results, keep the others
        rows = _merge(RESULTS_DIR / f"{name}.csv", rows)
    path = write_csv(f"{name}.csv", rows)
    _write_markdown(RESULTS_DIR / f"{name}.md", rows)
    print(f"\nwrote {path}")


def _merge(path: Path, new_rows: list[dict]) -> list[dict]:
    key = lambda r: (str(r["dtype"]), int(r["N"]), int(r["D"]))  # noqa: E731
    old = list(csv.DictReader(path.open())) if path.exists() else []
    fresh = {key(r) for r in new_rows}
    kept = [r for r in old if key(r) not in fresh and set(r) == set(new_rows[0])]
    order = {key(r): i for i, r in enumerate(kept + new_rows)}
    configs = [(str(c[0]).removeprefix("torch."), c[1], c[2]) for c in CONFIGS]
    return sorted(kept + new_rows, key=lambda r: configs.index(key(r)) if key(r) in configs else len(configs) + order[key(r)])


def _write_markdown(path: Path, rows: list[dict]) -> None:
    """The table, then each row's run conditions (rows may come from separate runs)."""
    cols = [c for c in rows[0] if c not in ("machine", "torch", "allocation") and not c.endswith("GB/s") or c == "GB/s"]
    cell = lambda v: f"{float(v):.3g}" if _is_float(v) else str(v)  # noqa: E731
    lines = ["cosine_distance forward + backward (mean), median times; % copy against the best copy of the run.", "",
             "| " + " | ".join(cols) + " | copy GB/s |", "|" + "---|" * (len(cols) + 1)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + f" | {cell(r['copy GB/s'])} |" for r in rows]
    lines += ["", f"machine: {rows[0]['machine']}, torch {rows[0]['torch']}, allocation: {rows[0]['allocation']}"]
    path.write_text("\n".join(lines) + "\n")


def _is_float(v) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return not str(v).isdigit()

if __name__ == "__main__":
    main()
