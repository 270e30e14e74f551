"""Building blocks of the AR text-to-token model: causal pre-LN Transformer blocks with Transformer-XL
relative positions (ESPnet "rel_pos_espnet"), written to match CosyVoice-1 / FlexiCodec-TTS numerics and
parameter names (``self_attn.linear_q``, ``pos_bias_u``, ``feed_forward.w_1``, ...).

Both encoders of the model are causal (the official ``static_chunk_size=1``), so only relative distances
>= 0 are ever attended to; the position table is built for those alone, which halves the attention-bias
memory of the official 2T-1 table without changing any unmasked score.

Decoding has two caches: the growing one of ``forward_chunk`` (a list of per-layer (keys, values), extended by
torch.cat each call) and ``StaticKVCache`` (buffers allocated once, one column written per step by
``forward_static`` at a position held in a device tensor, attention over the buffer with a position mask),
whose steps all have the same shapes, as CUDA graphs need. Training (``forward``) uses neither.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# One layer's key/value cache: (keys, values), each [B, heads, cached_len, d_head].
LayerCache = tuple[torch.Tensor, torch.Tensor]


def relative_position_table(length: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Sinusoid of the relative distances 0..length-1 -> [length, dim] (ESPnet's positive half)."""
    position = torch.arange(length, dtype=torch.float32, device=device).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))
    table = torch.zeros(length, dim, device=device)
    table[:, 0::2] = torch.sin(position * div_term)
    table[:, 1::2] = torch.cos(position * div_term)
    return table.to(dtype) if dtype is not None else table


class RelPositionMultiHeadedAttention(nn.Module):
    """Multi-head self-attention with Transformer-XL relative positions (learned u/v biases)."""

    def __init__(self, n_head: int, n_feat: int, dropout_rate: float):
        super().__init__()
        if n_feat % n_head:
            raise ValueError(f"model dim {n_feat} is not divisible by {n_head} heads")
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.dropout = nn.Dropout(dropout_rate)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.empty(self.h, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.empty(self.h, self.d_k))
        nn.init.xavier_uniform_(self.pos_bias_u)
        nn.init.xavier_uniform_(self.pos_bias_v)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, dk]
        return x.view(x.size(0), x.size(1), self.h, self.d_k).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                cache: LayerCache | None = None) -> tuple[torch.Tensor, LayerCache]:
        """x [B, T1, D]; mask [B or 1, T1, T2] bool (True = may attend; T2 = cached + T1);
        pos [T2, D] table of relative distances 0..T2-1 (already dropped out)."""
        q = self._heads(self.linear_q(x))
        k, v = self._heads(self.linear_k(x)), self._heads(self.linear_v(x))
        if cache is not None:
            k, v = torch.cat([cache[0], k], dim=2), torch.cat([cache[1], v], dim=2)
        t1, t2 = q.size(2), k.size(2)
        p = self.linear_pos(pos).view(t2, self.h, self.d_k).transpose(0, 1)  # [H, T2, dk]
        u = self.pos_bias_u.unsqueeze(1)  # [H, 1, dk]
        matrix_ac = torch.matmul(q + u, k.transpose(-2, -1))
        by_distance = torch.matmul(q + self.pos_bias_v.unsqueeze(1), p.transpose(-2, -1))  # [B, H, T1, T2(dist)]
        # score[i, j] reads distance (query position - key position); negative distances are masked anyway.
        query_pos = torch.arange(t2 - t1, t2, device=x.device).unsqueeze(1)
        distance = (query_pos - torch.arange(t2, device=x.device)).clamp(min=0)
        matrix_bd = torch.gather(by_distance, 3, distance.expand(*by_distance.shape[:2], t1, t2))
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        scores = scores.masked_fill(~mask.unsqueeze(1), float("-inf"))
        attn = self.dropout(torch.softmax(scores, dim=-1))
        out = torch.matmul(attn, v).transpose(1, 2).reshape(x.size(0), t1, self.h * self.d_k)
        return self.linear_out(out), (k, v)

    def forward_static(self, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, pos: torch.Tensor,
                       position: torch.Tensor, mask: torch.Tensor, distance: torch.Tensor) -> torch.Tensor:
        """One new position per row against static buffers (incremental decoding with fixed shapes).

        x [B, 1, D]; keys/values [B, H, S, dk] buffers, this position's key/value is written at ``position``
        (a one-element long tensor, never a host int) in place, and attention reads the first W columns,
        W = ``mask.size(-1)``; pos [H, S, dk] = ``linear_pos`` of the distances 0..S-1 (``static_positions``);
        mask [B, 1, 1, W] bool (True = may attend); distance [W] long = position - key column, clamped at 0.
        Same arithmetic as ``forward`` with a cache; masked columns add exact zeros (an -inf score), so only
        the summation order over W instead of the valid columns differs (a few ulp)."""
        b, w = x.size(0), mask.size(-1)
        q = self._heads(self.linear_q(x))
        keys.index_copy_(2, position, self._heads(self.linear_k(x)))
        values.index_copy_(2, position, self._heads(self.linear_v(x)))
        k, v = keys[:, :, :w], values[:, :, :w]
        matrix_ac = torch.matmul(q + self.pos_bias_u.unsqueeze(1), k.transpose(-2, -1))  # [B, H, 1, W]
        by_distance = torch.matmul(q + self.pos_bias_v.unsqueeze(1), pos[:, :w].transpose(-2, -1))
        matrix_bd = torch.gather(by_distance, 3, distance.expand(b, self.h, 1, w))
        scores = (matrix_ac + matrix_bd) / math.sqrt(self.d_k)
        attn = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(b, 1, self.h * self.d_k)
        return self.linear_out(out)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout_rate: float, activation: nn.Module):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.activation = activation
        self.dropout = nn.Dropout(dropout_rate)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(self.dropout(self.activation(self.w_1(x))))


class _PreLNBlock(nn.Module):
    """x + att(norm(x)); x + ffn(norm(x)). Subclasses only name the two norms like the official classes."""

    attn_norm: nn.LayerNorm
    ff_norm: nn.LayerNorm

    def __init__(self, dim: int, heads: int, ffn: int, activation: nn.Module, dropout_rate: float,
                 attention_dropout_rate: float):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, dim, attention_dropout_rate)
        self.feed_forward = PositionwiseFeedForward(dim, ffn, dropout_rate, activation)
        self.dropout = nn.Dropout(dropout_rate)

    def forward(self, x, mask, pos, cache: LayerCache | None = None):
        att, cache = self.self_attn(self.attn_norm(x), mask, pos, cache)
        x = x + self.dropout(att)
        x = x + self.dropout(self.feed_forward(self.ff_norm(x)))
        return x, cache

    def forward_static(self, x, keys, values, pos, position, mask, distance):
        x = x + self.self_attn.forward_static(self.attn_norm(x), keys, values, pos, position, mask, distance)
        return x + self.feed_forward(self.ff_norm(x))


class LMBlock(_PreLNBlock):
    """CosyVoice ``TransformerEncoderLayer`` (norm1 before attention, norm2 before the FFN)."""

    def __init__(self, dim, heads, ffn, activation, dropout_rate, attention_dropout_rate):
        super().__init__(dim, heads, ffn, activation, dropout_rate, attention_dropout_rate)
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)

    @property
    def attn_norm(self):
        return self.norm1

    @property
    def ff_norm(self):
        return self.norm2


class TextEncoderBlock(_PreLNBlock):
    """CosyVoice ``ConformerEncoderLayer`` with macaron and convolution off: the same pre-LN block whose
    norms are called norm_mha / norm_ff."""

    def __init__(self, dim, heads, ffn, activation, dropout_rate, attention_dropout_rate):
        super().__init__(dim, heads, ffn, activation, dropout_rate, attention_dropout_rate)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-5)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-5)

    @property
    def attn_norm(self):
        return self.norm_mha

    @property
    def ff_norm(self):
        return self.norm_ff


class CausalRelPosEncoder(nn.Module):
    """Stack of causal pre-LN blocks: input scaled by sqrt(dim) (ESPnet positional module), blocks, after_norm.

    ``forward`` runs padded batches with a causal + key-padding mask; ``forward_chunk`` appends new positions
    to a key/value cache (incremental decoding) and gives the same numbers as a full forward.
    """

    def __init__(self, block: type[_PreLNBlock], dim: int, heads: int, ffn: int, num_blocks: int,
                 activation: str, dropout_rate: float, positional_dropout_rate: float,
                 attention_dropout_rate: float):
        super().__init__()
        act = {"relu": nn.ReLU, "swish": nn.SiLU, "silu": nn.SiLU, "gelu": nn.GELU}
        if activation not in act:
            raise ValueError(f"activation must be one of {sorted(act)}, got {activation!r}")
        self.dim = dim
        self.xscale = math.sqrt(dim)
        self.pos_dropout = nn.Dropout(positional_dropout_rate)
        self.encoders = nn.ModuleList(
            block(dim, heads, ffn, act[activation](), dropout_rate, attention_dropout_rate)
            for _ in range(num_blocks))
        self.after_norm = nn.LayerNorm(dim, eps=1e-5)

    def _positions(self, length: int, like: torch.Tensor) -> torch.Tensor:
        return self.pos_dropout(relative_position_table(length, self.dim, like.device, like.dtype))

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """x [B, T, D], lengths [B] -> [B, T, D] (rows past each length are garbage, as in the original)."""
        t = x.size(1)
        steps = torch.arange(t, device=x.device)
        mask = (steps.unsqueeze(1) >= steps) & (steps < lengths.to(x.device).unsqueeze(1)).unsqueeze(1)
        x, pos = self.pos_dropout(x * self.xscale), self._positions(t, x)
        for layer in self.encoders:
            x, _ = layer(x, mask, pos)
        return self.after_norm(x)

    def forward_chunk(self, x: torch.Tensor, cache: list[LayerCache] | None = None,
                      offsets: torch.Tensor | None = None) -> tuple[torch.Tensor, list[LayerCache]]:
        """x [B, T1, D] new positions after the cached ones -> (output [B, T1, D], new cache).

        ``offsets`` [B] (optional) is for left-padded batches: item b's first ``offsets[b]`` positions
        (cached + new) are padding. No position attends to them except each padding position to itself,
        which keeps its row finite (an all-masked softmax is NaN, and 0 x NaN in the value product would
        poison the valid rows). Attention depends only on relative distances, so an item's valid outputs
        equal those of the same item decoded alone. None: every position is valid (batch-of-one decoding).
        """
        cached = 0 if cache is None else cache[0][0].size(2)
        t2 = cached + x.size(1)
        steps = torch.arange(t2, device=x.device)
        mask = (steps[cached:].unsqueeze(1) >= steps).unsqueeze(0)  # causal [1, T1, T2]
        if offsets is not None:
            valid_key = steps >= offsets.to(x.device).unsqueeze(1)  # [B, T2]
            itself = steps[cached:].unsqueeze(1) == steps  # [T1, T2]
            mask = mask & (valid_key.unsqueeze(1) | itself)
        x, pos = self.pos_dropout(x * self.xscale), self._positions(t2, x)
        new_cache = []
        for i, layer in enumerate(self.encoders):
            x, layer_cache = layer(x, mask, pos, None if cache is None else cache[i])
            new_cache.append(layer_cache)
        return self.after_norm(x), new_cache

    # ---- static-shape incremental decoding (sampling.py): buffers allocated once, every step the same shapes
    def static_positions(self, length: int, like: torch.Tensor) -> list[torch.Tensor]:
        """Per layer ``linear_pos`` of the distances 0..length-1 as [H, length, dk]: computed once per
        generation instead of once per step and layer."""
        table = relative_position_table(length, self.dim, like.device, like.dtype)
        out = []
        for layer in self.encoders:
            att = layer.self_attn
            out.append(att.linear_pos(table).view(length, att.h, att.d_k).transpose(0, 1).contiguous())
        return out

    def forward_static(self, x: torch.Tensor, cache: "StaticKVCache", position: torch.Tensor,
                       window: int | None = None) -> torch.Tensor:
        """x [B, 1, D]: the input at column ``position`` ([1] long tensor on x's device) -> output [B, 1, D];
        writes the position's keys/values into ``cache`` in place. Attends over the first ``window`` columns
        (default: all S; a smaller window must exceed the position, e.g. a host-side bucket of it), masking
        columns after ``position`` and each row's left padding (``cache.offsets``). Decoding only (no dropout)."""
        if self.training:
            raise RuntimeError("forward_static is for decoding: call eval() first")
        w = cache.length if window is None else window
        steps = cache.steps[:w]
        valid = steps <= position  # [W]
        if cache.offsets is not None:
            valid = valid & (steps >= cache.offsets.unsqueeze(1))  # [B, W]
        mask = valid.view(-1, 1, 1, w)
        distance = (position - steps).clamp(min=0)
        x = x * self.xscale
        for i, layer in enumerate(self.encoders):
            x = layer.forward_static(x, cache.keys[i], cache.values[i], cache.pos[i], position, mask, distance)
        return self.after_norm(x)


class StaticKVCache:
    """Static-shape key/value cache of a ``CausalRelPosEncoder`` for B rows and S columns: per layer key and
    value buffers [B, H, S, dk] (zeros: masked columns must hold finite values, 0 x inf is NaN), the per-layer
    relative-position projections [H, S, dk], the column indices 0..S-1 and optional left-padding offsets [B]
    (row b's columns < offsets[b] are padding). Allocated once per generation; ``load`` copies a
    ``forward_chunk`` cache (the prefix) into the first columns; ``forward_static`` then writes one column per
    step, so every step runs with identical shapes (CUDA graphs, ``torch.compile(mode="reduce-overhead")``)."""

    def __init__(self, encoder: CausalRelPosEncoder, batch: int, length: int, like: torch.Tensor,
                 offsets: torch.Tensor | None = None):
        att = encoder.encoders[0].self_attn
        shape = (batch, att.h, length, att.d_k)
        self.length = length
        self.keys = [torch.zeros(shape, device=like.device, dtype=like.dtype) for _ in encoder.encoders]
        self.values = [torch.zeros(shape, device=like.device, dtype=like.dtype) for _ in encoder.encoders]
        self.pos = encoder.static_positions(length, like)
        self.steps = torch.arange(length, device=like.device)
        self.offsets = None if offsets is None else offsets.to(like.device).clone()

    def refresh(self, encoder: CausalRelPosEncoder, offsets: torch.Tensor | None = None) -> None:
        """Ready for another generation of the same shapes, in place (addresses kept, e.g. for CUDA graphs):
        the position projections recomputed (the weights may have changed), the offsets replaced. Old keys and
        values stay: finite, and masked until overwritten."""
        if (offsets is None) != (self.offsets is None):
            raise ValueError("refresh: offsets must be given exactly when the cache was built with offsets")
        for p, new in zip(self.pos, encoder.static_positions(self.length, self.keys[0])):
            p.copy_(new)
        if offsets is not None:
            self.offsets.copy_(offsets)

    def load(self, cache: list[LayerCache]) -> int:
        """Copy a growing cache (e.g. of the prefix) into columns 0..T-1 -> T."""
        t = cache[0][0].size(2)
        if t > self.length:
            raise ValueError(f"a cache of {t} positions does not fit a static cache of {self.length}")
        for (k, v), keys, values in zip(cache, self.keys, self.values):
            keys[:, :, :t].copy_(k)
            values[:, :, :t].copy_(v)
        return t

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer (e.g. for ``torch._dynamo.mark_static_address``)."""
        extra = [] if self.offsets is None else [self.offsets]
        return [*self.keys, *self.values, *self.pos, self.steps, *extra]


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0,
               ignore_index: int = -100) -> torch.Tensor:
    """Mean over targets of alpha * (1 - p_t)^gamma * CE (the official duration objective); targets equal
    to ``ignore_index`` count for nothing (their CE is 0, so p_t = 1 and the term vanishes)."""
    ce = F.cross_entropy(logits, targets, reduction="none", ignore_index=ignore_index)
    pt = torch.exp(-ce)
    count = (targets != ignore_index).sum().clamp(min=1)
    return (alpha * (1 - pt) ** gamma * ce).sum() / count
