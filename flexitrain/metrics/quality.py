"""Signal quality metrics between a reference and a decoded waveform.

All functions take 1-D float arrays/tensors (``[T]``, ``[1, T]`` or ``[1, 1, T]``) in [-1, 1].
Length mismatch (codecs often return a few samples more or less) is handled by trimming both
signals to the shorter one. A metric that is undefined for the input (silent reference,
audio too short, PESQ finding no utterance) returns NaN instead of raising; :func:`summarize`
reports how many NaNs were skipped.

- PESQ (ITU-T P.862 via ``pesq``): wide-band needs 16 kHz, narrow-band 8 or 16 kHz; other
  rates are resampled to 16 kHz with soxr first.
- STOI / eSTOI via ``pystoi`` (which resamples to 10 kHz internally).
- SI-SDR in dB on zero-mean signals (Le Roux et al., 2019).
- Mel distance: mean |log10 mel(ref) - log10 mel(deg)| over all bins and frames, using a
  triangular filterbank on the HTK mel scale without area norm (torchaudio's
  ``melscale_fbanks`` defaults) on a Hann-window power spectrogram, mel energies clamped at 1e-5. Defaults:
  n_fft 1024, hop 256, 80 mels, 0 Hz to sr/2.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch  # only to accept tensors as input

__all__ = ["QUALITY_METRICS", "trim_to_shorter", "pesq_score", "stoi_score", "si_sdr",
           "mel_distance", "compute_quality", "summarize", "summarize_records"]

QUALITY_METRICS = ("pesq_wb", "pesq_nb", "stoi", "estoi", "si_sdr", "mel_distance")
_SILENCE_PEAK = 1e-6
_STOI_MIN_SECONDS = 0.4


def _to_1d(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.ndim > 1:
        a = a.squeeze()
    if a.ndim != 1:
        raise ValueError(f"{name} must be a mono waveform [T] (or [1, T]); got shape {np.shape(x)}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains NaN or inf")
    return a


def trim_to_shorter(reference, degraded) -> tuple[np.ndarray, np.ndarray]:
    """Both signals as float64 numpy arrays cut to the shorter length."""
    ref, deg = _to_1d(reference, "reference"), _to_1d(degraded, "degraded")
    n = min(len(ref), len(deg))
    return ref[:n], deg[:n]


def _silent(x: np.ndarray) -> bool:
    return x.size == 0 or float(np.max(np.abs(x))) < _SILENCE_PEAK


def _resample(x: np.ndarray, sr: int, target: int) -> np.ndarray:
    if sr == target:
        return x
    import soxr
    return soxr.resample(x, sr, target)


def pesq_score(reference, degraded, sample_rate: int, mode: str = "wb") -> float:
    """PESQ MOS-LQO; ``mode`` is ``"wb"`` (16 kHz) or ``"nb"``. NaN when undefined."""
    from pesq import PesqError, pesq

    if mode not in ("wb", "nb"):
        raise ValueError(f"PESQ mode must be 'wb' or 'nb', got {mode!r}")
    if mode == "wb" and sample_rate == 8000:
        raise ValueError("wide-band PESQ needs 16 kHz audio; got 8000 Hz (use mode='nb')")
    ref, deg = trim_to_shorter(reference, degraded)
    if sample_rate not in (8000, 16000):
        ref, deg = _resample(ref, sample_rate, 16000), _resample(deg, sample_rate, 16000)
        sample_rate = 16000
    if _silent(ref) or _silent(deg) or len(ref) < sample_rate // 4:
        return float("nan")
    try:
        return float(pesq(sample_rate, ref, deg, mode))
    except PesqError:
        return float("nan")


def stoi_score(reference, degraded, sample_rate: int, extended: bool = False) -> float:
    """STOI (or eSTOI with ``extended=True``) in [0, 1]; NaN when the clip is silent or too short."""
    from pystoi import stoi

    ref, deg = trim_to_shorter(reference, degraded)
    # pystoi needs 30 frames of 25.6 ms at 10 kHz (~0.4 s) and crashes on shorter input.
    if _silent(ref) or len(ref) < int(_STOI_MIN_SECONDS * sample_rate):
        return float("nan")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = float(stoi(ref, deg, sample_rate, extended=extended))
    # pystoi returns 1e-5 with a warning when too few non-silent frames remain.
    if any("Not enough STFT frames" in str(w.message) for w in caught):
        return float("nan")
    return value


def si_sdr(reference, degraded, eps: float = 1e-12) -> float:
    """Scale-invariant SDR in dB (zero-mean); NaN for a silent reference."""
    ref, deg = trim_to_shorter(reference, degraded)
    if _silent(ref):
        return float("nan")
    ref, deg = ref - ref.mean(), deg - deg.mean()
    target = (np.dot(deg, ref) / (np.dot(ref, ref) + eps)) * ref
    noise = deg - target
    return float(10.0 * np.log10((np.dot(target, target) + eps) / (np.dot(noise, noise) + eps)))


@lru_cache(maxsize=8)
def _mel_filterbank(sample_rate: int, n_fft: int, n_mels: int, f_min: float, f_max: float) -> np.ndarray:
    """Triangular HTK-mel filterbank ``[n_freqs, n_mels]``, no area norm (torchaudio's defaults)."""
    def hz_to_mel(f):
        return 2595.0 * math.log10(1.0 + f / 700.0)

    mels = np.linspace(hz_to_mel(f_min), hz_to_mel(f_max), n_mels + 2)
    f_pts = 700.0 * (10.0 ** (mels / 2595.0) - 1.0)
    freqs = np.linspace(0, sample_rate / 2, n_fft // 2 + 1)
    slopes = f_pts[None, :] - freqs[:, None]
    f_diff = f_pts[1:] - f_pts[:-1]
    down, up = -slopes[:, :-2] / f_diff[:-1], slopes[:, 2:] / f_diff[1:]
    return np.clip(np.minimum(down, up), 0.0, None)


def _log_mel(x: np.ndarray, sample_rate, n_fft, hop, n_mels, f_min, f_max) -> np.ndarray:
    # numpy (single-threaded FFT) rather than torch.stft: for clip-sized inputs torch's thread
    # pool only adds overhead, badly so on a busy machine.
    if len(x) < n_fft:  # reflect padding needs at least n_fft // 2 + 1 samples
        x = np.pad(x, (0, n_fft - len(x)))
    x = np.pad(x, (n_fft // 2, n_fft // 2), mode="reflect")  # centred frames, like torch.stft(center=True)
    frames = np.lib.stride_tricks.sliding_window_view(x, n_fft)[::hop]
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2  # [frames, n_freqs]
    mel = power @ _mel_filterbank(sample_rate, n_fft, n_mels, f_min, f_max)
    return np.log10(np.maximum(mel, 1e-5))


def mel_distance(reference, degraded, sample_rate: int, n_fft: int = 1024, hop_length: int = 256,
                 n_mels: int = 80, f_min: float = 0.0, f_max: float | None = None) -> float:
    """Mean absolute log10-mel difference (lower is better); NaN for empty input."""
    ref, deg = trim_to_shorter(reference, degraded)
    if ref.size == 0:
        return float("nan")
    f_max = float(sample_rate) / 2 if f_max is None else float(f_max)
    args = (sample_rate, n_fft, hop_length, n_mels, float(f_min), f_max)
    return float(np.abs(_log_mel(ref, *args) - _log_mel(deg, *args)).mean())


def compute_quality(reference, degraded, sample_rate: int,
                    metrics: Sequence[str] = QUALITY_METRICS) -> dict[str, float]:
    """The requested subset of :data:`QUALITY_METRICS` for one pair, as ``{name: value}``."""
    unknown = set(metrics) - set(QUALITY_METRICS)
    if unknown:
        raise ValueError(f"unknown quality metrics {sorted(unknown)}; choose from {QUALITY_METRICS}")
    ref, deg = trim_to_shorter(reference, degraded)
    fns = {
        "pesq_wb": lambda: pesq_score(ref, deg, sample_rate, "wb") if sample_rate != 8000 else float("nan"),
        "pesq_nb": lambda: pesq_score(ref, deg, sample_rate, "nb"),
        "stoi": lambda: stoi_score(ref, deg, sample_rate, extended=False),
        "estoi": lambda: stoi_score(ref, deg, sample_rate, extended=True),
        "si_sdr": lambda: si_sdr(ref, deg),
        "mel_distance": lambda: mel_distance(ref, deg, sample_rate),
    }
    return {name: fns[name]() for name in metrics}


def summarize(values: Iterable[float]) -> dict[str, float]:
    """``{mean, std, min, max, n, n_nan}`` over the finite values (population std); ``n_nan`` counts NaN/inf."""
    a = np.asarray(list(values), dtype=np.float64)
    finite = a[np.isfinite(a)]
    out = {"n": float(finite.size), "n_nan": float(a.size - finite.size)}
    if finite.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "min": float("nan"), "max": float("nan"), **out}
    return {"mean": float(finite.mean()), "std": float(finite.std()), "min": float(finite.min()),
            "max": float(finite.max()), **out}


def summarize_records(records: Iterable[Mapping[str, float]]) -> dict[str, dict[str, float]]:
    """Per-key :func:`summarize` over a list of per-utterance metric dicts."""
    columns: dict[str, list[float]] = {}
    for rec in records:
        for key, value in rec.items():
            columns.setdefault(key, []).append(float(value))
    return {key: summarize(vals) for key, vals in columns.items()}
