"""Discriminator structure (official layout), shapes, gain invariance and learning."""

import math

import pytest
import torch

import flexitrain.models.discriminators as discs
from flexitrain.losses import discriminator_loss
from flexitrain.models.discriminators import (
    CodecDiscriminator,
    MultiPeriodDiscriminator,
    MultiResolutionSTFTDiscriminator,
    remap_official_weight_norm_keys,
)


def _ceil_div(a, b):
    return -(-a // b)


def test_full_discriminator_shapes():
    torch.manual_seed(0)
    d = CodecDiscriminator()
    assert len(d.discriminators) == 8
    batch, length = 2, 8000
    outs = d(torch.randn(batch, 1, length))
    assert len(outs) == 8
    for period, fmaps in zip((2, 3, 5, 7, 11), outs[:5]):
        assert len(fmaps) == 6
        rows = (length + period - length % period) // period
        for _ in range(4):
            rows = _ceil_div(rows, 3)
        assert fmaps[-2].shape == (batch, 1024, rows, period)
        assert fmaps[-1].shape == (batch, 1, rows, period)
    for window, fmaps in zip((2048, 1024, 512), outs[5:]):
        assert len(fmaps) == 26
        n_bins = window // 2 + 1
        edges = [int(f * n_bins) for f in (0.0, 0.1, 0.25, 0.5, 0.75, 1.0)]
        widths = [_ceil_div(_ceil_div(_ceil_div(hi - lo, 2), 2), 2) for lo, hi in zip(edges, edges[1:])]
        frames = _ceil_div(length, window // 4)
        assert fmaps[0].shape == (batch, 64, frames, edges[1] - edges[0])
        assert fmaps[-1].shape == (batch, 1, frames, sum(widths))
    # Parameter count of the official Discriminator(periods=[2,3,5,7,11], fft_sizes=[2048,1024,512]).
    assert sum(p.numel() for p in d.parameters()) == 46_698_544


def test_input_contract_and_gain_invariance():
    d = MultiResolutionSTFTDiscriminator(fft_sizes=(256,), channels=8)
    with pytest.raises(ValueError, match=r"\[B, 1, T\]"):
        d(torch.randn(2, 4000))
    x = torch.randn(2, 1, 4000)
    torch.testing.assert_close(d(x)[0][-1], d(3.0 * x + 0.2)[0][-1], rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at least one"):
        CodecDiscriminator(periods=(), fft_sizes=())


def test_official_checkpoint_keys_load(monkeypatch):
    """A D built with the old weight_norm API (the official key names) loads strictly after remap."""
    torch.manual_seed(0)
    monkeypatch.setattr(discs, "weight_norm", torch.nn.utils.weight_norm)
    official = CodecDiscriminator(periods=(2,), fft_sizes=(512,))
    monkeypatch.undo()
    sd = official.state_dict()
    assert tuple(sd["discriminators.0.convs.0.0.weight_g"].shape) == (32, 1, 1, 1)
    assert tuple(sd["discriminators.1.band_convs.4.4.0.weight_v"].shape) == (64, 64, 3, 3)
    assert "discriminators.1.conv_post.weight_g" in sd
    ours = CodecDiscriminator(periods=(2,), fft_sizes=(512,))
    ours.load_state_dict(remap_official_weight_norm_keys(sd), strict=True)
    x = torch.randn(1, 1, 3000)
    for a, b in zip(official(x), ours(x)):
        torch.testing.assert_close(a[-1], b[-1])


def _toy_batch(gen, batch=4, length=4096):
    t = torch.arange(length) / 16000
    f0 = 150 + 250 * torch.rand(batch, 1, generator=gen)
    real = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 8)).unsqueeze(1)
    fake = torch.randn(batch, 1, length, generator=gen)
    return real, fake


@pytest.mark.parametrize("kind,lr,steps", [("mpd", 2e-4, 6), ("mrd", 2e-3, 12)])
def test_discriminator_learns_toy_problem(kind, lr, steps):
    """Harmonic 'speech' vs white noise: a few AdamW steps must clearly lower the LSGAN D loss."""
    torch.manual_seed(0)
    d = MultiPeriodDiscriminator(periods=(3,)) if kind == "mpd" else \
        MultiResolutionSTFTDiscriminator(fft_sizes=(512, 256), channels=16)
    opt = torch.optim.AdamW(d.parameters(), lr=lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        real, fake = _toy_batch(gen, length=2048)
        loss = discriminator_loss(d(fake), d(real))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(d.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-2:]) / 2 < 0.6 * losses[0], losses
