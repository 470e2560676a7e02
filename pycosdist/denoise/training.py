"""Training loop for teachers and (distilled) students, with atomic checkpoints and exact resume.

:func:`train` is a pure function of a configuration and two directories (data in, run out), so it
can later be launched per rank under torchrun. ``out_dir`` receives:

- ``last.pt``: everything needed to continue (model, KD module incl. its LIB, optimizer, scheduler,
  completed epochs, RNG states, history, best score); ``best.pt``: the same at the epoch with the
  best validation score. Both are written atomically (temporary file + ``os.replace``), so a crash
  never leaves a truncated checkpoint. Running the same command again resumes from ``last.pt`` and
  skips finished epochs; the result is identical to an uninterrupted run.
- ``history.csv`` / ``history.json``: one row per epoch (losses, validation scores, lr, seconds).
- ``config.toml``: the full configuration of the run.

Data: training examples are crops of ``data.segment_seconds`` taken at a random offset that is a
multiple of the STFT hop ("frame-aligned"), drawn from an RNG seeded by (seed, epoch, index), and
the batch order is a permutation seeded by (seed, epoch): both are reproducible after a resume.

Devices (``train.device``, :func:`resolve_device`): ``auto`` (CUDA if available, else CPU), ``cpu``,
``cuda``, ``cuda:N``. Model, KD module, teacher and teacher-latent cache live on that device; on CUDA
DataLoader workers cut the crops into pinned memory (the same batches as the in-process loading on
CPU). Checkpoints hold CPU tensors only, so a run continues, and a model loads, on any device.
Mixed precision (``train.amp``): ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA, with a GradScaler whose
state is checkpointed) autocasts the student's forward and the task loss; the KD term is computed in
float32 from float32 casts of both latents, and validation runs in float32.

Distributed: under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) :func:`train` joins a process
group (NCCL on CUDA with rank r on ``cuda:LOCAL_RANK``, gloo on CPU) and wraps model AND KD module
(the LIB of ``cosine_lib``, the FitNets adapter) in one DistributedDataParallel, so their gradients
are averaged together. ``train.batch_size`` stays the global batch: rank r takes items r, r+N, ... of
every global batch, and its loss is weighted by its share, so the averaged gradient is the
single-process gradient of the combined batch. Rank 0 alone validates, logs and writes checkpoints;
the others wait at a barrier. On CUDA, BatchNorm layers become SyncBatchNorm (statistics over the
global batch); on CPU they stay per rank (SyncBatchNorm has no CPU implementation), and
``model.norm = "group"`` makes a CPU DDP run exactly the single-process run.

Teacher-latent cache (``kd.teacher_cache``): the frozen teacher's encoder runs ONCE per training
utterance on the whole utterance (zero-padded to at least one crop) and its latent (C, F', T_utt) is
kept in memory; a crop starting at frame k uses frames k .. k+T-1 of it. Frame alignment makes
this exact for the interior frames; the approximation is at the crop's edges: the cached frames
within the teacher's temporal receptive field of a crop boundary (a few frames) saw the real
neighbouring audio where a teacher run on the crop alone would see the STFT's reflection padding
and the convolutions' zero padding. Memory: C*F'*4 bytes per frame (about 4 KiB for the demo
teacher, about 500 MiB for the demo corpus). ``teacher_cache = false`` runs the teacher on every batch.
The next run in the same process with the same teacher file, training inputs and crop length (the
demo's and the experiment's students) reuses the last cache instead of running the teacher again.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import io
import json
import math
import os
import random
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn

from . import config as config_mod
from . import distill
from ..features import LatentDistiller
from .audio import write_text_atomic
from .models import HOP, UNetConfig, UNetDenoiser, build_model, count_parameters, preset

CHECKPOINT_VERSION = 1


# --- reproducibility -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def set_threads(threads: int) -> int:
    """torch intra-op threads: ``threads`` or, for 0, one per available core. Returns the count."""
    if threads <= 0:
        threads = available_cores()
    torch.set_num_threads(threads)
    return threads


def rng_state() -> dict:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                      "gauss": float(gauss)}}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))


# --- devices and mixed precision -------------------------------------------------------------------
AMP_MODES = ("none", "bf16", "fp16")


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


def to_cpu(obj):
    """``obj`` (nested dicts / lists / tuples of tensors and plain values) with every tensor on the
    CPU, so a checkpoint written by a GPU run loads anywhere. CPU tensors are returned as they are."""
    if isinstance(obj, Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        out = type(obj)((k, to_cpu(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):  # a state_dict's per-module versions (read by load_state_dict)
            out._metadata = obj._metadata
        return out
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # a named tuple
        return type(obj)(*(to_cpu(v) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def loader_workers(device: torch.device) -> int:
    """DataLoader worker processes: none on CPU (the cores compute the steps, and the in-process
    loading is today's exact behaviour); on CUDA up to 4 per process, so crops are cut while the GPU
    computes, sharing the cores with the other processes of the node (torchrun's LOCAL_WORLD_SIZE)."""
    if device.type != "cuda":
        return 0
    return max(1, min(4, available_cores() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


# --- distributed -----------------------------------------------------------------------------------
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


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _all_sum(values: list[float], world: int, device: torch.device | str = "cpu") -> list[float]:
    """Sums over ranks; ``device``: the training device (NCCL reduces CUDA tensors only)."""
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return t.tolist()


# The U-Net submodule whose output is the latent the KD methods align (teacher and student).
LATENT_LAYER = "bottleneck"


class _Step(nn.Module):
    """Student forward + KD loss in one module, so that DDP sees (and synchronizes) both. The
    latents are taken by :class:`pycosdist.features.LatentDistiller` (a forward hook on
    :data:`LATENT_LAYER`), which computes the KD term in float32 whatever the autocast dtype."""

    def __init__(self, model: UNetDenoiser, distiller: LatentDistiller | None):
        super().__init__()
        self.model, self.distiller = model, distiller

    def forward(self, noisy: Tensor, teacher_latent: Tensor | None):
        # noisy: (B, n); teacher_latent: (B, C_t, F_t, T), or None without KD
        if self.distiller is None:
            enhanced, _, spec = self.model.enhance_with_latent(noisy)
            return enhanced, spec, noisy.new_zeros(())
        (enhanced, _, spec), kd_value = self.distiller(noisy, teacher_latent=teacher_latent)
        return enhanced, spec, kd_value


# --- checkpoints -----------------------------------------------------------------------------------
def save_checkpoint(state: dict, path) -> Path:
    """``torch.save`` to a temporary file next to ``path``, then ``os.replace``: ``path`` is either
    the old complete file or the new complete file, never a partial one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def load_checkpoint(path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint: no such file {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch's messages run over several lines of advice: keep the first sentence
        reason = (str(e).strip().splitlines() or [""])[0].split(". ")[0]
        raise ValueError(f"checkpoint {path}: not a readable pycosdist checkpoint ({type(e).__name__}: {reason})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "pycosdist" or "model_config" not in ckpt:
        raise ValueError(f"checkpoint {path}: not a pycosdist training checkpoint")
    return ckpt


def load_model(path) -> tuple[UNetDenoiser, dict]:
    """The model stored in checkpoint ``path`` (in eval mode) and the checkpoint dict. Raises
    ValueError (one line) when the weights are missing or do not fit the stored model config."""
    ckpt = load_checkpoint(path)
    try:
        model = build_model(ckpt["model_config"])
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint {path}: invalid model_config ({e})") from None
    weights = ckpt.get("model")
    if not isinstance(weights, dict):
        raise ValueError(f"checkpoint {path}: holds no model weights")
    problem = _weights_mismatch(model.state_dict(), weights)
    if problem:
        raise ValueError(f"checkpoint {path}: its weights do not match its model_config ({problem})")
    model.load_state_dict(weights)
    return model.eval(), ckpt


def _weights_mismatch(expected: dict, got: dict) -> str | None:
    """What differs between two state dicts' keys and shapes, in one line (None if nothing)."""
    missing = [k for k in expected if k not in got]
    unexpected = [k for k in got if k not in expected]
    shapes = [k for k in expected if k in got and tuple(getattr(got[k], "shape", ())) != tuple(expected[k].shape)]
    parts = []
    if shapes:
        k = shapes[0]
        parts.append(f"{len(shapes)} tensor shape(s) differ, first {k}: {list(getattr(got[k], 'shape', ()))} in the "
                     f"file, {list(expected[k].shape)} for the config")
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{len(keys)} {what} tensor(s), first {keys[0]}")
    return "; ".join(parts) or None


def model_config(cfg: dict) -> UNetConfig:
    m = cfg["model"]
    overrides = {}
    if m["channels"]:
        overrides["channels"] = tuple(m["channels"])
    if m["kernel_size"]:
        overrides["kernel_size"] = tuple(m["kernel_size"])
    if m["bottleneck_layers"]:
        overrides["bottleneck_layers"] = m["bottleneck_layers"]
    if m["norm"]:
        overrides["norm"] = m["norm"]
    if m["mask_floor"]:
        overrides["mask_floor"] = m["mask_floor"]
    return preset(m["preset"], **overrides)


# --- data ------------------------------------------------------------------------------------------
class FrameAlignedCrops(torch.utils.data.Dataset):
    """Random crops of ``segment`` samples (a multiple of the hop) of a whole-file paired dataset,
    starting at a hop multiple. Items: ``(noisy (segment,), clean (segment,), index, first_frame)``.
    Files shorter than a crop are zero-padded at the end (first_frame 0)."""

    def __init__(self, base, segment_seconds: float, seed: int, hop: int = HOP):
        if not segment_seconds > 0:
            raise ValueError(f"segment_seconds: expected > 0, got {segment_seconds!r}")
        self.base, self.hop, self.seed, self.epoch = base, hop, seed, 0
        self.segment = max(1, round(segment_seconds * 16000 / hop)) * hop

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        noisy, clean = self.base[i]
        n, seg = noisy.shape[-1], self.segment
        if n < seg:
            pad = lambda x: torch.nn.functional.pad(x, (0, seg - n))
            return pad(noisy), pad(clean), i, 0
        k = int(np.random.default_rng([self.seed, self.epoch, i]).integers(0, (n - seg) // self.hop + 1))
        off = k * self.hop
        return noisy[off:off + seg], clean[off:off + seg], i, k


def remix(noisy: Tensor, clean: Tensor, rng: np.random.Generator, snr_shift_db: float = 5.0,
          gain_db: float = 6.0) -> tuple[Tensor, Tensor]:
    """Dynamic remixing (augmentation): each clean crop (B, n) gets the noise (noisy - clean) of
    another crop of the batch, scaled by a random +-``snr_shift_db``, and the pair a random common
    gain of +-``gain_db``. New noisy/clean combinations every step out of a small corpus."""
    b = noisy.shape[0]
    noise = (noisy - clean)[torch.from_numpy(rng.permutation(b))]
    shift = torch.from_numpy(10 ** (rng.uniform(-snr_shift_db, snr_shift_db, (b, 1)) / 20)).float()
    gain = torch.from_numpy(10 ** (rng.uniform(-gain_db, gain_db, (b, 1)) / 20)).float()
    return gain * (clean + shift * noise), gain * clean


def epoch_batches(n: int, batch_size: int, seed: int, epoch: int) -> list[np.ndarray]:
    order = np.random.default_rng([seed, epoch, 1]).permutation(n)
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def collate_crops(items) -> tuple[Tensor, Tensor, list[int], list[int]]:
    """FrameAlignedCrops items -> (noisy (B, segment), clean (B, segment), indices, first frames)."""
    return (torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items]),
            [it[2] for it in items], [it[3] for it in items])


class TeacherLatentCache:
    """Per-utterance teacher latents, computed once (see the module docstring); they live on the
    teacher's device (the training device)."""

    def __init__(self, teacher_latent: Callable[[Tensor], Tensor], crops: FrameAlignedCrops, progress: bool = False):
        from tqdm import tqdm

        self.latents: list[Tensor] = []
        for i in tqdm(range(len(crops.base)), desc="teacher latents", unit="utt", disable=not progress, leave=False):
            noisy = crops.base[i][0]
            if noisy.shape[-1] < crops.segment:  # the crop of a short file is this same padded signal
                noisy = torch.nn.functional.pad(noisy, (0, crops.segment - noisy.shape[-1]))
            self.latents.append(teacher_latent(noisy[None])[0])  # (C, F', T_utt)

    def get(self, indices, first_frames, frames: int) -> Tensor:
        """(B, C, F', frames) stacked crops ``latent[i][..., k:k+frames]``."""
        return torch.stack([self.latents[i][..., k:k + frames] for i, k in zip(indices, first_frames)])

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.latents)


# The latents of the last cache built in this process, kept for the next run with the same teacher
# and corpus (a demo or an experiment distills several students from one teacher): {"key", "cache"}.
_LAST_TEACHER_CACHE: dict = {}


# --- the loop --------------------------------------------------------------------------------------
def _lr_lambda(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        progress = min(1.0, step / max(1, total_steps - 1))
        return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return factor


def write_history(out_dir: Path, history: list[dict]) -> None:
    write_text_atomic(out_dir / "history.json", json.dumps(history, indent=1))
    if history:
        keys = list(dict.fromkeys(k for row in history for k in row))
        buf = io.StringIO()
        w = csv.DictWriter(buf, keys, lineterminator="\n")
        w.writeheader()
        w.writerows(history)
        write_text_atomic(out_dir / "history.csv", buf.getvalue())


def _better(metric: str, new: float, old: float | None) -> bool:
    if new is None or not math.isfinite(new):
        return False
    return old is None or (new < old if metric == "loss" else new > old)


@torch.no_grad()
def validate(model: UNetDenoiser, dataset, cfg: dict, out_dir: Path, epoch: int) -> dict:
    """Mean task loss over the whole validation files (batch 1), and with ``valid_metric = "pesq"``
    also the mean PESQ / STOI / SI-SDR (via :func:`pycosdist.evaluation.evaluate`)."""
    model.eval()
    device = next(model.parameters()).device  # validation runs in float32, also in an amp run
    losses = []
    for i in range(len(dataset)):
        noisy, clean = dataset[i]
        enhanced, _, spec = model.enhance_with_latent(noisy[None].to(device))
        losses.append(float(distill.task_loss(spec, enhanced, clean[None].to(device), model.stft,
                                              **cfg["loss"])))
    out = {"valid_loss": float(np.mean(losses)) if losses else float("nan")}
    if cfg["train"]["valid_metric"] == "pesq":
        from . import evaluation

        s = evaluation.evaluate(lambda x: model(x[None].to(device))[0], dataset, out_dir / "valid", f"epoch{epoch:03d}",
                                workers=cfg["train"]["eval_workers"])
        out.update({f"valid_{m}": s[m] for m in ("pesq", "stoi", "si_sdr")})
    return out


def _resume_state(out_dir: Path, cfg: dict) -> dict | None:
    last = out_dir / "last.pt"
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last)
    # Checkpoints are device-agnostic: a run may continue on another device (train.device).
    diff = config_mod.differences(ckpt["config"], cfg, ignore=config_mod.RESUMABLE_KEYS + ("train.device",))
    if diff:
        raise ValueError(f"{out_dir} holds a run with a different configuration ({'; '.join(diff)}); "
                         f"use another output directory, or the original configuration to resume it")
    return ckpt


def check_train_config(cfg: dict) -> dict:
    """``cfg`` checked for everything a run needs before any data or model is touched."""
    cfg = config_mod.check(cfg)
    tc, kc = cfg["train"], cfg["kd"]
    if tc["valid_metric"] not in ("loss", "pesq"):
        raise ValueError(f"train.valid_metric: expected 'loss' or 'pesq', got {tc['valid_metric']!r}")
    for key in ("epochs", "batch_size"):
        if tc[key] < 1:
            raise ValueError(f"train.{key}: expected >= 1, got {tc[key]}")
    if kc["method"] not in distill.METHODS:
        raise ValueError(f"kd.method: expected one of {list(distill.METHODS)}, got {kc['method']!r}")
    if cfg["data"]["remix"] and kc["method"] != "none" and kc["teacher_cache"]:
        raise ValueError("data.remix: remixed inputs change every step, so cached teacher latents would not match "
                         "them; set kd.teacher_cache=false or data.remix=false")
    if kc["method"] != "none" and not kc["teacher"]:
        raise ValueError(f"kd.teacher: KD method {kc['method']!r} needs a teacher checkpoint")
    autocast_dtype(tc["amp"], resolve_device(tc["device"], *distributed_env()))  # device and amp errors
    return cfg


class Run:
    """Everything one training run holds: data, model, KD, optimizer, progress so far.

    Built by :meth:`setup` (which also resumes from ``last.pt``); :func:`train` then drives it epoch by
    epoch through :meth:`train_epoch`, :meth:`validate` and :meth:`save_epoch`.
    """

    def __init__(self, cfg: dict, data_dir, out_dir, progress: bool, log: Callable[[str], None]):
        from . import data

        self.cfg, self.tc, self.kc = cfg, cfg["train"], cfg["kd"]
        self.device = resolve_device(self.tc["device"], *distributed_env())
        self.amp_dtype = autocast_dtype(self.tc["amp"], self.device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # NCCL and DDP work on the current device
        self.rank, self.world = init_distributed(dist_backend(self.device))
        if self.tc["batch_size"] % self.world:
            raise ValueError(f"train.batch_size: the global batch ({self.tc['batch_size']}) must be divisible by "
                             f"the number of processes ({self.world})")
        if self.rank != 0:  # rank 0 alone talks and writes
            progress, log = False, (lambda *_: None)
        self.progress, self.log = progress, log
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.threads = set_threads(self.tc["threads"])
        seed_everything(self.tc["seed"])

        self.corpus = data.load_corpus(data_dir, valid_speakers=cfg["data"]["valid_speakers"],
                                       segment_seconds=None, seed=self.tc["seed"])
        if len(self.corpus.train) == 0 or len(self.corpus.valid) == 0:
            raise ValueError(f"data {data_dir}: need training and validation files, got {len(self.corpus.train)} "
                             f"and {len(self.corpus.valid)} (data.valid_speakers = {cfg['data']['valid_speakers']})")
        self.crops = FrameAlignedCrops(self.corpus.train, cfg["data"]["segment_seconds"], self.tc["seed"])
        self.frames = self.crops.segment // HOP + 1
        self.workers = loader_workers(self.device)
        self._build_model_and_kd()
        self._build_optimizer()
        self.history, self.best, self.start_epoch = [], None, 0
        self.cache: TeacherLatentCache | None = None

    # --- set-up ------------------------------------------------------------------------------------
    def _build_model_and_kd(self) -> None:
        self.model = build_model(model_config(self.cfg)).to(self.device)
        self.teacher, self.kd, self.distiller = None, None, None
        if self.kc["method"] != "none":
            self.teacher = distill.freeze(load_model(self.kc["teacher"])[0]).to(self.device)
            self.kd = distill.make_kd_loss(self.kc["method"], self.model.latent_shape(self.frames),
                                           self.teacher.latent_shape(self.frames), expansion=self.kc["expansion"],
                                           bias=self.kc["bias"], eps=self.kc["eps"]).to(self.device)
            # teacher.latent stops after the bottleneck: the teacher's decoder never runs.
            self.distiller = LatentDistiller(self.teacher, self.model, LATENT_LAYER, LATENT_LAYER, loss=self.kd,
                                             student_forward=self.model.enhance_with_latent,
                                             teacher_forward=self.teacher.latent)
        self.step_module = _Step(self.model, self.distiller)
        self.params = list(self.step_module.parameters())

    def _build_optimizer(self) -> None:
        tc = self.tc
        self.optimizer = torch.optim.AdamW(self.params, lr=tc["lr"], weight_decay=tc["weight_decay"])
        total_steps = tc["epochs"] * math.ceil(len(self.crops) / tc["batch_size"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(total_steps, tc["warmup_steps"], tc["min_lr_ratio"]))
        # fp16 gradients underflow without loss scaling; disabled, the scaler passes everything through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc["amp"] == "fp16")

    def resume(self) -> None:
        """Loads ``last.pt`` if the run directory has one (same configuration required)."""
        ckpt = _resume_state(self.out_dir, self.cfg)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            if self.kd is not None:
                self.kd.load_state_dict(ckpt["kd"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if ckpt.get("scaler"):  # absent in checkpoints written before train.amp; {} when disabled
                self.scaler.load_state_dict(ckpt["scaler"])
            self.history, self.best, self.start_epoch = ckpt["history"], ckpt["best"], ckpt["epoch"]
            set_rng_state(ckpt["rng"])
            if self.start_epoch < self.tc["epochs"]:
                self.log(f"resuming {self.out_dir} after epoch {self.start_epoch}")
        if self.rank == 0:
            write_text_atomic(self.out_dir / "config.toml", config_mod.to_toml(self.cfg))
        if self.world > 1:  # after a resume every rank holds the same state; DDP broadcasts rank 0's
            if use_sync_batchnorm(self.step_module, self.device, self.world):  # in place: same parameters
                self.step_module = nn.SyncBatchNorm.convert_sync_batchnorm(self.step_module)
            self.step_module = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def cache_teacher_latents(self) -> None:
        if self.teacher is None or not self.kc["teacher_cache"]:
            return
        t0 = time.perf_counter()
        key = self._teacher_cache_key()
        if _LAST_TEACHER_CACHE.get("key") == key:  # the previous run's: same teacher file, corpus, crops
            self.cache = _LAST_TEACHER_CACHE["cache"]
            self.log(f"teacher latents reused from the previous run in this process ({len(self.crops)} utterances)")
            return
        _LAST_TEACHER_CACHE.clear()  # frees the old latents before computing the new ones
        self.cache = TeacherLatentCache(self.teacher_latent, self.crops, self.progress)
        _LAST_TEACHER_CACHE.update(key=key, cache=self.cache)
        self.log(f"teacher latents cached: {len(self.crops)} utterances, {self.cache.nbytes() / 2**20:.0f} MiB, "
                 f"{time.perf_counter() - t0:.1f} s")

    def _teacher_cache_key(self) -> tuple:
        """What the cached latents depend on: the teacher file (path, size, mtime), the training
        inputs (noisy files: paths, sizes, mtimes), the crop length and the device."""
        def stamp(path) -> tuple:
            st = os.stat(path)
            return str(Path(path).resolve()), st.st_size, st.st_mtime_ns

        files = tuple(stamp(pair.noisy_path) for pair in self.corpus.train.pairs)
        return stamp(self.kc["teacher"]), files, self.crops.segment, str(self.device)

    # --- one epoch ---------------------------------------------------------------------------------
    def local_batches(self, epoch: int):
        """This rank's share of each global batch, with the weight that makes DDP's average of the
        local means the global batch mean (a global batch smaller than the world is dropped)."""
        batches = [b for b in epoch_batches(len(self.crops), self.tc["batch_size"], self.tc["seed"], epoch)
                   if len(b) >= self.world]
        for global_idx in batches:
            idx = global_idx[self.rank::self.world]
            yield idx, len(idx) * self.world / len(global_idx)

    def epoch_loader(self, epoch: int):
        """This rank's batches of the epoch: ``(collate_crops(...) of the batch, share)``. The crops are
        cut in this process when ``self.workers`` is 0 (CPU), else by DataLoader worker processes into
        pinned memory (CUDA): the same batches either way, since every crop is seeded by
        (seed, epoch, index) and the batch sampler is the list of this rank's batches."""
        local = list(self.local_batches(epoch))
        batches = [[int(i) for i in idx] for idx, _ in local]
        if self.workers == 0:
            loaded = (collate_crops([self.crops[i] for i in idx]) for idx in batches)
        else:  # workers start per epoch (not persistent), so they see crops.set_epoch(epoch)
            loaded = torch.utils.data.DataLoader(
                self.crops, batch_sampler=batches, num_workers=self.workers, collate_fn=collate_crops,
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(self.tc["seed"]))  # leaves the global torch RNG alone
        return zip(loaded, (share for _, share in local)), len(local)

    def load_batch(self, batch, epoch: int, step: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """A :func:`collate_crops` batch -> (noisy (B, segment), clean (B, segment), teacher latent
        (B, C, F', T) or None), on the training device."""
        noisy, clean, indices, first_frames = batch
        if self.cfg["data"]["remix"]:
            noisy, clean = remix(noisy, clean, np.random.default_rng([self.tc["seed"], epoch, step, 2]))
        noisy = noisy.to(self.device, non_blocking=True)
        clean = clean.to(self.device, non_blocking=True)
        t_lat = None
        if self.kd is not None:
            t_lat = (self.cache.get(indices, first_frames, self.frames)
                     if self.cache is not None else self.teacher_latent(noisy))
        return noisy, clean, t_lat

    def teacher_latent(self, noisy: Tensor) -> Tensor:
        """The frozen teacher's latent (B, C, F', T) of ``noisy`` (B, n), on the training device."""
        return self.distiller.teacher_latent(noisy.to(self.device))

    def autocast(self):
        """``torch.autocast`` to ``train.amp``'s dtype, or nothing for ``amp = "none"``."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def compute_loss(self, noisy: Tensor, clean: Tensor, t_lat: Tensor | None) -> dict[str, Tensor]:
        with self.autocast():  # the KD term itself is float32 (LatentDistiller.align)
            enhanced, spec, kd_value = self.step_module(noisy, t_lat)
            task = distill.task_loss(spec, enhanced, clean, self.model.stft, **self.cfg["loss"])
        loss = task + self.kc["lambda"] * kd_value if self.kd is not None else task
        return {"loss": loss, "task": task, "kd": kd_value}

    def check_finite(self, losses: dict[str, Tensor], epoch: int, step: int) -> None:
        stop = _all_sum([0.0 if torch.isfinite(losses["loss"]) else 1.0], self.world, self.device)[0]
        if stop:  # every rank stops together
            raise FloatingPointError(
                f"epoch {epoch + 1}, step {step}: loss is not finite on some rank (here {losses['loss'].item()}: "
                f"task {losses['task'].item()}, kd {losses['kd'].item()}); lower train.lr?")

    def optimizer_step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.tc["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.params, self.tc["grad_clip"])
        self.scaler.step(self.optimizer)  # skips the step if fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training crops; returns the epoch's mean losses (over all ranks)."""
        from tqdm import tqdm

        self.model.train()
        self.crops.set_epoch(epoch)
        sums = {"loss": 0.0, "task": 0.0, "kd": 0.0}
        loader, n_batches = self.epoch_loader(epoch)
        bar = tqdm(loader, total=n_batches, desc=f"epoch {epoch + 1}/{self.tc['epochs']}", unit="batch",
                   disable=not self.progress, leave=False)
        for step, (batch, share) in enumerate(bar, 1):
            losses = self.compute_loss(*self.load_batch(batch, epoch, step))
            self.check_finite(losses, epoch, step)
            self.optimizer_step(losses["loss"] * share)
            for k, v in losses.items():
                sums[k] += v.item() * share / self.world  # summed over ranks below: the global batch mean
            bar.set_postfix({k: f"{v / step:.4f}" for k, v in sums.items()})
        sums = dict(zip(sums, _all_sum(list(sums.values()), self.world, self.device)))
        return {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                **{f"train_{k}": v / n_batches for k, v in sums.items()}}

    def validate(self, epoch: int) -> dict:
        """Validation scores (rank 0 computes, every rank receives them)."""
        scores = [validate(self.model, self.corpus.valid, self.cfg, self.out_dir, epoch + 1) if self.rank == 0
                  else None]
        if self.world > 1:
            torch.distributed.broadcast_object_list(scores, src=0)
        return scores[0]

    def save_epoch(self, row: dict) -> None:
        """Marks the best epoch, writes last.pt (and best.pt), the history, and logs the epoch."""
        metric = self.tc["valid_metric"]
        score = row["valid_loss" if metric == "loss" else "valid_pesq"]
        row["best"] = _better(metric, score, None if self.best is None else self.best["score"])
        if row["best"]:
            self.best = {"epoch": row["epoch"], "metric": metric, "score": score}
        self.history.append(row)
        if self.rank == 0:
            state = self.checkpoint_state(row["epoch"])
            save_checkpoint(state, self.out_dir / "last.pt")
            if row["best"]:
                save_checkpoint(state, self.out_dir / "best.pt")
            write_history(self.out_dir, self.history)
        _barrier(self.world)  # a resume of any rank finds this epoch's checkpoint
        scores = "  ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith(("train_", "valid_")) and v is not None)
        self.log(f"epoch {row['epoch']}/{self.tc['epochs']}  {scores}  ({row['seconds']:.1f} s)"
                 f"{'  *best' if row['best'] else ''}")

    def checkpoint_state(self, epoch: int) -> dict:
        """The checkpoint dict, every tensor on the CPU (loads on any device)."""
        return to_cpu({
            "format": "pycosdist", "version": CHECKPOINT_VERSION, "config": self.cfg,
            "model_config": self.model.config.to_dict(), "model": self.model.state_dict(),
            "kd": self.kd.state_dict() if self.kd is not None else None, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(), "epoch": epoch,
            "rng": rng_state(), "history": self.history, "best": self.best,
        })

    def summary(self) -> dict:
        return {"out_dir": str(self.out_dir), "params": count_parameters(self.model), "threads": self.threads,
                "device": str(self.device), "amp": self.tc["amp"], "history": self.history, "best": self.best}


def train(cfg: dict, data_dir, out_dir, progress: bool = True,
          on_epoch_end: Callable[[dict], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Trains the model of ``cfg`` (a teacher, or a student distilled with ``kd.method``) on the
    corpus at ``data_dir``; writes to ``out_dir`` (see the module docstring) and resumes from it.

    ``on_epoch_end(row)`` is called after each epoch's checkpoint is written (an exception there
    stops training like a crash would). Returns ``{"out_dir", "history", "best", "params", ...}``.
    """
    run = Run(check_train_config(cfg), data_dir, out_dir, progress, log)
    run.resume()
    if run.start_epoch >= run.tc["epochs"]:
        log(f"{run.out_dir}: all {run.tc['epochs']} epochs already done")
        return run.summary()
    run.cache_teacher_latents()
    for epoch in range(run.start_epoch, run.tc["epochs"]):
        t0 = time.perf_counter()
        row = run.train_epoch(epoch)
        row.update(run.validate(epoch))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        run.save_epoch(row)
        if on_epoch_end is not None:
            on_epoch_end(row)
    return run.summary()


# --- several runs at once --------------------------------------------------------------------------
def concurrent_runs() -> int:
    """Training runs to run at once by default: 2 on a CPU with at least 2 cores (a small student's
    step cannot keep 2 cores busy: measured on 2 cores, two 1-thread runs side by side finish a
    cosine_lib and a no-KD demo student in 58 s where one 2-thread run after the other takes 74 s),
    else 1 (one core, or a GPU)."""
    return 2 if available_cores() >= 2 and not torch.cuda.is_available() else 1


def _train_in_worker(cfg: dict, data_dir, out_dir, label: str) -> dict:
    """One run in a worker process of :func:`train_concurrently`; its log lines carry its label."""
    t0 = time.perf_counter()
    summary = train(cfg, data_dir, out_dir, progress=False, log=lambda m: print(f"[{label}] {m}", flush=True))
    return {**summary, "seconds": round(time.perf_counter() - t0, 1)}


def train_concurrently(jobs: dict, data_dir, workers: int) -> dict:
    """Trains ``{label: (config, run folder)}`` on ``data_dir`` in ``workers`` fresh processes
    (spawned: the parent's torch thread pools are not fork-safe), each with its share of the cores
    as torch threads, in the order given; returns ``{label: training summary + "seconds"}``. Every run
    resumes from its folder, so a stopped batch continues where each run stopped. As with any
    spawned worker, a script that calls this must do so under ``if __name__ == "__main__":``."""
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    threads = max(1, available_cores() // workers)
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {label: pool.submit(_train_in_worker, config_mod.merge(cfg, {"train": {"threads": threads}}),
                                      data_dir, run_dir, label)
                   for label, (cfg, run_dir) in jobs.items()}
        return {label: future.result() for label, future in futures.items()}
