"""Audio decoding for the loader: bytes -> mono float32 at the model rate, cropped.

Only the frames a crop needs are read (SoundFile.seek), so long utterances cost the crop,
not the whole file.  Every problem is a skip reason or a repair counted in `DataStats`;
nothing here raises on bad input.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

from .stats import DataStats

AUDIO_KEYS = ("flac", "wav", "ogg", "mp3", "opus")
# Subtypes whose samples cannot be NaN/inf: the finiteness scan is skipped for them.
_PCM = {"PCM_S8", "PCM_U8", "PCM_16", "PCM_24", "PCM_32", "ALAW", "ULAW"}


def _fast_soundfile():
    """soundfile bound to the system libsndfile when there is one: it decodes FLAC about 35%
    faster (Debian/Ubuntu 1.2.0) than the copy bundled in the soundfile wheel.  A private copy
    of the module is used so that other soundfile users in the process keep the bundled library
    (a SoundFile opened by one library must not be read through the other).
    FLEXITRAIN_SNDFILE=bundled turns this off."""
    if os.environ.get("FLEXITRAIN_SNDFILE", "system") != "system":
        return sf
    import glob
    import importlib.util

    for path in sorted(glob.glob("/usr/lib*/*/libsndfile.so.1") + glob.glob("/lib*/*/libsndfile.so.1")
                       + glob.glob("/usr/lib*/libsndfile.so.1")):
        try:
            lib = sf._ffi.dlopen(path)  # full path: by soname dlopen returns the bundled copy
            lib.sf_version_string()
            spec = importlib.util.spec_from_file_location("_flexitrain_soundfile", sf.__file__)
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
        except Exception:  # any failure: keep the ordinary module
            continue
        mod._snd = lib
        return mod
    return sf


_sf = _fast_soundfile()


@dataclass(frozen=True)
class DecodeConfig:
    sample_rate: int = 16000
    crop_samples: int | None = None  # at sample_rate; None: the whole utterance
    random_crop: bool = True  # False: crops start at 0 (deterministic evaluation)
    max_duration: float = 30.0
    long_clip_policy: str = "skip"  # or "crop": keep the first/random max_duration seconds
    min_duration: float = 0.1
    silence_threshold: float = 1e-4  # peak |x| at or below this is "all silent"
    crop_align: int = 1  # random crops start at multiples of this (samples at sample_rate): a teacher frame grid


def parse_meta(raw: bytes | None, stats: DataStats) -> dict:
    """JSON metadata; malformed JSON keeps the audio with empty metadata (counted as bad_json)."""
    if raw is None:
        return {}
    try:
        meta = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        stats.add("bad_json")
        return {}
    if not isinstance(meta, dict):
        stats.add("bad_json")
        return {}
    return meta


def decode_audio(data: bytes, cfg: DecodeConfig, stats: DataStats, rng: np.random.Generator | None = None):
    """Decode, mix to mono, crop and resample.  Returns (float32 array, crop offset in seconds)
    or None when the sample must be skipped (the reason is counted)."""
    try:
        f = _sf.SoundFile(io.BytesIO(data))
    except Exception:  # libsndfile raises several types (LibsndfileError, RuntimeError, TypeError)
        stats.add("corrupt_audio")
        return None
    with f:
        frames, sr, channels, subtype = f.frames, f.samplerate, f.channels, f.subtype
        if frames <= 0 or sr <= 0:
            stats.add("empty_audio" if frames == 0 else "corrupt_audio")
            return None
        duration = frames / sr
        if duration < cfg.min_duration:
            stats.add("too_short")
            return None
        limit = frames
        if duration > cfg.max_duration:
            if cfg.long_clip_policy != "crop":
                stats.add("too_long")
                return None
            stats.add("long_cropped")
            limit = int(cfg.max_duration * sr)
        # Frames needed at the source rate for the crop (+1 so resampling never comes out short).
        need = limit
        if cfg.crop_samples is not None:
            need = min(limit, math.ceil(cfg.crop_samples * sr / cfg.sample_rate) + (sr != cfg.sample_rate))
        offset = 0
        if need < limit and cfg.random_crop and rng is not None:
            align = max(1, round(cfg.crop_align * sr / cfg.sample_rate))  # 1: any start (the same draws as before)
            offset = int(rng.integers(0, (limit - need) // align + 1)) * align
        try:
            if offset:
                f.seek(offset)
            # With `out` soundfile skips its frame-count check (two extra seeks per read).
            x = f.read(out=np.empty((need, channels) if channels > 1 else need, dtype=np.float32))
        except Exception:
            stats.add("corrupt_audio")
            return None
    if x.shape[0] < need and (subtype in _PCM or x.shape[0] == 0):
        # the header promised more frames than the stream holds (lossy codecs only estimate it)
        stats.add("corrupt_audio")
        return None
    if subtype in ("PCM_S8", "PCM_U8"):
        stats.add("pcm_8bit")
    elif subtype == "PCM_24":
        stats.add("pcm_24bit")
    if x.ndim == 2:
        stats.add("multichannel")
        x = x.mean(axis=1, dtype=np.float32)
    if subtype not in _PCM and not np.isfinite(x).all():
        stats.add("nonfinite_audio")
        return None
    if x.size == 0 or float(np.abs(x).max()) <= cfg.silence_threshold:
        stats.add("silent_audio")
        return None
    if sr != cfg.sample_rate:
        stats.add("resampled")
        x = soxr.resample(x, sr, cfg.sample_rate)
        if cfg.crop_samples is not None:
            x = x[: cfg.crop_samples]
    return np.ascontiguousarray(x, dtype=np.float32), offset / sr
