"""Sample-rate conversion for waveforms ``[..., T]`` (torch in, torch out).

Two backends with the same output length ``ceil(T * target / orig)`` (torchaudio's, as the official code):
- ``"soxr"``: libsoxr (HQ) on the CPU; best quality, not differentiable.
- ``"torch"``: Hann-windowed sinc (the torchaudio ``sinc_interp_hann`` kernel, width 6, rolloff 0.99) as a
  strided conv1d; runs on any device and is differentiable.
``"auto"`` picks soxr for CPU tensors that do not require grad, torch otherwise.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F

__all__ = ["resample", "resampled_length", "resample_lengths"]


def resampled_length(num_samples: int, orig_sr: int, target_sr: int) -> int:
    """Output length of :func:`resample`: ``ceil(T * target / orig)`` in exact integer arithmetic, as
    torchaudio's ``resample`` (what the official code calls) returns."""
    return -(-int(num_samples) * int(target_sr) // int(orig_sr))


def resample_lengths(lengths: torch.Tensor, orig_sr: int, target_sr: int) -> torch.Tensor:
    """Valid lengths of a padded batch after :func:`resample` (ceil, as `resampled_length`)."""
    return -torch.div(-lengths.long() * int(target_sr), int(orig_sr), rounding_mode="floor")


@lru_cache(maxsize=32)
def _sinc_kernel(orig: int, new: int, width_zeros: int = 6, rolloff: float = 0.99) -> tuple[torch.Tensor, int]:
    base = min(orig, new) * rolloff
    width = math.ceil(width_zeros * orig / base)
    idx = torch.arange(-width, width + orig, dtype=torch.float64)[None, None] / orig
    t = (torch.arange(0, -new, -1, dtype=torch.float64)[:, None, None] / new + idx) * base
    t = t.clamp(-width_zeros, width_zeros)
    window = torch.cos(t * math.pi / width_zeros / 2) ** 2
    t = t * math.pi
    kernel = torch.where(t == 0, torch.ones_like(t), torch.sin(t) / t) * window * (base / orig)
    return kernel.float(), width  # [new, 1, 2*width + orig]


def _resample_torch(x: torch.Tensor, orig: int, new: int, out_len: int) -> torch.Tensor:
    g = math.gcd(orig, new)
    orig, new = orig // g, new // g
    kernel, width = _sinc_kernel(orig, new)
    flat = x.reshape(-1, 1, x.shape[-1])
    y = F.conv1d(F.pad(flat, (width, width + orig)), kernel.to(x.device, x.dtype), stride=orig)
    y = y.transpose(1, 2).reshape(flat.shape[0], -1)
    y = y[:, :out_len] if y.shape[-1] >= out_len else F.pad(y, (0, out_len - y.shape[-1]))
    return y.reshape(*x.shape[:-1], out_len)


def _resample_soxr(x: torch.Tensor, orig: int, new: int, out_len: int) -> torch.Tensor:
    import soxr

    flat = x.detach().reshape(-1, x.shape[-1]).float().numpy().T  # soxr wants [frames, channels]
    y = torch.from_numpy(soxr.resample(flat.copy(), orig, new, quality="HQ").T.copy())
    y = y[:, :out_len] if y.shape[-1] >= out_len else F.pad(y, (0, out_len - y.shape[-1]))
    return y.reshape(*x.shape[:-1], out_len).to(x.dtype)


def resample(wav: torch.Tensor, orig_sr: int, target_sr: int, *, backend: str = "auto") -> torch.Tensor:
    """Resample along the last axis. ``wav`` is ``[..., T]`` float; returns ``[..., ceil(T*target/orig)]``."""
    if orig_sr <= 0 or target_sr <= 0 or int(orig_sr) != orig_sr or int(target_sr) != target_sr:
        raise ValueError(f"sample rates must be positive integers, got {orig_sr} -> {target_sr}")
    if not wav.is_floating_point():
        raise TypeError(f"resample expects a floating-point waveform, got {wav.dtype}")
    orig_sr, target_sr = int(orig_sr), int(target_sr)
    if orig_sr == target_sr:
        return wav
    if backend == "auto":
        backend = "soxr" if wav.device.type == "cpu" and not wav.requires_grad else "torch"
    out_len = resampled_length(wav.shape[-1], orig_sr, target_sr)
    if backend == "soxr":
        if wav.device.type != "cpu":
            raise ValueError("the soxr backend runs on CPU tensors only; use backend='torch'")
        return _resample_soxr(wav, orig_sr, target_sr, out_len)
    if backend == "torch":
        return _resample_torch(wav, orig_sr, target_sr, out_len)
    raise ValueError(f"unknown backend {backend!r} (auto, soxr, torch)")
