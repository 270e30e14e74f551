"""Tiny shard writer for the data-pipeline tests (tarfile + soundfile, no dependency on the
project's own shard writer)."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import soundfile as sf


def tone(seconds: float, sr: int = 16000, seed: int = 0, channels: int = 1) -> np.ndarray:
    """A non-silent test signal: a random-pitch tone plus a little noise, in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sr))) / sr
    x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 1000) * t) + 0.05 * rng.standard_normal(t.size)
    x = x.astype(np.float32)
    return np.stack([x, 0.5 * x], axis=1) if channels == 2 else x


def audio_bytes(x: np.ndarray, sr: int = 16000, fmt: str = "FLAC", subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format=fmt, subtype=subtype)
    return buf.getvalue()


def meta(key: str, seconds: float, sr: int = 16000, **extra) -> bytes:
    d = {"id": key, "text": f"text of {key}", "speaker": key.split("-")[0], "language": "en",
         "sample_rate": sr, "duration": seconds}
    d.update(extra)
    return json.dumps(d).encode()


def write_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]]) -> Path:
    """samples: [(key, {"flac": bytes, "json": bytes, ...})] -> a WebDataset tar at path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good_sample(key: str, seconds: float, seed: int, sr: int = 16000) -> tuple[str, dict[str, bytes]]:
    return key, {"flac": audio_bytes(tone(seconds, sr, seed), sr), "json": meta(key, seconds, sr)}


def write_corpus(folder: Path, n_shards: int, per_shard: int, seconds=(0.5, 2.0), sr: int = 16000,
                 index: bool = True, seed: int = 0) -> list[str]:
    """n_shards x per_shard good utterances of random length; returns all keys in order."""
    rng = np.random.default_rng(seed)
    keys, entries = [], []
    for s in range(n_shards):
        samples, total = [], 0.0
        for i in range(per_shard):
            key = f"spk{s % 3}-utt{s:03d}{i:04d}"
            dur = float(rng.uniform(*seconds))
            samples.append(good_sample(key, dur, seed=s * 10000 + i, sr=sr))
            keys.append(key)
            total += dur
        name = f"shard-{s:06d}.tar"
        write_shard(folder / name, samples)
        entries.append({"name": name, "num_samples": per_shard, "duration": total})
    if index:
        (folder / "index.json").write_text(json.dumps({
            "version": 1, "sample_rate": sr, "num_samples": n_shards * per_shard,
            "duration": sum(e["duration"] for e in entries), "shards": entries}))
    return keys
