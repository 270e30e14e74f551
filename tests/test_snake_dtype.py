"""Snake keeps bf16 activations in bf16 (flexitrain/models/codec/layers.py: `snake`, `Snake1d`; issue 13).

``alpha`` is an fp32 parameter: the plain expression would promote every bf16 conv output of the DAC back to fp32
under autocast (twice the activation memory and traffic). `snake` computes the formula in fp32 and rounds the
result to the input's dtype once, so a bf16 input gives a bf16 output and a bf16 input gradient (``alpha``'s
gradient stays fp32), with or without autocast.

Tolerance: the computation runs in fp32 on the bf16 input's exact values, so the one difference from the fp32
reference evaluated on those same values is the final rounding to bf16 (round to nearest: at most half a bf16
ulp, i.e. a relative error <= 2^-8 with bf16's 8 significand bits). The result is in fact exactly the reference
rounded to bf16 (the same fp32 kernels), which is asserted too.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn

from flexitrain.models.codec.layers import Snake1d, snake, snake_channels_last

pytestmark = pytest.mark.usefixtures("one_thread")

BF16_U = 2.0 ** -8  # unit roundoff of bf16 (8 significand bits incl. the implicit one)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


def reference(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The DAC formula in fp32, term by term (what `snake` computes inside)."""
    x, alpha = x.float(), alpha.float()
    return x + (alpha + 1e-9).reciprocal() * torch.sin(alpha * x).pow(2)


def inputs(device: str, shape=(2, 6, 257)) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = (3 * torch.randn(*shape, generator=g)).to(torch.bfloat16).to(device)
    alpha = (0.5 + torch.rand(1, shape[1], 1, generator=g)).to(device)  # fp32 parameter, as in Snake1d
    return x, alpha


def assert_bf16_rounding_of(out: torch.Tensor, ref: torch.Tensor) -> None:
    assert out.dtype == torch.bfloat16 and ref.dtype == torch.float32
    assert torch.all((out.float() - ref).abs() <= BF16_U * ref.abs() + 1e-30)
    if out.device.type == "cpu":  # the fused CUDA kernel may round its fp32 intermediates differently
        assert torch.equal(out, ref.to(torch.bfloat16))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True], ids=["eager", "autocast"])
def test_bf16_in_bf16_out_and_bf16_grad(device, autocast):
    x, alpha = inputs(device)
    x.requires_grad_()
    alpha = alpha.clone().requires_grad_()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        out = snake(x, alpha)
    assert out.dtype == torch.bfloat16
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16).to(device)
    out.backward(upstream)
    assert x.grad.dtype == torch.bfloat16 and alpha.grad.dtype == torch.float32

    x_ref = x.detach().float().requires_grad_()
    alpha_ref = alpha.detach().clone().requires_grad_()
    ref = reference(x_ref, alpha_ref)
    ref.backward(upstream.float())
    assert_bf16_rounding_of(out.detach(), ref.detach())
    # the input gradient is the fp32 one rounded to bf16 once (the cast's backward); alpha's is fp32 throughout
    assert_bf16_rounding_of(x.grad, x_ref.grad)
    torch.testing.assert_close(alpha.grad, alpha_ref.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_without_grad_and_channels_last(device):
    x, alpha = inputs(device)
    with torch.no_grad():
        assert_bf16_rounding_of(snake(x, alpha), reference(x, alpha))
        x4 = x.unsqueeze(2).contiguous(memory_format=torch.channels_last)  # the [B, C, 1, T] inference layout
        out4 = snake_channels_last(x4, alpha)
        assert_bf16_rounding_of(out4, reference(x4, alpha.view(1, -1, 1, 1)))


@pytest.mark.parametrize("device", DEVICES)
def test_snake1d_after_a_conv_under_autocast_stays_bf16(device):
    """The DAC pattern: an autocast conv returns bf16, Snake1d (fp32 alpha) keeps it bf16 for the next conv; an
    fp32 activation stays fp32 (snake never lowers precision by itself)."""
    torch.manual_seed(0)
    conv, act = nn.Conv1d(4, 6, 3, padding=1).to(device), Snake1d(6, device=device)
    with torch.no_grad():
        act.alpha.uniform_(0.5, 1.5)
    x = torch.randn(2, 4, 100, device=device)
    with torch.autocast(device, dtype=torch.bfloat16):
        h = conv(x)
        assert h.dtype == torch.bfloat16
        y = act(h)
    assert y.dtype == torch.bfloat16 and act.alpha.dtype == torch.float32
    assert_bf16_rounding_of(y.detach(), reference(h.detach(), act.alpha.detach()))
    y.float().sum().backward()
    assert act.alpha.grad.dtype == torch.float32 and conv.weight.grad.dtype == torch.float32
    assert snake(h.detach().float(), act.alpha).dtype == torch.float32
