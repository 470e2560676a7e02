"""Streaming inference of a causal :class:`~pycosdist.denoise.models.UNetDenoiser`: one hop in, one hop out.

:class:`StreamStep` is the whole model for ONE hop as a pure function of explicit state,
``(samples (B, hop), *state) -> (enhanced (B, hop), *new_state)``, and :class:`StreamingDenoiser`
keeps that state between calls. The state (all float tensors, zeros at the start of a stream;
``docs/streaming.md`` documents the layout for people who embed an export of it):

- ``analysis`` (B, n_fft - hop): the last input samples; with the new hop they form the STFT frame.
- ``enc{i}``, ``bott{i}`` (B, C_in, F_in, dilation * (k_t - 1)): each convolution's past input frames.
- ``dec{i}`` (B, C_in, F_in, k_t - 1): each transposed convolution's past input frames.
- ``overlap`` (B, n_fft - hop): the overlap-add tail, the partial sums of the next output samples.

The step is written with plain tensor ops (the DFT and inverse DFT as matrix products, BatchNorm
folded into the convolutions, each time convolution run on its window of past frames only), so that
the same module traces to TorchScript and ONNX (:func:`pycosdist.denoise.export.export_stream`).
Hop k's output is the offline output delayed by n_fft - hop samples (the window's past part), so
the algorithmic latency is n_fft samples: window plus no lookahead. :meth:`StreamingDenoiser.enhance`
compensates that delay, and streamed == offline to float tolerance (tests/denoise/test_streaming.py).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .models import COMPRESS, SAMPLE_RATE, FrameNorm, UNetDenoiser


def _fold_norm(weight: Tensor, bias: Tensor | None, norm: nn.Module, out_dim: int) -> tuple[Tensor, Tensor, nn.Module | None]:
    """A convolution's (weight, bias) with an eval-mode BatchNorm after it folded in (computed in
    float64); a FrameNorm cannot be folded and is returned to be applied after the convolution."""
    c_out = weight.shape[out_dim]
    w, b = weight.double(), (bias.double() if bias is not None else weight.new_zeros(c_out, dtype=torch.float64))
    if isinstance(norm, nn.BatchNorm2d):
        scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
        shape = [1] * w.dim()
        shape[out_dim] = c_out
        w = w * scale.reshape(shape)
        b = (b - norm.running_mean.double()) * scale + norm.bias.double()
        return w.to(weight.dtype), b.to(weight.dtype), None
    if isinstance(norm, FrameNorm):
        return weight.detach().clone(), b.to(weight.dtype), norm
    raise ValueError(f"model: a {type(norm).__name__} layer cannot run frame by frame; expected BatchNorm2d or FrameNorm")


class _Layer(nn.Module):
    """One convolution (+ folded BatchNorm or a FrameNorm) + ELU, run on a window of frames."""

    def __init__(self, name, weight, bias, norm, stride, padding, dilation, past, transposed=False,
                 output_padding=(0, 0)):
        super().__init__()
        self.name, self.stride, self.padding, self.dilation = name, stride, padding, dilation
        self.past, self.transposed, self.output_padding = past, transposed, output_padding
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = nn.Parameter(bias, requires_grad=False)
        self.norm = norm

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        # x: (B, C, F, 1) the current frame; state: (B, C, F, past) the frames before it
        window = torch.cat([state, x], dim=-1)  # (B, C, F, past + 1)
        if self.transposed:
            # A transposed conv with time stride 1 over k_t frames = one frame of a (k_f, 1) transposed
            # conv whose input channels are the k_t frames (weight rearranged in __init__ of StreamStep).
            b, c, f, k = window.shape
            y = F.conv_transpose2d(window.permute(0, 1, 3, 2).reshape(b, c * k, f, 1), self.weight, self.bias,
                                   self.stride, self.padding, self.output_padding)
        else:
            y = F.conv2d(window, self.weight, self.bias, self.stride, self.padding, self.dilation)
        if self.norm is not None:
            y = self.norm(y)
        return F.elu(y), window[..., 1:]


class StreamStep(nn.Module):
    """One hop of a causal :class:`UNetDenoiser` with explicit state (see the module docstring):
    ``forward(samples (B, hop), *state) -> (enhanced (B, hop), *new_state)``. The weights are copied
    (BatchNorm folded, in the model's dtype): later changes to ``model`` do not reach the step."""

    def __init__(self, model: UNetDenoiser):
        super().__init__()
        cfg = model.config
        if not cfg.causal:
            raise ValueError("model: streaming needs a causal model (UNetConfig(causal=True), e.g. the "
                             "causal_student_quarter preset); this one's convolutions and centred STFT use future "
                             "frames")
        self.config = cfg
        self.n_fft, self.hop, self.freq_bins = cfg.n_fft, cfg.hop, cfg.freq_bins
        self.mask_floor = float(cfg.mask_floor)
        dtype = next(model.parameters()).dtype
        self._register_dft(model, dtype)
        kf, kt = cfg.kernel_size
        self.layers = nn.ModuleList()
        self.state_shapes: dict[str, tuple] = {"analysis": (self.n_fft - self.hop,)}
        freq = [self.freq_bins]
        chans = (1,) + cfg.channels
        for i, block in enumerate(model.encoder):
            conv, norm = block[0], block[1]
            w, b, fn = _fold_norm(conv.weight.detach(), conv.bias, norm, 0)
            self._add(f"enc{i}", w, b, fn, conv.stride, (kf // 2, 0), (1, 1), kt - 1, chans[i], freq[-1])
            freq.append((freq[-1] - 1) // 2 + 1)
        for i, block in enumerate(model.bottleneck):
            conv, norm = block[0], block[1]
            w, b, fn = _fold_norm(conv.weight.detach(), conv.bias, norm, 0)
            self._add(f"bott{i}", w, b, fn, (1, 1), (kf // 2, 0), conv.dilation, conv.past_frames, conv.in_channels,
                      freq[-1])
        for j, up in enumerate(model.decoder):
            level = len(cfg.channels) - 1 - j  # restores the frequency size of encoder input `level`
            f_in, f_out = freq[level + 1], freq[level]
            w, b, fn = _fold_norm(up.conv.weight.detach(), up.conv.bias, up.post[0], 1)
            c_in = w.shape[0]
            # (C_in, C_out, k_f, k_t) -> (C_in * k_t, C_out, k_f, 1), newest frame last: frame m of the
            # window (m = k_t - 1 is the current one) meets time tap k_t - 1 - m.
            w = w.flip(-1).permute(0, 3, 1, 2).reshape(c_in * kt, w.shape[1], kf, 1)
            output_padding = f_out - ((f_in - 1) * 2 - 2 * (kf // 2) + kf)
            self._add(f"dec{j}", w, b, fn, (2, 1), (kf // 2, 0), (1, 1), kt - 1, c_in, f_in, transposed=True,
                      output_padding=(output_padding, 0))
        self.head_weight = nn.Parameter(model.head.weight.detach().clone(), requires_grad=False)
        self.head_bias = nn.Parameter(model.head.bias.detach().clone(), requires_grad=False)
        self.n_encoder, self.n_bottleneck = len(model.encoder), len(model.bottleneck)
        self.state_shapes["overlap"] = (self.n_fft - self.hop,)

    def _add(self, name, w, b, norm, stride, padding, dilation, past, c_in, f_in, transposed=False,
             output_padding=(0, 0)):
        self.layers.append(_Layer(name, w, b, norm, tuple(stride), padding, tuple(dilation), past, transposed,
                                  output_padding))
        self.state_shapes[name] = (c_in, f_in, past)

    def _register_dft(self, model: UNetDenoiser, dtype) -> None:
        """The windowed real DFT and the inverse real DFT times the synthesis window, as matrices
        (built in float64): frame (B, n_fft) @ analysis -> [Re X, Im X] (B, 2F);
        [Re Y, Im Y] (B, 2F) @ synthesis -> windowed output frame (B, n_fft)."""
        n, f = self.n_fft, self.freq_bins
        t = torch.arange(n, dtype=torch.float64)
        k = torch.arange(f, dtype=torch.float64)
        angle = 2 * math.pi * torch.outer(t, k) / n  # (n_fft, F)
        window = model.stft.window.double()
        analysis = torch.cat([window[:, None] * torch.cos(angle), -window[:, None] * torch.sin(angle)], dim=1)
        weight = torch.full((f,), 2.0, dtype=torch.float64)
        weight[0] = 1.0
        if n % 2 == 0:
            weight[-1] = 1.0  # DC and Nyquist appear once in the full spectrum, the others twice
        syn = model.stft.synthesis.double()
        synthesis = torch.cat([(weight[:, None] * torch.cos(angle.T)) / n * syn,
                               -(weight[:, None] * torch.sin(angle.T)) / n * syn], dim=0)
        self.register_buffer("dft", analysis.to(dtype))
        self.register_buffer("inverse_dft", synthesis.to(dtype))

    @property
    def state_names(self) -> list[str]:
        return list(self.state_shapes)

    def initial_state(self, batch: int = 1, dtype=None, device=None) -> list[Tensor]:
        """The state at the start of a stream: zeros (silence before it), in :attr:`state_names` order."""
        dtype = dtype or self.dft.dtype
        device = device or self.dft.device
        return [torch.zeros((batch, *shape), dtype=dtype, device=device) for shape in self.state_shapes.values()]

    def forward(self, samples: Tensor, *state: Tensor) -> tuple[Tensor, ...]:
        # samples: (B, hop); state: the tensors named by state_names, in that order
        analysis, overlap, conv_states = state[0], state[-1], state[1:-1]
        frame = torch.cat([analysis, samples], dim=1)  # (B, n_fft)
        spec = frame @ self.dft  # (B, 2F): [Re, Im]
        re, im = spec[:, :self.freq_bins], spec[:, self.freq_bins:]
        magnitude = torch.sqrt(re * re + im * im)
        x = (magnitude.clamp_min(1e-8) ** COMPRESS)[:, None, :, None]  # (B, 1, F, 1)
        new_states = []
        skips = []
        layers = list(self.layers)
        for i in range(self.n_encoder):
            x, s = layers[i](x, conv_states[i])
            new_states.append(s)
            skips.append(x)
        for i in range(self.n_encoder, self.n_encoder + self.n_bottleneck):
            x, s = layers[i](x, conv_states[i])
            new_states.append(s)
        for j, i in enumerate(range(self.n_encoder + self.n_bottleneck, len(layers))):
            x, s = layers[i](torch.cat([x, skips[-1 - j]], dim=1), conv_states[i])
            new_states.append(s)
        mask = torch.sigmoid(F.conv2d(x, self.head_weight, self.head_bias))[:, 0, :, 0]  # (B, F)
        if self.mask_floor:
            mask = self.mask_floor + (1.0 - self.mask_floor) * mask
        out_frame = torch.cat([re * mask, im * mask], dim=1) @ self.inverse_dft  # (B, n_fft)
        added = out_frame + F.pad(overlap, (0, self.hop))
        return (added[:, :self.hop], frame[:, self.hop:], *new_states, added[:, self.hop:])


class StreamingDenoiser:
    """A causal model run one hop at a time, keeping the state between calls.

    ``process_hop(x (hop,) or (B, hop)) -> enhanced, same shape``: the output is the model's offline
    output delayed by :attr:`delay_samples` = n_fft - hop. :meth:`enhance` streams a whole clip and
    compensates the delay. ``reset()`` starts a new stream (the batch size is fixed by the first hop
    after a reset). ``step`` may be any callable with :class:`StreamStep`'s signature (e.g. an
    exported one, :class:`pycosdist.denoise.export.ExportedStream`)."""

    def __init__(self, model: UNetDenoiser | None = None, step=None):
        if (model is None) == (step is None):
            raise ValueError("StreamingDenoiser: pass exactly one of model (a causal UNetDenoiser) or step")
        if model is not None:
            step = StreamStep(model).eval()
        self.step = step
        self.hop, self.n_fft = step.hop, step.n_fft
        self.delay_samples = self.n_fft - self.hop
        self.latency_ms = 1000.0 * self.n_fft / SAMPLE_RATE
        self._state: list | None = None

    def reset(self) -> None:
        self._state = None

    @torch.inference_mode()  # cheaper per op than no_grad: a hop is only ~60 small ops
    def process_hop(self, x: Tensor) -> Tensor:
        single = x.dim() == 1
        batch = x[None] if single else x
        if batch.dim() != 2 or batch.shape[-1] != self.hop:
            raise ValueError(f"x: expected one hop, ({self.hop},) or (batch, {self.hop}) samples, got shape "
                             f"{tuple(x.shape)}")
        if not batch.is_floating_point():
            raise ValueError(f"x: expected floating-point samples, got dtype {x.dtype}")
        if self._state is None:
            self._state = self.step.initial_state(batch.shape[0], dtype=batch.dtype)
        elif self._state[0].shape[0] != batch.shape[0]:
            raise ValueError(f"x: this stream has batch size {self._state[0].shape[0]}, got {batch.shape[0]}; call "
                             "reset() to start a stream with another batch size")
        out, *self._state = self.step(batch, *self._state)
        return out[0] if single else out

    @torch.inference_mode()
    def enhance(self, wave: Tensor) -> Tensor:
        """A whole clip (n,) or (B, n), streamed hop by hop from a fresh state (zero-padded to whole
        hops plus the delay) -> enhanced, same shape, delay removed. Resets the stream."""
        single = wave.dim() == 1
        batch = wave[None] if single else wave
        if batch.dim() != 2 or batch.shape[-1] == 0:
            raise ValueError(f"wave: expected a non-empty (samples,) or (batch, samples) waveform, got shape "
                             f"{tuple(wave.shape)}")
        n = batch.shape[-1]
        hops = -(-(n + self.delay_samples) // self.hop)
        padded = F.pad(batch, (0, hops * self.hop - n))
        self.reset()
        out = torch.cat([self.process_hop(padded[:, k * self.hop:(k + 1) * self.hop]) for k in range(hops)], dim=1)
        self.reset()
        out = out[:, self.delay_samples:self.delay_samples + n]
        return out[0] if single else out


def stream_numpy(denoiser: StreamingDenoiser, wave: np.ndarray) -> np.ndarray:
    """:meth:`StreamingDenoiser.enhance` of a float32 numpy clip (samples,)."""
    return denoiser.enhance(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))).numpy()
