"""QueryTokenAggregator: merges the frames of each group into one token.

Each group's query (mean of its frames + a learned ``query_embedding``) is inserted right
after the group's last frame, e.g. groups {0,1,2},{3},{4,5} give
``f0 f1 f2 q0 f3 q1 f4 f5 q2``; the interleaved sequence goes through a RoPE transformer
and the outputs at the query positions are the tokens. Padded frames / groups are moved
to the end. The official code attends to them (no mask); with ``mask_padding=True`` they
are masked out as keys, so a batched item gives the same tokens as the item alone.
"""

from __future__ import annotations

import torch
from torch import nn

from .transformer import ProjectedTransformer


class QueryTokenAggregator(nn.Module):
    def __init__(self, dim: int, in_out_dim: int, num_heads: int, num_layers: int, dim_feedforward: int,
                 causal: bool = False, context_frames: int | None = 125, use_mean_pooling_init: bool = True):
        super().__init__()
        self.use_mean_pooling_init = use_mean_pooling_init
        if not use_mean_pooling_init:
            self.query_token = nn.Parameter(torch.randn(1, dim, 1))
        self.query_embedding = nn.Parameter(torch.randn(1, in_out_dim, 1))
        self.transformer = ProjectedTransformer(
            input_dimension=in_out_dim, output_dimensions=[in_out_dim], d_model=dim, conv_layout=True,
            num_heads=num_heads, num_layers=num_layers, dim_feedforward=dim_feedforward, causal=causal,
            context=context_frames, layer_scale=0.01, norm="layer_norm", positional_embedding="rope",
            max_period=10000)

    def forward(self, features: torch.Tensor, alignment: torch.Tensor, num_groups: torch.Tensor,
                mask_padding: bool = False) -> torch.Tensor:
        """
        features: ``[B, D, T]`` frames (trimmed to the alignment's T if longer).
        alignment: ``[B, G, T]`` one-hot float, ``alignment[b, g, t] = 1`` iff frame t is in group g.
        num_groups: ``[B]`` valid groups per item (groups ``>= num_groups`` are padding).
        Returns ``[B, D, G]`` tokens, zero for padded groups.
        """
        B, D, T = features.shape
        _, G, T_a = alignment.shape
        if T > T_a:
            features, T = features[..., :T_a], T_a
        if T != T_a:
            raise ValueError(f"features have {T} frames, alignment has {T_a}")
        device = features.device
        ar_t = torch.arange(T, device=device)
        ar_g = torch.arange(G, device=device)

        group_mask = ar_g < num_groups.unsqueeze(1)  # [B, G]
        last = (alignment * ar_t).max(dim=2).values  # [B, G] last frame of each group (float)
        frame_len = last.masked_fill(~group_mask, -1).max(dim=1).values + 1  # [B]
        frame_mask = ar_t < frame_len.unsqueeze(1)  # [B, T]

        # Destinations in the interleaved sequence: frame t moves right by the number of
        # valid groups ending before t; query g goes right after its group's last frame.
        last_valid = last.masked_fill(~group_mask, T + 1)
        frame_dest = ar_t + (last_valid.unsqueeze(2) < ar_t).sum(dim=1)
        query_dest = last + ar_g + 1

        if self.use_mean_pooling_init:
            alignment = alignment.to(features.dtype)
            summed = torch.einsum("bgt,bdt->bgd", alignment, features)
            counts = alignment.sum(dim=2).clamp(min=1)
            queries = (summed / counts.unsqueeze(-1)).transpose(1, 2) + self.query_embedding.expand(B, -1, G)
        else:
            queries = self.query_token.expand(B, -1, G)

        source = torch.cat([features, queries], dim=2)  # [B, D, T+G]
        dest = torch.cat([frame_dest, query_dest], dim=1)
        valid = torch.cat([frame_mask, group_mask], dim=1)
        dest = dest.masked_fill(~valid, T + G)
        perm = dest.argsort(dim=1, stable=True)
        interleaved = torch.gather(source, 2, perm.unsqueeze(1).expand(-1, D, -1))

        lengths = valid.sum(dim=1) if mask_padding else None
        out = self.transformer(interleaved, lengths)

        query_pos = perm.argsort(dim=1)[:, T:]  # inverse permutation at the query slots
        tokens = torch.gather(out, 2, query_pos.unsqueeze(1).expand(-1, out.shape[1], -1))
        return tokens.masked_fill(~group_mask.unsqueeze(1), 0.0)
