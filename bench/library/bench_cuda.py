"""CUDA benchmark, in one run: device copy bandwidth (the ceiling), the cosine distance loss
(forward + backward) and the fused LIB + cosine loss, pycosdist vs the pure-PyTorch reference,
eager and torch.compile'd; optionally Liger-Kernel's fused linear cosine loss.

    PYTHONPATH=. .venv/bin/python bench/library/bench_cuda.py [--quick]

Cosine distance (reduction 'mean', forward + backward of the student): "GB/s" counts the
3 * N * D elements a single fused pass must move (read student and teacher, write the student
gradient: what cosine_distance_forward_with_grad does; a forward-then-backward implementation moves
5 * N * D), "% copy" compares it with a device-to-device copy (read + write) of the same run, the
ceiling. Variants: pycosdist, the pure-PyTorch reference eager and torch.compile'd, and the usual
idiom (1 - F.cosine_similarity(s, t)).mean() torch.compile'd. LIB loss: peak memory
is torch.cuda.max_memory_allocated above what the inputs and parameters hold (and as a percentage
of the eager reference's: the automatic chunk keeps pycosdist's within 25%); "CUDA kernels" and
"ATen ops" count what one forward + backward launches and calls on the host (torch.profiler). Every time is a
median. Prints Markdown tables and writes bench/results/cuda_<device>.csv (or, with --out-dir DIR,
DIR/cuda_<device>.csv), each row with the device name and the torch and CUDA versions.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import copy_bandwidth_gbs, format_table, machine_description, median_time, write_csv  # noqa: E402

COSINE_CONFIGS = [(torch.float32, 262144, 512), (torch.bfloat16, 262144, 512), (torch.float32, 16384, 256)]
LIB_CONFIGS = [(torch.float32, 65536, 256, 512, 4), (torch.bfloat16, 65536, 256, 512, 4)]  # N, D_s, D_t, expansion


def _step(loss_fn, leaves):
    def step():
        for x in leaves:
            x.grad = None
        loss_fn().backward()
    return step


def bench_cosine(pycosdist, reference, dtype, n, d, copy_gbs, quick):
    torch.manual_seed(0)
    student = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
    teacher = torch.randn(n, d, device="cuda", dtype=dtype)  # a constant, as in distillation
    def cos_sim_idiom(s, t):
        return (1 - torch.nn.functional.cosine_similarity(s, t, dim=-1, eps=1e-8)).mean()

    impls = {"pycosdist": pycosdist.cosine_distance_loss, "eager": reference.cosine_distance_loss,
             "compile": torch.compile(reference.cosine_distance_loss, dynamic=False),
             "cos_sim compile": torch.compile(cos_sim_idiom, dynamic=False)}
    repeats = 5 if quick else 20
    t = {}
    for name, fn in impls.items():
        step = _step(lambda fn=fn: fn(student, teacher), [student])
        step()  # compile / warm-up
        t[name] = median_time(step, "cuda", repeats=repeats)
    with torch.no_grad():
        t_fwd = median_time(lambda: pycosdist.cosine_distance_loss(student, teacher), "cuda", repeats=repeats)
    size = student.element_size()
    fused = 3 * n * d * size / t["pycosdist"] / 1e9
    return {
        "dtype": str(dtype).removeprefix("torch."), "N": n, "D": d,
        "pycosdist ms": t["pycosdist"] * 1e3, "eager ms": t["eager"] * 1e3, "compile ms": t["compile"] * 1e3,
        "cos_sim compile ms": t["cos_sim compile"] * 1e3,
        "x eager": t["eager"] / t["pycosdist"], "x compile": t["compile"] / t["pycosdist"],
        "x cos_sim compile": t["cos_sim compile"] / t["pycosdist"],
        "GB/s": fused, "% copy": 100 * fused / copy_gbs,
        "fwd only GB/s": 2 * n * d * size / t_fwd / 1e9,
    }


def _peak_bytes(fn) -> int:
    """Peak allocated memory while running fn, above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def _launches(fn) -> tuple[int, int]:
    """(CUDA kernels launched, host-side ATen ops called) by one call of fn, from the profiler: the
    launch overhead a step pays on the host."""
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = prof.events()
    kernels = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    aten = sum(1 for e in events if e.device_type == torch.autograd.DeviceType.CPU and e.name.startswith("aten::"))
    return kernels, aten


def _liger_loss():
    """Liger-Kernel's fused linear cosine loss, if installed: one linear (our W2 W1 folded), the
    teacher side through an identity matrix, no hard loss. None when it is not available."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearCosineSimilarityLoss
    except Exception:  # noqa: BLE001 - optional dependency, any import failure means "skip"
        return None
    loss = LigerFusedLinearCosineSimilarityLoss(weight_hard_loss=0.0, weight_soft_loss=1.0)

    def fn(student, teacher, w1, b1, w2, b2):
        eye = torch.eye(teacher.shape[1], device=teacher.device, dtype=teacher.dtype)
        labels = torch.zeros(student.shape[0], dtype=torch.long, device=student.device)
        return loss(student, w2 @ w1, teacher, eye, labels)
    return fn


def bench_lib(pycosdist, reference, dtype, n, d_s, d_t, expansion, quick):
    torch.manual_seed(0)
    e = expansion * d_s
    student = torch.randn(n, d_s, device="cuda", dtype=dtype, requires_grad=True)
    teacher = torch.randn(n, d_t, device="cuda", dtype=dtype)
    params = [(torch.randn(e, d_s, device="cuda", dtype=dtype) / d_s ** 0.5).requires_grad_(),
              torch.zeros(e, device="cuda", dtype=dtype, requires_grad=True),
              (torch.randn(d_t, e, device="cuda", dtype=dtype) / e ** 0.5).requires_grad_(),
              torch.zeros(d_t, device="cuda", dtype=dtype, requires_grad=True)]
    impls = {"pycosdist": pycosdist.lib_cosine_distance_loss, "eager": reference.lib_cosine_distance_loss,
             "compile": torch.compile(reference.lib_cosine_distance_loss, dynamic=False)}
    liger = _liger_loss()
    if liger is not None:
        impls["liger (W2 W1 folded)"] = liger
    rows = []
    for name, fn in impls.items():
        step = _step(lambda fn=fn: fn(student, teacher, *params), [student, *params])
        try:
            step()  # compile / warm-up
            peak = _peak_bytes(step)
            ms = median_time(step, "cuda", repeats=5 if quick else 15) * 1e3
            try:
                kernels, aten = _launches(step)
            except Exception as exc:  # noqa: BLE001 - a profiler problem must not cost the timings
                print(f"bench_cuda: counting the launches of {name} failed: {exc!r}", file=sys.stderr)
                kernels = aten = -1
        except Exception as exc:  # noqa: BLE001 - e.g. an optional baseline's API changed: report, go on
            print(f"bench_cuda: {name} failed on LIB {dtype} N={n}: {exc!r}", file=sys.stderr)
            continue
        rows.append({"impl": name, "dtype": str(dtype).removeprefix("torch."), "N": n, "D_s": d_s, "E": e, "D_t": d_t,
                     "ms": ms, "peak MiB": peak / 2**20, "peak % eager": float("nan"), "CUDA kernels": kernels,
                     "ATen ops": aten})
    base = next((r["ms"] for r in rows if r["impl"] == "pycosdist"), None)
    eager_peak = next((r["peak MiB"] for r in rows if r["impl"] == "eager"), None)
    for r in rows:
        r["x vs pycosdist"] = r["ms"] / base if base else float("nan")
        r["peak % eager"] = 100 * r["peak MiB"] / eager_peak if eager_peak else float("nan")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--out-dir", type=Path, default=None, help="write the CSV there (default bench/results)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_cuda: no CUDA device (torch.cuda.is_available() is False): nothing to measure.", file=sys.stderr)
        sys.exit(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # pycosdist from this tree when not installed
    import pycosdist
    from pycosdist import reference
    if not pycosdist.build_info()["with_cuda"]:
        print("bench_cuda: pycosdist was built without its CUDA kernels (no CUDA compiler at build time): "
              "rebuild with nvcc on PATH.", file=sys.stderr)
        sys.exit(1)

    device = machine_description("cuda")
    copy_gbs = copy_bandwidth_gbs(device="cuda")
    print(f"{device}: device-to-device copy {copy_gbs:.0f} GB/s (read + write)\n")

    cosine = [bench_cosine(pycosdist, reference, dt, n, d, copy_gbs, args.quick) for dt, n, d in COSINE_CONFIGS]
    print("cosine distance loss, forward + backward\n")
    print(format_table(cosine))
    lib = [r for cfg in LIB_CONFIGS for r in bench_lib(pycosdist, reference, *cfg, args.quick)]
    print("\nfused LIB + cosine distance loss, forward + backward (peak memory above inputs and parameters)\n")
    print(format_table(lib))

    slug = re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")
    where = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda}
    rows = [{"bench": "copy", **where, "GB/s": copy_gbs}]
    rows += [{"bench": "cosine", **where, **r} for r in cosine]
    rows += [{"bench": "lib", **where, **r} for r in lib]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    rows = [{k: r.get(k, "") for k in keys} for r in rows]
    if args.out_dir is None:
        path = write_csv(f"cuda_{slug}.csv", rows)
    else:
        args.out_dir.mkdir(parents=True, exist_ok=True)
        path = args.out_dir / f"cuda_{slug}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
