"""Shared benchmark utilities: timing, copy-bandwidth ceiling, peak memory, CSV/table output.

Benchmarks compare implementations side by side in one run; every figure is a median.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_time(fn: Callable[[], object], device: torch.device | str = "cpu", warmup: int = 3,
                repeats: int = 15, min_seconds: float = 0.0) -> float:
    """Median time of ``fn()`` in seconds (after ``warmup`` calls): wall time on the CPU; on CUDA
    the time between CUDA events recorded on the current stream before and after each call (the
    GPU's time, including any wait for the host to queue the work, without a synchronization's
    own latency), the same for every variant."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    if torch.device(device).type == "cuda":
        return _median_event_time(fn, repeats, min_seconds)
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _median_event_time(fn: Callable[[], object], repeats: int, min_seconds: float) -> float:
    times: list[float] = []
    start_all = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start_all < min_seconds:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidths_gbs(nbytes: int = 1 << 30, device: torch.device | str = "cpu") -> dict[str, float]:
    """Effective bandwidth (GB/s, bytes read + written) of large copies, by method:
    ``torch copy_`` (torch's parallel copy kernel) and, on CPU, ``numpy copyto`` (glibc memmove:
    non-temporal "streaming" stores for arrays this large, no read-for-ownership of the
    destination). ``nbytes`` >= 1 GiB keeps both out of the caches."""
    n = nbytes // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst, outside the timing
    result = {"torch copy_": 2 * n * 4 / median_time(lambda: dst.copy_(src), device, warmup=2, repeats=10) / 1e9}
    if torch.device(device).type == "cpu":
        import numpy
        from concurrent.futures import ThreadPoolExecutor

        a, b = src.numpy(), dst.numpy()
        result["numpy copyto"] = 2 * n * 4 / median_time(lambda: numpy.copyto(b, a), warmup=2, repeats=10) / 1e9
        # One streaming copy per torch thread (numpy releases the GIL while copying): a kernel that
        # runs on every core is measured against every core's streaming copy, not one core's.
        k = torch.get_num_threads()
        if k > 1:
            step = -(-n // k)
            parts = [(b[i:i + step], a[i:i + step]) for i in range(0, n, step)]
            with ThreadPoolExecutor(k) as pool:
                def threaded():
                    list(pool.map(lambda p: numpy.copyto(*p), parts))
                result[f"numpy copyto x{k} threads"] = 2 * n * 4 / median_time(threaded, warmup=2, repeats=10) / 1e9
    return result


def copy_bandwidth_gbs(nbytes: int = 1 << 30, device: torch.device | str = "cpu") -> float:
    """The copy ceiling a memory-bound fused kernel can approach on this machine: the BEST of the
    copies of :func:`copy_bandwidths_gbs` (GB/s, bytes read + written)."""
    return max(copy_bandwidths_gbs(nbytes, device).values())


# glibc keeps freed blocks below these sizes in the heap instead of returning them to the kernel.
REUSE_FREED_MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 32), "MALLOC_TRIM_THRESHOLD_": str(1 << 32)}


def reuse_freed_memory() -> None:
    """Make glibc keep freed large blocks in the heap, so that every variant of a benchmark reuses
    its previous step's memory instead of page-faulting fresh pages (~0.4 ms per MiB here, more
    than a memory-bound kernel's own time); applies to every variant alike. glibc reads these
    settings at start-up (mallopt at run time cannot raise the mmap threshold past 32 MiB), so
    this re-executes the script with them set in the environment. Call first thing in main()."""
    if all(os.environ.get(k) == v for k, v in REUSE_FREED_MEMORY_ENV.items()):
        return
    os.environ.update(REUSE_FREED_MEMORY_ENV)
    os.execv(sys.executable, [sys.executable, *sys.argv])


def peak_rss_bytes(fn: Callable[[], object]) -> int:
    """Peak resident memory (bytes) reached while running ``fn`` above the resident memory
    before it (Linux: resets the high-water mark through /proc/self/clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_kib("VmRSS")
    fn()
    return max(0, _rss_kib("VmHWM") - before) * 1024


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def machine_description(device: torch.device | str = "cpu") -> str:
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}"


def write_csv(name: str, rows: list[dict]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / name
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        writer.writeheader()
        writer.writerows(rows)
    return path


def format_table(rows: Iterable[dict]) -> str:
    """A Markdown table of ``rows`` (floats to 3 significant digits)."""
    rows = list(rows)
    cols = list(rows[0].keys())
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines)
