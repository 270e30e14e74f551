"""Pure-torch mel filterbank and mel spectrogram (torchaudio does not import here).

`melscale_fbanks` follows torchaudio's contract; with ``norm="slaney", mel_scale="slaney"``
it equals ``librosa.filters.mel(...).T``, the filterbank the official DAC/audiotools mel loss uses.

The STFT is length-aware: with ``lengths`` each item is reflect-padded at *its own* end (as if
it were unpadded), so batch padding cannot change the frames of an item; see `frame_lengths`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

_SLANEY_F_SP = 200.0 / 3
_SLANEY_MIN_LOG_HZ = 1000.0
_SLANEY_LOGSTEP = math.log(6.4) / 27.0


def hz_to_mel(freq: float, mel_scale: str = "htk") -> float:
    if mel_scale == "htk":
        return 2595.0 * math.log10(1.0 + freq / 700.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'htk' or 'slaney', got {mel_scale!r}")
    if freq < _SLANEY_MIN_LOG_HZ:
        return freq / _SLANEY_F_SP
    return _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP + math.log(freq / _SLANEY_MIN_LOG_HZ) / _SLANEY_LOGSTEP


def mel_to_hz(mels: Tensor, mel_scale: str = "htk") -> Tensor:
    if mel_scale == "htk":
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    if mel_scale != "slaney":
        raise ValueError(f"mel_scale must be 'htk' or 'slaney', got {mel_scale!r}")
    min_log_mel = _SLANEY_MIN_LOG_HZ / _SLANEY_F_SP
    log_part = _SLANEY_MIN_LOG_HZ * torch.exp(_SLANEY_LOGSTEP * (mels - min_log_mel))
    return torch.where(mels >= min_log_mel, log_part, _SLANEY_F_SP * mels)


def melscale_fbanks(
    n_freqs: int,
    f_min: float,
    f_max: float,
    n_mels: int,
    sample_rate: int,
    norm: str | None = None,
    mel_scale: str = "htk",
) -> Tensor:
    """Triangular mel filterbank of shape ``[n_freqs, n_mels]`` (torchaudio's layout), float64 math."""
    if norm not in (None, "slaney"):
        raise ValueError(f"norm must be None or 'slaney', got {norm!r}")
    if not 0 <= f_min < f_max:
        raise ValueError(f"need 0 <= f_min < f_max, got f_min={f_min}, f_max={f_max}")
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    m_pts = torch.linspace(
        hz_to_mel(f_min, mel_scale), hz_to_mel(f_max, mel_scale), n_mels + 2, dtype=torch.float64
    )
    f_pts = mel_to_hz(m_pts, mel_scale)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)  # [n_freqs, n_mels + 2]
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    fb = torch.clamp(torch.minimum(down, up), min=0.0)
    if norm == "slaney":
        fb = fb * (2.0 / (f_pts[2 : n_mels + 2] - f_pts[:n_mels])).unsqueeze(0)
    return fb.float()


def _as_batch_time(audio: Tensor) -> Tensor:
    if audio.dim() == 3:
        if audio.shape[1] != 1:
            raise ValueError(f"expected mono audio [B, 1, T], got shape {tuple(audio.shape)}")
        return audio[:, 0]
    if audio.dim() != 2:
        raise ValueError(f"expected audio [B, T] or [B, 1, T], got shape {tuple(audio.shape)}")
    return audio


def _check_lengths(lengths: Tensor, batch: int, max_len: int, check_values: bool = True) -> Tensor:
    """``lengths`` as int64 ``[batch]``; ``check_values`` also checks that they lie in [1, max_len] (a host read
    of the values: a device sync on a GPU; callers whose lengths are already checked pass False)."""
    lengths = torch.as_tensor(lengths).long()
    if lengths.shape != (batch,):
        raise ValueError(f"lengths must have shape [{batch}], got {tuple(lengths.shape)}")
    if check_values and (bool((lengths < 1).any()) or bool((lengths > max_len).any())):
        raise ValueError(f"lengths must lie in [1, {max_len}], got {lengths.tolist()}")
    return lengths


def reflect_pad_by_length(audio: Tensor, lengths: Tensor, pad: int) -> Tensor:
    """``[B, T] -> [B, T + 2*pad]``: reflect-pad each item around ``[0, length)``; zeros beyond.

    Equals ``F.pad(x[:L], (pad, pad), mode="reflect")`` for an item of length L (when L > pad),
    followed by zeros. Reflected indices that fall outside the item (very short items) read 0.
    """
    batch, time = audio.shape
    device = audio.device
    lengths = lengths.to(device)
    pos = torch.arange(time + 2 * pad, device=device).unsqueeze(0) - pad  # source index if inside
    length = lengths.unsqueeze(1)
    src = torch.where(pos < 0, -pos, pos)  # left reflection
    src = torch.where(pos >= length, 2 * length - 2 - pos, src)  # right reflection at the item's end
    valid = (src >= 0) & (src < length) & (pos < length + pad)
    gathered = torch.gather(audio, 1, src.clamp(0, time - 1).expand(batch, -1))
    return torch.where(valid, gathered, torch.zeros((), dtype=audio.dtype, device=device))  # NaN-safe


def frame_lengths(lengths: Tensor, hop_length: int) -> Tensor:
    """Number of centred STFT frames an item of each length has (``1 + L // hop``)."""
    return 1 + torch.div(lengths, hop_length, rounding_mode="floor")


def frame_mask(lengths: Tensor, hop_length: int, n_frames: int) -> Tensor:
    """Boolean ``[B, n_frames]`` mask of frames inside each item."""
    n_valid = frame_lengths(lengths, hop_length)
    return torch.arange(n_frames, device=lengths.device).unsqueeze(0) < n_valid.unsqueeze(1)


def stft_magnitude(
    audio: Tensor,
    n_fft: int,
    hop_length: int,
    window: Tensor,
    lengths: Tensor | None = None,
    power: float = 1.0,
    check_lengths: bool = True,
) -> Tensor:
    """Centred (reflect) STFT magnitude ``|X|**power`` of shape ``[B, n_fft//2 + 1, 1 + T//hop]``.
    ``check_lengths=False``: the lengths are known to lie in [1, T] (not read back to the host)."""
    audio = _as_batch_time(audio).float()  # FFTs need fp32 (no bf16 kernels); precision matters here
    pad = n_fft // 2
    if lengths is None:
        if audio.shape[-1] <= pad:
            raise ValueError(f"audio of {audio.shape[-1]} samples is too short for n_fft={n_fft}")
        padded = F.pad(audio.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
    else:
        lengths = _check_lengths(lengths, audio.shape[0], audio.shape[-1], check_lengths)
        padded = reflect_pad_by_length(audio, lengths, pad)
    spec = torch.stft(
        padded, n_fft=n_fft, hop_length=hop_length, window=window, center=False, return_complex=True
    )
    mag = spec.abs()
    return mag if power == 1.0 else mag.pow(power)


class MelSpectrogram(nn.Module):
    """Mel spectrogram ``[B, T] | [B, 1, T] -> [B, n_mels, 1 + T // hop]``.

    Defaults reproduce audiotools' ``AudioSignal.mel_spectrogram`` (periodic Hann, centred reflect
    STFT, magnitude, librosa/Slaney filters). ``log=True`` returns ``log10(clamp(mel, clamp_eps))``.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        n_fft: int = 1024,
        hop_length: int | None = None,
        n_mels: int = 80,
        f_min: float = 0.0,
        f_max: float | None = None,
        power: float = 1.0,
        norm: str | None = "slaney",
        mel_scale: str = "slaney",
        log: bool = False,
        clamp_eps: float = 1e-5,
    ):
        super().__init__()
        self.sample_rate = sample_rate
        self.n_fft = n_fft
        self.hop_length = hop_length or n_fft // 4
        self.n_mels = n_mels
        self.power = power
        self.log = log
        self.clamp_eps = clamp_eps
        f_max = sample_rate / 2 if f_max is None else f_max
        fb = melscale_fbanks(n_fft // 2 + 1, f_min, f_max, n_mels, sample_rate, norm, mel_scale)
        # Non-persistent: derived from the constructor args, never worth checkpointing.
        self.register_buffer("mel_fb", fb.t().contiguous(), persistent=False)  # [n_mels, F]
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)

    def frame_lengths(self, lengths: Tensor) -> Tensor:
        return frame_lengths(lengths, self.hop_length)

    def forward(self, audio: Tensor, lengths: Tensor | None = None, check_lengths: bool = True) -> Tensor:
        """``check_lengths=False``: ``lengths`` are known to lie in [1, T] (no host read, see `stft_magnitude`)."""
        with torch.autocast(audio.device.type, enabled=False):  # keep the projection in fp32
            mag = stft_magnitude(audio, self.n_fft, self.hop_length, self.window.float(), lengths, self.power,
                                 check_lengths)
            mel = torch.matmul(self.mel_fb.float(), mag)
        if self.log:
            mel = mel.clamp(min=self.clamp_eps).log10()
        return mel
