"""A training run's data: the training dataset (:func:`training_dataset`, the one place it is
built), this process's batches of every epoch (:class:`TrainingBatches`) and the cached teacher
latents (:func:`cached_teacher_latents`).

Training examples are crops of ``data.segment_seconds`` taken at a random offset that is a multiple
of the STFT hop ("frame-aligned"), drawn from an RNG seeded by (seed, epoch, index), and the batch
order is a permutation seeded by (seed, epoch): both are reproducible after a resume. Under
torchrun, rank r takes items r, r+N, ... of every global batch.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from . import data
from .models import HOP


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


def load_training_corpus(data_dir, cfg: dict) -> data.Corpus:
    """The corpus at ``data_dir`` as whole files, its validation speakers split off
    (``data.valid_speakers``); both splits must hold files."""
    corpus = data.load_corpus(data_dir, valid_speakers=cfg["data"]["valid_speakers"], segment_seconds=None,
                              seed=cfg["train"]["seed"])
    if len(corpus.train) == 0 or len(corpus.valid) == 0:
        raise ValueError(f"data {data_dir}: need training and validation files, got {len(corpus.train)} "
                         f"and {len(corpus.valid)} (data.valid_speakers = {cfg['data']['valid_speakers']})")
    return corpus


def training_dataset(corpus: data.Corpus, cfg: dict) -> FrameAlignedCrops:
    """The dataset a run trains on: frame-aligned crops of the corpus's training files."""
    return FrameAlignedCrops(corpus.train, cfg["data"]["segment_seconds"], cfg["train"]["seed"])


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


class TrainingBatches:
    """This process's batches of the crops, epoch by epoch, on the training device.

    ``workers``: DataLoader worker processes (0: cut the crops in this process; see
    :func:`pycosdist.denoise.devices.loader_workers`). ``remix``: apply :func:`remix` to every batch.
    """

    def __init__(self, crops: FrameAlignedCrops, batch_size: int, seed: int, rank: int, world: int,
                 device: torch.device, workers: int, remix: bool):
        self.crops, self.batch_size, self.seed = crops, batch_size, seed
        self.rank, self.world, self.device, self.workers, self.remix = rank, world, device, workers, remix

    def steps_per_epoch(self) -> int:
        return math.ceil(len(self.crops) / self.batch_size)

    def local_batches(self, epoch: int):
        """This rank's share of each global batch, with the weight that makes DDP's average of the
        local means the global batch mean (a global batch smaller than the world is dropped)."""
        batches = [b for b in epoch_batches(len(self.crops), self.batch_size, self.seed, epoch) if len(b) >= self.world]
        for global_idx in batches:
            idx = global_idx[self.rank::self.world]
            yield idx, len(idx) * self.world / len(global_idx)

    def epoch_loader(self, epoch: int):
        """This rank's batches of the epoch: ``(collate_crops(...) of the batch, share)``, and their
        count. The crops are cut in this process when ``workers`` is 0 (CPU), else by DataLoader worker
        processes into pinned memory (CUDA): the same batches either way, since every crop is seeded by
        (seed, epoch, index) and the batch sampler is the list of this rank's batches."""
        self.crops.set_epoch(epoch)
        local = list(self.local_batches(epoch))
        batches = [[int(i) for i in idx] for idx, _ in local]
        if self.workers == 0:
            loaded = (collate_crops([self.crops[i] for i in idx]) for idx in batches)
        else:  # workers start per epoch (not persistent), so they see crops.set_epoch(epoch)
            loaded = torch.utils.data.DataLoader(
                self.crops, batch_sampler=batches, num_workers=self.workers, collate_fn=collate_crops,
                pin_memory=self.device.type == "cuda",
                generator=torch.Generator().manual_seed(self.seed))  # leaves the global torch RNG alone
        return zip(loaded, (share for _, share in local)), len(local)

    def to_device(self, batch, epoch: int, step: int) -> tuple[Tensor, Tensor]:
        """A :func:`collate_crops` batch -> (noisy (B, segment), clean (B, segment)) on the training
        device, remixed if asked (seeded by (seed, epoch, step))."""
        noisy, clean, _, _ = batch
        if self.remix:
            noisy, clean = remix(noisy, clean, np.random.default_rng([self.seed, epoch, step, 2]))
        return noisy.to(self.device, non_blocking=True), clean.to(self.device, non_blocking=True)


# --- teacher latents ------------------------------------------------------------------------------
class TeacherLatentCache:
    """Per-utterance teacher latents, computed once (see :mod:`pycosdist.denoise.training`); they
    live on the teacher's device (the training device)."""

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


def _teacher_cache_key(teacher_path, crops: FrameAlignedCrops, device: torch.device) -> tuple:
    """What the cached latents depend on: the teacher file (path, size, mtime), the training inputs
    (noisy files: paths, sizes, mtimes), the crop length and the device."""
    def stamp(path) -> tuple:
        st = os.stat(path)
        return str(Path(path).resolve()), st.st_size, st.st_mtime_ns

    files = tuple(stamp(pair.noisy_path) for pair in crops.base.pairs)
    return stamp(teacher_path), files, crops.segment, str(device)


def cached_teacher_latents(teacher_latent: Callable[[Tensor], Tensor], teacher_path, crops: FrameAlignedCrops,
                           device: torch.device, progress: bool, log: Callable[[str], None]) -> TeacherLatentCache:
    """The teacher's latents of every training utterance: the previous run's in this process if it
    had the same teacher file, training inputs and crops, else computed now (and kept for the next)."""
    t0 = time.perf_counter()
    key = _teacher_cache_key(teacher_path, crops, device)
    if _LAST_TEACHER_CACHE.get("key") == key:
        log(f"teacher latents reused from the previous run in this process ({len(crops)} utterances)")
        return _LAST_TEACHER_CACHE["cache"]
    _LAST_TEACHER_CACHE.clear()  # frees the old latents before computing the new ones
    cache = TeacherLatentCache(teacher_latent, crops, progress)
    _LAST_TEACHER_CACHE.update(key=key, cache=cache)
    log(f"teacher latents cached: {len(crops)} utterances, {cache.nbytes() / 2**20:.0f} MiB, "
        f"{time.perf_counter() - t0:.1f} s")
    return cache
