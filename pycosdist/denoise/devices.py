"""Where a training run computes: the device (``train.device``), mixed precision (``train.amp``),
CPU threads and DataLoader worker processes. Pure decisions, testable without a GPU."""

from __future__ import annotations

import os

import torch

AMP_MODES = ("none", "bf16", "fp16")


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int) -> int:
    """torch intra-op threads: ``threads`` or, for 0, one per available core. Returns the count."""
    if threads <= 0:
        threads = available_cores()
    torch.set_num_threads(threads)
    return threads


def resolve_device(spec: str, local_rank: int = 0, world: int = 1, cuda_available: bool | None = None,
                   cuda_count: int | None = None, arg: str = "train.device") -> torch.device:
    """The device a ``train.device`` setting means for this process.

    ``"auto"``: CUDA when available, else CPU; ``"cpu"``; ``"cuda"``; ``"cuda:N"``. With several
    processes (torchrun, ``world`` > 1) a CUDA run puts rank ``local_rank`` on ``cuda:local_rank``, so
    ``"cuda:N"`` (one GPU for every rank) is refused there. ``cuda_available`` / ``cuda_count``
    default to what torch sees (parameters so that the decision is testable without a GPU); ``arg``
    names the setting in error messages.
    """
    if not isinstance(spec, str) or not (spec in ("auto", "cpu", "cuda") or
                                         (spec.startswith("cuda:") and spec[5:].isdigit())):
        raise ValueError(f"{arg}: expected 'auto', 'cpu', 'cuda' or 'cuda:N', got {spec!r}")
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if spec == "cpu" or (spec == "auto" and not cuda_available):
        return torch.device("cpu")
    if not cuda_available:
        raise ValueError(f"{arg}: {spec!r} needs CUDA, but this torch ({torch.__version__}) sees no CUDA device; "
                         f"use {arg}=cpu (or auto)")
    if cuda_count is None:
        cuda_count = torch.cuda.device_count()
    if spec.startswith("cuda:"):
        if world > 1:
            raise ValueError(f"{arg}: {spec!r} names one GPU, but under torchrun each of the {world} processes uses "
                             f"cuda:LOCAL_RANK; use {arg}=cuda (or auto)")
        index = int(spec[5:])
    else:
        index = local_rank if world > 1 else 0  # cuda:0 of the visible devices (CUDA_VISIBLE_DEVICES)
    if index >= cuda_count:
        raise ValueError(f"{arg}: {spec!r} needs cuda:{index}, but only {cuda_count} CUDA device(s) are visible"
                         + (f" (torchrun LOCAL_RANK {local_rank}: start at most {cuda_count} processes per node)"
                            if world > 1 else ""))
    return torch.device("cuda", index)


def autocast_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The ``torch.autocast`` dtype of ``train.amp`` on ``device`` (None: full float32).

    fp16 is refused on CPU: CPU autocast to float16 is slow or unsupported for several ops and
    float16 needs loss scaling; bf16 (same exponent range as float32, no scaling) is the CPU choice."""
    if amp not in AMP_MODES:
        raise ValueError(f"train.amp: expected one of {list(AMP_MODES)}, got {amp!r}")
    if amp == "fp16" and device.type != "cuda":
        raise ValueError(f"train.amp: 'fp16' needs a CUDA device, but train.device resolved to {device}; "
                         "use train.amp=bf16 (or none) on CPU")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def loader_workers(device: torch.device) -> int:
    """DataLoader worker processes: none on CPU (the cores compute the steps, and the in-process
    loading is today's exact behaviour); on CUDA up to 4 per process, so crops are cut while the GPU
    computes, sharing the cores with the other processes of the node (torchrun's LOCAL_WORLD_SIZE)."""
    if device.type != "cuda":
        return 0
    return max(1, min(4, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))
