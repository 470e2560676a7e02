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

Distributed: under ``torchrun --nproc-per-node N`` (``WORLD_SIZE`` > 1) :func:`train` joins a gloo
process group and wraps model AND KD module (the LIB of ``cosine_lib``, the FitNets adapter) in one
DistributedDataParallel, so their gradients are averaged together. ``train.batch_size`` stays the
global batch: rank r takes items r, r+N, ... of every global batch, and its loss is weighted by its
share, so the averaged gradient is the single-process gradient of the combined batch. Rank 0 alone
validates, logs and writes checkpoints; the others wait at a barrier. BatchNorm statistics are per
rank (SyncBatchNorm needs a GPU); ``model.norm = "group"`` makes a CPU DDP run exactly the
single-process run. The loop runs on CPU.

Teacher-latent cache (``kd.teacher_cache``): the frozen teacher's encoder runs ONCE per training
utterance on the whole utterance (zero-padded to at least one crop) and its latent (C, F', T_utt) is
kept in memory; a crop starting at frame k uses frames k .. k+T-1 of it. Frame alignment makes
this exact for the interior frames; the approximation is at the crop's edges: the cached frames
within the teacher's temporal receptive field of a crop boundary (a few frames) saw the real
neighbouring audio where a teacher run on the crop alone would see the STFT's reflection padding
and the convolutions' zero padding. Memory: C*F'*4 bytes per frame (about 4 KiB for the demo
teacher, 240 MB for the demo corpus). ``teacher_cache = false`` runs the teacher on every batch.
"""

from __future__ import annotations

import csv
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
from .audio import write_text_atomic
from .models import HOP, UNetConfig, UNetDenoiser, build_model, count_parameters, preset

CHECKPOINT_VERSION = 1


# --- reproducibility -------------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def set_threads(threads: int) -> int:
    """torch intra-op threads: ``threads`` or, for 0, one per available core. Returns the count."""
    if threads <= 0:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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


# --- distributed -----------------------------------------------------------------------------------
def init_distributed() -> tuple[int, int]:
    """(rank, world size): (0, 1) in a plain process; under torchrun (``WORLD_SIZE`` > 1) joins the
    gloo process group first if it is not joined yet."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    dist.init_process_group("gloo")  # the loop runs on CPU
    return dist.get_rank(), dist.get_world_size()


def _barrier(world: int) -> None:
    if world > 1:
        torch.distributed.barrier()


def _all_sum(values: list[float], world: int) -> list[float]:
    if world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64)
    torch.distributed.all_reduce(t)
    return t.tolist()


class _Step(nn.Module):
    """Student forward + KD loss in one module, so that DDP sees (and synchronizes) both."""

    def __init__(self, model: UNetDenoiser, kd: nn.Module | None):
        super().__init__()
        self.model, self.kd = model, kd

    def forward(self, noisy: Tensor, teacher_latent: Tensor | None):
        enhanced, latent, spec = self.model.enhance_with_latent(noisy)
        kd_value = self.kd(latent, teacher_latent) if self.kd is not None else torch.zeros(())
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


class TeacherLatentCache:
    """Per-utterance teacher latents, computed once (see the module docstring)."""

    def __init__(self, teacher: UNetDenoiser, crops: FrameAlignedCrops, progress: bool = False):
        from tqdm import tqdm

        self.latents: list[Tensor] = []
        for i in tqdm(range(len(crops.base)), desc="teacher latents", unit="utt", disable=not progress, leave=False):
            noisy = crops.base[i][0]
            if noisy.shape[-1] < crops.segment:  # the crop of a short file is this same padded signal
                noisy = torch.nn.functional.pad(noisy, (0, crops.segment - noisy.shape[-1]))
            self.latents.append(distill.teacher_latent(teacher, noisy[None])[0])  # (C, F', T_utt)

    def get(self, indices, first_frames, frames: int) -> Tensor:
        """(B, C, F', frames) stacked crops ``latent[i][..., k:k+frames]``."""
        return torch.stack([self.latents[i][..., k:k + frames] for i, k in zip(indices, first_frames)])

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for x in self.latents)


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
    losses = []
    for i in range(len(dataset)):
        noisy, clean = dataset[i]
        enhanced, _, spec = model.enhance_with_latent(noisy[None])
        losses.append(float(distill.task_loss(spec, enhanced, clean[None], model.stft, cfg["loss"]["wave_weight"])))
    out = {"valid_loss": float(np.mean(losses)) if losses else float("nan")}
    if cfg["train"]["valid_metric"] == "pesq":
        from . import evaluation

        s = evaluation.evaluate(lambda x: model(x[None])[0], dataset, out_dir / "valid", f"epoch{epoch:03d}",
                                workers=cfg["train"]["eval_workers"])
        out.update({f"valid_{m}": s[m] for m in ("pesq", "stoi", "si_sdr")})
    return out


def _resume_state(out_dir: Path, cfg: dict) -> dict | None:
    last = out_dir / "last.pt"
    if not last.is_file():
        return None
    ckpt = load_checkpoint(last)
    diff = config_mod.differences(ckpt["config"], cfg, ignore=config_mod.RESUMABLE_KEYS)
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
    return cfg


class Run:
    """Everything one training run holds: data, model, KD, optimizer, progress so far.

    Built by :meth:`setup` (which also resumes from ``last.pt``); :func:`train` then drives it epoch by
    epoch through :meth:`train_epoch`, :meth:`validate` and :meth:`save_epoch`.
    """

    def __init__(self, cfg: dict, data_dir, out_dir, progress: bool, log: Callable[[str], None]):
        from . import data

        self.cfg, self.tc, self.kc = cfg, cfg["train"], cfg["kd"]
        self.rank, self.world = init_distributed()
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
        self._build_model_and_kd()
        self._build_optimizer()
        self.history, self.best, self.start_epoch = [], None, 0
        self.cache: TeacherLatentCache | None = None

    # --- set-up ------------------------------------------------------------------------------------
    def _build_model_and_kd(self) -> None:
        self.model = build_model(model_config(self.cfg))
        self.teacher, self.kd = None, None
        if self.kc["method"] != "none":
            self.teacher = distill.freeze(load_model(self.kc["teacher"])[0])
            self.kd = distill.make_kd_loss(self.kc["method"], self.model.latent_shape(self.frames),
                                           self.teacher.latent_shape(self.frames), expansion=self.kc["expansion"],
                                           bias=self.kc["bias"], eps=self.kc["eps"])
        self.step_module = _Step(self.model, self.kd)
        self.params = list(self.step_module.parameters())

    def _build_optimizer(self) -> None:
        tc = self.tc
        self.optimizer = torch.optim.AdamW(self.params, lr=tc["lr"], weight_decay=tc["weight_decay"])
        total_steps = tc["epochs"] * math.ceil(len(self.crops) / tc["batch_size"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_lambda(total_steps, tc["warmup_steps"], tc["min_lr_ratio"]))

    def resume(self) -> None:
        """Loads ``last.pt`` if the run directory has one (same configuration required)."""
        ckpt = _resume_state(self.out_dir, self.cfg)
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
            if self.kd is not None:
                self.kd.load_state_dict(ckpt["kd"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            self.history, self.best, self.start_epoch = ckpt["history"], ckpt["best"], ckpt["epoch"]
            set_rng_state(ckpt["rng"])
            if self.start_epoch < self.tc["epochs"]:
                self.log(f"resuming {self.out_dir} after epoch {self.start_epoch}")
        if self.rank == 0:
            write_text_atomic(self.out_dir / "config.toml", config_mod.to_toml(self.cfg))
        if self.world > 1:  # after a resume every rank holds the same state; DDP broadcasts rank 0's
            self.step_module = nn.parallel.DistributedDataParallel(self.step_module)

    def cache_teacher_latents(self) -> None:
        if self.teacher is None or not self.kc["teacher_cache"]:
            return
        t0 = time.perf_counter()
        self.cache = TeacherLatentCache(self.teacher, self.crops, self.progress)
        self.log(f"teacher latents cached: {len(self.crops)} utterances, {self.cache.nbytes() / 2**20:.0f} MiB, "
                 f"{time.perf_counter() - t0:.1f} s")

    # --- one epoch ---------------------------------------------------------------------------------
    def local_batches(self, epoch: int):
        """This rank's share of each global batch, with the weight that makes DDP's average of the
        local means the global batch mean (a global batch smaller than the world is dropped)."""
        batches = [b for b in epoch_batches(len(self.crops), self.tc["batch_size"], self.tc["seed"], epoch)
                   if len(b) >= self.world]
        for global_idx in batches:
            idx = global_idx[self.rank::self.world]
            yield idx, len(idx) * self.world / len(global_idx)

    def load_batch(self, idx, epoch: int, step: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """(noisy (B, segment), clean (B, segment), teacher latent (B, C, F', T) or None)."""
        items = [self.crops[int(i)] for i in idx]
        noisy = torch.stack([it[0] for it in items])
        clean = torch.stack([it[1] for it in items])
        if self.cfg["data"]["remix"]:
            noisy, clean = remix(noisy, clean, np.random.default_rng([self.tc["seed"], epoch, step, 2]))
        t_lat = None
        if self.kd is not None:
            t_lat = (self.cache.get([it[2] for it in items], [it[3] for it in items], self.frames)
                     if self.cache is not None else distill.teacher_latent(self.teacher, noisy))
        return noisy, clean, t_lat

    def compute_loss(self, noisy: Tensor, clean: Tensor, t_lat: Tensor | None) -> dict[str, Tensor]:
        enhanced, spec, kd_value = self.step_module(noisy, t_lat)
        task = distill.task_loss(spec, enhanced, clean, self.model.stft, self.cfg["loss"]["wave_weight"])
        loss = task + self.kc["lambda"] * kd_value if self.kd is not None else task
        return {"loss": loss, "task": task, "kd": kd_value}

    def check_finite(self, losses: dict[str, Tensor], epoch: int, step: int) -> None:
        if _all_sum([0.0 if torch.isfinite(losses["loss"]) else 1.0], self.world)[0]:  # every rank stops together
            raise FloatingPointError(
                f"epoch {epoch + 1}, step {step}: loss is not finite on some rank (here {losses['loss'].item()}: "
                f"task {losses['task'].item()}, kd {losses['kd'].item()}); lower train.lr?")

    def optimizer_step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.tc["grad_clip"] > 0:
            nn.utils.clip_grad_norm_(self.params, self.tc["grad_clip"])
        self.optimizer.step()
        self.scheduler.step()

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training crops; returns the epoch's mean losses (over all ranks)."""
        from tqdm import tqdm

        self.model.train()
        self.crops.set_epoch(epoch)
        sums = {"loss": 0.0, "task": 0.0, "kd": 0.0}
        batches = list(self.local_batches(epoch))
        bar = tqdm(batches, desc=f"epoch {epoch + 1}/{self.tc['epochs']}", unit="batch", disable=not self.progress,
                   leave=False)
        for step, (idx, share) in enumerate(bar, 1):
            losses = self.compute_loss(*self.load_batch(idx, epoch, step))
            self.check_finite(losses, epoch, step)
            self.optimizer_step(losses["loss"] * share)
            for k, v in losses.items():
                sums[k] += v.item() * share / self.world  # summed over ranks below: the global batch mean
            bar.set_postfix({k: f"{v / step:.4f}" for k, v in sums.items()})
        sums = dict(zip(sums, _all_sum(list(sums.values()), self.world)))
        return {"epoch": epoch + 1, "lr": self.optimizer.param_groups[0]["lr"],
                **{f"train_{k}": v / len(batches) for k, v in sums.items()}}

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
        return {
            "format": "pycosdist", "version": CHECKPOINT_VERSION, "config": self.cfg,
            "model_config": self.model.config.to_dict(), "model": self.model.state_dict(),
            "kd": self.kd.state_dict() if self.kd is not None else None, "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "epoch": epoch, "rng": rng_state(),
            "history": self.history, "best": self.best,
        }

    def summary(self) -> dict:
        return {"out_dir": str(self.out_dir), "params": count_parameters(self.model), "threads": self.threads,
                "history": self.history, "best": self.best}


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
