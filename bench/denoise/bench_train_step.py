"""Benchmark: throughput (samples/s) of one cosine_lib distillation training step on CPU.

    python bench/denoise/bench_train_step.py [--quick] [--sizes demo paper]

The step: student forward + task loss + KD loss + backward + AdamW step, on a batch of 8
two-second crops, the frozen teacher's latent either taken from a precomputed cache ("cache") or
computed by running the teacher encoder under no_grad ("teacher"). Sizes: "demo" is the demo's
pair (teacher, student_quarter: D_s = 272, E = 1088, D_t = 1088); "paper" the largest model preset,
paper_teacher, with paper_student_quarter (D_s = 576, E = 2304, D_t = 2304), cache only (the
paper teacher's forward would only add the same time to every variant). The KD loss is our fused
op (pycosdist.nn.CosineLIBDistillationLoss, which folds the LIB), the unfused pure-PyTorch
reference eager, or torch.compile of that reference. Also the KD loss alone (forward + backward)
at the same shape, to show its share of the step. The variants are timed round-robin (one step of
each in turn), so that on a shared machine they all see the same load. Writes bench/results/train_step_cpu.csv / .md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import RESULTS_DIR, format_table, machine_description, write_csv  # noqa: E402

from pycosdist import reference  # noqa: E402
from pycosdist.denoise import distill  # noqa: E402
from pycosdist.denoise.models import HOP, build_model  # noqa: E402
from pycosdist.nn import CosineLIBDistillationLoss  # noqa: E402

BATCH, SECONDS = 8, 2.0
SIZES = {"demo": ("teacher", "student_quarter"), "paper": ("paper_teacher", "paper_student_quarter")}
KD_VARIANTS = ["pycosdist fused", "reference eager", "reference compile"]


class ReferenceCosineLIB(CosineLIBDistillationLoss):
    """The same module (parameters, init) with the unfused pure-PyTorch reference loss."""

    def forward(self, student_latent, teacher_latent):
        lib = self.lib
        return reference.lib_cosine_distance_loss(student_latent, teacher_latent, lib.expand.weight, lib.expand.bias,
                                                  lib.project.weight, lib.project.bias, self.eps, self.reduction,
                                                  self.layout)


def kd_module(variant: str, d_s: int, d_t: int) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(expansion=4, bias=True, eps=1e-8, reduction="mean", layout="bcft")
    if variant == "pycosdist fused":
        return CosineLIBDistillationLoss(d_s, d_t, **args)
    ref = ReferenceCosineLIB(d_s, d_t, **args)
    return torch.compile(ref, dynamic=False) if variant == "reference compile" else ref


def make_step(variant: str, cached: bool, size: str):
    torch.manual_seed(0)
    teacher_name, student_name = SIZES[size]
    student, teacher = build_model(student_name), distill.freeze(build_model(teacher_name))
    n = round(SECONDS * 16000 / HOP) * HOP
    noisy, clean = 0.1 * torch.randn(BATCH, n), 0.1 * torch.randn(BATCH, n)
    frames = n // HOP + 1
    (cs, fs, _), (ct, ft, _) = student.latent_shape(frames), teacher.latent_shape(frames)
    kd = kd_module(variant, cs * fs, ct * ft)
    params = list(student.parameters()) + list(kd.parameters())
    opt = torch.optim.AdamW(params, lr=1e-3)
    cache = distill.teacher_latent(teacher, noisy) if cached else None

    def step():
        t_lat = cache if cached else distill.teacher_latent(teacher, noisy)
        enhanced, latent, spec = student.enhance_with_latent(noisy)
        loss = distill.task_loss(spec, enhanced, clean, student.stft) + 0.1 * kd(latent, t_lat)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, kd, (BATCH, cs, fs, frames), (BATCH, ct, ft, frames)


def interleaved_medians(fns: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds of each fn, timed round-robin (one call of each in turn), so that all variants
    see the same machine load on a shared machine; ``warmup`` untimed rounds first (compile)."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeats):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def load() -> str:
    return "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    args = parser.parse_args()
    repeats = 3 if args.quick else 10
    load_before = load()
    print(load_before, flush=True)
    rows = []
    for size in args.sizes:
        for cached in ((True, False) if size == "demo" else (True,)):
            steps, kds = {}, {}
            for variant in KD_VARIANTS:
                step, kd, s_shape, t_shape = make_step(variant, cached, size)
                g = torch.Generator().manual_seed(1)
                s_lat = torch.randn(s_shape, generator=g).requires_grad_()  # (B, C_s, F_s, T)
                t_lat = torch.randn(t_shape, generator=g)  # (B, C_t, F_t, T)
                steps[variant], kds[variant] = step, (lambda kd=kd, s=s_lat, t=t_lat: kd(s, t).backward())
            t_step = interleaved_medians(steps, repeats)
            t_kd = interleaved_medians(kds, repeats * 3)
            n_frames, d_s, d_t = s_shape[0] * s_shape[3], s_shape[1] * s_shape[2], t_shape[1] * t_shape[2]
            for variant in KD_VARIANTS:
                t, tk = t_step[variant], t_kd[variant]
                rows.append({"size": size, "teacher latent": "cache" if cached else "teacher", "KD loss": variant,
                             "step ms": t * 1e3, "samples/s": BATCH / t, "KD fwd+bwd ms": tk * 1e3,
                             "KD share %": 100 * tk / t, "frames": n_frames, "D_s": d_s, "D_t": d_t})
                print(rows[-1], flush=True)
    for r in rows:  # speed-up of the fused step against each reference with the same size and latent source
        same = [x for x in rows if x["size"] == r["size"] and x["teacher latent"] == r["teacher latent"]]
        for ref, col in (("reference eager", "x eager step"), ("reference compile", "x compile step")):
            r[col] = next(x for x in same if x["KD loss"] == ref)["step ms"] / r["step ms"]
    load_after = load()
    machine = machine_description()
    title = (f"cosine_lib distillation training step, batch {BATCH} x {SECONDS} s, variants timed round-robin, sizes "
             f"{', '.join(f'{k}: {v[1]} <- {v[0]}' for k, v in SIZES.items() if k in args.sizes)}; median of "
             f"{repeats}; {machine}; torch {torch.__version__}; {load_before} at start, {load_after} at end")
    table = format_table(rows)
    print(f"\n{title}\n\n{table}")
    path = write_csv("train_step_cpu.csv", [{**r, "machine": machine, "torch": torch.__version__,
                                              "load before": load_before, "load after": load_after} for r in rows])
    (RESULTS_DIR / "train_step_cpu.md").write_text(f"{title}\n\n{table}\n")
    print(f"\nwrote {path} and train_step_cpu.md")


if __name__ == "__main__":
    main()
