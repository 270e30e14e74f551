"""ConvNeXt-1D block of the semantic encoder/decoder (Vocos-style, no layer scale in FlexiCodec)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ConvNeXtBlock(nn.Module):
    """Depthwise conv (k7) → LayerNorm(eps 1e-6) → Linear → GELU → Linear, plus residual.

    Keys: ``dwconv``, ``norm``, ``pwconv1``, ``pwconv2`` (and ``gamma`` when
    ``layer_scale_init_value > 0``). ``is_causal`` left-pads by 6 instead of 3/3.
    """

    def __init__(self, dim: int, intermediate_dim: int, layer_scale_init_value: float = 0.0,
                 is_causal: bool = False):
        super().__init__()
        self.is_causal = is_causal
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=0 if is_causal else 3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = (nn.Parameter(layer_scale_init_value * torch.ones(dim))
                      if layer_scale_init_value > 0 else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x
        if self.is_causal:
            x = F.pad(x, (6, 0))
        x = self.dwconv(x).transpose(1, 2)
        x = self.pwconv2(self.act(self.pwconv1(self.norm(x))))
        if self.gamma is not None:
            x = self.gamma * x
        return residual + x.transpose(1, 2)
