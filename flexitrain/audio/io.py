"""Reading audio files for inference entry points (prompts, sources, codec inputs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def read_mono(path: str | Path, what: str = "audio file") -> tuple[torch.Tensor, int]:
    """A mono float32 waveform [N] (channels averaged) and its rate; errors name ``what`` and the path."""
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    audio, sr = sf.read(str(p), dtype="float32", always_2d=True)
    if audio.shape[0] == 0:
        raise ValueError(f"{what} {str(path)!r} is empty")
    return torch.from_numpy(np.ascontiguousarray(audio.mean(axis=1))), int(sr)
