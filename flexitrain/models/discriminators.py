"""DAC-style GAN discriminators used by the FlexiCodec recipe (codec.md §3.3).

Every discriminator maps audio ``[B, 1, T]`` to a list of feature maps whose last entry is the
logit map. `CodecDiscriminator` returns one such list per sub-discriminator.
Module names follow the official ``Discriminator`` (``discriminators.{i}.convs.{j}.0``,
``band_convs``, ``conv_post``) so an official checkpoint loads after
`remap_official_weight_norm_keys`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm

# Official MPD widths; smaller ones make a CPU-sized discriminator for demos and tests.
PERIOD_CHANNELS: tuple[int, ...] = (32, 128, 512, 1024)
DEFAULT_BANDS: tuple[tuple[float, float], ...] = (
    (0.0, 0.1), (0.1, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 1.0)
)


def wn_conv2d(*args, act: bool = True, **kwargs) -> nn.Module:
    conv = weight_norm(nn.Conv2d(*args, **kwargs))
    return nn.Sequential(conv, nn.LeakyReLU(0.1)) if act else conv


def _nhwc(x: Tensor) -> Tensor:
    """Channels-last on CUDA: cuDNN's tensor-core convolutions run NHWC natively (NCHW costs a transpose
    kernel per conv and per direction). A no-op on CPU, whose numerics stay those of the official layout."""
    return x.contiguous(memory_format=torch.channels_last) if x.is_cuda else x


def _check_audio(x: Tensor) -> None:
    if x.dim() != 3 or x.shape[1] != 1:
        raise ValueError(f"discriminator input must be [B, 1, T], got shape {tuple(x.shape)}")


class PeriodDiscriminator(nn.Module):
    """MPD branch: folds the waveform into ``[B, 1, T/p, p]`` and convolves along time."""

    def __init__(self, period: int, channels: Sequence[int] = PERIOD_CHANNELS):
        super().__init__()
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        self.period = period
        chans = [1, *channels]
        self.convs = nn.ModuleList(
            [wn_conv2d(c_in, c_out, (5, 1), (3, 1), padding=(2, 0)) for c_in, c_out in zip(chans, chans[1:])]
            + [wn_conv2d(chans[-1], chans[-1], (5, 1), 1, padding=(2, 0))]
        )
        self.conv_post = wn_conv2d(chans[-1], 1, (3, 1), padding=(1, 0), act=False)

    def forward(self, x: Tensor) -> list[Tensor]:
        _check_audio(x)
        # Official code always pads (a full period when T is already a multiple); kept for parity.
        x = F.pad(x, (0, self.period - x.shape[-1] % self.period), mode="reflect")
        x = x.view(x.shape[0], 1, -1, self.period)
        fmaps = []
        for layer in self.convs:
            x = layer(_nhwc(x))
            fmaps.append(x)
        fmaps.append(self.conv_post(_nhwc(x)))
        return fmaps


class BandSTFTDiscriminator(nn.Module):
    """MRD branch: complex STFT (real/imag channels) split into frequency bands, one conv stack each."""

    def __init__(
        self,
        window_length: int,
        hop_factor: float = 0.25,
        bands: Sequence[tuple[float, float]] = DEFAULT_BANDS,
        channels: int = 64,
    ):
        super().__init__()
        self.window_length = window_length
        self.hop_length = int(window_length * hop_factor)
        if self.hop_length != window_length // 4:
            # audiotools' match_stride padding (reproduced below) is only defined for hop = w / 4.
            raise ValueError("BandSTFTDiscriminator needs hop_factor = 0.25")
        n_bins = window_length // 2 + 1
        self.bands = [(int(lo * n_bins), int(hi * n_bins)) for lo, hi in bands]
        ch = channels

        def stack() -> nn.ModuleList:
            return nn.ModuleList(
                [wn_conv2d(2, ch, (3, 9), (1, 1), padding=(1, 4))]
                + [wn_conv2d(ch, ch, (3, 9), (1, 2), padding=(1, 4)) for _ in range(3)]
                + [wn_conv2d(ch, ch, (3, 3), (1, 1), padding=(1, 1))]
            )

        self.band_convs = nn.ModuleList([stack() for _ in self.bands])
        self.conv_post = wn_conv2d(ch, 1, (3, 3), (1, 1), padding=(1, 1), act=False)
        self.register_buffer("window", torch.hann_window(window_length, periodic=True), persistent=False)

    def spectrogram(self, x: Tensor) -> Tensor:
        """``[B, 1, T] -> [B, 2, ceil(T / hop), n_bins]`` as audiotools' ``stft(match_stride=True)``."""
        w, hop = self.window_length, self.hop_length
        length = x.shape[-1]
        right_pad = -(-length // hop) * hop - length
        pad = (w - hop) // 2
        x = F.pad(x.float(), (pad, pad + right_pad), mode="reflect")[:, 0]  # FFT in fp32 (no bf16 FFT)
        with torch.autocast(x.device.type, enabled=False):
            spec = torch.stft(x, w, hop, window=self.window.float(), center=True, return_complex=True)
        spec = spec[..., 2:-2]  # frames added by the padding: now frames * hop == padded length
        return torch.view_as_real(spec).permute(0, 3, 2, 1)  # [B, F, T, 2] -> [B, 2, T, F]

    def forward(self, x: Tensor) -> list[Tensor]:
        _check_audio(x)
        spec = self.spectrogram(x)
        fmaps, outs = [], []
        for (lo, hi), convs in zip(self.bands, self.band_convs):
            band = spec[..., lo:hi]
            for layer in convs:
                band = layer(_nhwc(band))
                fmaps.append(band)
            outs.append(band)
        fmaps.append(self.conv_post(_nhwc(torch.cat(outs, dim=-1))))
        return fmaps


class CodecDiscriminator(nn.Module):
    """MPD (``periods``) + multi-band multi-resolution STFT discriminator (``fft_sizes``).

    ``forward(x [B, 1, T]) -> list[list[Tensor]]``: per sub-discriminator (periods first, then
    fft sizes) its feature maps; ``[-1]`` is the logit map. Inputs are DC-removed and peak-normalised
    to 0.8 first (``normalize_input``), as the official one, so the D ignores gain.
    """

    def __init__(
        self,
        periods: Sequence[int] = (2, 3, 5, 7, 11),
        fft_sizes: Sequence[int] = (2048, 1024, 512),
        bands: Sequence[tuple[float, float]] = DEFAULT_BANDS,
        channels: int = 64,
        normalize_input: bool = True,
        period_channels: Sequence[int] = PERIOD_CHANNELS,
    ):
        super().__init__()
        if not periods and not fft_sizes:
            raise ValueError("CodecDiscriminator needs at least one period or fft size")
        self.normalize_input = normalize_input
        self.discriminators = nn.ModuleList(
            [PeriodDiscriminator(p, period_channels) for p in periods]
            + [BandSTFTDiscriminator(w, bands=bands, channels=channels) for w in fft_sizes]
        )

    @staticmethod
    def preprocess(x: Tensor) -> Tensor:
        x = x - x.mean(dim=-1, keepdim=True)
        return 0.8 * x / (x.abs().amax(dim=-1, keepdim=True) + 1e-9)

    def forward(self, x: Tensor) -> list[list[Tensor]]:
        _check_audio(x)
        if self.normalize_input:
            x = self.preprocess(x)
        return [d(x) for d in self.discriminators]


class MultiPeriodDiscriminator(CodecDiscriminator):
    def __init__(self, periods: Sequence[int] = (2, 3, 5, 7, 11), normalize_input: bool = True):
        super().__init__(periods=periods, fft_sizes=(), normalize_input=normalize_input)


class MultiResolutionSTFTDiscriminator(CodecDiscriminator):
    def __init__(
        self,
        fft_sizes: Sequence[int] = (2048, 1024, 512),
        bands: Sequence[tuple[float, float]] = DEFAULT_BANDS,
        channels: int = 64,
        normalize_input: bool = True,
    ):
        super().__init__(periods=(), fft_sizes=fft_sizes, bands=bands, channels=channels,
                         normalize_input=normalize_input)


_OLD_WN = re.compile(r"^(.*)\.weight_([gv])$")


def remap_official_weight_norm_keys(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Old ``weight_norm`` keys (``X.weight_g``/``X.weight_v``) -> parametrization keys."""
    out = {}
    for key, value in state_dict.items():
        m = _OLD_WN.match(key)
        if m:
            idx = "0" if m.group(2) == "g" else "1"
            key = f"{m.group(1)}.parametrizations.weight.original{idx}"
        out[key] = value
    return out
