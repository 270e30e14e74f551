"""Waveform augmentation of codec training batches (`data.augment`), off by default.

    augment:
      target: input        # input: the codec reads the augmented audio, batches also carry the clean
                           #   audio as "clean" (the reconstruction target); both: audio is augmented in place
      gain: {prob: 0.5, min_db: -6.0, max_db: 6.0}
      noise: {prob: 0.3, shards: /data/noise/train, min_snr_db: 5.0, max_snr_db: 30.0}
      bandlimit: {prob: 0.2, min_hz: 2000.0, max_hz: 7000.0}

A transform left out (or null) is off; with every transform off the pipeline is exactly the plain one (bit-
identical batches, no "clean" key).  Each transform is applied to an item with its probability, in the order
gain -> noise -> band-limit:

* gain: a uniform draw in [min_db, max_db] dB, a plain multiply (no clipping: the audio is float).
* noise: a segment of the noise set (WebDataset shards of the same format as the corpus; any audio member,
  cropped, resampled and mixed to mono like speech) scaled so that signal power / noise power over the item's
  valid samples is a uniform draw in [min_snr_db, max_snr_db] dB.  Each worker keeps a ring of `bank_seconds` of
  noise (at least two crops long), read from noise shards drawn with replacement and refreshed by one clip per
  batch; segments start at random points of the ring.
* bandlimit: a random low-pass, cutoff uniform in [min_hz, max_hz], as an FFT mask with a raised-cosine roll-off
  over the `rolloff` fraction of the cutoff below it: no energy is left above the cutoff.

It runs in the DataLoader workers on the collated batch [B, 1, T], after collation, in numpy: the random draws
and the FFTs are batched, the rest works in place on each item's valid samples, so the padding stays zero.  Its random draws come from generators of their own, seeded by (seed, epoch, rank, worker): the
items, crops and batches are those of the run without augmentation, and a resumed run replays the same
augmentations.  Counts of changed items are data stats `augment/gain`, `augment/noise`, `augment/bandlimit`.
With `target: input` every transform, gain included, is something the codec learns to undo.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np
import scipy.fft

TARGETS = ("input", "both")
TRANSFORMS = ("gain", "noise", "bandlimit")


@dataclass(frozen=True)
class GainConfig:
    prob: float = 1.0
    min_db: float = -6.0
    max_db: float = 6.0


@dataclass(frozen=True)
class NoiseConfig:
    shards: object = None  # any `expand_shards` spec (required)
    prob: float = 1.0
    min_snr_db: float = 5.0
    max_snr_db: float = 30.0
    bank_seconds: float = 60.0
    urls: tuple[str, ...] = ()  # expanded `shards` (filled by the datamodule at setup)


@dataclass(frozen=True)
class BandlimitConfig:
    prob: float = 1.0
    min_hz: float = 2000.0
    max_hz: float = 7000.0
    rolloff: float = 0.1


@dataclass(frozen=True)
class AugmentConfig:
    target: str = "input"
    gain: GainConfig | None = None
    noise: NoiseConfig | None = None
    bandlimit: BandlimitConfig | None = None

    @property
    def keep_clean(self) -> bool:
        """Batches carry the un-augmented audio as "clean" (the reconstruction target)."""
        return self.target == "input"

    @property
    def counter_names(self) -> tuple[str, ...]:
        return tuple(f"augment/{t}" for t in TRANSFORMS if getattr(self, t) is not None)


def _number(where: str, key: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
        raise ValueError(f"{where}.{key} must be a finite number, got {value!r}")
    return float(value)


def _section(cls, raw, where: str, sample_rate: int):
    if raw is None:
        return None
    allowed = {f.name for f in dataclasses.fields(cls)} - {"urls"}
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping of {sorted(allowed)} or null, got {raw!r}")
    unknown = sorted(str(k) for k in raw if k not in allowed)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; it takes {sorted(allowed)}")
    values = {k: (v if k == "shards" else _number(where, k, v)) for k, v in raw.items()}
    cfg = cls(**values)
    if not 0.0 <= cfg.prob <= 1.0:
        raise ValueError(f"{where}.prob must lie in [0, 1], got {cfg.prob}")
    if cls is GainConfig and cfg.min_db > cfg.max_db:
        raise ValueError(f"{where}: min_db {cfg.min_db} > max_db {cfg.max_db}")
    if cls is NoiseConfig:
        if cfg.shards is None:
            raise ValueError(f"{where}.shards is required: the noise shard set (a directory, pattern or list)")
        if cfg.min_snr_db > cfg.max_snr_db:
            raise ValueError(f"{where}: min_snr_db {cfg.min_snr_db} > max_snr_db {cfg.max_snr_db}")
        if cfg.bank_seconds <= 0:
            raise ValueError(f"{where}.bank_seconds must be positive, got {cfg.bank_seconds}")
    if cls is BandlimitConfig:
        nyquist = sample_rate / 2
        if not 0 < cfg.min_hz <= cfg.max_hz <= nyquist:
            raise ValueError(f"{where}: need 0 < min_hz <= max_hz <= {nyquist:g} (Nyquist at {sample_rate} Hz), "
                             f"got min_hz={cfg.min_hz:g}, max_hz={cfg.max_hz:g}")
        if not 0 < cfg.rolloff < 1:
            raise ValueError(f"{where}.rolloff must lie in (0, 1), got {cfg.rolloff}")
    return None if cfg.prob == 0 else cfg


def parse_augment(raw, sample_rate: int, where: str = "augment") -> AugmentConfig | None:
    """`data.augment` (a mapping or None) -> AugmentConfig, or None when no transform is on."""
    if raw is None:
        return None
    if isinstance(raw, AugmentConfig):
        return raw if raw.counter_names else None
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where} must be a mapping {{target, gain, noise, bandlimit}} or null, got {raw!r}")
    unknown = sorted(str(k) for k in raw if k not in ("target",) + TRANSFORMS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; it takes target, gain, noise, bandlimit")
    target = raw.get("target", "input")
    if target not in TARGETS:
        raise ValueError(f"{where}.target must be 'input' (augment the codec input, keep the target clean) or "
                         f"'both', got {target!r}")
    cfg = AugmentConfig(
        target=target,
        gain=_section(GainConfig, raw.get("gain"), f"{where}.gain", sample_rate),
        noise=_section(NoiseConfig, raw.get("noise"), f"{where}.noise", sample_rate),
        bandlimit=_section(BandlimitConfig, raw.get("bandlimit"), f"{where}.bandlimit", sample_rate),
    )
    return cfg if cfg.counter_names else None


def with_noise_urls(cfg: AugmentConfig | None, expand, where: str = "augment.noise.shards") -> AugmentConfig | None:
    """The config with the noise shard spec expanded (`expand(spec, label)` raises for a spec matching nothing)."""
    if cfg is None or cfg.noise is None:
        return cfg
    urls = tuple(expand(cfg.noise.shards, where))
    return dataclasses.replace(cfg, noise=dataclasses.replace(cfg.noise, urls=urls))


# ----------------------------------------------------------------------------- noise
class NoiseBank:
    """A ring of noise samples (float32) filled from an endless clip iterator; `take` cuts segments."""

    max_barren = 1000  # clip draws in a row without a usable clip: the noise set is broken

    def __init__(self, clips: Iterator[np.ndarray | None], size: int):
        self.clips, self.ring, self.pos, self.filled = clips, np.zeros(max(1, size), np.float32), 0, 0
        while self.filled < self.ring.size:
            self.refresh()

    def refresh(self) -> None:
        """Write the next clip into the ring (wrapping), over the oldest noise."""
        for _ in range(self.max_barren):
            clip = next(self.clips)
            if clip is not None and clip.size:
                break
        else:
            raise RuntimeError(f"{self.max_barren} noise clips in a row were unusable (empty, silent or corrupt): "
                               "check data.augment.noise.shards")
        n, size = min(clip.size, self.ring.size), self.ring.size
        head = min(n, size - self.pos)
        self.ring[self.pos : self.pos + head] = clip[:head]
        self.ring[: n - head] = clip[head:n]
        self.pos = (self.pos + n) % size
        self.filled = min(size, self.filled + n)

    def segment(self, start: int, length: int) -> np.ndarray:
        """`length` samples from ring position `start`, wrapping around: a view when it does not wrap."""
        if start + length <= self.ring.size:
            return self.ring[start : start + length]
        return np.take(self.ring, np.arange(start, start + length), mode="wrap")


# ----------------------------------------------------------------------------- batches
def lowpass_(spec: np.ndarray, freqs: np.ndarray, cutoff: np.ndarray, rolloff: float) -> None:
    """Low-pass rows of an rfft spectrum [k, F] in place: unchanged below cutoff*(1-rolloff), a raised-cosine
    fall to 0 at the cutoff, 0 above.  Per row, so only the roll-off bins cost a cosine (a full [k, F] gain
    array took three times as long as the FFTs)."""
    for i, c in enumerate(cutoff.tolist()):
        lo, hi = np.searchsorted(freqs, [c * (1 - rolloff), c])
        spec[i, lo:hi] *= (0.5 + 0.5 * np.cos(np.pi * (freqs[lo:hi] - c * (1 - rolloff)) / (c * rolloff)))
        spec[i, hi:] = 0


class Augmenter:
    """Applies an AugmentConfig to collated batches in one worker; `rng` draws the transforms, `noise_clips`
    (an endless iterator of float32 clips or None for unusable draws) feeds the noise bank."""

    def __init__(self, cfg: AugmentConfig, sample_rate: int, max_len: int, rng: np.random.Generator,
                 stats, noise_clips: Iterator[np.ndarray | None] | None = None):
        self.cfg, self.sample_rate, self.rng, self.stats = cfg, sample_rate, rng, stats
        self.bank = None
        if cfg.noise is not None:
            if noise_clips is None:
                raise ValueError("noise augmentation needs a noise clip stream")
            size = max(int(cfg.noise.bank_seconds * sample_rate), 2 * max_len)
            self.bank = NoiseBank(noise_clips, size)

    def __call__(self, audio: np.ndarray, lengths: np.ndarray) -> None:
        """Augment `audio` [B, 1, T] (or [B, T]) in place; samples at or after `lengths` stay zero."""
        x = audio[:, 0, :] if audio.ndim == 3 else audio  # a view: the ops below write into `audio`
        b, t = x.shape
        cfg, rng = self.cfg, self.rng
        lengths = np.asarray(lengths).tolist()
        # Every transform draws all its numbers for every item, used or not: the draws of one batch never
        # depend on the outcomes of another's, so the streams stay aligned whatever the probabilities.
        # The per-item loops below touch only an item's valid samples, in place (masked [k, T] arrays and
        # fancy-index copies cost twice the time in the loader's workers).
        if cfg.gain is not None:
            on = rng.random(b) < cfg.gain.prob
            db = rng.uniform(cfg.gain.min_db, cfg.gain.max_db, b)
            gain = (10.0 ** (db / 20.0)).astype(np.float32)
            for r in np.flatnonzero(on).tolist():
                x[r] *= gain[r]
            self.stats.add("augment/gain", int(on.sum()))
        if cfg.noise is not None:
            on = rng.random(b) < cfg.noise.prob
            snr = rng.uniform(cfg.noise.min_snr_db, cfg.noise.max_snr_db, b)
            starts = rng.integers(0, self.bank.ring.size, b)
            for r in np.flatnonzero(on).tolist():
                sig = x[r, : lengths[r]]
                noise = self.bank.segment(int(starts[r]), sig.size)
                # SNR = signal energy / noise energy over the same valid samples (float32 dots: ample for dB)
                ratio = float(np.dot(sig, sig)) / max(float(np.dot(noise, noise)), 1e-20)
                sig += noise * np.float32(math.sqrt(ratio / 10.0 ** (snr[r] / 10.0)))
            self.stats.add("augment/noise", int(on.sum()))
            self.bank.refresh()  # one new clip per batch: the bank drifts through the noise set
        if cfg.bandlimit is not None:
            on = rng.random(b) < cfg.bandlimit.prob
            cutoff = rng.uniform(cfg.bandlimit.min_hz, cfg.bandlimit.max_hz, b)
            if on.any():
                rows = np.flatnonzero(on)
                spec = scipy.fft.rfft(x[rows], axis=-1)  # float32 in, complex64 out (numpy's rfft is ~4x slower)
                lowpass_(spec, np.fft.rfftfreq(t, 1.0 / self.sample_rate), cutoff[rows], cfg.bandlimit.rolloff)
                out = scipy.fft.irfft(spec, n=t, axis=-1)
                for i, r in enumerate(rows.tolist()):
                    x[r, : lengths[r]] = out[i, : lengths[r]]  # the filter rings past an item's end: padding stays 0
                self.stats.add("augment/bandlimit", len(rows))
