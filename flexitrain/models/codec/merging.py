"""Similarity-based frame merging, teacher-feature downsampling and de-aggregation (vectorised).

Merging rule (official): frame t starts a new group iff cos(h[t-1], h[t]) <= τ (frame 0 always
does); runs longer than ``max_tokens_per_group`` are cut every ``max_tokens_per_group`` frames
counted from the run's start.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Grouping:
    frame_to_group: torch.Tensor  # [B, T] int64 group id of each frame, -1 for padded frames (masked mode)
    alignment: torch.Tensor  # [B, G, T] float one-hot
    num_groups: torch.Tensor  # [B] valid groups per item
    token_lengths: torch.Tensor  # [B, G] frames per group (0 for padded groups)
    similarity: torch.Tensor  # [B, T-1] cosine similarity of neighbouring frames
    # 0-dim int64: the group count of the compact layout (the largest valid count in masked mode). Equals G
    # unless the group axis was padded to T (``static_groups``); losses averaged over "the batch's groups"
    # use it so that they do not depend on the padding.
    compact_groups: torch.Tensor | None = None

    @property
    def group_mask(self) -> torch.Tensor:
        G = self.alignment.shape[1]
        return torch.arange(G, device=self.num_groups.device) < self.num_groups.unsqueeze(1)


def group_frames(h: torch.Tensor, threshold, max_tokens_per_group: int | None = None,
                 frame_lengths: torch.Tensor | None = None, mask_padding: bool = False,
                 static_groups: bool = False) -> Grouping:
    """Group the frames of ``h`` ``[B, D, T]`` (channel-first) by neighbour similarity.

    threshold: float or ``[B]`` tensor (τ per item).
    frame_lengths: ``[B]`` valid frames per item. Official behaviour (``mask_padding=False``): transitions
    touching padding get similarity 0, so each padded frame becomes its own (extra) group. With
    ``mask_padding=True`` padded frames belong to no group and G is the largest valid group count.
    static_groups (needs ``mask_padding`` and ``frame_lengths``): the group axis is padded to G = T, the upper
    bound, so no size depends on the data and nothing is read back to the host (no device sync; what a
    training step needs). Groups ``>= num_groups`` are empty (zero alignment rows, ``token_lengths`` 0) as in
    the compact layout, which is the first ``compact_groups`` columns of this one.
    """
    if static_groups and not (mask_padding and frame_lengths is not None):
        raise ValueError("static_groups needs mask_padding=True and frame_lengths")
    B, D, T = h.shape
    device = h.device
    ar_t = torch.arange(T, device=device)
    if T <= 1:
        sim = h.new_ones(B, max(T - 1, 0))
        f2s = torch.zeros(B, T, dtype=torch.long, device=device)
        boundary = torch.ones(B, T, dtype=torch.bool, device=device)
    else:
        # Same call as the official code on a [B, T, D] view (bit-identical similarities).
        hv = h.transpose(1, 2)
        sim = F.cosine_similarity(hv[:, :-1, :], hv[:, 1:, :], dim=2)
        valid = None
        if frame_lengths is not None:
            valid = ar_t.unsqueeze(0) < frame_lengths.unsqueeze(1)
            sim = torch.where(valid[:, :-1] & valid[:, 1:], sim, torch.zeros_like(sim))
        tau = threshold.view(-1, 1) if torch.is_tensor(threshold) else threshold
        starts = torch.cat([torch.ones(B, 1, dtype=torch.bool, device=device), sim <= tau], dim=1)
        if valid is not None and mask_padding:
            starts = starts | ~valid  # never merge into padding, whatever τ is
        if max_tokens_per_group is not None:
            run_start = torch.cummax(ar_t.unsqueeze(0) * starts.long(), dim=1).values
            boundary = ((ar_t.unsqueeze(0) - run_start) % max_tokens_per_group) == 0
        else:
            boundary = starts
        f2s = torch.cumsum(boundary.long(), dim=1) - 1

    if frame_lengths is None:
        num_groups = f2s.max(dim=1).values + 1 if T > 0 else torch.zeros(B, dtype=torch.long, device=device)
        G_tensor = num_groups.max()
    else:
        last_valid = (frame_lengths - 1).clamp(min=0).unsqueeze(1)
        num_groups = torch.gather(f2s, 1, last_valid).squeeze(1) + 1
        num_groups = torch.where(frame_lengths > 0, num_groups, torch.zeros_like(num_groups))
        if mask_padding:
            f2s = f2s.masked_fill(ar_t.unsqueeze(0) >= frame_lengths.unsqueeze(1), -1)
            G_tensor = num_groups.max()
        else:
            G_tensor = f2s.max() + 1  # official: padded frames form extra groups
    if static_groups:
        G = T  # a frame per group at most: static shapes, no host read
    else:
        G = int(G_tensor) if B > 0 else 0  # the one host sync: tensor sizes depend on G
    alignment = (f2s.unsqueeze(1) == torch.arange(G, device=device).view(1, -1, 1)).to(h.dtype)
    token_lengths = alignment.sum(dim=2).long()
    return Grouping(f2s, alignment, num_groups, token_lengths, sim, G_tensor.reshape(()) if B > 0 else None)


def mean_pool(features: torch.Tensor, alignment: torch.Tensor) -> torch.Tensor:
    """``[B, D, T]`` frames → ``[B, D, G]`` group means (official ``aggregate_features``)."""
    alignment = alignment.to(features.dtype)
    summed = torch.einsum("bgt,btd->bgd", alignment, features.transpose(1, 2))
    return (summed / alignment.sum(dim=2).clamp(min=1).unsqueeze(-1)).transpose(1, 2)


def frame_to_group_from_lengths(token_lengths: torch.Tensor, num_frames: int | None = None) -> torch.Tensor:
    """``[B, G]`` token lengths → ``[B, T]`` group index of each frame (-1 past an item's end)."""
    ends = torch.cumsum(token_lengths, dim=1)
    totals = ends[:, -1] if ends.shape[1] else token_lengths.new_zeros(token_lengths.shape[0])
    if num_frames is None:
        num_frames = int(totals.max()) if totals.numel() else 0
    t = torch.arange(num_frames, device=token_lengths.device).expand(token_lengths.shape[0], -1).contiguous()
    idx = torch.searchsorted(ends.contiguous(), t, right=True)
    return torch.where(t < totals.unsqueeze(1), idx, torch.full_like(idx, -1))


def expand_groups(grouped: torch.Tensor, frame_to_group: torch.Tensor) -> torch.Tensor:
    """``[B, D, G]`` tokens → ``[B, D, T]`` frames (each token copied to its frames, 0 for padding)."""
    B, D, G = grouped.shape
    idx = frame_to_group.clamp(min=0, max=max(G - 1, 0))
    out = torch.gather(grouped, 2, idx.unsqueeze(1).expand(-1, D, -1))
    return out * (frame_to_group >= 0).unsqueeze(1).to(out.dtype)


def downsample_lengths(lengths: torch.Tensor, factor: float) -> torch.Tensor:
    """Official ``_downsample_x_lens``: floor for integer factors, ``(len/f).long()`` otherwise, ≥1 if len>0."""
    if factor == 1:
        return lengths
    if factor == int(factor):
        out = torch.div(lengths, int(factor), rounding_mode="floor")
    else:
        out = (lengths.double() / factor).long()
    return torch.where(lengths > 0, out.clamp(min=1), out)


def downsample_features(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Official batch downsampling ``[B, C, T]`` → avg-pool (integer factor) or linear interpolation."""
    if factor == 1:
        return x
    if factor == int(factor):
        return F.avg_pool1d(x, int(factor), int(factor))
    return F.interpolate(x, size=int(x.shape[-1] / factor), mode="linear", align_corners=False)


def downsample_features_per_item(x: torch.Tensor, lengths: torch.Tensor, factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Downsample each item as if it were alone (its own length and interpolation scale).

    Returns ``(features [B, C, T_out], out_lengths [B])``; frames past an item's length are 0.
    """
    out_len = downsample_lengths(lengths, factor)
    if factor == 1:
        T_out = x.shape[-1]
        return x * (torch.arange(T_out, device=x.device) < out_len.unsqueeze(1)).unsqueeze(1), out_len
    if factor == int(factor):
        f = int(factor)
        y = F.avg_pool1d(x, f, f)
    else:
        T_out = int(x.shape[-1] / factor)
        # Linear interpolation with align_corners=False and scale = len_in / len_out per item.
        j = torch.arange(T_out, device=x.device, dtype=torch.float32)
        scale = lengths.float() / out_len.clamp(min=1).float()
        src = ((j.unsqueeze(0) + 0.5) * scale.unsqueeze(1) - 0.5).clamp(min=0)
        i0 = src.long()
        lam1 = src - i0
        i1 = torch.minimum(i0 + 1, (lengths - 1).clamp(min=0).unsqueeze(1))
        i0 = torch.minimum(i0, (lengths - 1).clamp(min=0).unsqueeze(1))
        C = x.shape[1]
        x0 = torch.gather(x, 2, i0.unsqueeze(1).expand(-1, C, -1))
        x1 = torch.gather(x, 2, i1.unsqueeze(1).expand(-1, C, -1))
        y = x0 * (1 - lam1).unsqueeze(1) + x1 * lam1.unsqueeze(1)
    valid = torch.arange(y.shape[-1], device=x.device) < out_len.unsqueeze(1)
    return y * valid.unsqueeze(1).to(y.dtype), out_len
