"""Optional REPA-style alignment of the bottleneck output (codec.md §3.7).

The official loss is ``MSE(target, repa_mlp(bottleneck))`` with a target that is *not* detached,
so gradients reach the encoder through it (§7 item 11). Here the target is always detached.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from flexitrain.losses.masking import masked_mean, masked_mse


def build_repa_mlp(dim: int = 512, hidden: int = 1536) -> nn.Sequential:
    """``Linear(dim, hidden) - GELU - Linear(hidden, dim)``; as attribute ``repa_mlp`` its keys are
    the official ``repa_mlp.0.*`` ``[1536, 512]`` and ``repa_mlp.2.*`` ``[512, 1536]``."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


def repa_loss(pred: Tensor, target: Tensor, mask: Tensor | None = None, kind: str = "mse") -> Tensor:
    """Align ``pred [B, C, T]`` (the MLP output) with ``sg(target) [B, C, T]`` over ``mask [B, T]``.

    ``kind="mse"`` (official) or ``"cosine"`` (1 − cosine similarity per frame, as in REPA).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ in shape")
    target = target.detach()
    if kind == "mse":
        return masked_mse(pred, target, mask)
    if kind == "cosine":
        return masked_mean(1 - F.cosine_similarity(pred, target, dim=1), mask)
    raise ValueError(f"repa loss kind must be 'mse' or 'cosine', got {kind!r}")
