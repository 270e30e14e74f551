"""Non-streaming port of the Mimi transformer used by FlexiCodec (aggregators and bottleneck).

Pre-norm layers ``x + ls1·Attn(LN1(x))`` then ``x + ls2·W2·GELU(W1·LN2(x))``, no biases,
RoPE on *interleaved* channel pairs (2i, 2i+1). Keys match the official module
(``transformer.layers.{i}.self_attn.in_proj_weight`` ...). Additions over the official
code: an optional key-padding mask (``lengths``), and RoPE tables built once per call
instead of once per layer.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rope_tables(T: int, head_dim: int, max_period: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / sin ``[T, head_dim/2]`` for positions 0..T-1 (same float32 formula as Mimi)."""
    ds = torch.arange(head_dim // 2, device=device, dtype=torch.float32)
    freqs = torch.exp(ds * (-math.log(max_period) * 2 / head_dim))
    ts = torch.arange(T, device=device, dtype=torch.float32).view(-1, 1)
    return torch.cos(freqs * ts), torch.sin(freqs * ts)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``[B, H, T, D]`` with interleaved pairs; math in float32, result in x's dtype."""
    xr, xi = x.unflatten(-1, (-1, 2)).float().unbind(-1)
    out = torch.stack([xr * cos - xi * sin, xr * sin + xi * cos], dim=-1)
    return out.to(x.dtype).flatten(-2)


class LayerScale(nn.Module):
    def __init__(self, channels: int, init: float = 1e-4):
        super().__init__()
        self.scale = nn.Parameter(torch.full((channels,), init))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * x


class MultiheadSelfAttention(nn.Module):
    """Fused QKV projection (``in_proj_weight`` as a bare parameter), SDPA, ``out_proj``."""

    def __init__(self, embed_dim: int, num_heads: int, causal: bool = False, context: int | None = None):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"d_model {embed_dim} is not divisible by num_heads {num_heads}")
        self.embed_dim, self.num_heads = embed_dim, num_heads
        self.causal, self.context = causal, context
        self.in_proj_weight = nn.Parameter(nn.Linear(embed_dim, 3 * embed_dim, bias=False).weight.detach())
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                attn_mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = F.linear(x, self.in_proj_weight).view(B, T, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p=0.0)
        return self.out_proj(out.transpose(1, 2).reshape(B, T, self.embed_dim))


class TransformerLayer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, causal: bool = False,
                 context: int | None = None, layer_scale: float | None = None, norm: str = "layer_norm"):
        super().__init__()
        if norm != "layer_norm":
            raise ValueError(f"only norm='layer_norm' is used by FlexiCodec, got {norm!r}")
        self.self_attn = MultiheadSelfAttention(d_model, num_heads, causal, context)
        self.norm1 = nn.LayerNorm(d_model, eps=1e-5)
        self.norm2 = nn.LayerNorm(d_model, eps=1e-5)
        self.linear1 = nn.Linear(d_model, dim_feedforward, bias=False)
        self.linear2 = nn.Linear(dim_feedforward, d_model, bias=False)
        if layer_scale is None:
            self.layer_scale_1, self.layer_scale_2 = nn.Identity(), nn.Identity()
        else:
            self.layer_scale_1 = LayerScale(d_model, layer_scale)
            self.layer_scale_2 = LayerScale(d_model, layer_scale)

    def forward(self, x, rope=None, attn_mask=None):
        x = x + self.layer_scale_1(self.self_attn(self.norm1(x), rope, attn_mask))
        return x + self.layer_scale_2(self.linear2(F.gelu(self.linear1(self.norm2(x)))))


class Transformer(nn.Module):
    def __init__(self, d_model: int, num_heads: int, num_layers: int, dim_feedforward: int = 2048,
                 causal: bool = False, context: int | None = None, positional_embedding: str = "rope",
                 max_period: float = 10_000, layer_scale: float | None = None, norm: str = "layer_norm"):
        super().__init__()
        if positional_embedding not in ("rope", "none"):
            raise ValueError(f"positional_embedding {positional_embedding!r} is not used by FlexiCodec")
        self.use_rope = positional_embedding == "rope"
        self.max_period = max_period
        self.causal, self.context = causal, context
        self.head_dim = d_model // num_heads
        self.layers = nn.ModuleList(
            TransformerLayer(d_model, num_heads, dim_feedforward, causal, context, layer_scale, norm)
            for _ in range(num_layers))

    def attention_mask(self, T: int, lengths: torch.Tensor | None, device) -> torch.Tensor | None:
        """Boolean ``[B|1, 1, T, T]`` mask (True = attend), or None for full attention."""
        mask = None
        if self.causal:  # Mimi: key k visible to query q iff 0 <= q - k < context
            pos = torch.arange(T, device=device)
            delta = pos.view(-1, 1) - pos.view(1, -1)
            mask = delta >= 0
            if self.context is not None:
                mask = mask & (delta < self.context)
            mask = mask[None, None]
        if lengths is not None:
            keys = (torch.arange(T, device=device) < lengths.view(-1, 1))[:, None, None, :]
            mask = keys if mask is None else mask & keys
        return mask

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` ``[B, T, C]``; ``lengths`` ``[B]`` masks padded keys (official code: no mask)."""
        T = x.shape[1]
        rope = rope_tables(T, self.head_dim, self.max_period, x.device) if self.use_rope else None
        mask = self.attention_mask(T, lengths, x.device)
        for layer in self.layers:
            x = layer(x, rope, mask)
        return x


class ProjectedTransformer(nn.Module):
    """Channel-first (``[B, C, T]``) transformer with bias-free in/out projections when C != d_model."""

    def __init__(self, input_dimension: int, output_dimensions, d_model: int, *, conv_layout: bool = True,
                 **kwargs):
        super().__init__()
        self.transformer = Transformer(d_model=d_model, **kwargs)
        self.conv_layout = conv_layout
        self.input_proj = nn.Linear(input_dimension, d_model, bias=False) if d_model != input_dimension else None
        self.output_projs = nn.ModuleList(
            nn.Identity() if d_model == d else nn.Linear(d_model, d, bias=False) for d in output_dimensions)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor | None = None) -> torch.Tensor:
        if self.conv_layout:
            x = x.transpose(1, 2)
        if self.input_proj is not None:
            x = self.input_proj(x)
        y = self.output_projs[0](self.transformer(x, lengths))
        return y.transpose(1, 2) if self.conv_layout else y
