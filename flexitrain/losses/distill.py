"""Semantic distillation (codec.md §3.6) and the group mean-pooling that builds its target.

The official training repo distils towards the semantic aggregator's own (detached) output,
which nothing anchors to the teacher (§7 item 10). flexitrain anchors the target to the frozen
teacher: the 12.5 Hz SenseVoice features mean-pooled over each merged group.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flexitrain.losses.masking import masked_mse


def mean_pool_groups(features: Tensor, token_lengths: Tensor) -> Tensor:
    """``features [B, C, T]`` averaged over consecutive groups -> ``[B, C, G]``.

    ``token_lengths [B, G]`` holds the frames per group (0 for padded groups, which come out as 0).
    Groups tile each item from frame 0; frames past ``token_lengths.sum(1)`` are ignored.
    """
    if features.dim() != 3 or token_lengths.dim() != 2 or features.shape[0] != token_lengths.shape[0]:
        raise ValueError(
            f"need features [B, C, T] and token_lengths [B, G], got {tuple(features.shape)} "
            f"and {tuple(token_lengths.shape)}"
        )
    batch, channels, frames = features.shape
    groups = token_lengths.shape[1]
    token_lengths = token_lengths.to(features.device).long()
    if bool((token_lengths < 0).any()) or bool((token_lengths.sum(1) > frames).any()):
        raise ValueError(f"token_lengths must be >= 0 and sum to at most T={frames} per item")
    ends = token_lengths.cumsum(1)  # [B, G]
    t = torch.arange(frames, device=features.device).expand(batch, frames).contiguous()
    group_of_frame = torch.searchsorted(ends, t, right=True)  # G for frames past the last group
    sums = features.new_zeros(batch, channels, groups + 1)
    sums.scatter_add_(2, group_of_frame.unsqueeze(1).expand(-1, channels, -1), features)
    counts = token_lengths.clamp(min=1).to(features.dtype).unsqueeze(1)
    return sums[..., :groups] / counts


def group_mask(token_lengths: Tensor) -> Tensor:
    """True for real groups (``token_lengths > 0``), ``[B, G]``."""
    return token_lengths > 0


def semantic_distill_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """MSE between ``pred [B, C, G]`` and the stop-gradient ``target``, over real groups only.

    Unweighted: the ×15 of the official model lives in the loss-weight dict (``distill``).
    """
    return masked_mse(pred, target.detach(), mask)
