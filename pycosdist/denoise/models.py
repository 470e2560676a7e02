"""U-Net denoising autoencoders on the STFT magnitude (teacher and students).

The network sees the compressed magnitude |X|^0.3 of the noisy STFT (16 kHz, 512-point FFT, hop
128, Hann) as a 1-channel image (B, 1, F=257, T), predicts a sigmoid mask in [0, 1], multiplies it
into the noisy magnitude, and resynthesizes with the noisy phase. Encoder levels halve FREQUENCY
only (stride (2, 1)); time is never downsampled, so every model's latent (the bottleneck output,
(B, C, F', T)) has the same T frames as the input STFT, whatever its width or depth. That is what
lets a student's frames be aligned one-to-one with the teacher's.

Causal models (``UNetConfig(causal=True)``) use no future sample: their STFT frames END at the
current hop (left zero-padding of n_fft - hop samples, no centring), every time convolution sees the
current and past frames only, and the decoder's transposed convolutions keep only the outputs that
past frames produce. Frame t of a causal model covers samples [t*hop - (n_fft - hop), t*hop + hop),
so the output is final one hop after its last input sample: the algorithmic latency is n_fft samples
(window), with no lookahead. With n_fft = 2 hop (the causal presets) a clip of a whole number of hops
has T = n // hop + 1 frames, like a centred model of the same hop, so KD against a non-causal
teacher stays frame-aligned (training crops are whole hops). :mod:`pycosdist.denoise.streaming` runs
them hop by hop with the same output.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
from torch import Tensor, nn

SAMPLE_RATE = 16000
N_FFT = 512
HOP = 128
COMPRESS = 0.3  # magnitude compression exponent: tames the dynamic range of the input and the loss


class FrameNorm(nn.Module):
    """Per-example, per-FRAME normalization over channels and frequency, then a per-channel affine:
    what GroupNorm(1, C) does, without pooling statistics over time, so it is causal."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: Tensor) -> Tensor:
        # x: (B, C, F, T); statistics per (b, t)
        mean = x.mean(dim=(1, 2), keepdim=True)
        var = x.var(dim=(1, 2), unbiased=False, keepdim=True)
        return (x - mean) * torch.rsqrt(var + self.eps) * self.weight[:, None, None] + self.bias[:, None, None]


# Normalization layers by name (UNetConfig.norm); CAUSAL_NORMS use no statistic over time at inference.
NORMS = {"batch": nn.BatchNorm2d, "group": lambda c: nn.GroupNorm(1, c), "frame": FrameNorm}
CAUSAL_NORMS = ("batch", "frame")


@dataclass(frozen=True)
class UNetConfig:
    """Architecture of a :class:`UNetDenoiser`.

    channels: output channels of each encoder level (one entry per level; each level halves F).
    kernel_size: (frequency, time) kernel of every convolution.
    bottleneck_layers: stride-1 convolutions after the last level, with time dilation 1, 2, 4, ...
      (temporal context without downsampling time); the last one's output is the latent.
    bottleneck_channels: their width (0: same as the last level).
    norm: "batch" (BatchNorm2d) or "group" (GroupNorm with one group: per-example statistics, so a
      run split over DistributedDataParallel ranks on CPU, where SyncBatchNorm is unavailable, is
      exactly the single-process run with the combined batch), or "frame" (:class:`FrameNorm`:
      per-frame statistics, causal and batch-independent).
    mask_floor: the lowest gain the mask can apply (mask = floor + (1 - floor) * sigmoid); a floor
      bounds how deep a mistaken mask can cut into speech the model does not recognize, which
      protects intelligibility on voices unlike the training ones (0: no floor).
    causal: no future frame or sample is used (see the module docstring); norm must then be one of
      :data:`CAUSAL_NORMS` ("group" pools statistics over the whole clip's time axis).
    n_fft, hop: STFT window and hop in samples at 16 kHz (periodic Hann window). Algorithmic latency
      of a causal model: n_fft samples (256 -> 16 ms).
    """

    channels: tuple[int, ...] = (16, 32, 48, 64)
    kernel_size: tuple[int, int] = (5, 3)
    bottleneck_layers: int = 2
    bottleneck_channels: int = 0
    norm: str = "batch"
    mask_floor: float = 0.0
    causal: bool = False
    n_fft: int = N_FFT
    hop: int = HOP

    def __post_init__(self):
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        object.__setattr__(self, "kernel_size", tuple(int(k) for k in self.kernel_size))
        if not self.channels or any(c < 1 for c in self.channels):
            raise ValueError(f"channels: expected a non-empty list of positive ints, got {list(self.channels)}")
        if len(self.kernel_size) != 2 or any(k < 1 or k % 2 == 0 for k in self.kernel_size):
            raise ValueError(f"kernel_size: expected two odd positive ints (freq, time), got {list(self.kernel_size)}")
        if self.bottleneck_layers < 1:
            raise ValueError(f"bottleneck_layers: expected >= 1, got {self.bottleneck_layers}")
        if self.norm not in NORMS:
            raise ValueError(f"norm: expected one of {list(NORMS)}, got {self.norm!r}")
        if not 0.0 <= self.mask_floor < 1.0:
            raise ValueError(f"mask_floor: expected a gain in [0, 1), got {self.mask_floor}")
        if self.bottleneck_channels < 0:
            raise ValueError(f"bottleneck_channels: expected >= 0, got {self.bottleneck_channels}")
        if not isinstance(self.causal, bool):
            raise ValueError(f"causal: expected true or false, got {self.causal!r}")
        if self.n_fft < 4 or self.n_fft % 2:
            raise ValueError(f"n_fft: expected an even number of samples >= 4, got {self.n_fft}")
        if not 1 <= self.hop <= self.n_fft // 2:
            raise ValueError(f"hop: expected 1..n_fft/2 = {self.n_fft // 2} samples (at least 50% window overlap), "
                             f"got {self.hop}")
        if self.causal and self.n_fft % self.hop:
            raise ValueError(f"hop: a causal model needs a hop that divides n_fft = {self.n_fft}, got {self.hop}")
        if self.causal and self.norm not in CAUSAL_NORMS:
            raise ValueError(f"norm: {self.norm!r} normalizes over the whole time axis, which a causal model cannot "
                             f"do; expected one of {list(CAUSAL_NORMS)} with causal=True")

    @property
    def freq_bins(self) -> int:
        return self.n_fft // 2 + 1

    @property
    def latency_ms(self) -> float:
        """Algorithmic latency of a causal model (window, no lookahead); inf for a non-causal one."""
        return 1000.0 * self.n_fft / SAMPLE_RATE if self.causal else float("inf")

    @property
    def latent_channels(self) -> int:
        return self.bottleneck_channels or self.channels[-1]

    def to_dict(self) -> dict:
        return asdict(self)


def _scaled(channels, divisor):
    return tuple(max(1, c // divisor) for c in channels)


_DEMO = UNetConfig(channels=(16, 32, 48, 64), kernel_size=(5, 3), bottleneck_layers=2)
_PAPER = UNetConfig(channels=(32, 64, 128, 256, 256), kernel_size=(5, 3), bottleneck_layers=3)

# Named presets. Students are the teacher narrowed (channels / 2, / 4, / 8: same F' as the teacher,
# smaller C) or made shallower (one level fewer: F' twice the teacher's, C / 4), the mismatch
# scenarios of the paper. "demo" sizes train in minutes on 2 CPU cores; "paper_" ones are larger.
PRESETS: dict[str, UNetConfig] = {}
for _prefix, _base in (("", _DEMO), ("paper_", _PAPER)):
    PRESETS[_prefix + "teacher"] = _base
    for _name, _div in (("half", 2), ("quarter", 4), ("eighth", 8)):
        PRESETS[f"{_prefix}student_{_name}"] = replace(_base, channels=_scaled(_base.channels, _div))
    PRESETS[_prefix + "student_shallow"] = replace(_base, channels=_scaled(_base.channels[:-1], 4))
# Causal students for streaming: the demo students with causal convolutions and a 256-sample window
# (16 ms algorithmic latency) at the teacher's hop of 128, so their T frames match the teacher's.
for _name, _div in (("half", 2), ("quarter", 4)):
    PRESETS[f"causal_student_{_name}"] = replace(_DEMO, channels=_scaled(_DEMO.channels, _div), causal=True,
                                                 n_fft=256, hop=HOP)


def preset(name: str, **overrides) -> UNetConfig:
    """The :data:`PRESETS` entry ``name`` with any :class:`UNetConfig` fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"preset: unknown model preset {name!r}; expected one of {sorted(PRESETS)}")
    return replace(PRESETS[name], **overrides)


def synthesis_window(window: Tensor, hop: int) -> Tensor:
    """The causal iSTFT's window: ``window / envelope``, where envelope[m] is the sum of window^2 over
    all offsets congruent to m modulo hop. Overlap-adding ``frame * synthesis_window`` of frames
    analysed with ``window`` then reconstructs the signal exactly wherever every frame overlapping
    a sample exists, without dividing by a running envelope (which streaming cannot know ahead)."""
    n_fft = window.shape[0]
    squared = torch.nn.functional.pad(window.double() ** 2, (0, -n_fft % hop)).reshape(-1, hop).sum(0)
    return (window.double() / squared.repeat(n_fft // hop + 1)[:n_fft]).to(window.dtype)


class STFT(nn.Module):
    """16 kHz STFT front end: (B, n) waveform <-> (B, n_fft // 2 + 1, T) complex spectrogram,
    T = n // hop + 1 for centred (reflect-padded) frames; causal frames (see the module docstring):
    T = ceil(n / hop) + n_fft / hop - 1, which is n // hop + 1 too when n_fft = 2 hop and hop divides n."""

    def __init__(self, n_fft: int = N_FFT, hop: int = HOP, causal: bool = False):
        super().__init__()
        self.n_fft, self.hop, self.causal = n_fft, hop, causal
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        self.register_buffer("synthesis", synthesis_window(self.window, hop), persistent=False)

    def frames(self, samples: int) -> int:
        """T, the number of frames of a ``samples``-long waveform (see :meth:`forward`)."""
        if self.causal:
            return -(-samples // self.hop) + self.n_fft // self.hop - 1
        return samples // self.hop + 1

    def forward(self, wave: Tensor) -> Tensor:
        # wave: (B, n) -> (B, n_fft // 2 + 1, T) complex, T = self.frames(n)
        if self.causal:
            # Frame t = samples [t*hop - (n_fft - hop), t*hop + hop): the past and the current hop. The
            # right padding adds every frame that overlaps the last sample, so inverse() is exact to
            # the end (what a stream outputs once its input is flushed with zeros).
            past, hop = self.n_fft - self.hop, self.hop
            wave = torch.nn.functional.pad(wave, (past, -wave.shape[-1] % hop + past))
        return torch.stft(wave, self.n_fft, self.hop, window=self.window, center=not self.causal,
                          return_complex=True)

    def inverse(self, spec: Tensor, length: int) -> Tensor:
        # spec: (B, F, T) complex -> (B, length)
        if not self.causal:
            return torch.istft(spec, self.n_fft, self.hop, window=self.window, center=True, length=length)
        frames = torch.fft.irfft(spec.transpose(1, 2), n=self.n_fft) * self.synthesis  # (B, T, n_fft)
        t = frames.shape[1]
        total = (t - 1) * self.hop + self.n_fft
        added = torch.nn.functional.fold(frames.transpose(1, 2), (1, total), (1, self.n_fft), stride=(1, self.hop))
        start = self.n_fft - self.hop  # the left padding of forward()
        return added.reshape(spec.shape[0], total)[:, start:start + length]


def compress(mag: Tensor) -> Tensor:
    # Clamped so the gradient of x^0.3 stays finite at 0.
    return mag.clamp_min(1e-8) ** COMPRESS


class CausalConv2d(nn.Conv2d):
    """A Conv2d whose time axis (the last) is zero-padded on the past side only: output frame t
    sees input frames t - dilation * (k - 1) .. t. The frequency axis keeps its symmetric padding."""

    def __init__(self, c_in, c_out, kernel, stride=(1, 1), dilation=(1, 1)):
        super().__init__(c_in, c_out, kernel, stride, (dilation[0] * (kernel[0] // 2), 0), dilation)
        self.past_frames = dilation[1] * (kernel[1] - 1)

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(torch.nn.functional.pad(x, (self.past_frames, 0)))


class _ConvBlock(nn.Sequential):
    def __init__(self, c_in, c_out, kernel, stride=(1, 1), dilation=(1, 1), norm="batch", causal=False):
        if causal:
            conv = CausalConv2d(c_in, c_out, kernel, stride, dilation)
        else:
            pad = tuple(d * (k // 2) for k, d in zip(kernel, dilation))
            conv = nn.Conv2d(c_in, c_out, kernel, stride, pad, dilation)
        super().__init__(conv, NORMS[norm](c_out), nn.ELU())


class _UpBlock(nn.Module):
    """Transposed conv doubling F (to exactly the skip's size), then BN + ELU. Causal: no time
    padding, and of the T + k - 1 output frames the first T are kept (frame t then gets input
    frames t - k + 1 .. t only)."""

    def __init__(self, c_in, c_out, kernel, norm="batch", causal=False):
        super().__init__()
        self.causal = causal
        self.conv = nn.ConvTranspose2d(c_in, c_out, kernel, (2, 1), (kernel[0] // 2, 0 if causal else kernel[1] // 2))
        self.post = nn.Sequential(NORMS[norm](c_out), nn.ELU())

    def forward(self, x: Tensor, size) -> Tensor:
        if self.causal:
            frames = x.shape[-1]
            y = self.conv(x, output_size=(size[0], frames + self.conv.kernel_size[1] - 1))[..., :frames]
        else:
            y = self.conv(x, output_size=size)
        return self.post(y)


class UNetDenoiser(nn.Module):
    """Mask-based U-Net speech denoiser; see the module docstring.

    ``forward(noisy (B, n)) -> enhanced (B, n)``; :meth:`enhance_with_latent` also returns the latent
    (B, C, F', T); :meth:`latent` runs the encoder only (what a teacher needs for distillation).
    """

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        self.stft = STFT(config.n_fft, config.hop, config.causal)
        k, norm, causal = config.kernel_size, config.norm, config.causal
        chans = (1,) + config.channels
        self.encoder = nn.ModuleList(_ConvBlock(chans[i], chans[i + 1], k, (2, 1), norm=norm, causal=causal)
                                     for i in range(len(config.channels)))
        c_lat = config.latent_channels
        self.bottleneck = nn.Sequential(*(
            _ConvBlock(chans[-1] if i == 0 else c_lat, c_lat, k, dilation=(1, 2 ** i), norm=norm, causal=causal)
            for i in range(config.bottleneck_layers)))
        # Decoder level i takes [upper decoder output, encoder level i output] and restores level i-1's F.
        ups = []
        for i in reversed(range(len(config.channels))):
            c_in = (c_lat if i == len(config.channels) - 1 else chans[i + 1]) + chans[i + 1]
            ups.append(_UpBlock(c_in, chans[i] if i > 0 else chans[1], k, norm=norm, causal=causal))
        self.decoder = nn.ModuleList(ups)
        self.head = nn.Conv2d(chans[1], 1, 1)

    def latent_shape(self, frames: int = 1) -> tuple[int, int, int]:
        """(C, F', T) of the latent for an input of ``frames`` STFT frames."""
        f = self.config.freq_bins
        for _ in self.config.channels:
            f = (f - 1) // 2 + 1  # conv with pad k//2, stride 2 in frequency
        return self.config.latent_channels, f, frames

    def _features(self, noisy: Tensor) -> tuple[Tensor, Tensor]:
        if noisy.dim() != 2:
            raise ValueError(f"noisy: expected a (batch, samples) waveform, got shape {tuple(noisy.shape)}")
        if not noisy.is_floating_point():
            raise ValueError(f"noisy: expected a floating-point waveform, got dtype {noisy.dtype}")
        spec = self.stft(noisy)  # (B, F, T) complex
        return spec, compress(spec.abs()).unsqueeze(1)  # (B, 1, F, T)

    def _encode(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for block in self.encoder:
            x = block(x)
            skips.append(x)
        return self.bottleneck(x), skips

    def latent(self, noisy: Tensor) -> Tensor:
        """Bottleneck output (B, C, F', T) of ``noisy`` (B, n); the decoder is not run."""
        return self._encode(self._features(noisy)[1])[0]

    def mask_and_latent(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """The network between the STFT and the iSTFT: ``features`` (B, 1, F, T) compressed noisy
        magnitude -> ``(mask (B, F, T) in [mask_floor, 1], latent (B, C, F', T))``."""
        lat, skips = self._encode(features)
        y = lat
        sizes = [features.shape[-2:]] + [s.shape[-2:] for s in skips[:-1]]
        for up, skip, size in zip(self.decoder, reversed(skips), reversed(sizes)):
            y = up(torch.cat([y, skip], 1), size)
        mask = torch.sigmoid(self.head(y)).squeeze(1)
        if self.config.mask_floor:
            mask = self.config.mask_floor + (1.0 - self.config.mask_floor) * mask
        return mask, lat

    def enhance_with_latent(self, noisy: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Returns ``(enhanced (B, n), latent (B, C, F', T), enhanced_spec (B, F, T) complex)``."""
        spec, x = self._features(noisy)
        mask, lat = self.mask_and_latent(x)
        enhanced_spec = mask * spec  # masks the magnitude, keeps the noisy phase
        return self.stft.inverse(enhanced_spec, noisy.shape[-1]), lat, enhanced_spec

    def forward(self, noisy: Tensor) -> Tensor:
        return self.enhance_with_latent(noisy)[0]


def build_model(config: UNetConfig | dict | str) -> UNetDenoiser:
    """A model from a :class:`UNetConfig`, its dict form (as stored in checkpoints) or a preset name."""
    if isinstance(config, str):
        config = preset(config)
    elif isinstance(config, dict):
        config = UNetConfig(**config)
    return UNetDenoiser(config)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def count_macs(model: nn.Module, seconds: float = 1.0) -> int:
    """Multiply-accumulates of one forward pass over ``seconds`` of 16 kHz audio (batch 1).

    Counted with forward hooks on every Conv2d / ConvTranspose2d / Linear, from the shapes they
    actually see: a conv costs (output positions) x (C_in / groups) x kh x kw per output channel,
    a transposed conv the same per INPUT position. Everything else (STFT, BatchNorm, activations,
    the mask product) is elementwise or FFT work and is not counted.
    """
    total = 0

    def hook(mod, inputs, output):
        nonlocal total
        if isinstance(mod, nn.ConvTranspose2d):
            x = inputs[0]
            total += x[0].numel() * (mod.out_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Conv2d):
            total += output[0].numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
        elif isinstance(mod, nn.Linear):
            total += output[0].numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear))]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, int(round(seconds * SAMPLE_RATE)), device=next(model.parameters()).device))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return total
