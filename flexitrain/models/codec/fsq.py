"""Finite scalar quantiser (FSQ) of the semantic stream, with the official constants.

Keys: ``semantic_vq.fsq.project_in.*`` / ``semantic_vq.fsq.project_out.*``; the level,
basis and implicit-codebook buffers are non-persistent, as in the official module.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class FSQ(nn.Module):
    def __init__(self, levels: Sequence[int], dim: int | None = None, num_codebooks: int = 1,
                 keep_num_codebooks_dim: bool | None = None, scale: float | None = None):
        super().__init__()
        levels = list(levels)
        self.register_buffer("_levels", torch.tensor(levels, dtype=torch.int32), persistent=False)
        self.register_buffer("_basis", torch.cumprod(torch.tensor([1] + levels[:-1]), 0, dtype=torch.int32),
                             persistent=False)
        self.scale = scale
        self.codebook_dim = len(levels)
        self.num_codebooks = num_codebooks
        self.effective_codebook_dim = self.codebook_dim * num_codebooks
        if keep_num_codebooks_dim is None:
            keep_num_codebooks_dim = num_codebooks > 1
        if num_codebooks > 1 and not keep_num_codebooks_dim:
            raise ValueError("FSQ with num_codebooks > 1 needs keep_num_codebooks_dim")
        self.keep_num_codebooks_dim = keep_num_codebooks_dim
        self.dim = dim if dim is not None else self.effective_codebook_dim
        self.has_projections = self.dim != self.effective_codebook_dim
        if self.has_projections:
            self.project_in = nn.Linear(self.dim, self.effective_codebook_dim)
            self.project_out = nn.Linear(self.effective_codebook_dim, self.dim)
        else:
            self.project_in = nn.Identity()
            self.project_out = nn.Identity()
        self.codebook_size = math.prod(levels)

    def bound(self, z: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
        levels = self._levels
        half_l = (levels - 1) * (1 - eps) / 2
        offset = torch.where(levels % 2 == 0, 0.5, 0.0)
        shift = (offset / half_l).tan()
        return (z + shift).tanh() * half_l - offset

    def quantize(self, z: torch.Tensor) -> torch.Tensor:
        """→ values on the grid, normalised to [-1, 1) (straight-through round)."""
        bounded = self.bound(z)
        quantized = bounded + (bounded.round() - bounded).detach()
        return quantized / (self._levels // 2)

    def codes_to_indices(self, zhat: torch.Tensor) -> torch.Tensor:
        half_width = self._levels // 2
        return ((zhat * half_width + half_width) * self._basis).sum(dim=-1).to(torch.int32)

    def indices_to_codes(self, indices: torch.Tensor, project_out: bool = True) -> torch.Tensor:
        """``[..., C]`` (or ``[...]`` with one codebook) indices → ``[..., dim]``."""
        half_width = self._levels // 2
        digits = (indices.unsqueeze(-1) // self._basis) % self._levels
        codes = (digits - half_width) / half_width
        if self.keep_num_codebooks_dim:
            codes = codes.flatten(-2)
        return self.project_out(codes) if project_out else codes

    def forward(self, z: torch.Tensor):
        """``[B, N, dim]`` → (``[B, N, dim]`` quantised, indices ``[B, N]`` or ``[B, N, C]`` int32)."""
        if z.shape[-1] != self.dim:
            raise ValueError(f"expected dimension {self.dim}, got {z.shape[-1]}")
        z = self.project_in(z)
        z = z.unflatten(-1, (self.num_codebooks, self.codebook_dim))
        codes = self.quantize(z)
        indices = self.codes_to_indices(codes)
        out = self.project_out(codes.flatten(-2))
        if not self.keep_num_codebooks_dim:
            indices = indices.squeeze(-1)
        return out, indices


class FSQWrapper(nn.Module):
    """Channel-first wrapper: ``[B, D, G]`` → (quantised ``[B, D, G]``, codes ``[B, C, G]`` int32)."""

    def __init__(self, input_dim: int, levels: Sequence[int] = (8, 8, 8, 8, 8), num_codebooks: int = 1, **kwargs):
        super().__init__()
        self.input_dim = input_dim
        self.fsq = FSQ(levels=levels, dim=input_dim, num_codebooks=num_codebooks, **kwargs)

    @property
    def codebook_size(self) -> int:
        return self.fsq.codebook_size

    def forward(self, x: torch.Tensor):
        zq, indices = self.fsq(x.transpose(1, 2))
        indices = indices.transpose(1, 2) if self.fsq.num_codebooks > 1 else indices.unsqueeze(1)
        return zq.transpose(1, 2), indices

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, C, G]`` codes → ``[B, D, G]``."""
        indices = codes.transpose(1, 2) if self.fsq.num_codebooks > 1 else codes.squeeze(1)
        return self.fsq.indices_to_codes(indices).transpose(1, 2)
