"""Benchmark: fused LIB + cosine distance loss (forward + backward) on CPU vs the unfused
pure-PyTorch reference (eager and torch.compile'd) and the best hand-written formulation, the
hand-folded eager one (W = W2 @ W1, b = W2 @ b1 + b2, one addmm, then the fused
pycosdist.cosine_distance_loss; autograd maps the gradients back to the factors): median time,
peak extra memory, and achieved GFLOP/s against the sgemm peak measured in the same run.

    PYTHONPATH=. .venv/bin/python bench/library/bench_lib.py [--quick]

float32, D_s=128, D_t=512, e=4 (E=512), N in {16384, 131072}; the loss is 'mean', with biases.
GFLOP/s counts the folded formulation's work for every variant (3 GEMMs of N*D_s*D_t plus 3 of
D_s*E*D_t to fold and unfold), so it compares times; the unfolded reference does about e times
more arithmetic. The ceiling: a 4096^3 float32 torch.mm, in a fresh process of the same run.
Each (variant, N) runs in a fresh subprocess, so that memory one variant freed but the process
keeps (glibc heap, inductor's compile) can neither hide nor inflate another's peak. There: make the
inputs and parameters, run the step twice (compile, first touch of MKL buffers and thread pools),
malloc_trim(0) to hand freed heap back to the OS, then the peak extra memory is the RSS high-water
mark of one more step above the RSS before it: every intermediate, saved tensor and gradient the
step allocates counts; the inputs and parameters do not. Then the median time of the step.
Also: lib_projection vs two nn.functional.linear calls, forward + backward.
Prints Markdown tables; writes bench/results/lib_cosine_cpu.csv / .md and lib_projection_cpu.csv.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import RESULTS_DIR, format_table, machine_description, median_time, peak_rss_bytes, write_csv  # noqa: E402

import pycosdist  # noqa: E402
from pycosdist import reference  # noqa: E402

D_S, D_T, EXPANSION = 128, 512, 4
SIZES = [16384, 131072]
VARIANTS = ["pycosdist fused", "hand-folded eager", "reference eager", "reference compile"]
SGEMM_N = 4096


def hand_folded(student, teacher, w1, b1, w2, b2):
    """The best hand-written formulation: fold the LIB (it has no activation), one addmm, then the
    fused cosine loss; autograd maps the gradients back to w1, b1, w2, b2."""
    w, b = reference.fold_lib(w1, b1, w2, b2)  # (D_t, D_s), (D_t,)
    return pycosdist.cosine_distance_loss(torch.addmm(b, student, w.T), teacher)


def folded_flops(n: int, d_s: int = D_S, d_t: int = D_T, e: int = EXPANSION * D_S) -> int:
    """Forward + backward FLOPs of the folded formulation: p = S W^T, dW = dP^T S, dS = dP W
    (2 N D_s D_t each) and the fold W = W2 W1, dW1 = W2^T dW, dW2 = dW W1^T (2 D_s E D_t each)."""
    return 3 * 2 * n * d_s * d_t + 3 * 2 * d_s * e * d_t


def sgemm_gflops(repeats: int) -> float:
    """The ceiling: a square float32 torch.mm, 4096^3."""
    a, b = torch.randn(SGEMM_N, SGEMM_N), torch.randn(SGEMM_N, SGEMM_N)
    out = torch.empty(SGEMM_N, SGEMM_N)
    seconds = median_time(lambda: torch.mm(a, b, out=out), warmup=2, repeats=repeats)
    return 2 * SGEMM_N ** 3 / seconds / 1e9


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
    if variant == "hand-folded eager":
        return hand_folded
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
    if variant == "sgemm":
        return {"gflops": sgemm_gflops(repeats)}
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


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="values of N")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "N", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        variant, n, repeats = args.worker
        print(json.dumps(worker(variant, int(n), int(repeats))))
        return

    repeats = 3 if args.quick else 7
    machine = machine_description()
    load_before = load()
    print(load_before, flush=True)
    peak = measure("sgemm", 0, repeats)["gflops"]
    print(f"sgemm peak ({SGEMM_N}^3 float32 torch.mm): {peak:.0f} GFLOP/s", flush=True)
    rows, bars = [], []
    for n in args.sizes:
        res = {v: measure(v, n, repeats) for v in VARIANTS}
        eager, fused = res["reference eager"], res["pycosdist fused"]
        for v in VARIANTS:
            r = res[v]
            gflops = folded_flops(n) / r["seconds"] / 1e9
            rows.append({"N": n, "variant": v, "fwd+bwd ms": r["seconds"] * 1e3,
                         "peak extra MiB": r["peak_bytes"] / 2**20,
                         "mem % eager": 100 * r["peak_bytes"] / max(eager["peak_bytes"], 1),
                         "x eager": eager["seconds"] / r["seconds"],
                         "x this (fused speed-up)": r["seconds"] / fused["seconds"],
                         "folded GFLOP/s": gflops, "% sgemm peak": 100 * gflops / peak})
            print(rows[-1], flush=True)
        x_compile = res["reference compile"]["seconds"] / fused["seconds"]
        x_folded = res["hand-folded eager"]["seconds"] / fused["seconds"]
        mem = 100 * fused["peak_bytes"] / eager["peak_bytes"]
        bars.append(f"N={n}: fused is {x_compile:.2f}x torch.compile of the reference (bar >= 4), "
                    f"{x_folded:.2f}x the hand-folded eager formulation (bar >= 1.2); fused peak extra memory "
                    f"= {mem:.1f}% of the eager reference's (bar <= 10%)")
        print(bars[-1], flush=True)
    load_after = load()

    config = f"float32, D_s={D_S}, D_t={D_T}, E={EXPANSION * D_S}, reduction='mean', biases"
    title = (f"LIB + cosine distance loss, forward + backward of student and every LIB parameter ({config}); "
             f"median of {repeats}; peak RSS above inputs and parameters, one fresh process per cell; {machine}; "
             f"torch {torch.__version__}; sgemm peak {peak:.0f} GFLOP/s (4096^3 float32 torch.mm, same run); "
             f"{load_before} at start, {load_after} at end")
    table = format_table(rows)
    print(f"\n{title}\n\n{table}\n")
    extra = {"config": config, "machine": machine, "torch": torch.__version__, "sgemm GFLOP/s": peak,
             "load before": load_before, "load after": load_after}
    path = write_csv("lib_cosine_cpu.csv", [{**r, **extra} for r in rows])
    md = RESULTS_DIR / "lib_cosine_cpu.md"
    md.write_text(f"{title}\n\n{table}\n\n" + "\n".join(f"- {b}" for b in bars) + "\n")
    print(f"wrote {path} and {md}")

    prows = projection_rows(repeats)
    print("\nlib_projection vs two nn.functional.linear calls, forward + backward (float32), median times\n")
    print(format_table(prows))
    path = write_csv("lib_projection_cpu.csv", [{**r, "machine": machine, "torch": torch.__version__} for r in prows])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
