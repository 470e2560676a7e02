"""Distill your own denoiser with pycosdist: any teacher and student nn.Module, latents by module name.

The models here are NOT pycosdist's U-Nets: a GRU mask estimator (teacher) and a small 1-D conv
mask estimator (student), on log-magnitude frames of a toy noisy signal. The KD loss aligns the
teacher's GRU output (B, T, 256) with the student's conv bottleneck (B, 32, T) through the linear
inverted bottleneck, by the fused cosine distance.

    python examples/distill_your_model.py [--steps 60]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from pycosdist.features import LatentDistiller, freeze

N_FFT, HOP = 256, 64
BINS = N_FFT // 2 + 1


def log_mag(wave: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """wave (B, n) -> (complex spectrum (B, F, T), log magnitude (B, T, F))."""
    spec = torch.stft(wave, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True)
    return spec, torch.log1p(spec.abs()).transpose(1, 2)


class GRUMasker(nn.Module):
    """Teacher: (B, T, F) features -> GRU -> mask (B, T, F)."""

    def __init__(self, hidden: int = 256):
        super().__init__()
        self.rnn = nn.GRU(BINS, hidden, batch_first=True)
        self.head = nn.Linear(hidden, BINS)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.rnn(feats)[0]))


class ConvMasker(nn.Module):
    """Student: (B, T, F) features -> Conv1d stack over time -> mask (B, T, F)."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv1d(BINS, width, 5, padding=2), nn.ReLU())
        self.bottleneck = nn.Conv1d(width, width, 5, padding=2)
        self.head = nn.Conv1d(width, BINS, 1)

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bottleneck(self.encoder(feats.transpose(1, 2))))
        return torch.sigmoid(self.head(x)).transpose(1, 2)


def toy_batch(batch: int, seconds: float, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Harmonic 'voiced' tones with a wandering pitch (clean) plus white noise (noisy)."""
    n = int(16000 * seconds)
    t = torch.arange(n) / 16000
    f0 = 120 + 80 * torch.rand(batch, 1, generator=generator)
    wobble = 1 + 0.05 * torch.sin(2 * torch.pi * 3 * t)
    clean = sum(torch.sin(2 * torch.pi * k * f0 * wobble * t) / k for k in range(1, 6)) * 0.1
    noisy = clean + 0.05 * torch.randn(batch, n, generator=generator)
    return noisy, clean


def masked_loss(model_out: torch.Tensor, spec: torch.Tensor, clean: torch.Tensor) -> torch.Tensor:
    """L1 between enhanced and clean log magnitudes (mask (B, T, F) applied to the noisy spectrum)."""
    enhanced = model_out.transpose(1, 2) * spec.abs()
    return (torch.log1p(enhanced) - torch.log1p(torch.stft(
        clean, N_FFT, HOP, window=torch.hann_window(N_FFT), return_complex=True).abs())).abs().mean()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--kd-weight", type=float, default=0.1)
    args = parser.parse_args(argv)
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    teacher = GRUMasker()
    opt_t = torch.optim.Adam(teacher.parameters(), 3e-3)
    for _ in range(args.steps):  # a quick teacher; in real use, load your trained one
        noisy, clean = toy_batch(8, 0.5, g)
        spec, feats = log_mag(noisy)
        loss = masked_loss(teacher(feats), spec, clean)
        opt_t.zero_grad()
        loss.backward()
        opt_t.step()
    freeze(teacher)

    student = ConvMasker()
    noisy, _ = toy_batch(1, 0.5, g)
    kd = LatentDistiller(teacher, student, teacher_layer="rnn", student_layer="bottleneck",
                         teacher_layout="btd", layout="bdt", example_input=log_mag(noisy)[1])
    optimizer = torch.optim.Adam([*student.parameters(), *kd.parameters()], 3e-3)
    history = []
    for _ in range(args.steps):
        noisy, clean = toy_batch(8, 0.5, g)
        spec, feats = log_mag(noisy)
        mask, kd_loss = kd(feats)
        task = masked_loss(mask, spec, clean)
        loss = task + args.kd_weight * kd_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append({"task": task.item(), "kd": kd_loss.item()})
    first, last = history[0], history[-1]
    print(f"student: task loss {first['task']:.4f} -> {last['task']:.4f}, "
          f"cosine distance to the teacher {first['kd']:.4f} -> {last['kd']:.4f}")
    return {"history": history, "lib_params": sum(p.numel() for p in kd.parameters())}


if __name__ == "__main__":
    main()
