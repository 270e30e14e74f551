"""Weight-normalised convolutions and the Snake activation of the DAC codec.

The official model uses the old ``torch.nn.utils.weight_norm`` hook API, so its
state dict stores ``weight_g`` / ``weight_v`` / ``bias``. These modules keep
exactly those parameter names (no hooks, no parametrizations) and compute the
effective weight with the same kernel (``torch._weight_norm``, norm over every
dim except 0), so outputs are bit-identical.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class _WeightNormMixin:
    weight_g: nn.Parameter
    weight_v: nn.Parameter

    def _init_weight_norm(self, weight: torch.Tensor) -> None:
        # g = ||v|| over all dims but 0, as torch.nn.utils.weight_norm does at wrap time
        # (registered after the bias, g before v: the official key order).
        v = weight.detach().clone()
        if weight.is_meta:
            g = torch.empty((weight.shape[0],) + (1,) * (weight.dim() - 1), device="meta")
        else:
            g = torch._C._VariableFunctions.norm_except_dim(v, 2, 0)
        self.weight_g = nn.Parameter(g.clone())
        self.weight_v = nn.Parameter(v)

    @property
    def weight(self) -> torch.Tensor:
        v, g = self.weight_v, self.weight_g
        if torch.is_grad_enabled() or torch.jit.is_scripting():
            return torch._weight_norm(v, g, 0)
        # Inference: reuse the folded weight until a parameter changes (in-place updates bump _version).
        key = (v._version, g._version, v.data_ptr(), g.data_ptr(), v.device, v.dtype)
        cache = self.__dict__.get("_folded")
        if cache is None or cache[0] != key:
            cache = (key, torch._weight_norm(v, g, 0))
            self.__dict__["_folded"] = cache
        return cache[1]

    def weight_2d(self) -> torch.Tensor:
        """The weight as a channels-last ``[*, *, 1, k]`` conv2d kernel (for ``[B, C, 1, T]`` inputs)."""
        w = self.weight
        if torch.is_grad_enabled():
            return w.unsqueeze(2).contiguous(memory_format=torch.channels_last)
        cache = self.__dict__.get("_folded_2d")
        if cache is None or cache[0] is not w:
            cache = (w, w.unsqueeze(2).contiguous(memory_format=torch.channels_last))
            self.__dict__["_folded_2d"] = cache
        return cache[1]


class WNConv1d(_WeightNormMixin, nn.Module):
    """``weight_norm(nn.Conv1d(...))`` with the same keys and numerics."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, dilation: int = 1, groups: int = 1, bias: bool = True,
                 device=None):
        super().__init__()
        conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, padding=padding,
                         dilation=dilation, groups=groups, bias=bias, device=device)
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, groups
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.bias = nn.Parameter(conv.bias.detach().clone()) if bias else None
        self._init_weight_norm(conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:  # [B, C, 1, T] channels-last fast path (oneDNN runs it without reorders)
            y = F.conv2d(x, self.weight_2d(), self.bias, (1, self.stride), (0, self.padding),
                         (1, self.dilation), self.groups)
            return y.contiguous(memory_format=torch.channels_last)  # a 1-channel input gives NCHW
        return F.conv1d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}")


class WNConvTranspose1d(_WeightNormMixin, nn.Module):
    """``weight_norm(nn.ConvTranspose1d(...))``: ``weight_g`` is ``[in, 1, 1]`` (dim 0 of ``[in, out, k]``)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 padding: int = 0, bias: bool = True, device=None):
        super().__init__()
        conv = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride,
                                  padding=padding, bias=bias, device=device)
        self.stride, self.padding = stride, padding
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.bias = nn.Parameter(conv.bias.detach().clone()) if bias else None
        self._init_weight_norm(conv.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return F.conv_transpose2d(x, self.weight_2d(), self.bias, (1, self.stride), (0, self.padding))
        return F.conv_transpose1d(x, self.weight, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}")


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake: x + sin²(αx)/(α + 1e-9), the DAC formula term by term (same rounding).

    Under no_grad it runs in place on one temporary, which halves the memory traffic
    of the five element-wise passes; with autograd it uses the plain expression.
    """
    if x.dim() != alpha.dim():  # [B, C, 1, T] layout
        alpha = alpha.view(1, -1, *([1] * (x.dim() - 2)))
    inv = (alpha + 1e-9).reciprocal()
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return x + inv * torch.sin(alpha * x).pow(2)
    t = alpha * x
    t.sin_()
    t.mul_(t)
    t.mul_(inv)
    return t.add_(x)


class Snake1d(nn.Module):
    def __init__(self, channels: int, device=None):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return snake(x, self.alpha)
