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

A run is assembled from units that each fit in one reading: :mod:`~pycosdist.denoise.batches` (the
training dataset and this process's batches), :mod:`~pycosdist.denoise.step` (model, KD module,
optimizer, and the loss and update of one step), :mod:`~pycosdist.denoise.checkpoint` (files and
RNG state), :mod:`~pycosdist.denoise.devices` and :mod:`~pycosdist.denoise.distributed` (where it
runs). :class:`Run` holds one of each and the progress so far; :func:`train` is the epoch loop.
Every name those modules define for users is importable from here too.

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

import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import config as config_mod
from . import distill
from .audio import write_text_atomic
from .batches import (FrameAlignedCrops, TeacherLatentCache, TrainingBatches, cached_teacher_latents, collate_crops,
                      epoch_batches, load_training_corpus, remix, training_dataset)
from .checkpoint import (CHECKPOINT_VERSION, load_checkpoint, load_model, resume_state, rng_state, save_checkpoint,
                         seed_everything, set_rng_state, to_cpu, write_history)
from .devices import AMP_MODES, autocast_dtype, available_cores, loader_workers, resolve_device, set_threads
from .graphed_step import check_cuda_graphs
from .distributed import (all_sum, barrier, broadcast_from_rank0, dist_backend, distributed_env, init_distributed,
                          use_sync_batchnorm, wrap_ddp)
from .models import HOP, UNetDenoiser, count_parameters
from .step import LATENT_LAYER, TrainStep, initial_weights, lr_factor, model_config
# Internals that tests reach through this module, as before the split.
from .batches import _LAST_TEACHER_CACHE  # noqa: F401
from .step import _Step  # noqa: F401

__all__ = [
    "AMP_MODES", "CHECKPOINT_VERSION", "FrameAlignedCrops", "LATENT_LAYER", "Run", "TeacherLatentCache",
    "TrainStep", "TrainingBatches", "all_sum", "autocast_dtype", "available_cores", "barrier",
    "broadcast_from_rank0", "cached_teacher_latents", "check_train_config", "collate_crops", "concurrent_runs",
    "dist_backend", "distributed_env", "epoch_batches", "init_distributed", "load_checkpoint", "load_model",
    "load_training_corpus", "loader_workers", "lr_factor", "model_config", "remix", "resolve_device",
    "resume_state", "rng_state", "save_checkpoint", "seed_everything", "set_rng_state", "set_threads",
    "to_cpu", "train", "train_concurrently", "training_dataset", "use_sync_batchnorm", "validate",
    "wrap_ddp", "write_history",
]


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
    if kc["kd_only_epochs"] and (kc["method"] == "none" or kc["kd_only_epochs"] >= tc["epochs"]):
        raise ValueError(f"kd.kd_only_epochs: the two-step schedule needs a KD method and fewer KD-only epochs than "
                         f"train.epochs ({tc['epochs']}), got {kc['kd_only_epochs']} with kd.method {kc['method']!r}")
    if kc["method"] != "none" and not kc["teacher"]:
        raise ValueError(f"kd.teacher: KD method {kc['method']!r} needs a teacher checkpoint")
    initial_weights(cfg)  # a bad model.init fails here, before any data is read
    device = resolve_device(tc["device"], *distributed_env())
    autocast_dtype(tc["amp"], device)  # device and amp errors
    if tc["cuda_graphs"]:
        check_cuda_graphs(device, tc["amp"], distributed_env()[1])
    return cfg


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


def _better(metric: str, new: float, old: float | None) -> bool:
    if new is None or not math.isfinite(new):
        return False
    return old is None or (new < old if metric == "loss" else new > old)


class Run:
    """One training run: where it runs (device, rank), its data (``batches``: a
    :class:`~pycosdist.denoise.batches.TrainingBatches`), what it trains (``train_step``: a
    :class:`~pycosdist.denoise.step.TrainStep`) and its progress (history, best epoch), saved to and
    resumed from ``out_dir``. :func:`train` drives it: :meth:`resume`, :meth:`cache_teacher_latents`,
    then per epoch :meth:`train_epoch`, :meth:`validate` and :meth:`save_epoch`.
    """

    def __init__(self, cfg: dict, data_dir, out_dir, progress: bool, log: Callable[[str], None]):
        self.cfg, self.tc, self.kc = cfg, cfg["train"], cfg["kd"]
        self._join(progress, log)
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.threads = set_threads(self.tc["threads"])
        seed_everything(self.tc["seed"])
        self.corpus = load_training_corpus(data_dir, cfg)
        crops = training_dataset(self.corpus, cfg)
        self.frames = crops.segment // HOP + 1  # latent frames of one crop
        self.batches = TrainingBatches(crops, self.tc["batch_size"], self.tc["seed"], self.rank, self.world,
                                       self.device, loader_workers(self.device), cfg["data"]["remix"])
        self.train_step = TrainStep(cfg, self.device, self.amp_dtype, self.frames, self.batches.steps_per_epoch())
        self.model = self.train_step.model
        self.history, self.best, self.start_epoch = [], None, 0
        self.cache: TeacherLatentCache | None = None

    def _join(self, progress: bool, log: Callable[[str], None]) -> None:
        """The device and precision of this process, and its rank among torchrun's processes."""
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

    # --- checkpoint and resume ---------------------------------------------------------------------
    def resume(self) -> None:
        """Loads ``last.pt`` if the run directory has one (same configuration required), writes
        ``config.toml``, and (under torchrun) wraps the step in DDP once every rank holds that state."""
        ckpt = resume_state(self.out_dir, self.cfg)
        if ckpt is not None:
            self.train_step.load_state_dict(ckpt)
            self.history, self.best, self.start_epoch = ckpt["history"], ckpt["best"], ckpt["epoch"]
            set_rng_state(ckpt["rng"])
            if self.start_epoch < self.tc["epochs"]:
                self.log(f"resuming {self.out_dir} after epoch {self.start_epoch}")
        if self.rank == 0:
            write_text_atomic(self.out_dir / "config.toml", config_mod.to_toml(self.cfg))
        self.train_step.distribute(self.world)

    def checkpoint_state(self, epoch: int) -> dict:
        """The checkpoint dict, every tensor on the CPU (loads on any device)."""
        return to_cpu({"format": "pycosdist", "version": CHECKPOINT_VERSION, "config": self.cfg,
                       **self.train_step.state_dict(), "epoch": epoch, "rng": rng_state(),
                       "history": self.history, "best": self.best})

    def save_epoch(self, row: dict) -> None:
        """Marks the best epoch, writes last.pt (and best.pt), the history, and logs the epoch."""
        metric = self.tc["valid_metric"]
        score = row["valid_loss" if metric == "loss" else "valid_pesq"]
        # Under the two-step schedule the KD-only epochs train no decoder: best.pt comes from the task epochs.
        eligible = self.train_step.phase(row["epoch"] - 1) != "kd"
        row["best"] = eligible and _better(metric, score, None if self.best is None else self.best["score"])
        if row["best"]:
            self.best = {"epoch": row["epoch"], "metric": metric, "score": score}
        self.history.append(row)
        if self.rank == 0:
            state = self.checkpoint_state(row["epoch"])
            save_checkpoint(state, self.out_dir / "last.pt")
            if row["best"]:
                save_checkpoint(state, self.out_dir / "best.pt")
            write_history(self.out_dir, self.history)
        barrier(self.world)  # a resume of any rank finds this epoch's checkpoint
        scores = "  ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith(("train_", "valid_")) and v is not None)
        self.log(f"epoch {row['epoch']}/{self.tc['epochs']}  {scores}  ({row['seconds']:.1f} s)"
                 f"{'  *best' if row['best'] else ''}")

    # --- one epoch ---------------------------------------------------------------------------------
    def cache_teacher_latents(self) -> None:
        """With ``kd.teacher_cache``: the teacher's latent of every training utterance, computed once."""
        if self.train_step.teacher is not None and self.kc["teacher_cache"]:
            self.cache = cached_teacher_latents(self.train_step.teacher_latent, self.kc["teacher"],
                                                self.batches.crops, self.device, self.progress, self.log)

    def teacher_latents(self, batch, noisy: Tensor) -> Tensor | None:
        """The teacher latent (B, C, F', T) of a :func:`collate_crops` batch (``noisy``: its inputs on
        the device): from the cache, or by running the teacher; None without KD."""
        if self.train_step.kd is None:
            return None
        _, _, indices, first_frames = batch
        if self.cache is not None:
            return self.cache.get(indices, first_frames, self.frames)
        return self.train_step.teacher_latent(noisy)

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training crops; returns the epoch's mean losses (over all ranks)."""
        from tqdm import tqdm

        self.model.train()
        sums = {"loss": 0.0, "task": 0.0, "kd": 0.0}
        loader, n_batches = self.batches.epoch_loader(epoch)
        bar = tqdm(loader, total=n_batches, desc=f"epoch {epoch + 1}/{self.tc['epochs']}", unit="batch",
                   disable=not self.progress, leave=False)
        phase = self.train_step.phase(epoch)
        for step, (batch, share) in enumerate(bar, 1):
            noisy, clean = self.batches.to_device(batch, epoch, step)
            losses = self.train_step.run(noisy, clean, self.teacher_latents(batch, noisy), share, self.world,
                                         where=f"epoch {epoch + 1}, step {step}", phase=phase)
            for k, v in losses.items():
                sums[k] += v.item() * share / self.world  # summed over ranks below: the global batch mean
            bar.set_postfix({k: f"{v / step:.4f}" for k, v in sums.items()})
        sums = dict(zip(sums, all_sum(list(sums.values()), self.world, self.device)))
        return {"epoch": epoch + 1, "lr": float(self.train_step.optimizer.param_groups[0]["lr"]),  # a tensor under cuda_graphs
                **{f"train_{k}": v / n_batches for k, v in sums.items()}}

    def validate(self, epoch: int) -> dict:
        """Validation scores (rank 0 computes, every rank receives them)."""
        scores = validate(self.model, self.corpus.valid, self.cfg, self.out_dir, epoch + 1) if self.rank == 0 else None
        return broadcast_from_rank0(scores, self.rank, self.world)

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
