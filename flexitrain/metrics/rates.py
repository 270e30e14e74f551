"""Rate metrics of a dynamic-frame-rate codec, computed from token lengths.

A token covers ``L`` base frames (FlexiCodec: 80 ms frames at 12.5 Hz, ``1 <= L <= max_tokens_per_group``).
For utterance ``u`` with ``G_u`` tokens and ``d_u`` seconds of audio:

- per-utterance frame rate ``r_u = G_u / d_u`` (Hz), summarised as mean / std (population) / min / max;
- pooled frame rate ``R = sum_u G_u / sum_u d_u`` (Hz) over the set. Long utterances weigh more,
  which is what a bitrate over the whole set needs. At tau = 1.0 every ``L = 1``, so ``R = 12.5``.
- bits per token ``b = sum_k log2(K_k)`` over the codebooks used (``K_k`` = size of codebook k).
  FlexiCodec: FSQ 8^5 = 32768 codes -> 15 bits for the semantic token, each acoustic RVQ stage
  4096 codes -> 12 bits, so ``b = 15 + 12 * (num_quantizers - 1)``.
- bitrate without side information ``B = R * b`` (bits/s);
- duration side information ``s`` bits/token, needed to decode (the decoder must know each ``L``):
  ``"fixed"``: ``s = ceil(log2(max_tokens_per_group))`` (a fixed-length code; 3 bits for caps 5..8,
  0 for a cap of 1, i.e. fixed rate); ``"entropy"``: ``s = H(p) = -sum_L p_L log2 p_L`` with ``p``
  the empirical token-length distribution of the set (the ideal entropy-coder bound);
- bitrate with side information ``B_side = R * (b + s)``.

Example: 8 quantizers at 12.5 Hz give 99 bits * 12.5 = 1237.5 bps, plus 3 * 12.5 = 37.5 bps with
fixed-length durations for a cap of 8.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np
import torch

__all__ = ["FLEXICODEC_FRAME_RATE_HZ", "flexicodec_codebook_sizes", "bits_per_token",
           "duration_side_bits", "frame_rate_stats", "token_length_histogram", "split_token_lengths",
           "RateAccumulator"]

FLEXICODEC_FRAME_RATE_HZ = 12.5
_SIDE_MODES = ("fixed", "entropy", "none")


def _int_array(x, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one utterance), got shape {a.shape}")
    if a.size and (not np.issubdtype(a.dtype, np.integer) or a.min() < 1):
        raise ValueError(f"{name} must hold positive integer token lengths (crop padding first)")
    return a.astype(np.int64)


def flexicodec_codebook_sizes(num_quantizers: int, semantic_size: int = 32768,
                              acoustic_size: int = 4096) -> list[int]:
    """Codebook sizes used at ``num_quantizers`` (the FSQ semantic token counts as the first)."""
    if num_quantizers < 1:
        raise ValueError(f"num_quantizers must be >= 1, got {num_quantizers}")
    return [semantic_size] + [acoustic_size] * (num_quantizers - 1)


def bits_per_token(codebook_sizes: Sequence[int]) -> float:
    """``sum(log2(K))`` over the codebooks (exact, also for sizes that are not powers of two)."""
    sizes = list(codebook_sizes)
    if not sizes or any(int(k) < 1 for k in sizes):
        raise ValueError(f"codebook_sizes must be a non-empty list of positive sizes, got {sizes}")
    return float(sum(math.log2(int(k)) for k in sizes))


def duration_side_bits(max_tokens_per_group: int, mode: str = "fixed",
                       histogram_counts: Sequence[int] | None = None) -> float:
    """Bits per token to transmit token lengths; see the module docstring for the modes."""
    if mode not in _SIDE_MODES:
        raise ValueError(f"side-information mode must be one of {_SIDE_MODES}, got {mode!r}")
    if max_tokens_per_group < 1:
        raise ValueError(f"max_tokens_per_group must be >= 1, got {max_tokens_per_group}")
    if mode == "none":
        return 0.0
    if mode == "fixed":
        return float(math.ceil(math.log2(max_tokens_per_group)))
    if histogram_counts is None:
        raise ValueError("mode='entropy' needs the token-length histogram counts")
    counts = np.asarray(histogram_counts, dtype=np.float64)
    if counts.sum() <= 0:
        return 0.0
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum() + 0.0)


def frame_rate_stats(num_tokens: Sequence[int], durations_s: Sequence[float]) -> dict[str, float]:
    """``{pooled, mean, std, min, max, n, total_tokens, total_seconds}`` of tokens per second."""
    g = np.asarray(num_tokens, dtype=np.float64)
    d = np.asarray(durations_s, dtype=np.float64)
    if g.shape != d.shape or g.ndim != 1:
        raise ValueError(f"num_tokens and durations_s must be 1-D of equal length, got {g.shape} and {d.shape}")
    if d.size and d.min() <= 0:
        raise ValueError("durations_s must be positive")
    if g.size == 0:
        nan = float("nan")
        return {"pooled": nan, "mean": nan, "std": nan, "min": nan, "max": nan, "n": 0.0,
                "total_tokens": 0.0, "total_seconds": 0.0}
    r = g / d
    return {"pooled": float(g.sum() / d.sum()), "mean": float(r.mean()), "std": float(r.std()),
            "min": float(r.min()), "max": float(r.max()), "n": float(g.size),
            "total_tokens": float(g.sum()), "total_seconds": float(d.sum())}


def token_length_histogram(token_lengths: Iterable, max_len: int | None = None) -> np.ndarray:
    """Counts of token lengths: ``hist[L - 1]`` = number of tokens covering ``L`` frames.

    ``token_lengths`` is one 1-D array/tensor or an iterable of per-utterance ones.
    """
    if isinstance(token_lengths, (np.ndarray, torch.Tensor)) and np.ndim(token_lengths) == 1:
        token_lengths = [token_lengths]
    arrays = [_int_array(t, "token_lengths") for t in token_lengths]
    flat = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
    top = int(flat.max()) if flat.size else 0
    if max_len is None:
        max_len = max(top, 1)
    elif top > max_len:
        raise ValueError(f"token length {top} exceeds max_len={max_len}")
    return np.bincount(flat - 1, minlength=max_len)[:max_len] if flat.size else np.zeros(max_len, np.int64)


def split_token_lengths(token_lengths, total_frames) -> list[np.ndarray]:
    """Crop a padded batch ``[B, G]`` to per-item arrays using ``total_frames[B]`` (valid token counts).

    Cropping by count matters: padded frames show up as extra length-1 tokens, not only as zeros.
    """
    tl = token_lengths.detach().cpu().numpy() if isinstance(token_lengths, torch.Tensor) else np.asarray(token_lengths)
    n = total_frames.detach().cpu().numpy() if isinstance(total_frames, torch.Tensor) else np.asarray(total_frames)
    if tl.ndim != 2 or n.shape != (tl.shape[0],):
        raise ValueError(f"expected token_lengths [B, G] and total_frames [B], got {tl.shape} and {n.shape}")
    return [tl[b, : int(n[b])].astype(np.int64) for b in range(tl.shape[0])]


class RateAccumulator:
    """Collects token lengths and durations of one setting (threshold, num_quantizers) over a set.

    >>> acc = RateAccumulator(max_tokens_per_group=8)
    >>> acc.update([1, 1, 2], 0.32)          # 3 tokens covering 4 frames in 0.32 s
    >>> acc.compute(flexicodec_codebook_sizes(8))["frame_rate"]["pooled"]
    9.375
    """

    def __init__(self, max_tokens_per_group: int = 8) -> None:
        if max_tokens_per_group < 1:
            raise ValueError(f"max_tokens_per_group must be >= 1, got {max_tokens_per_group}")
        self.max_tokens_per_group = int(max_tokens_per_group)
        self.num_tokens: list[int] = []
        self.durations: list[float] = []
        self.histogram = np.zeros(self.max_tokens_per_group, np.int64)

    def update(self, token_lengths, duration_s: float) -> None:
        """Add one utterance: its valid token lengths (1-D) and its audio duration in seconds."""
        t = _int_array(token_lengths, "token_lengths")
        if duration_s <= 0:
            raise ValueError(f"duration_s must be positive, got {duration_s}")
        self.num_tokens.append(int(t.size))
        self.durations.append(float(duration_s))
        self.histogram += token_length_histogram(t, self.max_tokens_per_group)

    def update_batch(self, token_lengths, total_frames, num_samples, sample_rate: int) -> None:
        """Add a padded batch: ``token_lengths [B, G]``, ``total_frames [B]``, ``num_samples [B]``."""
        ns = num_samples.detach().cpu().numpy() if isinstance(num_samples, torch.Tensor) else np.asarray(num_samples)
        for t, n in zip(split_token_lengths(token_lengths, total_frames), ns):
            self.update(t, float(n) / sample_rate)

    def merge(self, other: "RateAccumulator") -> "RateAccumulator":
        """Fold in another accumulator (e.g. gathered from another rank)."""
        if other.max_tokens_per_group != self.max_tokens_per_group:
            raise ValueError("cannot merge accumulators with different max_tokens_per_group")
        self.num_tokens += other.num_tokens
        self.durations += other.durations
        self.histogram = self.histogram + other.histogram
        return self

    def compute(self, codebook_sizes: Sequence[int], side_info: str = "fixed") -> dict:
        """Frame-rate stats, bits/token, bitrates (bps) and the token-length histogram."""
        rate = frame_rate_stats(self.num_tokens, self.durations)
        bits = bits_per_token(codebook_sizes)
        side = duration_side_bits(self.max_tokens_per_group, side_info, self.histogram)
        total = int(self.histogram.sum())
        return {
            "frame_rate": rate,
            "bits_per_token": bits,
            "side_bits_per_token": side,
            "side_info": side_info,
            "bitrate_bps": rate["pooled"] * bits,
            "bitrate_with_side_bps": rate["pooled"] * (bits + side),
            "token_length_histogram": self.histogram.tolist(),
            "token_length_fraction": (self.histogram / total).tolist() if total else [0.0] * len(self.histogram),
            "mean_token_length": float((np.arange(1, len(self.histogram) + 1) * self.histogram).sum() / total)
            if total else float("nan"),
        }
