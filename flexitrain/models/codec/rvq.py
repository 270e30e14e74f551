"""Residual vector quantiser of DAC (factorised, L2-normalised code lookup).

Code lookup rules of the official code, kept bit-exact:
- nearest neighbour of the L2-normalised projection among the L2-normalised codebook rows,
  scored with the full expanded squared distance ``|e|² - 2 e·c + |c|²``;
- the quantised vector is the *raw* codebook row, passed through the straight-through
  expression ``z_e + (z_q - z_e).detach()`` before ``out_proj`` (this is not bit-identical
  to ``z_q`` and the residual of the next stage depends on it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .layers import WNConv1d


class VectorQuantize(nn.Module):
    def __init__(self, input_dim: int, codebook_size: int, codebook_dim: int):
        super().__init__()
        self.codebook_size = codebook_size
        self.codebook_dim = codebook_dim
        self.in_proj = WNConv1d(input_dim, codebook_dim, kernel_size=1)
        self.out_proj = WNConv1d(codebook_dim, input_dim, kernel_size=1)
        self.codebook = nn.Embedding(codebook_size, codebook_dim)

    def nearest(self, z_e: torch.Tensor) -> torch.Tensor:
        """``[B, d, T]`` projected latents → ``[B, T]`` int64 code indices."""
        B, d, T = z_e.shape
        enc = F.normalize(z_e.transpose(1, 2).reshape(B * T, d))
        cb = F.normalize(self.codebook.weight)
        dist = enc.pow(2).sum(1, keepdim=True) - 2 * enc @ cb.t() + cb.pow(2).sum(1, keepdim=True).t()
        return (-dist).max(1)[1].view(B, T)

    def lookup(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, T]`` codes → raw codebook rows ``[B, d, T]``."""
        return F.embedding(codes, self.codebook.weight).transpose(1, 2)

    def forward(self, z: torch.Tensor, loss_mask: torch.Tensor | None = None):
        """Returns ``(out [B,D,T], commitment [B], codebook_loss [B], codes [B,T], z_e [B,d,T])``.
        ``loss_mask`` (``[T]`` or ``[B, T]`` bool): the losses average over these positions only."""
        z_e = self.in_proj(z)
        codes = self.nearest(z_e)
        z_q = self.lookup(codes)
        commitment = _mean_over(F.mse_loss(z_e, z_q.detach(), reduction="none"), loss_mask)
        codebook = _mean_over(F.mse_loss(z_q, z_e.detach(), reduction="none"), loss_mask)
        z_q = z_e + (z_q - z_e).detach()  # straight-through; numerically part of the official output
        return self.out_proj(z_q), commitment, codebook, codes, z_e


def _mean_over(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Per-item mean of ``values`` ``[B, d, T]`` over d and the positions where ``mask`` (``[T]`` / ``[B, T]``)
    is True (all if None); no host read."""
    if mask is None:
        return values.mean([1, 2])
    m = mask.expand(values.shape[0], values.shape[-1]).unsqueeze(1).to(values.dtype)
    count = (m.sum([1, 2]) * values.shape[1]).clamp(min=1)
    return (values * m).sum([1, 2]) / count


@dataclass
class RVQOutput:
    quantized: torch.Tensor  # [B, D, T] sum of the (per-item masked) stage outputs
    codes: torch.Tensor  # [B, n_stages_run, T] int64
    latents: torch.Tensor  # [B, n_stages_run * codebook_dim, T] projected latents (pre-quantisation)
    commitment_loss: torch.Tensor  # scalar: Σ_stages mean_b(mask · MSE(z_e, sg(z_q)))
    codebook_loss: torch.Tensor  # scalar: Σ_stages mean_b(mask · MSE(z_q, sg(z_e)))
    n_quantizers: torch.Tensor  # [B] number of stages that count for each item


class ResidualVectorQuantize(nn.Module):
    def __init__(self, input_dim: int = 512, n_codebooks: int = 9, codebook_size: int = 1024,
                 codebook_dim=8, quantizer_dropout: float = 0.0):
        super().__init__()
        if isinstance(codebook_dim, int):
            codebook_dim = [codebook_dim] * n_codebooks
        self.n_codebooks = n_codebooks
        self.codebook_dim = list(codebook_dim)
        self.codebook_size = codebook_size
        self.quantizer_dropout = float(quantizer_dropout)
        self.quantizers = nn.ModuleList(
            VectorQuantize(input_dim, codebook_size, codebook_dim[i]) for i in range(n_codebooks))

    def forward(self, z: torch.Tensor, n_quantizers: int | None = None, dropout: bool = False,
                loss_mask: torch.Tensor | None = None) -> RVQOutput:
        """Quantise ``z`` ``[B, D, T]``. ``loss_mask`` (``[T]`` or ``[B, T]`` bool): the commitment and codebook
        losses average over these positions only (all if None); the codes and outputs cover every position.

        ``dropout=False``: the first ``n_quantizers`` stages (all if None) for every item.
        ``dropout=True`` (training): all stages up to ``n_quantizers`` run, and the first
        ``int(B * quantizer_dropout)`` items keep a random number in ``[1, n_quantizers]``
        of them (official DAC quantizer dropout); stage outputs and losses are masked per item.
        """
        B = z.shape[0]
        n_max = self.n_codebooks if n_quantizers is None else int(n_quantizers)
        if not 0 < n_max <= self.n_codebooks:
            raise ValueError(f"n_quantizers must be in [1, {self.n_codebooks}], got {n_quantizers}")
        n_q = torch.full((B,), n_max, device=z.device, dtype=torch.long)
        if dropout:
            n_drop = int(B * self.quantizer_dropout)
            if n_drop:
                rand = torch.randint(1, n_max + 1, (B,), device=z.device)
                n_q[:n_drop] = rand[:n_drop]
        quantized = 0
        residual = z
        commitment = z.new_zeros(())
        codebook = z.new_zeros(())
        codes, latents = [], []
        for i in range(n_max):
            out_i, com_i, cb_i, codes_i, z_e_i = self.quantizers[i](residual, loss_mask)
            if dropout:
                mask = (i < n_q).to(z.dtype)
                quantized = quantized + out_i * mask[:, None, None]
                commitment = commitment + (com_i * mask).mean()
                codebook = codebook + (cb_i * mask).mean()
            else:
                quantized = quantized + out_i
                commitment = commitment + com_i.mean()
                codebook = codebook + cb_i.mean()
            residual = residual - out_i
            codes.append(codes_i)
            latents.append(z_e_i)
        return RVQOutput(quantized, torch.stack(codes, 1), torch.cat(latents, 1), commitment, codebook, n_q)

    def from_codes(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, n, T]`` codes of the first n stages → ``[B, D, T]`` (Σ out_proj(codebook row))."""
        if codes.shape[1] > self.n_codebooks:
            raise ValueError(f"got {codes.shape[1]} code streams, the RVQ has {self.n_codebooks}")
        z_q = 0.0
        for i in range(codes.shape[1]):
            q = self.quantizers[i]
            z_q = z_q + q.out_proj(q.lookup(codes[:, i]))
        return z_q
