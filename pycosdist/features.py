"""Distill any model: take a named intermediate output (a latent) of a teacher and of a student
``nn.Module`` with forward hooks, and align them with the fused cosine + LIB loss.

    teacher = freeze(MyBigNet().load_state_dict(...))     # eval mode, no gradients
    student = MySmallNet()
    kd = LatentDistiller(teacher, student, teacher_layer="encoder.4", student_layer="encoder.2",
                         layout="btd", example_input=x[:1])
    optimizer = torch.optim.AdamW([*student.parameters(), *kd.parameters()])  # kd holds the LIB
    for x, y in loader:
        output, kd_loss = kd(x)            # teacher (no grad) and student run once each
        loss = task_loss(output, y) + 0.1 * kd_loss

Module names are those of ``model.named_modules()`` (``""`` is the model itself). A latent is a
sequence of frames, paired one to one between teacher and student, so both must have the same
batch size and frame count; the per-frame widths may differ (the LIB maps student -> teacher).
Layouts: ``"bcft"`` (B, C, F, T) feature maps (a frame is the C*F values at one time step),
``"btd"`` (B, T, D) sequences, ``"bdt"`` (B, D, T) Conv1d outputs, ``"nd"`` (..., D) any rows.
"""

from __future__ import annotations

import difflib
from typing import Callable

import torch
from torch import Tensor, nn

from .nn import CosineLIBDistillationLoss

LAYOUTS = ("bcft", "btd", "bdt", "nd")


def freeze(model: nn.Module) -> nn.Module:
    """Eval mode (BatchNorm uses its running statistics, no dropout) and no gradients, in place."""
    model.eval()
    model.requires_grad_(False)
    return model


class LatentTap:
    """Keeps the output of ``model``'s submodule ``name`` from the latest forward (a forward hook).

    ``arg`` names the argument in error messages. :meth:`pop` returns the captured tensor once.
    """

    def __init__(self, model: nn.Module, name: str, arg: str = "layer"):
        modules = dict(model.named_modules())
        if name not in modules:
            close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.3)
            hint = f"; close names: {close}" if close else ""
            raise ValueError(f"{arg}: {type(model).__name__} has no submodule named {name!r}{hint} "
                             f"(the names are those of model.named_modules())")
        self.name, self.arg, self._output = name, arg, None
        self._handle = modules[name].register_forward_hook(self._capture)

    def _capture(self, module: nn.Module, inputs, output) -> None:
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], Tensor):
            output = output[0]  # e.g. an RNN's (output, state)
        if not isinstance(output, Tensor):
            raise TypeError(f"{self.arg}: submodule {self.name!r} returned {type(output).__name__}, expected a Tensor")
        self._output = output

    def pop(self) -> Tensor:
        out, self._output = self._output, None
        if out is None:
            raise RuntimeError(f"{self.arg}: submodule {self.name!r} did not run in the forward pass")
        return out

    def remove(self) -> None:
        self._handle.remove()


def frame_axes(latent: Tensor, layout: str, arg: str) -> tuple[int, ...]:
    """The frame-indexing sizes of ``latent`` in ``layout``: (B, T), or the leading dims for 'nd'."""
    need = {"bcft": 4, "btd": 3, "bdt": 3}.get(layout)
    if need is not None and latent.dim() != need:
        raise ValueError(f"{arg}: layout {layout!r} expects a {need}-D latent, got shape {list(latent.shape)}")
    if layout == "bcft":
        return latent.shape[0], latent.shape[3]
    if layout == "btd":
        return latent.shape[0], latent.shape[1]
    if layout == "bdt":
        return latent.shape[0], latent.shape[2]
    return tuple(latent.shape[:-1])


def frame_width(latent: Tensor, layout: str) -> int:
    """Values per frame: C*F ('bcft'), D otherwise."""
    if layout == "bcft":
        return latent.shape[1] * latent.shape[2]
    return latent.shape[1] if layout == "bdt" else latent.shape[-1]


def _check_layout(layout: str, arg: str) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"{arg}: expected one of {LAYOUTS}, got {layout!r}")


class LatentDistiller(nn.Module):
    """Latent alignment between any teacher and student, by module name (see the module docstring).

    ``loss``: a module ``(student_latent, teacher_latent) -> scalar`` on the latents as captured;
    by default :class:`pycosdist.nn.CosineLIBDistillationLoss` (the paper's loss, fused), built from
    the per-frame widths ``student_dim``/``teacher_dim`` or, if not given, from one no-grad forward
    of both models on ``example_input``. ``student_forward`` / ``teacher_forward``: what a forward
    calls (default the modules themselves; e.g. a method that also returns extra outputs, or a
    teacher method that stops after the tapped layer).

    The loss runs outside autocast, on half-precision latents promoted to float32: under mixed
    precision the student computes in bf16/fp16, but a cosine between half vectors loses the small
    angles this loss is about, and the LIB weights are float32.

    The distiller's own parameters are the loss's (the LIB): teacher and student are held, not
    registered as submodules, so ``kd.parameters()``, ``kd.state_dict()`` and ``kd.train()`` never
    touch them. The teacher must be frozen (:func:`freeze`).
    """

    def __init__(self, teacher: nn.Module, student: nn.Module, teacher_layer: str, student_layer: str, *,
                 layout: str = "bcft", teacher_layout: str | None = None, example_input=None,
                 student_dim: int | None = None, teacher_dim: int | None = None, expansion: int = 4,
                 bias: bool = True, eps: float = 1e-8, reduction: str = "mean", loss: nn.Module | None = None,
                 student_forward: Callable | None = None, teacher_forward: Callable | None = None):
        super().__init__()
        teacher_layout = teacher_layout or layout
        _check_layout(layout, "layout")
        _check_layout(teacher_layout, "teacher_layout")
        self._models = (teacher, student)  # a tuple: not submodules (see the class docstring)
        self.layout, self.teacher_layout = layout, teacher_layout
        # In a tuple: a bound method or module here must never become a submodule.
        self._forwards = (student_forward or student, teacher_forward or teacher)
        self.teacher_tap = LatentTap(teacher, teacher_layer, "teacher_layer")
        self.student_tap = LatentTap(student, student_layer, "student_layer")
        if loss is None:
            loss = self._default_loss(example_input, student_dim, teacher_dim, expansion, bias, eps, reduction)
        self.loss = loss

    @property
    def teacher(self) -> nn.Module:
        return self._models[0]

    @property
    def student(self) -> nn.Module:
        return self._models[1]

    def _default_loss(self, example_input, student_dim, teacher_dim, expansion, bias, eps, reduction):
        if self.layout != self.teacher_layout and "bcft" in (self.layout, self.teacher_layout):
            raise ValueError(f"layout {self.layout!r} and teacher_layout {self.teacher_layout!r}: the default loss "
                             "needs both 'bcft' or both frame-major; pass loss= for mixed layouts")
        if student_dim is None or teacher_dim is None:
            if example_input is None:
                raise ValueError("example_input: needed to infer the latent widths (or pass student_dim and "
                                 "teacher_dim)")
            was_training = self.student.training
            self.student.eval()  # a probe must not update BatchNorm statistics
            try:
                with torch.no_grad():
                    _, s, t = self._latents((example_input,) if isinstance(example_input, Tensor) else
                                            tuple(example_input), {}, None)
            finally:
                self.student.train(was_training)
            student_dim = student_dim or frame_width(s, self.layout)
            teacher_dim = teacher_dim or frame_width(t, self.teacher_layout)
        return CosineLIBDistillationLoss(student_dim, teacher_dim, expansion=expansion, bias=bias, eps=eps,
                                         reduction=reduction, layout="bcft" if self.layout == "bcft" else "nd")

    def check_frozen(self) -> None:
        """Raises unless the teacher is in eval mode with no parameter requiring a gradient."""
        trainable = [n for n, p in self.teacher.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(f"teacher: not frozen: {len(trainable)} parameter(s) require grad (e.g. {trainable[0]!r}); "
                             "call pycosdist.features.freeze(teacher) first")
        if self.teacher.training:
            raise ValueError("teacher: not frozen: it is in training mode (BatchNorm statistics would change); "
                             "call pycosdist.features.freeze(teacher) first")

    @torch.no_grad()
    def teacher_latent(self, *inputs, **kwargs) -> Tensor:
        """The frozen teacher's latent for ``inputs`` (a constant): also what a latent cache stores."""
        self.check_frozen()
        self._forwards[1](*inputs, **kwargs)
        return self.teacher_tap.pop()

    def _latents(self, inputs: tuple, kwargs: dict, teacher_latent: Tensor | None):
        """(student output, student latent, teacher latent), after running the models."""
        t = self.teacher_latent(*inputs, **kwargs) if teacher_latent is None else teacher_latent
        output = self._forwards[0](*inputs, **kwargs)
        s = self.student_tap.pop()
        s_frames = frame_axes(s, self.layout, f"student_layer {self.student_tap.name!r}")
        t_frames = frame_axes(t, self.teacher_layout, f"teacher_layer {self.teacher_tap.name!r}")
        if tuple(s_frames) != tuple(t_frames):
            raise ValueError(f"latent frames differ: student_layer {self.student_tap.name!r} gives {list(s.shape)} "
                             f"({self.layout}: frames {list(s_frames)}), teacher_layer {self.teacher_tap.name!r} "
                             f"gives {list(t.shape)} ({self.teacher_layout}: frames {list(t_frames)}); the alignment "
                             "pairs frames one to one, so batch size and frame count must agree")
        return output, s, t

    def align(self, student_latent: Tensor, teacher_latent: Tensor) -> Tensor:
        """The loss between captured latents (float32 for half latents, outside autocast)."""
        if isinstance(self.loss, CosineLIBDistillationLoss) and self.layout != "bcft":
            student_latent = _frame_major(student_latent, self.layout)
            teacher_latent = _frame_major(teacher_latent, self.teacher_layout)
        with torch.autocast(student_latent.device.type, enabled=False):
            return self.loss(_at_least_float32(student_latent), _at_least_float32(teacher_latent))

    def forward(self, *inputs, teacher_latent: Tensor | None = None, **kwargs):
        """Runs the teacher (unless ``teacher_latent`` is given, e.g. from a cache) and the student on
        ``inputs``; returns ``(student output, KD loss)``."""
        output, s, t = self._latents(inputs, kwargs, teacher_latent)
        return output, self.align(s, t.detach())

    def remove_hooks(self) -> None:
        self.teacher_tap.remove()
        self.student_tap.remove()


def _at_least_float32(x: Tensor) -> Tensor:
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _frame_major(latent: Tensor, layout: str) -> Tensor:
    """A 'btd'/'bdt'/'nd' latent as (..., D) with frames leading (the fused op's 'nd' layout)."""
    return latent.transpose(1, 2) if layout == "bdt" else latent
