"""SenseVoiceSmall SAN-M encoder (FunASR ``SenseVoiceEncoderSmall``), inference only, with padding masks.

Module and parameter names follow FunASR so ``model.pt`` loads key for key:
``encoders0.0.*`` (input_size -> d, no attention residual), ``encoders.{i}.*`` (d -> d), ``after_norm``.
The ``tp_encoders``/``tp_norm`` stack (used only for CTC) is not built; the teacher loader
accepts and drops those keys. Output is ``after_norm(...)`` = FunASR's ``hidden_out``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SANMEncoder", "SANMLayer", "sinusoidal_positions"]


def sinusoidal_positions(length: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """FunASR ``SinusoidalPositionEncoder``: positions 1..length, ``[sin | cos]`` concatenated
    (not interleaved), inverse timescales ``exp(-i * ln(1e4) / (dim/2 - 1))``. Shape ``[length, dim]``."""
    # torch.full, not torch.tensor: made on the device (a tensor from host data is a blocking copy on a GPU).
    increment = torch.log(torch.full((1,), 10000.0, dtype=dtype, device=device)) / (dim / 2 - 1)
    inv = torch.exp(torch.arange(dim / 2, device=device).to(dtype) * -increment)
    t = torch.arange(1, length + 1, device=device).to(dtype)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=-1)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 (as FunASR's), cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps).type_as(x)


class SANMAttention(nn.Module):
    """Multi-head self-attention plus an FSMN memory (depthwise conv over V) added to its output."""

    def __init__(self, in_size: int, size: int, heads: int, kernel_size: int, sanm_shift: int = 0):
        super().__init__()
        if size % heads:
            raise ValueError(f"output_size {size} is not divisible by attention_heads {heads}")
        self.size, self.heads = size, heads
        self.linear_q_k_v = nn.Linear(in_size, 3 * size)
        self.linear_out = nn.Linear(size, size)
        self.fsmn_block = nn.Conv1d(size, size, kernel_size, groups=size, bias=False)
        left = (kernel_size - 1) // 2 + max(sanm_shift, 0)
        self.fsmn_pad = (left, kernel_size - 1 - left)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x ``[B, T, in]``, mask ``[B, T]`` bool (True = valid)."""
        b, t, _ = x.shape
        q, k, v = self.linear_q_k_v(x).split(self.size, dim=-1)
        # FSMN: zero padded frames before and after the conv so they never leak into valid ones.
        keep = mask[..., None].to(v.dtype)
        v_masked = v * keep
        mem = F.conv1d(F.pad(v_masked.transpose(1, 2), self.fsmn_pad), self.fsmn_block.weight, groups=self.size)
        mem = (mem.transpose(1, 2) + v_masked) * keep

        def heads(z):
            return z.reshape(b, t, self.heads, -1).transpose(1, 2)

        att = F.scaled_dot_product_attention(heads(q), heads(k), heads(v), attn_mask=mask[:, None, None, :])
        att = att.transpose(1, 2).reshape(b, t, self.size)
        return self.linear_out(att) + mem


class FeedForward(nn.Module):
    def __init__(self, size: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(size, hidden)
        self.w_2 = nn.Linear(hidden, size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(torch.relu(self.w_1(x)))


class SANMLayer(nn.Module):
    """Pre-norm SAN-M block; the attention residual exists only when ``in_size == size``."""

    def __init__(self, in_size: int, size: int, heads: int, linear_units: int, kernel_size: int, sanm_shift: int = 0):
        super().__init__()
        self.self_attn = SANMAttention(in_size, size, heads, kernel_size, sanm_shift)
        self.feed_forward = FeedForward(size, linear_units)
        self.norm1 = LayerNorm32(in_size)
        self.norm2 = LayerNorm32(size)
        self.residual = in_size == size

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        att = self.self_attn(self.norm1(x), mask)
        x = x + att if self.residual else att
        return x + self.feed_forward(self.norm2(x))


class SANMEncoder(nn.Module):
    """``forward(x [B, T, input_size], mask [B, T] bool) -> hidden_out [B, T, output_size]``.

    Applies ``x * sqrt(output_size)`` and the sinusoidal positions first, as FunASR does.
    Constructor arguments are FunASR's ``encoder_conf`` names; the ones that do not change
    inference (dropouts, ``tp_blocks``, ``input_layer``...) are accepted and ignored.
    """

    def __init__(self, input_size: int = 560, output_size: int = 512, attention_heads: int = 4, linear_units: int = 2048,
                 num_blocks: int = 50, kernel_size: int = 11, sanm_shfit: int = 0, normalize_before: bool = True,
                 concat_after: bool = False, selfattention_layer_type: str = "sanm", **unused):
        super().__init__()
        if not normalize_before or concat_after or selfattention_layer_type != "sanm":
            raise ValueError("only normalize_before=True, concat_after=False, selfattention_layer_type='sanm' "
                             "(the SenseVoiceSmall configuration) are supported")
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.input_size, self.output_size = input_size, output_size
        layer_args = (attention_heads, linear_units, kernel_size, sanm_shfit)
        self.encoders0 = nn.ModuleList([SANMLayer(input_size, output_size, *layer_args)])
        self.encoders = nn.ModuleList([SANMLayer(output_size, output_size, *layer_args) for _ in range(num_blocks - 1)])
        self.after_norm = LayerNorm32(output_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x * math.sqrt(self.output_size)
        x = x + sinusoidal_positions(x.shape[1], x.shape[2], x.device, x.dtype)
        for layer in self.encoders0:
            x = layer(x, mask)
        for layer in self.encoders:
            x = layer(x, mask)
        return self.after_norm(x)
