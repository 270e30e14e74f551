"""Multi-scale mel reconstruction loss (DAC recipe; codec.md §3.2), at the true sample rate.

Official call: ``MelSpectrogramLoss(pow=1, mag_weight=0, log_weight=2, n_mels=[5..320],
window_lengths=[32..2048])`` on 16 kHz audio declared as 24 kHz. Here the filterbanks use
``sample_rate``; ``assume_sample_rate=24000`` reproduces the official frequency warping.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from flexitrain.audio.mel import MelSpectrogram, _check_lengths, frame_mask
from flexitrain.losses.masking import masked_mean

DEFAULT_WINDOW_LENGTHS = (32, 64, 128, 256, 512, 1024, 2048)
DEFAULT_N_MELS = (5, 10, 20, 40, 80, 160, 320)


class MultiScaleMelLoss(nn.Module):
    """``Σ_scales log_weight·L1(log10(clamp(mel)^pow)) + mag_weight·L1(mel)``, masked over padding.

    ``forward(pred, target, lengths=None) -> scalar``; audio ``[B, T]`` or ``[B, 1, T]``;
    ``lengths [B]`` in samples. With lengths, each item is analysed as if it were unpadded and
    only its own frames count, so extra batch padding leaves the loss unchanged. Computed in fp32.
    ``check_lengths=False`` skips the check that the lengths lie in [1, T] (a host read, i.e. a device sync on
    a GPU): for training steps whose lengths were checked on the host where the batch was built.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        window_lengths: Sequence[int] = DEFAULT_WINDOW_LENGTHS,
        n_mels: Sequence[int] = DEFAULT_N_MELS,
        hop_factor: float = 0.25,
        clamp_eps: float = 1e-5,
        mag_weight: float = 0.0,
        log_weight: float = 2.0,
        pow: float = 1.0,
        f_min: float = 0.0,
        f_max: float | None = None,
        assume_sample_rate: int | None = None,
    ):
        super().__init__()
        if len(window_lengths) != len(n_mels):
            raise ValueError(f"{len(window_lengths)} window lengths but {len(n_mels)} n_mels")
        self.sample_rate = sample_rate
        self.clamp_eps = clamp_eps
        self.mag_weight = mag_weight
        self.log_weight = log_weight
        self.pow = pow
        fb_rate = assume_sample_rate or sample_rate
        self.mels = nn.ModuleList(
            MelSpectrogram(fb_rate, n_fft=w, hop_length=int(w * hop_factor), n_mels=m,
                           f_min=f_min, f_max=f_max, power=1.0)
            for w, m in zip(window_lengths, n_mels)
        )

    def forward(self, pred: Tensor, target: Tensor, lengths: Tensor | None = None,
                check_lengths: bool = True) -> Tensor:
        if pred.shape != target.shape:
            raise ValueError(
                f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match; trim first"
            )
        batch = pred.shape[0]
        # One STFT call for both signals per scale.
        both = torch.cat([pred, target], dim=0).float()
        both_lengths = None
        if lengths is not None:  # checked once here, not once per scale
            lengths = _check_lengths(torch.as_tensor(lengths, device=pred.device), batch, pred.shape[-1], check_lengths)
            both_lengths = lengths.repeat(2)
        with torch.autocast(both.device.type, enabled=False):  # log-mels need fp32 under bf16-mixed
            return self._sum_over_scales(both, both_lengths, batch)

    def _sum_over_scales(self, both: Tensor, both_lengths: Tensor | None, batch: int) -> Tensor:
        loss = both.new_zeros(())
        for mel in self.mels:
            spec = mel(both, both_lengths, check_lengths=False)  # [2B, n_mels, frames]; lengths checked in forward
            mask = None
            if both_lengths is not None:
                mask = frame_mask(both_lengths[:batch], mel.hop_length, spec.shape[-1])
            x, y = spec[:batch], spec[batch:]
            if self.log_weight:
                log_x = x.clamp(min=self.clamp_eps).pow(self.pow).log10()
                log_y = y.clamp(min=self.clamp_eps).pow(self.pow).log10()
                loss = loss + self.log_weight * masked_mean((log_x - log_y).abs(), mask)
            if self.mag_weight:
                loss = loss + self.mag_weight * masked_mean((x - y).abs(), mask)
        return loss
