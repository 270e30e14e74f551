"""Teacher frames -> the codec's 80 ms (12.5 Hz) frame grid by mean pooling."""
from __future__ import annotations

import math

import torch

CODEC_HOP_SAMPLES = 1280  # FlexiCodec's frame: 80 ms at 16 kHz


def pool_to_codec_grid(frames: torch.Tensor, factor: int) -> torch.Tensor:
    """``frames [T, D]`` of one item (all valid) -> ``[ceil(T / factor), D]``: the mean of each run of ``factor``
    consecutive frames; the last, partial run is the mean of the frames it has.

    Used when the teacher's frame is an exact fraction of the codec's (Whisper and wav2vec2-style encoders:
    20 ms = 80 ms / 4). Then every codec frame covers exactly ``factor`` teacher frames, and the mean uses each
    once: no frame skipped or counted twice, no interpolation across codec-frame borders (FlexiCodec's own
    ``downsample_features`` average-pools integer factors the same way; linear interpolation is only needed for
    SenseVoice's non-integer 16.67 -> 12.5 Hz)."""
    t, d = frames.shape
    out = math.ceil(t / factor)
    pad = out * factor - t
    if pad:
        frames = torch.cat([frames, frames.new_zeros(pad, d)])
    sums = frames.reshape(out, factor, d).sum(1)
    counts = torch.full((out, 1), float(factor), dtype=frames.dtype, device=frames.device)
    counts[-1] = factor - pad
    return sums / counts
