"""The 24 kHz / 50 Hz log-mel of the FlexiCodec-TTS NAR and its Vocos vocoder (tts.md §2.2).

Official front end (`flexicodec/nar_tts/melspec.py` + `extract_normalized_mel_spec_50hz`):
reflect-pad (n_fft - hop) / 2 = 720 each side, STFT n_fft = win = 1920 (periodic Hann), hop 480,
``center=False``, magnitude ``sqrt(re² + im² + 1e-9)``, 128 Slaney mel bins 0-12 kHz,
``log(clamp(mel, 1e-5))``, normalised as ``(logmel + 4.92) / sqrt(8.14)``. A clip of N samples at
24 kHz has N // 480 frames. Layout: ``[B, 128, T]`` (Vocos input); the Voicebox uses ``[B, T, 128]``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexitrain.audio.mel import melscale_fbanks
from flexitrain.audio.resample import resample

SAMPLE_RATE = 24000
N_FFT = 1920
HOP_LENGTH = 480
N_MELS = 128
F_MAX = 12000.0
MEL_MEAN = -4.92  # official "MEL_MIN"
MEL_VAR = 8.14
FRAME_RATE = SAMPLE_RATE / HOP_LENGTH  # 50 Hz


def mel_frames(num_samples: Tensor | int, sample_rate: int = SAMPLE_RATE) -> Tensor | int:
    """Valid 50 Hz frames of a clip of ``num_samples`` at ``sample_rate`` (true units: the official
    training code divided 16 kHz lengths by 24000, masking only the first 2/3 of each clip)."""
    if isinstance(num_samples, Tensor):
        return torch.div(num_samples.long() * SAMPLE_RATE, sample_rate * HOP_LENGTH, rounding_mode="floor")
    return int(num_samples) * SAMPLE_RATE // (sample_rate * HOP_LENGTH)


def normalize_mel(logmel: Tensor) -> Tensor:
    return (logmel - MEL_MEAN) / math.sqrt(MEL_VAR)


def denormalize_mel(mel: Tensor) -> Tensor:
    return mel * math.sqrt(MEL_VAR) + MEL_MEAN


class Mel24k(nn.Module):
    """``wav [B, N] | [B, 1, N]`` at 24 kHz → normalised (default) or raw log-mel ``[B, 128, N // 480]``."""

    def __init__(self, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT, hop_length: int = HOP_LENGTH,
                 n_mels: int = N_MELS, f_min: float = 0.0, f_max: float = F_MAX, normalized: bool = True):
        super().__init__()
        if (n_fft - hop_length) % 2:
            raise ValueError("n_fft - hop_length must be even (symmetric reflect padding)")
        self.sample_rate, self.n_fft, self.hop_length, self.n_mels = sample_rate, n_fft, hop_length, n_mels
        self.normalized = normalized
        fb = melscale_fbanks(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate, norm="slaney", mel_scale="slaney")
        # Derived from the arguments: not checkpointed (Vocos / Voicebox state dicts stay official).
        self.register_buffer("mel_basis", fb.t().contiguous(), persistent=False)  # [n_mels, F]
        self.register_buffer("hann_window", torch.hann_window(n_fft), persistent=False)

    def log_mel(self, wav: Tensor) -> Tensor:
        if wav.dim() == 3:
            if wav.shape[1] != 1:
                raise ValueError(f"expected mono audio [B, 1, N], got {tuple(wav.shape)}")
            wav = wav[:, 0]
        if wav.dim() != 2:
            raise ValueError(f"expected audio [B, N] or [B, 1, N], got {tuple(wav.shape)}")
        pad = (self.n_fft - self.hop_length) // 2
        if wav.shape[-1] <= pad or wav.shape[-1] < self.hop_length:
            raise ValueError(f"audio of {wav.shape[-1]} samples is too short for a {self.hop_length}-sample hop")
        # fp32 island: torch.stft takes no bf16 input, and the magnitude's squares, its epsilon (1e-9) and the log
        # of the mel energies span a range that bf16's 8 significand bits would coarsen into the mel targets and
        # conditions. Element-wise / FFT work without weights: little to gain from bf16.
        with torch.autocast(wav.device.type, enabled=False):
            x = F.pad(wav.float().unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
            spec = torch.stft(x, self.n_fft, hop_length=self.hop_length, win_length=self.n_fft,
                              window=self.hann_window.float(), center=False, return_complex=True)
            spec = torch.view_as_real(spec)
            mag = torch.sqrt(spec.pow(2).sum(-1) + 1e-9)
            return torch.matmul(self.mel_basis.float(), mag).clamp(min=1e-5).log()

    def forward(self, wav: Tensor) -> Tensor:
        logmel = self.log_mel(wav)
        return normalize_mel(logmel) if self.normalized else logmel


_CACHE: dict[tuple, Mel24k] = {}


def mel24k(wav: Tensor, sample_rate: int = SAMPLE_RATE, lengths: Tensor | None = None,
           resample_backend: str = "torch") -> tuple[Tensor, Tensor | None]:
    """Normalised 50 Hz mel ``[B, 128, T]`` of ``wav`` at any rate (resampled to 24 kHz first, with the
    torchaudio-equivalent sinc kernel by default) and, given ``lengths`` in input samples, the valid
    frames per item ``[B]``. Padding is analysed as zeros (as the official batched code does)."""
    if sample_rate != SAMPLE_RATE:
        wav = resample(wav, sample_rate, SAMPLE_RATE, backend=resample_backend)
    key = (str(wav.device),)
    if key not in _CACHE:
        _CACHE[key] = Mel24k().to(wav.device)
    mel = _CACHE[key](wav)
    if lengths is None:
        return mel, None
    return mel, mel_frames(torch.as_tensor(lengths, device=mel.device), sample_rate).clamp(max=mel.shape[-1])
