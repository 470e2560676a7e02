"""Several training processes under torchrun: joining the process group, the DDP wrapper, and the
collectives the training loop needs. In a plain process (``WORLD_SIZE`` unset or 1) every function
here is a no-op or returns its input."""

from __future__ import annotations

import datetime
import os

import torch
from torch import nn


def distributed_env() -> tuple[int, int]:
    """(local rank, world size) as torchrun sets them; (0, 1) in a plain process."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def dist_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors (gloo's CUDA all-reduce goes through host memory), gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def use_sync_batchnorm(module: nn.Module, device: torch.device, world: int) -> bool:
    """Whether DDP should convert ``module``'s BatchNorm layers to SyncBatchNorm (statistics over the
    global batch): only with several processes, on CUDA (SyncBatchNorm has no CPU implementation),
    and only if there is a BatchNorm to convert (``model.norm = "group"`` has none)."""
    return (world > 1 and device.type == "cuda"
            and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()))


def init_distributed(backend: str = "gloo") -> tuple[int, int]:
    """(rank, world size): (0, 1) in a plain process; under torchrun (``WORLD_SIZE`` > 1) joins the
    process group (``backend``: see :func:`dist_backend`) first if it is not joined yet."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    # The other ranks wait while rank 0 validates alone (PESQ scoring can take many minutes): a long
    # timeout instead of NCCL's default 10 minutes.
    dist.init_process_group(backend, timeout=datetime.timedelta(hours=2))
    return dist.get_rank(), dist.get_world_size()


def wrap_ddp(module: nn.Module, device: torch.device, world: int) -> nn.Module:
    """``module`` in a DistributedDataParallel (its BatchNorms made SyncBatchNorm where
    :func:`use_sync_batchnorm` says so); ``module`` itself with one process. Call it once every rank
    holds the same state (after a resume): DDP broadcasts rank 0's parameters."""
    if world == 1:
        return module
    if use_sync_batchnorm(module, device, world):  # in place: the same parameters
        module = nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def all_sum(values: list[float], world: int, device: torch.device | str = "cpu") -> list[float]:
    """Sums over ranks; ``device``: the training device (NCCL reduces CUDA tensors only)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


def broadcast_from_rank0(value, rank: int, world: int):
    """Rank 0's ``value`` on every rank (any picklable object); ``value`` itself with one process."""
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
