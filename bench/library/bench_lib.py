"""Benchmark: fused LIB + cosine distance loss (forward + backward) on CPU vs the unfused
pure-PyTorch reference, eager and torch.compile'd: median time and peak extra memory.

    PYTHONPATH=. .venv/bin/python bench/library/bench_lib.py [--quick]

float32, D_s=128, D_t=512, e=4 (E=512), N in {16384, 131072}; the loss is 'mean', with biases.
Each (variant, N) runs in a fresh subprocess, so that memory one variant freed but the process
keeps (glibc heap, inductor's compile) can neither hide nor inflate another's peak. There: make the
inputs and parameters, run the step twice (compile, first touch of MKL buffers and thread pools),
malloc_trim(0) to hand freed heap back to the OS, then the peak extra memory is the RSS high-water
mark of one more step above the RSS before it: every intermediate, saved tensor and gradient the
step allocates counts; the inputs and parameters do not. Then the median time of the step.
Also: lib_projection vs two nn.functional.linear calls, forward + backward.
Prints Markdown tables; writes bench/results/lib_cosine_cpu.csv and lib_projection_cpu.csv.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import format_table, machine_description, median_time, peak_rss_bytes, write_csv  # noqa: E402

import pycosdist  # noqa: E402
from pycosdist import reference  # noqa: E402

D_S, D_T, EXPANSION = 128, 512, 4
SIZES = [16384, 131072]
VARIANTS = ["pycosdist fused", "reference eager", "reference compile"]


def make_inputs(n: int, d_s: int = D_S, d_t: int = D_T, e: int = EXPANSION * D_S, dtype=torch.float32):
    """student (n, d_s) and the LIB parameters require grad; the teacher (n, d_t) is a constant."""
    torch.manual_seed(0)
    student = torch.randn(n, d_s, dtype=dtype, requires_grad=True)
    teacher = torch.randn(n, d_t, dtype=dtype)
    lib = pycosdist.nn.LinearInvertedBottleneck(d_s, d_t, e // d_s).to(dtype)
    params = [lib.expand.weight, lib.expand.bias, lib.project.weight, lib.project.bias]
    return student, teacher, params


def loss_fn(variant: str):
    if variant == "pycosdist fused":
        return pycosdist.lib_cosine_distance_loss
    if variant == "reference eager":
        return reference.lib_cosine_distance_loss
    if variant == "reference compile":  # specialized to the shapes: the baseline's best case
        return torch.compile(reference.lib_cosine_distance_loss, dynamic=False)
    raise ValueError(variant)


def fwd_bwd(fn, student, teacher, params):
    w1, b1, w2, b2 = params

    def step():
        loss = fn(student, teacher, w1, b1, w2, b2)
        return torch.autograd.grad(loss, [student, *params])
    return step


def worker(variant: str, n: int, repeats: int) -> dict:
    """One measurement, in this (fresh) process."""
    student, teacher, params = make_inputs(n)
    step = fwd_bwd(loss_fn(variant), student, teacher, params)
    step()
    step()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    peak = peak_rss_bytes(step)
    seconds = median_time(step, warmup=0, repeats=repeats)
    return {"seconds": seconds, "peak_bytes": peak}


def measure(variant: str, n: int, repeats: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", variant, str(n), str(repeats)], check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def projection_rows(repeats: int) -> list[dict]:
    rows = []
    for n in SIZES:
        x, _, (w1, b1, w2, b2) = make_inputs(n)
        params = [x, w1, b1, w2, b2]
        unfused = lambda *a: torch.nn.functional.linear(torch.nn.functional.linear(a[0], a[1], a[2]), a[3], a[4])  # noqa
        times = {}
        for name, fn in (("lib_projection", pycosdist.lib_projection), ("2x F.linear", unfused)):
            g = torch.randn(n, D_T)
            times[name] = median_time(lambda: torch.autograd.grad(fn(*params), params, g), repeats=repeats)
        rows.append({"N": n, "D_s": D_S, "E": EXPANSION * D_S, "D_t": D_T,
                     "lib_projection ms": times["lib_projection"] * 1e3, "2x F.linear ms": times["2x F.linear"] * 1e3,
                     "x F.linear": times["2x F.linear"] / times["lib_projection"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "N", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, n, repeats = args.worker
        print(json.dumps(worker(variant, int(n), int(repeats))))
        return

    repeats = 3 if args.quick else 7
    machine = machine_description()
    rows = []
    for n in SIZES:
        res = {v: measure(v, n, repeats) for v in VARIANTS}
        eager, fused = res["reference eager"], res["pycosdist fused"]
        for v in VARIANTS:
            r = res[v]
            rows.append({"N": n, "variant": v, "fwd+bwd ms": r["seconds"] * 1e3,
                         "peak extra MiB": r["peak_bytes"] / 2**20,
                         "mem % eager": 100 * r["peak_bytes"] / max(eager["peak_bytes"], 1),
                         "x eager time": eager["seconds"] / r["seconds"]})
            print(rows[-1], flush=True)
        compiled = res["reference compile"]
        print(f"N={n}: fused peak = {100 * fused['peak_bytes'] / eager['peak_bytes']:.1f}% of eager's (bar <= 25%), "
              f"fused time = {fused['seconds'] / compiled['seconds']:.2f}x compile's (bar <= 1)", flush=True)

    config = f"float32, D_s={D_S}, D_t={D_T}, E={EXPANSION * D_S}, reduction='mean', biases"
    print(f"\nLIB + cosine distance loss, forward + backward ({config}); median times, peak RSS above inputs "
          f"and parameters, one fresh process per cell; {machine}; torch {torch.__version__}\n")
    print(format_table(rows))
    path = write_csv("lib_cosine_cpu.csv", [{**r, "config": config, "machine": machine, "torch": torch.__version__}
                                             for r in rows])
    print(f"\nwrote {path}")

    prows = projection_rows(repeats)
    print("\nlib_projection vs two nn.functional.linear calls, forward + backward (float32), median times\n")
    print(format_table(prows))
    path = write_csv("lib_projection_cpu.csv", [{**r, "machine": machine, "torch": torch.__version__} for r in prows])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
