"""Token rates of FlexiCodec's merging rule for a teacher on a shard set, without codec weights.

The codec merges its 12.5 Hz frames by neighbour cosine similarity of the teacher features brought to that grid
(``semantic_downsample_factor``), at most ``max_tokens_per_group`` frames per token: the same calls as
`FlexiCodec.encode_frames` + `FlexiCodec.group` in masked mode, so the rate per τ is what a trained codec with
this teacher gives (the frame rate does not depend on the codec's weights).
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

from flexitrain.models.codec.merging import downsample_features_per_item, group_frames

HOP = 1280  # the codec's 80 ms frame at 16 kHz


def codec_frames(feats: torch.Tensor, feat_lengths: torch.Tensor, num_samples: torch.Tensor,
                 downsample_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher features -> the codec's 12.5 Hz frames and per-item frame counts (as `encode_frames`)."""
    sem, sem_len = downsample_features_per_item(feats.float(), feat_lengths, downsample_factor)
    frames = torch.minimum((num_samples + HOP - 1) // HOP, sem_len).clamp(max=sem.shape[-1])
    return sem, frames


@torch.no_grad()
def measure_frame_rates(teacher, clips: Iterable[torch.Tensor], thresholds: list[float],
                        downsample_factor: float = 1.0, max_tokens_per_group: int | None = 8,
                        sample_rate: int = 16000) -> dict:
    """``clips``: 1-D 16 kHz tensors. Returns ``{"rates": {τ: tokens/s pooled over all clips}, "seconds",
    "utterances", "frames_per_second"}``."""
    tokens = {float(t): 0 for t in thresholds}
    seconds, n, frames_total = 0.0, 0, 0
    for clip in clips:
        length = torch.tensor([clip.shape[-1]])
        feats, feat_lengths = teacher(clip.reshape(1, 1, -1).float(), length)
        sem, frames = codec_frames(feats, feat_lengths.cpu(), length, downsample_factor)
        for tau in tokens:
            g = group_frames(sem, torch.tensor([tau]), max_tokens_per_group, frames, mask_padding=True)
            tokens[tau] += int(g.num_groups.sum())
        frames_total += int(frames.sum())
        seconds += clip.shape[-1] / sample_rate
        n += 1
    if n == 0:
        raise ValueError("no utterance to measure")
    return {"rates": {t: c / seconds for t, c in tokens.items()}, "seconds": seconds, "utterances": n,
            "frames_per_second": frames_total / seconds}


def summary_line(rates: dict[float, float]) -> str:
    """``frame rates: 1.0→A Hz, 0.9→B Hz, ...; span X.XX×`` (span: highest over lowest rate)."""
    parts = ", ".join(f"{float(t)}→{r:.2f} Hz" for t, r in rates.items())
    lo, hi = min(rates.values()), max(rates.values())
    span = hi / lo if lo > 0 else math.inf
    return f"frame rates: {parts}; span {span:.2f}×"
