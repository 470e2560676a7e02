"""A training step without per-op launch overhead: the student's whole step (forward, task loss,
KD loss, backward, optimizer update) run on static shapes, either

- ``"compile"``: ``torch.compile`` of the forward + losses (``mode="reduce-overhead"`` on CUDA,
  which replays its forward and backward graphs as CUDA graphs) and of the optimizer's update;
  runs on any device (the CPU path is what the tests check); or
- ``"cuda_graphs"``: the whole step captured once into one ``torch.cuda.CUDAGraph`` and replayed
  (one launch per step); CUDA only.

Why: a small student's step is bound by the host queuing hundreds of small kernels (on an H100,
bench/results/gpu: the fused KD step at 65.7 steps/s, the task loss alone at 70.2; a fused KD op
saves GPU time the host-bound step cannot show). Static shapes are what both need: fixed crops
(``data.segment_seconds``), a fixed batch, and the teacher latent copied into a static buffer
(from the teacher-latent cache).

Training: ``train.cuda_graphs = true`` makes :class:`pycosdist.denoise.step.TrainStep` run every
full batch through a ``cuda_graphs`` step (one per training phase; a smaller last batch runs
eagerly). Off by default: it has not been run on a GPU yet (``make gpu-check`` runs its test).

The step is numerically the eager step: the same ops in the same order on the same data. The
first ``warmup`` calls run eagerly (on a side stream for ``cuda_graphs``, as capture requires) and
are real training steps, so the loss curve is the eager one from the first step
(tests/denoise/test_graphed_step.py; ``make gpu-check`` compares 100 bf16 steps on a GPU).

Requirements, checked where they can be: every call has the shapes, dtypes and device of the
first; for ``cuda_graphs`` the optimizer is capturable (``torch.optim.Adam``/``AdamW`` with
``capturable=True``, a tensor ``lr`` if a scheduler changes it), ``torch.autocast`` inside the
loss function has ``cache_enabled=False``, no fp16 ``GradScaler`` (its inf check syncs the host),
and the loss function makes no host synchronisation (no ``.item()``, no data-dependent shapes).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor, nn

MODES = ("eager", "compile", "cuda_graphs")
LossFn = Callable[..., dict[str, Tensor]]


def _signature(inputs) -> list[tuple]:
    return [(tuple(x.shape), x.dtype, x.device) for x in inputs]


class StaticStep:
    """``step(*inputs) -> {name: scalar loss}`` for ``loss_fn(*inputs) -> {"loss": ..., ...}``:
    backpropagates ``"loss"``, clips the global gradient norm to ``grad_clip`` (0: off) and steps
    ``optimizer`` over ``params``. Returns detached copies of the losses (still on the device: no
    host synchronisation; in ``cuda_graphs`` mode the losses of the replayed graph, copied).
    ``mode``: one of :data:`MODES` (see the module docstring)."""

    def __init__(self, loss_fn: LossFn, params: Iterable[Tensor], optimizer: torch.optim.Optimizer, *,
                 mode: str = "compile", grad_clip: float = 0.0, warmup: int = 3):
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {list(MODES)}, got {mode!r}")
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < (1 if mode == "cuda_graphs" else 0):
            raise ValueError(f"warmup: expected an int >= {1 if mode == 'cuda_graphs' else 0} (eager steps before "
                             f"capture), got {warmup!r}")
        if not grad_clip >= 0:
            raise ValueError(f"grad_clip: expected a number >= 0 (0: off), got {grad_clip!r}")
        self.params = [p for p in params if p.requires_grad]
        self.loss_fn, self.optimizer, self.mode = loss_fn, optimizer, mode
        self.grad_clip, self.warmup = float(grad_clip), warmup
        self.calls = 0
        self._shapes: list[tuple] | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_inputs: list[Tensor] = []
        self._static_losses: dict[str, Tensor] = {}
        if mode == "cuda_graphs":
            self._check_capturable()
        self._cuda = any(p.is_cuda for p in self.params)
        if mode == "compile":
            self._losses = torch.compile(loss_fn, mode="reduce-overhead" if self._cuda else None, dynamic=False)
            self._update = torch.compile(self._clip_and_step, dynamic=False)
        else:
            self._losses, self._update = loss_fn, self._clip_and_step

    def _check_capturable(self) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError("mode 'cuda_graphs' needs a CUDA device (torch.cuda.is_available() is False); "
                               "use mode 'compile' or 'eager'")
        for group in self.optimizer.param_groups:
            if not group.get("capturable", False):
                raise ValueError(f"optimizer: mode 'cuda_graphs' needs a capturable optimizer (e.g. "
                                 f"torch.optim.AdamW(..., capturable=True)); {type(self.optimizer).__name__} has "
                                 f"capturable={group.get('capturable')!r}")

    # --- the step's body, shared by every mode ---------------------------------------------------------
    def _clip_and_step(self) -> None:
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.params, self.grad_clip, foreach=True)
        self.optimizer.step()

    def _body(self, inputs, zero_grad: bool) -> dict[str, Tensor]:
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        losses = self._losses(*inputs)
        losses["loss"].backward()
        self._update()
        # Copies: reduce-overhead's CUDA graphs overwrite their outputs on the next step.
        return {k: v.detach().clone() for k, v in losses.items()}

    # --- calls ---------------------------------------------------------------------------------------------
    def accepts(self, *inputs: Tensor) -> bool:
        """Whether ``inputs`` have the shapes, dtypes and devices of the first call (e.g. not the
        smaller last batch of an epoch), i.e. whether this step can run them."""
        return self._shapes is None or _signature(inputs) == self._shapes

    def __call__(self, *inputs: Tensor) -> dict[str, Tensor]:
        shapes = _signature(inputs)
        if self._shapes is None:
            self._shapes = shapes
        elif shapes != self._shapes:
            raise ValueError(f"inputs: a static step needs the same shapes, dtypes and devices on every call; "
                             f"the first call had {self._shapes}, this one {shapes} (fix the crop length and "
                             f"batch size, or drop the last incomplete batch)")
        self.calls += 1
        if self.mode == "compile" and self._cuda:
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: the last one's buffers are free
        if self.mode != "cuda_graphs":
            return self._body(inputs, zero_grad=True)
        if self.calls <= self.warmup:
            return self._warmup_step(inputs)
        if self._graph is None:
            self._capture(inputs)
        for static, x in zip(self._static_inputs, inputs):
            static.copy_(x, non_blocking=True)
        self._graph.replay()
        return {k: v.clone() for k, v in self._static_losses.items()}

    def _warmup_step(self, inputs) -> dict[str, Tensor]:
        """An eager step on a side stream: cuBLAS / cuDNN workspaces and autograd's stream state are
        set up away from the stream that is later captured (the torch.cuda.graphs recipe)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            losses = self._body(inputs, zero_grad=True)
        torch.cuda.current_stream().wait_stream(side)
        return losses

    def _capture(self, inputs) -> None:
        """Records one step into a CUDA graph (nothing runs). The gradients are None at capture, so
        the captured backward writes them into the graph's own memory on every replay."""
        self._static_inputs = [x.detach().clone() for x in inputs]
        self.optimizer.zero_grad(set_to_none=True)
        self._graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self._graph):
            self._static_losses = self._body(self._static_inputs, zero_grad=False)


def check_cuda_graphs(device: torch.device, amp: str, world: int) -> None:
    """What ``train.cuda_graphs = true`` needs, checked before a run starts: a CUDA device, no fp16
    GradScaler (its inf check reads the host), one process (DDP's gradient hooks are not captured here)."""
    if device.type != "cuda":
        raise ValueError(f"train.cuda_graphs: captures the step in a CUDA graph and needs a CUDA device, but the run "
                         f"is on {device} (train.device); set train.cuda_graphs=false")
    if amp == "fp16":
        raise ValueError("train.cuda_graphs: fp16's GradScaler checks for overflow on the host every step, which a "
                         "CUDA graph cannot; use train.amp=bf16 or none, or train.cuda_graphs=false")
    if world > 1:
        raise ValueError(f"train.cuda_graphs: one process only (this run has {world} under torchrun); "
                         f"set train.cuda_graphs=false")


def distillation_loss_fn(student: nn.Module, kd: nn.Module | None, task_loss: Callable[..., Tensor],
                         kd_weight: float, amp_dtype: torch.dtype | None) -> LossFn:
    """The student's losses for a static step: ``fn(noisy (B, n), clean (B, n), teacher_latent
    (B, C_t, F_t, T)) -> {"loss", "task", "kd"}``, ``loss = task + kd_weight * kd``. The student runs
    under ``torch.autocast(amp_dtype)`` (None: float32, autocast cache off, as graph capture needs);
    the KD term is computed in float32 from float32 casts of both latents, as in training.
    ``task_loss(enhanced_spec, enhanced, clean, stft)``; ``kd(student_latent, teacher_latent)``, or
    None for a task-only step (the teacher latent is then ignored)."""
    device_type = next(student.parameters()).device.type

    def losses(noisy: Tensor, clean: Tensor, teacher_latent: Tensor) -> dict[str, Tensor]:
        with torch.autocast(device_type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None,
                            cache_enabled=False):
            enhanced, s_lat, enhanced_spec = student.enhance_with_latent(noisy)
            task = task_loss(enhanced_spec, enhanced.float(), clean, student.stft)
        if kd is None:
            return {"loss": task, "task": task, "kd": torch.zeros_like(task)}
        kd_value = kd(s_lat.float(), teacher_latent.float())
        return {"loss": task + kd_weight * kd_value, "task": task, "kd": kd_value}
    return losses
