"""Scale-invariant SDR over each item's true length (validation metric, or a negated loss)."""

from __future__ import annotations

import torch
from torch import Tensor

from flexitrain.losses.masking import lengths_to_mask


def si_sdr(pred: Tensor, target: Tensor, lengths: Tensor | None = None, eps: float = 1e-8) -> Tensor:
    """Per-item SI-SDR in dB, ``[B]``; audio ``[B, T]`` or ``[B, 1, T]``, padding beyond ``lengths`` ignored.

    Both signals are made zero-mean over the item, then ``10·log10(|αs|² / |αs − ŝ|²)`` with
    ``α = <ŝ, s> / |s|²`` (Le Roux et al., 2019). Computed in fp32.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must match; trim first")
    pred = pred.reshape(pred.shape[0], -1).float()
    target = target.reshape(target.shape[0], -1).float()
    if lengths is None:
        mask = torch.ones_like(pred)
    else:
        mask = lengths_to_mask(torch.as_tensor(lengths, device=pred.device), pred.shape[-1]).float()
    count = mask.sum(-1, keepdim=True).clamp(min=1.0)
    pred = (pred - (pred * mask).sum(-1, keepdim=True) / count) * mask
    target = (target - (target * mask).sum(-1, keepdim=True) / count) * mask
    alpha = (pred * target).sum(-1, keepdim=True) / (target.pow(2).sum(-1, keepdim=True) + eps)
    projection = alpha * target
    noise = projection - pred
    return 10 * torch.log10((projection.pow(2).sum(-1) + eps) / (noise.pow(2).sum(-1) + eps))
