"""A short GPU distillation run, self-contained (no dataset, no training CLI): the demo teacher and
student (pycosdist.denoise.models presets) on random audio, N optimizer steps of

    task loss + lambda * KD loss      under torch.autocast(bfloat16) for the models

with the KD loss either pycosdist's fused CosineLIBDistillationLoss or torch.compile of the
float64-free pure-PyTorch reference (pycosdist.reference.lib_cosine_distance_loss, the eager
idiom: two Linear layers, then the cosine distance), plus a task-only run (the floor). The KD loss
runs in float32 on the (bfloat16) latents cast up, as losses usually do under autocast; the same
for both KD variants. All variants are built and warmed up first, then timed in interleaved
rounds (a rotated order each round, so that host or clock drift hits all alike); reports the
median round's steps/s (and the slowest / fastest round), seconds of audio per second, each
variant's peak GPU memory and the loss before / after, and the same step's throughput on the
CPU (float32, fused KD) for comparison.

    PYTHONPATH=. python bench/denoise/bench_gpu_distill.py [--steps 300] [--out-dir bench/results/gpu]

Needs torch (CUDA build) and numpy only: no audio files, no pesq / pystoi / soundfile. Runs in well
under 10 minutes on an H100 (the demo models are small; torch.compile's warm-up dominates).
With --device cpu it runs the same loop on the CPU (a smoke test).
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # pycosdist from this working tree when not installed


def _audio(batch: int, samples: int, device, seed: int):
    """Random 'speech' (a few decaying sinusoids at random pitches) and white noise at ~5 dB SNR."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(samples) / 16000
    f0 = 100 + 200 * torch.rand(batch, 1, generator=g)
    clean = sum(torch.sin(2 * torch.pi * k * f0 * t + 6.28 * torch.rand(batch, 1, generator=g)) / k for k in range(1, 6))
    clean = 0.1 * clean * (0.5 + 0.5 * torch.sin(2 * torch.pi * 3 * t))  # syllable-rate envelope
    noisy = clean + 0.056 * torch.randn(batch, samples, generator=g)
    return clean.to(device), noisy.to(device)


def _kd_module(kind: str, d_s: int, d_t: int):
    """The KD loss of a variant: a module whose parameters are the LIB's, called on (B, C, F, T) latents."""
    from pycosdist import reference
    from pycosdist.nn import CosineLIBDistillationLoss

    fused = CosineLIBDistillationLoss(d_s, d_t, expansion=4, bias=True, reduction="mean", layout="bcft")
    if kind == "fused":
        return fused
    compiled = torch.compile(reference.lib_cosine_distance_loss, dynamic=False)

    class CompiledReference(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lib = fused.lib  # the same initial parameters as the fused variant

        def forward(self, s, t):
            lib = self.lib
            return compiled(s, t.detach(), lib.expand.weight, lib.expand.bias, lib.project.weight, lib.project.bias,
                            1e-8, "mean", "bcft")
    return CompiledReference()


class Variant:
    """One variant's models, optimizer and data, ready to step (built before any timing, so
    every variant pays the same set-up outside the timed region)."""

    def __init__(self, kind: str, args, device: str, amp: bool):
        from pycosdist.denoise import distill
        from pycosdist.denoise.models import build_model

        torch.manual_seed(0)
        self.kind, self.device, self.amp, self.args = kind, device, amp, args
        self.distill = distill
        self.teacher = distill.freeze(build_model(args.teacher).to(device))
        self.student = build_model(args.student).to(device)
        c_s, f_s, _ = self.student.latent_shape()
        c_t, f_t, _ = self.teacher.latent_shape()
        self.kd = None if kind == "task-only" else _kd_module(kind, c_s * f_s, c_t * f_t).to(device)
        params = list(self.student.parameters()) + (list(self.kd.parameters()) if self.kd is not None else [])
        self.opt = torch.optim.Adam(params, lr=1e-3)
        self.batches = [_audio(args.batch, int(args.seconds * 16000), device, seed) for seed in range(4)]
        self.done = 0

    def step(self) -> torch.Tensor:
        clean, noisy = self.batches[self.done % len(self.batches)]
        self.done += 1
        with torch.autocast(device_type=self.device, dtype=torch.bfloat16, enabled=self.amp):
            t_lat = self.distill.teacher_latent(self.teacher, noisy)
            enhanced, s_lat, enhanced_spec = self.student.enhance_with_latent(noisy)
            loss = self.distill.task_loss(enhanced_spec, enhanced.float(), clean, self.student.stft)
        if self.kd is not None:
            loss = loss + self.args.kd_weight * self.kd(s_lat.float(), t_lat.float())
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        return loss.detach()

    def timed(self, steps: int) -> float:
        """Steps per second over `steps` steps."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            last = self.step()
        float(last)  # waits for the last step
        _sync(self.device)
        return steps / (time.perf_counter() - start)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def run_interleaved(kinds, args, device: str, steps: int, rounds: int, amp: bool) -> list[dict]:
    """Every variant built and warmed up first; then `rounds` rounds of steps // rounds timed steps
    each, the variants in a rotated order every round (drift of the host or the GPU clocks hits
    all alike). Reports the median round's steps/s, and the peak memory of each variant's own
    steps above what was allocated before them."""
    variants = [Variant(kind, args, device, amp) for kind in kinds]
    first = {v.kind: float(v.step()) for v in variants}
    for v in variants:
        for _ in range(1, args.warmup):
            v.step()
    peak = {}
    for v in variants:
        if device == "cuda":
            _sync(device)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        v.timed(3)
        peak[v.kind] = (torch.cuda.max_memory_allocated() - base) / 2**20 if device == "cuda" else float("nan")
    per_round = max(1, steps // rounds)
    rates = {v.kind: [] for v in variants}
    for r in range(rounds):
        for v in variants[r % len(variants):] + variants[:r % len(variants)]:
            rates[v.kind].append(v.timed(per_round))
    rows = []
    for v in variants:
        rate = statistics.median(rates[v.kind])
        rows.append({
            "device": device, "kd": v.kind, "amp": "bf16" if amp else "fp32", "batch": args.batch,
            "seconds": args.seconds, "steps": per_round * rounds, "rounds": rounds, "steps/s": rate,
            "steps/s min": min(rates[v.kind]), "steps/s max": max(rates[v.kind]),
            "audio s/s": rate * args.batch * args.seconds, "peak MiB": peak[v.kind],
            "loss first": first[v.kind], "loss last": float(v.step()),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=600, help="timed steps per GPU variant (default 600)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first (torch.compile, cuDNN autotune)")
    parser.add_argument("--rounds", type=int, default=6, help="timed rounds, variants interleaved (default 6)")
    parser.add_argument("--cpu-steps", type=int, default=5, help="timed CPU steps for the comparison (0: skip)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of 16 kHz audio per example")
    parser.add_argument("--teacher", default="teacher")
    parser.add_argument("--student", default="student_quarter")
    parser.add_argument("--kd-weight", type=float, default=1.0, help="lambda")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "gpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_distill: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(1)
    import pycosdist

    rows = run_interleaved(("task-only", "fused", "reference-compiled"), args, args.device, args.steps,
                           args.rounds, amp=True)
    if args.cpu_steps > 0 and args.device == "cuda":
        cpu_args = copy.copy(args)
        cpu_args.warmup = 1
        rows += run_interleaved(("fused",), cpu_args, "cpu", args.cpu_steps, 1, amp=False)
    by_kind = {(r["device"], r["kd"]): r for r in rows}
    fused = by_kind[(args.device, "fused")]
    for r in rows:
        r["x fused"] = r["steps/s"] / fused["steps/s"]
    info = {
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine(),
        "torch": torch.__version__, "cuda": torch.version.cuda, "pycosdist build": pycosdist.build_info(),
        "cpu": f"{platform.machine()} x{torch.get_num_threads()} threads", "teacher": args.teacher,
        "student": args.student, "kd_weight": args.kd_weight,
    }
    cols = list(rows[0])
    print(json.dumps(info, default=str))
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{v:.4g}" if isinstance(v, float) else str(v) for v in r.values()) + " |")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"distill_{args.device}.csv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols)
        writer.writeheader()
        writer.writerows(rows)
    (args.out_dir / f"distill_{args.device}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1,
                                                                         default=str))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
