"""A short GPU distillation run, self-contained (no dataset, no training CLI): the demo teacher and
student (pycosdist.denoise.models presets) on random audio, N optimizer steps of

    task loss + lambda * KD loss      under torch.autocast(bfloat16) for the student

with the KD loss either pycosdist's fused CosineLIBDistillationLoss or torch.compile of the
pure-PyTorch reference (pycosdist.reference.lib_cosine_distance_loss, the eager idiom: two Linear
layers, then the cosine distance), plus a task-only run (the floor), and the fused step made
launch-free (pycosdist.denoise.graphed_step.StaticStep): captured whole into one CUDA graph
("fused-graphs") and torch.compile(mode="reduce-overhead") ("fused-compile"). Every variant runs
the same step (graphed_step.distillation_loss_fn, Adam with capturable=True) on the same 4 batches,
whose teacher latents are computed once beforehand (as training's teacher-latent cache does): the
variants differ only in the KD loss and in how the step is launched. The KD loss runs in float32
on the (bfloat16) latents cast up, as losses usually do under autocast.

All variants are built and warmed up first, then timed in interleaved rounds (a rotated order each
round, so that host or clock drift hits all alike); reports the median round's steps/s (and the
slowest / fastest round), seconds of audio per second, each variant's peak GPU memory and the loss
before / after, and the same step's throughput on the CPU (float32, fused KD) for comparison.
Then the loss curves: every static variant and the eager fused one, each from the same initial
weights, over the first --curve-steps steps; the largest difference from the eager curve,
relative to the eager loss, must stay within --curve-tol (bf16 tolerance), else the script fails
(exit 1) after writing its results.

    PYTHONPATH=. python bench/denoise/bench_gpu_distill.py [--steps 300] [--out-dir bench/results/gpu]

Needs torch (CUDA build) and numpy only: no audio files, no pesq / pystoi / soundfile. Runs in a
few minutes on an H100 (the demo models are small; torch.compile's warm-up dominates).
With --device cpu it runs the same loop on the CPU (a smoke test; no CUDA-graph variant there).
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
    """One variant's models, optimizer, data and step, ready to step (built before any timing, so
    every variant pays the same set-up outside the timed region)."""

    def __init__(self, kind: str, args, device: str, amp: bool):
        from pycosdist.denoise import distill
        from pycosdist.denoise.graphed_step import StaticStep, distillation_loss_fn
        from pycosdist.denoise.models import build_model

        torch.manual_seed(0)
        self.kind, self.device, self.amp, self.args = kind, device, amp, args
        teacher = distill.freeze(build_model(args.teacher).to(device))
        self.student = build_model(args.student).to(device)
        c_s, f_s, _ = self.student.latent_shape()
        c_t, f_t, _ = teacher.latent_shape()
        kd_kind = {"task-only": None, "reference-compiled": "reference-compiled"}.get(kind, "fused")
        self.kd = None if kd_kind is None else _kd_module(kd_kind, c_s * f_s, c_t * f_t).to(device)
        params = list(self.student.parameters()) + (list(self.kd.parameters()) if self.kd is not None else [])
        self.opt = torch.optim.Adam(params, lr=1e-3, capturable=device == "cuda")
        mode = {"fused-graphs": "cuda_graphs", "fused-compile": "compile"}.get(kind, "eager")
        loss_fn = distillation_loss_fn(self.student, self.kd, distill.task_loss, args.kd_weight,
                                       torch.bfloat16 if amp else None)
        self.static = StaticStep(loss_fn, params, self.opt, mode=mode)
        self.batches = []
        for seed in range(4):  # the teacher-latent cache: computed once, outside every timed step
            clean, noisy = _audio(args.batch, int(args.seconds * 16000), device, seed)
            with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
                t_lat = distill.teacher_latent(teacher, noisy)
            self.batches.append((noisy, clean, t_lat))
        self.done = 0

    def step(self) -> torch.Tensor:
        noisy, clean, t_lat = self.batches[self.done % len(self.batches)]
        self.done += 1
        return self.static(noisy, clean, t_lat)["loss"]

    def timed(self, steps: int) -> float:
        """Steps per second over `steps` steps."""
        _sync(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            last = self.step()
        float(last)  # waits for the last step
        _sync(self.device)
        return steps / (time.perf_counter() - start)


def loss_curves(kinds, args, device: str, steps: int, amp: bool) -> dict[str, list[float]]:
    """Each variant's first `steps` losses, from the same initial weights and batches (no host
    synchronisation inside the loop: the losses are read at the end)."""
    curves = {}
    for kind in kinds:
        v = Variant(kind, args, device, amp)
        losses = [v.step() for _ in range(steps)]
        curves[kind] = [float(x) for x in losses]
    return curves


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
    parser.add_argument("--static", nargs="*", default=["graphs", "compile"], choices=["graphs", "compile"],
                        help="static (launch-free) variants of the fused step: one CUDA graph (CUDA only), "
                             "torch.compile(mode='reduce-overhead')")
    parser.add_argument("--curve-steps", type=int, default=100, help="steps of the loss-curve comparison")
    parser.add_argument("--curve-tol", type=float, default=2e-2,
                        help="largest allowed difference between a static step's loss curve and the eager one, "
                             "relative to the largest eager loss (bf16 tolerance)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results" / "gpu")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu_distill: no CUDA device (torch.cuda.is_available() is False)", file=sys.stderr)
        sys.exit(1)
    import pycosdist

    static = tuple(f"fused-{kind}" for kind in args.static if args.device == "cuda" or kind != "graphs")
    rows = run_interleaved(("task-only", "fused", "reference-compiled", *static), args, args.device, args.steps,
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

    # The loss curves: each static step against the eager fused one, same weights, same batches.
    curves = loss_curves(("fused", *static), args, args.device, args.curve_steps, amp=True)
    eager = curves["fused"]
    scale = max(abs(x) for x in eager)
    report = {"steps": args.curve_steps, "tolerance (relative to the largest eager loss)": args.curve_tol,
              "device": info["device"], "curves": curves, "max relative difference": {}}
    failed = []
    for kind in static:
        diff = max(abs(a - b) for a, b in zip(curves[kind], eager)) / scale
        report["max relative difference"][kind] = diff
        ok = diff <= args.curve_tol and all(x == x for x in curves[kind])  # x == x: not NaN
        print(f"loss curve, {kind} vs eager fused, first {args.curve_steps} steps: max difference {diff:.3g} of the "
              f"largest loss ({'ok' if ok else 'FAILED'}, tolerance {args.curve_tol:g}); eager "
              f"{eager[0]:.4f} -> {eager[-1]:.4f}, {kind} {curves[kind][0]:.4f} -> {curves[kind][-1]:.4f}")
        if not ok:
            failed.append(kind)
    path = args.out_dir / f"distill_curves_{args.device}.json"
    path.write_text(json.dumps(report, indent=1))
    print(f"wrote {path}")
    if failed:
        print(f"bench_gpu_distill: the loss curve of {failed} differs from the eager step's", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
