"""SenseVoice front end: Kaldi fbank -> LFR (low frame rate stacking) -> global CMVN.

Batched re-statement of FunASR's ``WavFrontend`` (used by the official FlexiCodec ``FBankGen``),
which processes one item at a time and stacks LFR frames in a Python loop. Here every step
works on a padded batch with per-item lengths, so batched output equals single-item output.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from flexitrain.audio.kaldi_fbank import kaldi_fbank

__all__ = ["SenseVoiceFrontend", "load_am_mvn", "apply_lfr"]


def load_am_mvn(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``(add_shift, rescale)`` from a Kaldi nnet ``am.mvn`` file (as FunASR ``load_cmvn`` does:
    the line after ``<AddShift>`` / ``<Rescale>`` starts with ``<LearnRateCoef>``, values are tokens [3:-1])."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CMVN file not found: {path}")
    lines = path.read_text(encoding="utf-8").splitlines()
    found: dict[str, list[float]] = {}
    for i, line in enumerate(lines[:-1]):
        tag = line.split()[:1]
        if tag and tag[0] in ("<AddShift>", "<Rescale>"):
            nxt = lines[i + 1].split()
            if nxt and nxt[0] == "<LearnRateCoef>":
                found[tag[0]] = [float(v) for v in nxt[3:-1]]
    missing = [t for t in ("<AddShift>", "<Rescale>") if t not in found]
    if missing:
        raise ValueError(f"{path}: no {' / '.join(missing)} block followed by a <LearnRateCoef> line")
    shift, scale = (torch.tensor(found[t], dtype=torch.float32) for t in ("<AddShift>", "<Rescale>"))
    if shift.numel() != scale.numel() or shift.numel() == 0:
        raise ValueError(f"{path}: <AddShift> has {shift.numel()} values, <Rescale> has {scale.numel()}")
    return shift, scale


def apply_lfr(feats: torch.Tensor, lengths: torch.Tensor, lfr_m: int = 7, lfr_n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack ``lfr_m`` frames every ``lfr_n`` frames, per item.

    Output row j of item b is ``concat(feats[b, clamp(n*j - (m-1)//2 + k, 0, F_b - 1)] for k < m)``,
    i.e. FunASR ``apply_lfr``: left-pad with copies of frame 0, right-pad with the last valid frame.
    Args: feats ``[B, F, D]``, lengths ``[B]`` valid frames. Returns ``([B, ceil(F / n), m*D], [B])`` with
    valid lengths ``T_b = ceil(F_b / n)``; rows at or beyond ``T_b`` repeat the last frame (callers mask them).
    """
    batch, _, dim = feats.shape
    out_lengths = torch.div(lengths + lfr_n - 1, lfr_n, rounding_mode="floor")
    t_max = max(-(-feats.shape[1] // lfr_n), 1)  # from the padded width (no host sync)
    dev = feats.device
    idx = (torch.arange(t_max, device=dev)[:, None] * lfr_n - (lfr_m - 1) // 2 + torch.arange(lfr_m, device=dev)[None, :])
    last = (lengths - 1).clamp(min=0).to(dev)
    idx = torch.minimum(idx.clamp(min=0)[None], last[:, None, None])  # [B, T, m]
    rows = (idx + torch.arange(batch, device=dev)[:, None, None] * feats.shape[1]).reshape(-1)
    stacked = feats.reshape(-1, dim).index_select(0, rows).reshape(batch, t_max, lfr_m * dim)  # row copies
    return stacked, out_lengths


def _zero_past(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Zero rows ``t >= lengths[b]`` of ``x [B, T, D]`` in place."""
    return x.masked_fill_((torch.arange(x.shape[1], device=x.device)[None, :] >= lengths[:, None])[..., None], 0.0)


class SenseVoiceFrontend(nn.Module):
    """Waveform ``[B, N]`` at ``fs`` in [-1, 1] -> features ``[B, T_lfr, n_mels*lfr_m]`` with lengths.

    ``dither`` defaults to 0 (deterministic); FunASR's default is 1.0, set it to reproduce that noise.
    CMVN buffers are not persistent: they come from ``am.mvn``, not from a checkpoint.
    """

    def __init__(self, cmvn_shift: torch.Tensor | None = None, cmvn_scale: torch.Tensor | None = None, *,
                 fs: int = 16000, window: str = "hamming", n_mels: int = 80, frame_length: float = 25,
                 frame_shift: float = 10, lfr_m: int = 7, lfr_n: int = 6, dither: float = 0.0,
                 upscale_samples: bool = True):
        super().__init__()
        self.fs, self.window, self.n_mels = int(fs), window, int(n_mels)
        self.frame_length, self.frame_shift = float(frame_length), float(frame_shift)
        self.lfr_m, self.lfr_n, self.dither = int(lfr_m), int(lfr_n), float(dither)
        self.upscale_samples = upscale_samples
        self.output_size = self.n_mels * self.lfr_m
        for name, v in (("cmvn_shift", cmvn_shift), ("cmvn_scale", cmvn_scale)):
            if v is not None and v.numel() != self.output_size:
                raise ValueError(f"{name} has {v.numel()} values, expected n_mels*lfr_m = {self.output_size}")
        self.register_buffer("cmvn_shift", None if cmvn_shift is None else cmvn_shift.float().reshape(-1), persistent=False)
        self.register_buffer("cmvn_scale", None if cmvn_scale is None else cmvn_scale.float().reshape(-1), persistent=False)

    @classmethod
    def from_mvn(cls, am_mvn: str | Path, **kwargs) -> "SenseVoiceFrontend":
        return cls(*load_am_mvn(am_mvn), **kwargs)

    def fbank(self, wav: torch.Tensor, lengths: torch.Tensor | None = None,
              lengths_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``[B, N]`` in [-1, 1] -> Kaldi fbank ``[B, F, n_mels]`` (input scaled to int16 range first).
        ``lengths_checked``: see `kaldi_fbank` (no host read of the lengths)."""
        return kaldi_fbank(wav, lengths, sample_rate=self.fs, num_mel_bins=self.n_mels, frame_length_ms=self.frame_length,
                           frame_shift_ms=self.frame_shift, window_type=self.window, dither=self.dither,
                           scale=float(1 << 15) if self.upscale_samples else 1.0, lengths_checked=lengths_checked)

    @property
    def frame_samples(self) -> int:
        """Samples in one fbank frame: the shortest item the front end takes without its short-clip path."""
        return int(self.fs * self.frame_length * 0.001)

    def lfr_cmvn(self, fbank: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """LFR then CMVN (``(x + shift) * scale``, two roundings as FunASR); rows past each length are zero."""
        x, out_lengths = apply_lfr(fbank, lengths.to(fbank.device), self.lfr_m, self.lfr_n)
        if self.cmvn_shift is not None:
            x.add_(self.cmvn_shift).mul_(self.cmvn_scale)
        return _zero_past(x, out_lengths), out_lengths

    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None,
                lengths_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """wav ``[B, N]`` or ``[B, 1, N]`` float in [-1, 1]; lengths ``[B]`` (default full).
        ``lengths_checked``: every length is known to lie in [`frame_samples`, N] (see `kaldi_fbank`)."""
        if wav.dim() == 3:
            if wav.shape[1] != 1:
                raise ValueError(f"expected mono wav [B, 1, N], got {tuple(wav.shape)}")
            wav = wav[:, 0]
        if wav.dim() != 2:
            raise ValueError(f"expected wav [B, N] or [B, 1, N], got {tuple(wav.shape)}")
        if lengths is None:
            lengths = torch.full((wav.shape[0],), wav.shape[1], dtype=torch.long, device=wav.device)
        fb, fb_lengths = self.fbank(wav.float(), lengths, lengths_checked)
        return self.lfr_cmvn(fb, fb_lengths)

    @staticmethod
    def num_output_frames(num_samples: int, fs: int = 16000, frame_shift: float = 10, frame_length: float = 25,
                          lfr_n: int = 6) -> int:
        shift, size = int(fs * frame_shift * 0.001), int(fs * frame_length * 0.001)
        frames = 1 + (num_samples - size) // shift if num_samples >= size else 1
        return math.ceil(frames / lfr_n)
