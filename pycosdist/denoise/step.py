"""What a training run trains and how one step updates it (:class:`TrainStep`): the model, the KD
module (teacher, loss, LIB) and the optimizer, lr schedule and loss scaler, set up from a training
configuration; the loss of a step (:meth:`TrainStep.compute_loss`, the one place it is computed) and
the update (:meth:`TrainStep.run`: loss, finite check, backward, optimizer step).

Mixed precision (``train.amp``): ``bf16`` (CPU or CUDA) or ``fp16`` (CUDA, with a GradScaler whose
state is checkpointed) autocasts the student's forward and the task loss; the KD term is computed in
float32 from float32 casts of both latents.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch import Tensor, nn

from . import distill
from ..features import LatentDistiller
from .checkpoint import load_model
from .distributed import all_sum, wrap_ddp
from .graphed_step import StaticStep
from .models import UNetConfig, UNetDenoiser, build_model, preset

# The U-Net submodule whose output is the latent the KD methods align (teacher and student).
LATENT_LAYER = "bottleneck"


def model_config(cfg: dict) -> UNetConfig:
    """The student's (or teacher's) architecture: ``model.preset`` with the ``model.*`` overrides."""
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


def initial_weights(cfg: dict) -> dict | None:
    """The state dict ``model.init`` names (None when it is empty), checked to be weights of the
    architecture ``cfg`` builds. Raises ValueError naming ``model.init`` otherwise."""
    init = cfg["model"]["init"]
    if not init:
        return None
    from . import pretrained

    try:
        init = pretrained.resolve(init)
        model, _ = load_model(init)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"model.init: {e}") from None
    wanted, stored = model_config(cfg).to_dict(), model.config.to_dict()
    if stored != wanted:
        differ = [k for k in wanted if stored.get(k) != wanted[k]]
        raise ValueError(f"model.init: {init} holds a different architecture than this config's model "
                         f"(differs in {', '.join(differ)}); fine-tuning needs the same one")
    return model.state_dict()


def lr_factor(total_steps: int, warmup: int, min_ratio: float) -> Callable[[int], float]:
    """The learning-rate multiplier of step k: linear warm-up over ``warmup`` steps, then a cosine
    decay to ``min_ratio`` at ``total_steps``."""
    def factor(step: int) -> float:
        warm = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
        progress = min(1.0, step / max(1, total_steps - 1))
        return warm * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
    return factor


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


class TrainStep:
    """The model being trained, its KD module and its optimizer, and the training step.

    ``frames``: latent frames of one training crop (the KD module's shapes depend on it);
    ``steps_per_epoch``: optimizer steps per epoch (the lr schedule's length). The model is built
    before the KD module, so that within a seed every KD method starts from the same student.
    """

    def __init__(self, cfg: dict, device: torch.device, amp_dtype: torch.dtype | None, frames: int,
                 steps_per_epoch: int):
        self.cfg, self.device, self.amp_dtype = cfg, device, amp_dtype
        self._build_model_and_kd(frames)
        self._build_optimizer(steps_per_epoch)

    # --- set-up ------------------------------------------------------------------------------------
    def _build_model_and_kd(self, frames: int) -> None:
        kc = self.cfg["kd"]
        self.model = build_model(model_config(self.cfg)).to(self.device)
        start = initial_weights(self.cfg)
        if start is not None:  # fine-tuning; built first all the same, so the RNG draws match a fresh run
            self.model.load_state_dict(start)
        self.teacher, self.kd, self.distiller = None, None, None
        if kc["method"] != "none":
            self.teacher = distill.freeze(load_model(kc["teacher"])[0]).to(self.device)
            self.kd = distill.make_kd_loss(kc["method"], self.model.latent_shape(frames),
                                           self.teacher.latent_shape(frames), expansion=kc["expansion"],
                                           bias=kc["bias"], eps=kc["eps"]).to(self.device)
            # teacher.latent stops after the bottleneck: the teacher's decoder never runs.
            self.distiller = LatentDistiller(self.teacher, self.model, LATENT_LAYER, LATENT_LAYER, loss=self.kd,
                                             student_forward=self.model.enhance_with_latent,
                                             teacher_forward=self.teacher.latent)
        self.step_module: nn.Module = _Step(self.model, self.distiller)
        self.params = list(self.step_module.parameters())

    def _build_optimizer(self, steps_per_epoch: int) -> None:
        tc = self.cfg["train"]
        # train.cuda_graphs: a capturable AdamW whose lr is a device tensor the scheduler fills in place,
        # so that the captured update reads each step's lr; one StaticStep per phase, captured lazily.
        graphs = tc["cuda_graphs"]
        self.static_steps: dict[str, StaticStep] | None = {} if graphs else None
        lr = torch.tensor(tc["lr"], device=self.device) if graphs else tc["lr"]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr, weight_decay=tc["weight_decay"], capturable=graphs)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_factor(tc["epochs"] * steps_per_epoch, tc["warmup_steps"], tc["min_lr_ratio"]))
        # fp16 gradients underflow without loss scaling; disabled, the scaler passes everything through.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc["amp"] == "fp16")

    def distribute(self, world: int) -> None:
        """Wraps model and KD module in one DDP (so their gradients are averaged together)."""
        self.step_module = wrap_ddp(self.step_module, self.device, world)

    # --- checkpoint parts --------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"model_config": self.model.config.to_dict(), "model": self.model.state_dict(),
                "kd": self.kd.state_dict() if self.kd is not None else None, "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict()}

    def load_state_dict(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        if self.kd is not None:
            self.kd.load_state_dict(ckpt["kd"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        for group in self.optimizer.param_groups:  # the checkpoint may come from the other train.cuda_graphs
            lr = float(group["lr"])
            group["lr"] = torch.tensor(lr, device=self.device) if self.static_steps is not None else lr
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):  # absent in checkpoints written before train.amp; {} when disabled
            self.scaler.load_state_dict(ckpt["scaler"])

    # --- the step ----------------------------------------------------------------------------------
    def teacher_latent(self, noisy: Tensor) -> Tensor:
        """The frozen teacher's latent (B, C, F', T) of ``noisy`` (B, n), on the training device."""
        return self.distiller.teacher_latent(noisy.to(self.device))

    def autocast(self):
        """``torch.autocast`` to ``train.amp``'s dtype, or nothing for ``amp = "none"`` (without its
        weight-cast cache under train.cuda_graphs: graph capture needs it off)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=self.static_steps is None)

    def phase(self, epoch: int) -> str:
        """What epoch ``epoch`` (0-based) trains on: "task" (no KD), "joint" (task + lambda * KD), or
        with ``kd.kd_only_epochs`` = K > 0 (the two-step schedule) "kd" for the first K epochs, then "task"."""
        k = self.cfg["kd"]["kd_only_epochs"]
        if self.kd is None:
            return "task"
        if k == 0:
            return "joint"
        return "kd" if epoch < k else "task"

    def compute_loss(self, noisy: Tensor, clean: Tensor, t_lat: Tensor | None, phase: str = "joint") -> dict[str, Tensor]:
        """The loss of a batch: ``{"loss", "task", "kd"}`` (scalars); "loss" is task + kd.lambda * kd
        in the "joint" :meth:`phase`, kd alone in "kd", task alone in "task".
        noisy, clean: (B, n); t_lat: the teacher latent (B, C, F', T), or None without KD."""
        with self.autocast():  # the KD term itself is float32 (LatentDistiller.align)
            enhanced, spec, kd_value = self.step_module(noisy, t_lat)
            task = distill.task_loss(spec, enhanced, clean, self.model.stft, **self.cfg["loss"])
        if self.kd is None or phase == "task":
            loss = task
        elif phase == "kd":
            loss = kd_value
        else:
            loss = task + self.cfg["kd"]["lambda"] * kd_value
        return {"loss": loss, "task": task, "kd": kd_value}

    def check_finite(self, losses: dict[str, Tensor], world: int, where: str) -> None:
        """Raises FloatingPointError on every rank if the loss is not finite on any rank."""
        stop = all_sum([0.0 if torch.isfinite(losses["loss"]) else 1.0], world, self.device)[0]
        if stop:  # every rank stops together
            raise FloatingPointError(
                f"{where}: loss is not finite on some rank (here {losses['loss'].item()}: "
                f"task {losses['task'].item()}, kd {losses['kd'].item()}); lower train.lr?")

    def optimizer_step(self, loss: Tensor) -> None:
        tc = self.cfg["train"]
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if tc["grad_clip"] > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            nn.utils.clip_grad_norm_(self.params, tc["grad_clip"])
        self.scaler.step(self.optimizer)  # skips the step if fp16 gradients overflowed
        self.scaler.update()
        self.scheduler.step()

    def run(self, noisy: Tensor, clean: Tensor, t_lat: Tensor | None, share: float, world: int,
            where: str, phase: str = "joint") -> dict[str, Tensor]:
        """One training step on this rank's part of a global batch (``share``: its weight, see
        :meth:`pycosdist.denoise.batches.TrainingBatches.local_batches`); returns the losses.
        ``where`` ("epoch E, step S") names the step in the error a non-finite loss raises;
        ``phase``: see :meth:`phase`."""
        inputs = (noisy, clean) if t_lat is None else (noisy, clean, t_lat)
        if self.static_steps is not None:
            if phase not in self.static_steps:
                self.static_steps[phase] = StaticStep(
                    lambda *x: self.compute_loss(*x[:2], x[2] if len(x) > 2 else None, phase), self.params,
                    self.optimizer, mode="cuda_graphs", grad_clip=self.cfg["train"]["grad_clip"])
            static = self.static_steps[phase]
            if static.accepts(*inputs):  # else (a smaller last batch) the eager step below
                losses = static(*inputs)  # the finite check follows the update: the run stops all the same
                self.check_finite(losses, world, where)
                self.scheduler.step()
                return losses
        losses = self.compute_loss(noisy, clean, t_lat, phase)
        self.check_finite(losses, world, where)
        self.optimizer_step(losses["loss"] * share)
        return losses
