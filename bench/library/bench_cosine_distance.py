"""Benchmark: fused cosine_distance loss (forward + backward) on CPU vs the pure-PyTorch
reference, eager and torch.compile'd, in one run, against the copy-bandwidth ceiling.

    PYTHONPATH=. .venv/bin/python bench/library/bench_cosine_distance.py [--quick]

"eager" and "compile" run pycosdist.reference.cosine_distance_loss; "F.cos_sim" is the common
eager idiom (1 - F.cosine_similarity(s, t)).mean(). Prints a Markdown table and writes
bench/results/cosine_distance_cpu.csv. Effective bandwidth
counts the 3 * N * D elements a fused forward + backward must move (read student and teacher,
write the student gradient); every time is a median.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import copy_bandwidth_gbs, format_table, machine_description, median_time, write_csv  # noqa: E402

import pycosdist  # noqa: E402
from pycosdist import reference  # noqa: E402

CONFIGS = [(torch.float32, 16384, 256), (torch.float32, 65536, 512), (torch.float32, 4096, 64),
           (torch.bfloat16, 65536, 512)]


def cosine_similarity_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The usual eager idiom (its eps rule differs slightly): the 'eager' of the issue's bar."""
    return (1 - torch.nn.functional.cosine_similarity(student, teacher, dim=-1)).mean()


def implementations() -> dict:
    return {
        "pycosdist": pycosdist.cosine_distance_loss,
        "eager": reference.cosine_distance_loss,
        # A fresh compile per configuration, specialized to its shapes (the baseline's best case).
        "compile": torch.compile(reference.cosine_distance_loss, dynamic=False),
        "eager F.cosine_similarity": cosine_similarity_loss,
    }


def fwd_bwd(fn, student: torch.Tensor, teacher: torch.Tensor):
    def step():
        student.grad = None
        fn(student, teacher).backward()
    return step


def time_config(dtype: torch.dtype, n: int, d: int, quick: bool = False) -> dict[str, float]:
    torch.manual_seed(0)
    student = torch.randn(n, d, dtype=dtype, requires_grad=True)
    teacher = torch.randn(n, d, dtype=dtype)  # a constant, as in distillation
    times = {}
    for name, fn in implementations().items():
        step = fwd_bwd(fn, student, teacher)
        step()  # compile / first touch
        slow = name.startswith("eager") and n * d >= 1 << 22
        times[name] = median_time(step, warmup=1 if slow else 3, repeats=3 if quick else (5 if slow else 15))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()

    copy_gbs = copy_bandwidth_gbs()
    machine = machine_description()
    rows = []
    for dtype, n, d in CONFIGS:
        t = time_config(dtype, n, d, args.quick)
        nbytes = 3 * n * d * torch.empty((), dtype=dtype).element_size()
        gbs = nbytes / t["pycosdist"] / 1e9
        rows.append({
            "dtype": str(dtype).removeprefix("torch."), "N": n, "D": d,
            "pycosdist ms": t["pycosdist"] * 1e3, "eager ms": t["eager"] * 1e3, "compile ms": t["compile"] * 1e3,
            "x eager": t["eager"] / t["pycosdist"], "x compile": t["compile"] / t["pycosdist"],
            "F.cos_sim ms": t["eager F.cosine_similarity"] * 1e3,
            "x F.cos_sim": t["eager F.cosine_similarity"] / t["pycosdist"],
            "GB/s": gbs, "% copy": 100 * gbs / copy_gbs,
        })
        print(rows[-1], flush=True)
    print(f"\ncosine_distance forward+backward, median times; copy bandwidth {copy_gbs:.1f} GB/s; {machine}; "
          f"torch {torch.__version__}\n")
    print(format_table(rows))
    path = write_csv("cosine_distance_cpu.csv",
                     [{**r, "copy GB/s": copy_gbs, "machine": machine, "torch": torch.__version__} for r in rows])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
