"""Benchmark: throughput (samples/s) of one cosine_lib distillation training step on CPU.

    python bench/denoise/bench_train_step.py [--quick]

The step: student forward (demo student preset) + task loss + KD loss + backward + AdamW step, on a
batch of 8 two-second crops, the frozen demo teacher's latent either taken from a precomputed cache
("cache") or computed by running the teacher encoder under no_grad ("teacher"). The KD loss is our
fused op (pycosdist.nn.CosineLIBDistillationLoss), the unfused pure-PyTorch reference eager, or
torch.compile of that reference. Also the KD loss alone (forward + backward) at the same shape, to
show its share of the step. Writes bench/results/train_step_cpu.csv.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import format_table, machine_description, median_time, write_csv  # noqa: E402

from pycosdist.denoise import distill  # noqa: E402
from pycosdist.denoise.models import HOP, build_model  # noqa: E402
from pycosdist.nn import CosineLIBDistillationLoss  # noqa: E402

BATCH, SECONDS = 8, 2.0
TEACHER, STUDENT = "teacher", "student_quarter"
KD_VARIANTS = ["pycosdist fused", "reference eager", "reference compile"]


def kd_module(variant: str, d_s: int, d_t: int) -> torch.nn.Module:
    torch.manual_seed(0)
    args = dict(expansion=4, bias=True, eps=1e-8, reduction="mean", layout="bcft")
    if variant == "pycosdist fused":
        return CosineLIBDistillationLoss(d_s, d_t, **args)
    ref = distill._ReferenceCosineLIB(d_s, d_t, **args)
    return torch.compile(ref, dynamic=False) if variant == "reference compile" else ref


def make_step(variant: str, cached: bool):
    torch.manual_seed(0)
    student, teacher = build_model(STUDENT), distill.freeze(build_model(TEACHER))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 10
    rows = []
    for cached in (True, False):
        for variant in KD_VARIANTS:
            step, kd, s_shape, t_shape = make_step(variant, cached)
            t = median_time(step, warmup=2, repeats=repeats)
            g = torch.Generator().manual_seed(1)
            s_lat = torch.randn(s_shape, generator=g).requires_grad_()  # (B, C_s, F_s, T)
            t_lat = torch.randn(t_shape, generator=g)  # (B, C_t, F_t, T)
            t_kd = median_time(lambda: kd(s_lat, t_lat).backward(), warmup=2, repeats=repeats * 3)
            n_frames, d_s, d_t = s_shape[0] * s_shape[3], s_shape[1] * s_shape[2], t_shape[1] * t_shape[2]
            rows.append({"teacher latent": "cache" if cached else "teacher", "KD loss": variant,
                         "step ms": t * 1e3, "samples/s": BATCH / t, "KD fwd+bwd ms": t_kd * 1e3,
                         "KD share %": 100 * t_kd / t, "frames": n_frames, "D_s": d_s, "D_t": d_t})
            print(rows[-1], flush=True)
    for r in rows:  # speed-up of the step against the eager reference with the same teacher-latent source
        base = next(x for x in rows if x["teacher latent"] == r["teacher latent"] and x["KD loss"] == "reference eager")
        r["x eager step"] = base["step ms"] / r["step ms"]
    machine = machine_description()
    print(f"\ncosine_lib distillation training step, batch {BATCH} x {SECONDS} s, student {STUDENT}, teacher "
          f"{TEACHER}; median times; {machine}; torch {torch.__version__}\n")
    print(format_table(rows))
    path = write_csv("train_step_cpu.csv", [{**r, "machine": machine, "torch": torch.__version__} for r in rows])
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
