"""Weight-normalised convolutions and the Snake activation of the DAC codec.

The official model uses the old ``torch.nn.utils.weight_norm`` hook API, so its
state dict stores ``weight_g`` / ``weight_v`` / ``bias``. These modules keep
exactly those parameter names (no hooks, no parametrizations) and compute the
effective weight with the same kernel (``torch._weight_norm``, norm over every
dim except 0), so outputs are bit-identical.
"""

from __future__ import annotations

import os

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


def clear_folded_weights(module: nn.Module) -> None:
    """Drop the inference caches of folded weight-norm weights under ``module``.

    The cache key (parameter version counters) misses in-place updates that do not bump ``_version``, such as
    the fused AdamW kernels: a training loop calls this after each optimiser step (and `FlexiCodec.train()`
    does on every mode switch), so validation never decodes with stale weights."""
    for m in module.modules():
        if isinstance(m, _WeightNormMixin):
            m.__dict__.pop("_folded", None)
            m.__dict__.pop("_folded_2d", None)


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


def _snake_fp32(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The Snake formula computed in fp32 and returned in ``x``'s dtype (one fused kernel once compiled)."""
    return _snake_formula(x.float(), alpha.float()).to(x.dtype)


# FLEXITRAIN_FUSED_SNAKE=0 switches the fused GPU Snake off without a code change (e.g. where inductor is absent).
_FUSED_SNAKE = {"enabled": os.environ.get("FLEXITRAIN_FUSED_SNAKE", "1") != "0", "fn": None}


def set_fused_snake(enabled: bool) -> None:
    """GPU Snake as one compiled kernel per direction (default on); off: the eager formula (5 kernels each way)."""
    _FUSED_SNAKE["enabled"] = bool(enabled)


def _fused_snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    fn = _FUSED_SNAKE["fn"]
    if fn is None:  # compiled lazily: importing the model must not need a compiler
        fn = _FUSED_SNAKE["fn"] = torch.compile(_snake_fp32, dynamic=True)
    return fn(x, alpha)


def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Snake: x + sin²(αx)/(α + 1e-9), the DAC formula term by term (same rounding).

    Dtype-preserving: a bf16 activation stays bf16 (computed in fp32 inside; ``alpha`` is an fp32
    parameter and would otherwise promote every conv output under autocast back to fp32).
    On CUDA the formula runs as one fused kernel forward and one backward (`set_fused_snake`).
    Under no_grad on CPU it runs in place on one temporary, which halves the memory traffic
    of the five element-wise passes; with autograd it uses the plain expression.
    """
    if x.dim() != alpha.dim():  # [B, C, 1, T] layout
        alpha = alpha.view(1, -1, *([1] * (x.dim() - 2)))
    if x.is_cuda and _FUSED_SNAKE["enabled"]:
        return _fused_snake(x, alpha)
    if x.dtype != alpha.dtype and x.dtype in (torch.bfloat16, torch.float16):
        return _snake_fp32(x, alpha)
    inv = (alpha + 1e-9).reciprocal()
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return x + inv * torch.sin(alpha * x).pow(2)
    t = alpha * x
    t.sin_()
    t.mul_(t)
    t.mul_(inv)
    return t.add_(x)


_CHUNK = 1 << 18  # elements per block of the channels-last Snake (1 MiB fp32: stays in L2)


def _snake_rows(x: torch.Tensor, alpha: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
    """Snake over a channels-last ``[B, C, 1, T]`` tensor (inference), block by block.

    Each block of rows ``[r, C]`` goes through one small reused temporary (cache-resident), so the
    five element-wise passes cost one pass over memory, and no activation-sized temporary is
    allocated (large fresh buffers cost page faults). ``out=None`` updates ``x`` in place (for a
    tensor nobody else needs); else the result goes to ``out``. Same formula and rounding as
    :func:`snake`.
    """
    C = x.shape[1]
    rows = x.permute(0, 2, 3, 1).view(-1, C)  # a view (channels-last memory)
    dst = rows if out is None else out.permute(0, 2, 3, 1).view(-1, C)
    a = alpha.reshape(-1).to(x.dtype)
    inv = (a + 1e-9).reciprocal()
    n = rows.shape[0]
    r = max(1, min(n, _CHUNK // max(C, 1)))
    tmp = torch.empty(r, C, dtype=x.dtype, device=x.device)
    for s in range(0, n, r):
        src = rows[s:s + r]
        t = tmp[:src.shape[0]]
        torch.mul(src, a, out=t)
        t.sin_()
        t.mul_(t)
        t.mul_(inv)
        torch.add(t, src, out=dst[s:s + r])
    return x if out is None else out


_COMPILED_SNAKE: tuple | None = None


def _snake_formula(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


def _snake_formula_(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    return x.copy_(_snake_formula(x, alpha))


def enable_compiled_snake(enabled: bool = True) -> None:
    """Opt-in (off by default): run the inference Snake of the channels-last CPU path as one
    ``torch.compile``'d (inductor) kernel instead of five ATen passes (codec encode+decode 1.06x faster at batch 4 x 6 s, 1.14x at
    16 x 6 s on a 2-core CPU).

    Needs a working C++ compiler; the first call compiles (10-60 s; inductor caches it on disk).
    Same formula; the fused kernel may round the last bit differently (|Δ| ~1e-7).
    """
    global _COMPILED_SNAKE
    _COMPILED_SNAKE = None
    if enabled:
        _COMPILED_SNAKE = (torch.compile(_snake_formula, dynamic=True), torch.compile(_snake_formula_, dynamic=True))


def snake_channels_last(x: torch.Tensor, alpha: torch.Tensor, inplace: bool = False) -> torch.Tensor:
    """Inference Snake for channels-last ``[B, C, 1, T]``; ``inplace`` overwrites ``x`` (in place it
    is ~2x faster: a fresh activation-sized output costs page faults as well as the arithmetic)."""
    if alpha.dtype != x.dtype:
        return snake(x, alpha)
    if _COMPILED_SNAKE is not None:
        return _COMPILED_SNAKE[1 if inplace else 0](x, alpha.view(1, -1, 1, 1))
    if inplace:
        return _snake_rows(x, alpha, None)
    return _snake_rows(x, alpha, torch.empty_like(x, memory_format=torch.channels_last))


def rows_layout(x: torch.Tensor) -> bool:
    """True for a CPU float32 ``[B, C, 1, T]`` channels-last tensor (= ``[B*T, C]`` rows) outside
    autocast: where the blocked / in-place inference paths apply (same dtypes as the plain path)."""
    return x.dim() == 4 and x.shape[2] == 1 and x.dtype == torch.float32 and x.device.type == "cpu" \
        and x.is_contiguous(memory_format=torch.channels_last) and not torch.is_autocast_enabled("cpu")


class Snake1d(nn.Module):
    def __init__(self, channels: int, device=None):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return snake(x, self.alpha)
