"""DAC encoder / decoder (descript-audio-codec 1.0.0 layout) with the RVQ in between.

Module nesting mirrors the official code so state-dict keys match
(``dac.encoder.block.N...``, ``dac.quantizer.quantizers.i...``, ``dac.decoder.model.N...``).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .layers import Snake1d, WNConv1d, WNConvTranspose1d, rows_layout, snake_channels_last
from .rvq import ResidualVectorQuantize


class ResidualUnit(nn.Module):
    def __init__(self, dim: int, dilation: int = 1):
        super().__init__()
        pad = ((7 - 1) * dilation) // 2
        self.block = nn.Sequential(
            Snake1d(dim),
            WNConv1d(dim, dim, kernel_size=7, dilation=dilation, padding=pad),
            Snake1d(dim),
            WNConv1d(dim, dim, kernel_size=1),
        )

    def forward(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        """``inplace`` (inference, channels-last only): accumulate the result into ``x``."""
        if not torch.is_grad_enabled() and x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
            return self._forward_channels_last(x, inplace)
        y = self.block(x)
        pad = (x.shape[-1] - y.shape[-1]) // 2  # 0 with "same" padding; kept for odd configs
        if pad > 0:
            x = x[..., pad:-pad]
        return x + y

    def _residual_1x1(self, x: torch.Tensor, y: torch.Tensor, inplace: bool) -> torch.Tensor:
        conv = self.block[3]
        C = x.shape[1]
        B, _, H, T = x.shape
        rows = y.permute(0, 2, 3, 1).reshape(-1, C)
        w = conv.weight[:, :, 0].t()
        if inplace and rows_layout(x) and rows.dtype == x.dtype == w.dtype:
            out = x.permute(0, 2, 3, 1).view(-1, C)
            out.addmm_(rows, w)
        else:
            out = torch.addmm(x.permute(0, 2, 3, 1).reshape(-1, C), rows, w)
        if conv.bias is not None:
            out.add_(conv.bias)
        return out.view(B, H, T, C).permute(0, 3, 1, 2)

    def _forward_channels_last(self, x: torch.Tensor, inplace: bool = False) -> torch.Tensor:
        # Inference in [B, C, 1, T] channels-last memory (= [B*T, C] rows): the 1x1 conv and the
        # residual add become one GEMM accumulating into x (or a copy of it). On CPU the Snakes run
        # blocked (the second in place on the conv output), so only the first Snake and the k7 conv
        # allocate activation-sized buffers.
        snake1, conv7, snake2, conv = self.block
        if rows_layout(x):
            y = conv7(snake_channels_last(x, snake1.alpha))
            if rows_layout(y):
                y = snake_channels_last(y, snake2.alpha, inplace=True)
            else:
                y = snake2(y)
        else:
            y = snake2(conv7(snake1(x)))
        return self._residual_1x1(x, y, inplace)


def run_units(units, x: torch.Tensor, lengths: torch.Tensor | None, inplace: bool) -> torch.Tensor:
    """Residual units in sequence (``inplace``: inference on an owned ``x``, overwritten)."""
    for unit in units:
        x = unit(time_mask(x, lengths, inplace), inplace=inplace)
    return x


def time_mask(x: torch.Tensor, lengths: torch.Tensor | None, inplace: bool = False) -> torch.Tensor:
    """Zero ``x`` ``[B, C, T]`` past each item's length, so the next conv sees what it would
    see for the item alone (zero padding). Snake(0) = 0, so masking before a Snake is enough."""
    if lengths is None:
        return x
    keep = torch.arange(x.shape[-1], device=x.device) < lengths.unsqueeze(1)
    keep = keep.view(x.shape[0], *([1] * (x.dim() - 2)), x.shape[-1]).to(x.dtype)
    return x.mul_(keep) if inplace else x * keep


def snake_owned(snake: Snake1d, x: torch.Tensor, inplace: bool) -> torch.Tensor:
    """Snake that may overwrite ``x`` (inference on an intermediate nobody else holds)."""
    if inplace and rows_layout(x):
        return snake_channels_last(x, snake.alpha, inplace=True)
    return snake(x)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, T]`` → ``[B, C, 1, T]`` stored (B, T, C): the layout oneDNN convs run fastest in."""
    return x.unsqueeze(2).contiguous(memory_format=torch.channels_last)


def from_channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.squeeze(2).contiguous()


def conv_out_length(lengths: torch.Tensor, conv: nn.Module) -> torch.Tensor:
    k, s, p = conv.kernel_size, conv.stride, conv.padding
    if isinstance(conv, WNConvTranspose1d):
        return (lengths - 1) * s - 2 * p + k
    return torch.div(lengths + 2 * p - conv.dilation * (k - 1) - 1, s, rounding_mode="floor") + 1


class EncoderBlock(nn.Module):
    def __init__(self, dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            ResidualUnit(dim // 2, dilation=1),
            ResidualUnit(dim // 2, dilation=3),
            ResidualUnit(dim // 2, dilation=9),
            Snake1d(dim // 2),
            WNConv1d(dim // 2, dim, kernel_size=2 * stride, stride=stride, padding=math.ceil(stride / 2)),
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, inplace: bool = False):
        """``inplace`` (inference): ``x`` is an intermediate the block may overwrite."""
        if lengths is None and not inplace:
            return self.block(x)
        x = run_units(self.block[:3], x, lengths, inplace)
        x = self.block[4](snake_owned(self.block[3], time_mask(x, lengths, inplace), inplace))
        return x if lengths is None else (x, conv_out_length(lengths, self.block[4]))


class Encoder(nn.Module):
    def __init__(self, d_model: int, strides: Sequence[int], d_latent: int):
        super().__init__()
        blocks: list[nn.Module] = [WNConv1d(1, d_model, kernel_size=7, padding=3)]
        for stride in strides:
            d_model *= 2
            blocks.append(EncoderBlock(d_model, stride=stride))
        blocks += [Snake1d(d_model), WNConv1d(d_model, d_latent, kernel_size=3, padding=1)]
        self.block = nn.Sequential(*blocks)
        self.enc_dim = d_model

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None,
                channels_last: bool = False) -> torch.Tensor:
        """``[B, 1, N]`` → ``[B, latent, N / hop]``. ``lengths`` (samples, multiples of the hop)
        masks every conv input past each item's end (batched == one item at a time).
        ``channels_last`` runs the convs in a faster layout (same math, different rounding)."""
        if channels_last:
            x = to_channels_last(x)
        inplace = channels_last and not torch.is_grad_enabled()  # intermediates are updated in place
        if lengths is None and not inplace:
            x = self.block(x)
        else:
            x = self.block[0](time_mask(x, lengths))
            for blk in self.block[1:-2]:
                if lengths is None:
                    x = blk(x, inplace=inplace)
                else:
                    x, lengths = blk(x, lengths, inplace=inplace)
            x = self.block[-1](snake_owned(self.block[-2], time_mask(x, lengths, inplace), inplace))
        return from_channels_last(x) if channels_last else x


class DecoderBlock(nn.Module):
    def __init__(self, input_dim: int, output_dim: int, stride: int):
        super().__init__()
        self.block = nn.Sequential(
            Snake1d(input_dim),
            WNConvTranspose1d(input_dim, output_dim, kernel_size=2 * stride, stride=stride,
                              padding=math.ceil(stride / 2)),
            ResidualUnit(output_dim, dilation=1),
            ResidualUnit(output_dim, dilation=3),
            ResidualUnit(output_dim, dilation=9),
        )

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None, inplace: bool = False):
        """``inplace`` (inference): ``x`` is an intermediate the block may overwrite."""
        if lengths is None and not inplace:
            return self.block(x)
        x = self.block[1](snake_owned(self.block[0], time_mask(x, lengths, inplace), inplace))
        if lengths is not None:
            lengths = conv_out_length(lengths, self.block[1])
        x = run_units(self.block[2:], x, lengths, inplace)
        return x if lengths is None else (x, lengths)


class Decoder(nn.Module):
    def __init__(self, input_channel: int, channels: int, rates: Sequence[int], d_out: int = 1):
        super().__init__()
        layers: list[nn.Module] = [WNConv1d(input_channel, channels, kernel_size=7, padding=3)]
        output_dim = channels
        for i, stride in enumerate(rates):
            input_dim = channels // 2**i
            output_dim = channels // 2 ** (i + 1)
            layers.append(DecoderBlock(input_dim, output_dim, stride))
        layers += [Snake1d(output_dim), WNConv1d(output_dim, d_out, kernel_size=7, padding=3), nn.Tanh()]
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None,
                channels_last: bool = False) -> torch.Tensor:
        """``[B, latent, T]`` → ``[B, 1, hop·T - δ]``; ``lengths`` (frames) masks padded frames."""
        if channels_last:
            x = to_channels_last(x)
        inplace = channels_last and not torch.is_grad_enabled()  # intermediates are updated in place
        if lengths is None and not inplace:
            x = self.model(x)
        else:
            x = self.model[0](time_mask(x, lengths))
            for blk in self.model[1:-3]:
                if lengths is None:
                    x = blk(x, inplace=inplace)
                else:
                    x, lengths = blk(x, lengths, inplace=inplace)
            x = self.model[-1](self.model[-2](snake_owned(self.model[-3], time_mask(x, lengths, inplace), inplace)))
        return from_channels_last(x) if channels_last else x


class DAC(nn.Module):
    """Container holding ``encoder``, ``quantizer`` and ``decoder`` (the official ``dac`` submodule)."""

    def __init__(self, encoder_dim: int, encoder_rates: Sequence[int], latent_dim: int | None,
                 decoder_dim: int, decoder_rates: Sequence[int], n_codebooks: int, codebook_size: int,
                 codebook_dim, quantizer_dropout: float, sample_rate: int):
        super().__init__()
        if latent_dim is None:
            latent_dim = encoder_dim * (2 ** len(encoder_rates))
        self.latent_dim = latent_dim
        self.sample_rate = sample_rate
        self.hop_length = int(math.prod(encoder_rates))
        self.encoder = Encoder(encoder_dim, encoder_rates, latent_dim)
        self.quantizer = ResidualVectorQuantize(latent_dim, n_codebooks, codebook_size, codebook_dim,
                                                quantizer_dropout)
        self.decoder = Decoder(latent_dim, decoder_dim, decoder_rates)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Official init: trunc_normal on Conv1d.weight (a derived tensor under weight norm, so
        # a no-op) and zero bias on every (non-transposed) Conv1d in the DAC.
        for m in self.modules():
            if isinstance(m, WNConv1d) and m.bias is not None and not m.bias.is_meta:
                with torch.no_grad():
                    m.bias.zero_()

    def pad_to_hop(self, audio: torch.Tensor) -> torch.Tensor:
        """Right-pad ``[B, 1, N]`` audio to a multiple of the hop (official ``preprocess``)."""
        right_pad = -audio.shape[-1] % self.hop_length
        return F.pad(audio, (0, right_pad)) if right_pad else audio
