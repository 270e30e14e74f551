"""DiffLlama: the bidirectional Llama velocity estimator of the FlexiCodec-TTS Voicebox (tts.md §2.3).

Plain PyTorch re-implementation of the official `llama_nar.py` (HF Llama ~4.41, eager attention) with
the official module names, so the released `nartts.safetensors` loads strictly:
``x_t → mel_mlp`` + ``cond → cond_mlp`` (added) → N × [AdaRMSNorm(t) → self-attn (RoPE, padding-only
mask) → AdaRMSNorm(t) → SwiGLU MLP] → AdaRMSNorm(t) → ``mel_out_mlp`` = velocity. The flow time t ∈ [0, 1]
enters only through the adaptive RMSNorm scales (raw t in a 10000-base sinusoid, as released).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def mlp(dim_in: int, dim_hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim_in, dim_hidden), nn.SiLU(), nn.Linear(dim_hidden, dim_out))


def sinusoidal_time_embedding(t: Tensor, dim: int) -> Tensor:
    """``[B] → [B, dim]``: ``cat(sin(t·f), cos(t·f))`` with f = 10000^(-i/(dim/2 - 1)), raw t (not ×1000)."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    arg = t.float()[:, None] * freqs[None]
    return torch.cat((arg.sin(), arg.cos()), dim=-1)


class AdaptiveRMSNorm(nn.Module):
    """RMSNorm whose per-channel scale is ``to_weight(time embedding)`` (no shift, no gate)."""

    def __init__(self, hidden_size: int, dim_cond: int, eps: float = 1e-6):
        super().__init__()
        self.to_weight = nn.Linear(dim_cond, hidden_size)
        self.eps = eps

    def reset_parameters(self) -> None:
        # The intended identity start (the released code lets HF post_init overwrite it: tts.md B12).
        nn.init.zeros_(self.to_weight.weight)
        nn.init.ones_(self.to_weight.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        scale = self.to_weight(cond)
        if scale.dim() == 2:
            scale = scale.unsqueeze(1)
        return (scale * normed).to(x.dtype)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype) -> tuple[Tensor, Tensor]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, hidden_size // num_heads
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=False)
        self.o_proj = nn.Linear(hidden_size, hidden_size, bias=False)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, bias: Tensor | None) -> Tensor:
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DiffLlamaLayer(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.self_attn = SelfAttention(hidden_size, num_heads)
        self.mlp = SwiGLU(hidden_size, 4 * hidden_size)
        self.input_layernorm = AdaptiveRMSNorm(hidden_size, hidden_size)
        self.post_attention_layernorm = AdaptiveRMSNorm(hidden_size, hidden_size)

    def forward(self, x: Tensor, t_emb: Tensor, cos: Tensor, sin: Tensor, bias: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x, t_emb), cos, sin, bias)
        return x + self.mlp(self.post_attention_layernorm(x, t_emb))


class DiffLlama(nn.Module):
    """``forward(x_t [B,T,mel], t [B], cond [B,T,H], x_mask [B,T] | None) → velocity [B,T,mel]``.

    ``x_mask`` (1 = valid) only masks *keys*: padded query rows are still computed (as released).
    ``return_hidden_at=i`` also returns the hidden state after layer i (the REPA tap).
    """

    def __init__(self, mel_dim: int = 128, hidden_size: int = 1024, num_heads: int = 16, num_layers: int = 16,
                 rope_theta: float = 10000.0):
        super().__init__()
        self.hidden_size, self.rope_theta, self.head_dim = hidden_size, rope_theta, hidden_size // num_heads
        self.layers = nn.ModuleList(DiffLlamaLayer(hidden_size, num_heads) for _ in range(num_layers))
        self.norm = AdaptiveRMSNorm(hidden_size, hidden_size)
        self.diff_step_mlp = mlp(hidden_size, 4 * hidden_size, hidden_size)
        self.cond_mlp = mlp(hidden_size, 4 * hidden_size, hidden_size)
        self.mel_mlp = mlp(mel_dim, 4 * hidden_size, hidden_size)
        self.mel_out_mlp = mlp(hidden_size, 4 * hidden_size, mel_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, AdaptiveRMSNorm):
                m.reset_parameters()

    def forward(self, x: Tensor, t: Tensor, cond: Tensor, x_mask: Tensor | None = None,
                return_hidden_at: int | None = None):
        B, T, _ = x.shape
        if cond.shape[:2] != (B, T):
            raise ValueError(f"cond {tuple(cond.shape)} must be [B, T, H] with x_t's B, T = {B}, {T}")
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32)
        t = t.expand(B) if t.dim() == 0 else t
        h = self.mel_mlp(x) + self.cond_mlp(cond)
        t_emb = self.diff_step_mlp(sinusoidal_time_embedding(t, self.hidden_size).to(h.dtype))
        cos, sin = rotary_cos_sin(T, self.head_dim, self.rope_theta, x.device, h.dtype)
        bias = None
        if x_mask is not None:
            if x_mask.shape != (B, T):
                raise ValueError(f"x_mask must be [B, T] = [{B}, {T}], got {tuple(x_mask.shape)}")
            bias = torch.zeros(B, 1, 1, T, device=x.device, dtype=h.dtype)
            bias = bias.masked_fill(~x_mask.bool()[:, None, None, :], torch.finfo(h.dtype).min)
        hidden = None
        for i, layer in enumerate(self.layers):
            h = layer(h, t_emb, cos, sin, bias)
            if i == return_hidden_at:
                hidden = h
        v = self.mel_out_mlp(self.norm(h, t_emb))
        return (v, hidden) if return_hidden_at is not None else v
