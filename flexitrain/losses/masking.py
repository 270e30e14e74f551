"""Masked reductions shared by the codec losses (padding must never count)."""

from __future__ import annotations

import torch
from torch import Tensor


def lengths_to_mask(lengths: Tensor, max_len: int) -> Tensor:
    """Boolean ``[B, max_len]`` mask, True inside each item."""
    lengths = torch.as_tensor(lengths)
    if lengths.dim() != 1:
        raise ValueError(f"lengths must be 1-D [B], got shape {tuple(lengths.shape)}")
    return torch.arange(max_len, device=lengths.device).unsqueeze(0) < lengths.unsqueeze(1)


def _broadcast_mask(mask: Tensor, values: Tensor) -> Tensor:
    """``[B, T]`` mask against ``[B, ..., T]`` values (channels in between, as ``[B, C, T]``)."""
    if mask.dim() != 2 or mask.shape[0] != values.shape[0] or mask.shape[1] != values.shape[-1]:
        raise ValueError(
            f"mask must be [B, T] = [{values.shape[0]}, {values.shape[-1]}] for values of shape "
            f"{tuple(values.shape)}, got {tuple(mask.shape)}"
        )
    return mask.view(mask.shape[0], *([1] * (values.dim() - 2)), mask.shape[1])


def masked_mean(values: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean of ``values [B, ..., T]`` over positions where ``mask [B, T]`` is True (all if None).

    Every unmasked element has the same weight, so an item's contribution does not depend on
    how much padding the batch has. Returns 0 (with grad) if nothing is unmasked.
    """
    if mask is None:
        return values.mean()
    m = _broadcast_mask(mask, values).to(values.dtype)
    per_position = values.numel() // (values.shape[0] * values.shape[-1])
    count = (m.sum() * per_position).clamp(min=1.0)
    return (values * m).sum() / count


def masked_mse(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return masked_mean((pred - target).pow(2), mask)


def masked_l1(pred: Tensor, target: Tensor, mask: Tensor | None = None) -> Tensor:
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    return masked_mean((pred - target).abs(), mask)
