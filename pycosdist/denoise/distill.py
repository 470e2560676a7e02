"""Knowledge-distillation losses between a student's and a frozen teacher's latents, and the task loss.

Every KD module has the same interface: ``forward(student_latent (B, Cs, Fs, T), teacher_latent
(B, Ct, Ft, T)) -> scalar``. A frame is the C*F vector of one time step (see
:func:`pycosdist.reference.frames`); teacher and student have the same T because the models never
downsample time. Methods (:data:`METHODS`):

- ``none``: no KD (``make_kd_loss`` returns None).
- ``fitnet_mse``: FitNets-style hint: a linear adapter D_s -> D_t on each student frame, mean squared
  error against the teacher frame (mean over batch, frames and the D_t features).
- ``similarity_preserving``: the fine-grained (frame-by-frame) similarity-preserving loss of Nathoo
  et al. (ICASSP 2024). Per sample, X is the (T, D) matrix of latent frames and G = X X^T (T, T);
  each ROW of G is L2-normalized (the normalization of Tung & Mori's similarity-preserving KD, which
  Nathoo et al. build on); the loss is ||G_s - G_t||_F^2 / T^2, averaged over the batch. No
  parameters: G is T x T for both models, whatever D_s and D_t are. Applied at the bottleneck only,
  the same place as the cosine loss, so the comparison is like for like.
- ``cosine_lib``: ours, :class:`pycosdist.nn.CosineLIBDistillationLoss` (linear inverted bottleneck
  D_s -> e*D_s -> D_t, then mean per-frame cosine distance), layout ``'bcft'``.

Ablation methods (they separate the paper's two ideas, the cosine distance and the LIB adapter):

- ``cosine_linear``: cosine distance through ONE linear adapter D_s -> D_t (no inverted bottleneck);
  the distance is the fused :func:`pycosdist.cosine_distance_loss`.
- ``mse_lib``: FitNets' MSE through the LIB (:class:`pycosdist.nn.LinearInvertedBottleneck`, the
  fused projection op) instead of one linear adapter.

``fitnet_mse`` is the remaining corner (MSE through one linear adapter). The LIB methods
(:data:`LIB_METHODS`) take the expansion factor e (``kd.expansion``).

The teacher is frozen (:func:`freeze`): eval mode (BatchNorm uses its running statistics),
``requires_grad=False``, and its latents are computed under ``torch.no_grad()``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import reference
from .models import UNetDenoiser, compress

METHODS = ("none", "fitnet_mse", "similarity_preserving", "cosine_lib", "cosine_linear", "mse_lib")
LIB_METHODS = ("cosine_lib", "mse_lib")  # the methods whose adapter is a LIB (they use ``expansion``)


def _frame_dim(shape, arg: str) -> int:
    if len(shape) not in (3, 4):
        raise ValueError(f"{arg}: expected a latent shape (C, F, T) or (B, C, F, T), got {tuple(shape)}")
    return int(shape[-3]) * int(shape[-2])


def _check_pair(student: Tensor, teacher: Tensor, d_s: int | None = None, d_t: int | None = None) -> None:
    for x, arg, d in ((student, "student_latent", d_s), (teacher, "teacher_latent", d_t)):
        if x.dim() != 4:
            raise ValueError(f"{arg}: expected a (B, C, F, T) latent, got shape {tuple(x.shape)}")
        if d is not None and x.shape[1] * x.shape[2] != d:
            raise ValueError(f"{arg}: expected C*F = {d} features per frame, got shape {tuple(x.shape)}")
    if student.shape[0] != teacher.shape[0] or student.shape[3] != teacher.shape[3]:
        raise ValueError(f"student_latent {tuple(student.shape)} and teacher_latent {tuple(teacher.shape)}: "
                         f"expected the same batch size B and frame count T")


class FitNetMSELoss(nn.Module):
    """Linear adapter on student frames + MSE against teacher frames."""

    def __init__(self, student_dim: int, teacher_dim: int):
        super().__init__()
        self.adapter = nn.Linear(student_dim, teacher_dim)

    def forward(self, student_latent: Tensor, teacher_latent: Tensor) -> Tensor:
        _check_pair(student_latent, teacher_latent, self.adapter.in_features, self.adapter.out_features)
        s = reference.frames(student_latent, "bcft")
        t = reference.frames(teacher_latent, "bcft").detach()
        return F.mse_loss(self.adapter(s), t)


class CosineLinearLoss(nn.Module):
    """One linear adapter on student frames + mean per-frame cosine distance (fused op)."""

    def __init__(self, student_dim: int, teacher_dim: int, bias: bool = True, eps: float = 1e-8):
        super().__init__()
        self.adapter = nn.Linear(student_dim, teacher_dim, bias=bias)
        self.eps = eps

    def forward(self, student_latent: Tensor, teacher_latent: Tensor) -> Tensor:
        from .. import cosine_distance_loss

        _check_pair(student_latent, teacher_latent, self.adapter.in_features, self.adapter.out_features)
        p = self.adapter(reference.frames(student_latent, "bcft"))  # (B*T, D_t)
        return cosine_distance_loss(p, reference.frames(teacher_latent, "bcft").detach(), eps=self.eps)


class MSELIBLoss(nn.Module):
    """The LIB adapter D_s -> e*D_s -> D_t on student frames + MSE against teacher frames."""

    def __init__(self, student_dim: int, teacher_dim: int, expansion: int = 4, bias: bool = True):
        super().__init__()
        from ..nn import LinearInvertedBottleneck

        self.lib = LinearInvertedBottleneck(student_dim, teacher_dim, expansion, bias)

    def forward(self, student_latent: Tensor, teacher_latent: Tensor) -> Tensor:
        _check_pair(student_latent, teacher_latent, self.lib.in_dim, self.lib.out_dim)
        p = self.lib(reference.frames(student_latent, "bcft"))  # (B*T, D_t)
        return F.mse_loss(p, reference.frames(teacher_latent, "bcft").detach())


def frame_gram(latent: Tensor, eps: float = 1e-8) -> Tensor:
    """(B, C, F, T) latent -> (B, T, T) frame-by-frame Gram matrices with L2-normalized rows."""
    x = latent.flatten(1, 2).transpose(1, 2)  # (B, T, D)
    return F.normalize(x @ x.transpose(1, 2), dim=-1, eps=eps)


class SimilarityPreservingLoss(nn.Module):
    """Fine-grained similarity-preserving KD (no parameters); see the module docstring."""

    def __init__(self, eps: float = 1e-8):
        super().__init__()
        self.eps = eps

    def forward(self, student_latent: Tensor, teacher_latent: Tensor) -> Tensor:
        _check_pair(student_latent, teacher_latent)
        g_s = frame_gram(student_latent, self.eps)
        g_t = frame_gram(teacher_latent.detach(), self.eps)
        t = g_s.shape[-1]
        return ((g_s - g_t) ** 2).sum((1, 2)).mean() / (t * t)


def _cosine_lib_module(student_dim, teacher_dim, expansion, bias, eps):
    from ..nn import CosineLIBDistillationLoss

    return CosineLIBDistillationLoss(student_dim, teacher_dim, expansion=expansion, bias=bias, eps=eps,
                                     reduction="mean", layout="bcft")


def make_kd_loss(method: str, student_latent_shape, teacher_latent_shape, *, expansion: int = 4, bias: bool = True,
                 eps: float = 1e-8) -> nn.Module | None:
    """The KD module for ``method`` (see :data:`METHODS`) between latents of the given shapes
    ((C, F, T) or (B, C, F, T); only C*F matters), or None for ``'none'``. ``expansion``, ``bias``:
    LIB settings of :data:`LIB_METHODS` (``bias`` also for the linear adapter of ``cosine_linear``); ``eps``: norm clamp of the cosine and SP normalizations."""
    if method not in METHODS:
        raise ValueError(f"method: unknown KD method {method!r}; expected one of {list(METHODS)}")
    if method == "none":
        return None
    d_s = _frame_dim(student_latent_shape, "student_latent_shape")
    d_t = _frame_dim(teacher_latent_shape, "teacher_latent_shape")
    if method == "fitnet_mse":
        return FitNetMSELoss(d_s, d_t)
    if method == "similarity_preserving":
        return SimilarityPreservingLoss(eps)
    if method == "cosine_linear":
        return CosineLinearLoss(d_s, d_t, bias, eps)
    if method == "mse_lib":
        return MSELIBLoss(d_s, d_t, expansion, bias)
    return _cosine_lib_module(d_s, d_t, expansion, bias, eps)


def freeze(teacher: nn.Module) -> nn.Module:
    """Eval mode and no gradients, in place; returns ``teacher``."""
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


@torch.no_grad()
def teacher_latent(teacher: UNetDenoiser, noisy: Tensor) -> Tensor:
    """The frozen teacher's latent (B, C, F', T) of ``noisy`` (B, n): a constant (no graph), on the
    teacher's device (``noisy`` is moved there; the teacher-latent cache lives on that device)."""
    if teacher.training:
        raise RuntimeError("teacher_latent: the teacher must be frozen (call distill.freeze(teacher) first)")
    return teacher.latent(noisy.to(next(teacher.parameters()).device))


def neg_si_sdr(enhanced: Tensor, clean: Tensor, eps: float = 1e-8) -> Tensor:
    """Mean over the batch of minus the scale-invariant SDR in dB of ``enhanced`` (B, n) against
    ``clean`` (B, n), both made zero-mean (Le Roux et al., 2019). ``eps`` keeps an all-silent crop
    finite: there the term only pushes the output towards silence."""
    y = enhanced - enhanced.mean(-1, keepdim=True)
    s = clean - clean.mean(-1, keepdim=True)
    target = (y * s).sum(-1, keepdim=True) / ((s * s).sum(-1, keepdim=True) + eps) * s
    ratio = ((target * target).sum(-1) + eps) / (((y - target) ** 2).sum(-1) + eps)
    return -(10.0 * torch.log10(ratio)).mean()


def task_loss(enhanced_spec: Tensor, enhanced: Tensor, clean: Tensor, stft, wave_weight: float = 10.0,
              sisdr_weight: float = 0.0) -> Tensor:
    """Task (reconstruction) loss of the student against the clean target.

    L1 between compressed magnitudes |Y|^0.3 and |S|^0.3 (enhanced_spec (B, F, T) complex vs the
    clean STFT), which weighs quiet time-frequency regions like a perceptual loudness curve, plus
    ``wave_weight`` x the L1 between waveforms (enhanced (B, n) vs clean (B, n)), which sees the
    overlap-add of the masked frames (what is actually heard) and so keeps the mask STFT-consistent,
    plus ``sisdr_weight`` x minus the SI-SDR in dB (:func:`neg_si_sdr`): a loss on the whole
    utterance's waveform error relative to its energy, so quiet speech that a mask attenuates costs
    as much as loud speech (what intelligibility measures such as STOI look at).
    """
    mag = F.l1_loss(compress(enhanced_spec.abs()), compress(stft(clean).abs()))
    loss = mag + wave_weight * F.l1_loss(enhanced, clean)
    if sisdr_weight:
        loss = loss + sisdr_weight * neg_si_sdr(enhanced, clean)
    return loss
