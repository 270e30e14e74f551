"""flexitrain/losses/adversarial.py: the D step's one discriminator call, the generator pass through a frozen D,
and weight norms computed once per phase (issue 13, GPU training throughput).

- `discriminator_step_loss` runs D once on ``cat([fake.detach(), real])`` instead of once per half: the same loss
  and the same D gradients as two calls, up to float32 summation order.
- `generator_gan_terms` freezes D for the generator pass: no D weight gradients are computed (their ``.grad``
  stay None), ``requires_grad`` is restored afterwards, and gradients still reach the generator's output.
- Both run under ``parametrize.cached()``: each weight-norm parametrization (``g · v / ‖v‖``) is evaluated once
  per phase, not once per D call.
"""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from flexitrain.losses.adversarial import (discriminator_loss, discriminator_step_loss, feature_matching_loss,
                                           generator_adversarial_loss, generator_gan_terms)
from flexitrain.models.discriminators import CodecDiscriminator

pytestmark = pytest.mark.usefixtures("one_thread")

# Float32 tolerance for "one call on 2B items" vs "two calls on B items". Per item the discriminator computes the
# same thing either way (no batch-coupled layer: per-item normalisation, STFT, convs), but a convolution's weight
# and bias gradients are sums over batch x positions (thousands of terms here), and their order differs between
# one 2B-item kernel and two B-item kernels added by autograd (oneDNN blocks the batch differently, and may pick
# another algorithm for another batch size). Each reordering changes the last bits (float32 epsilon 2^-23 ~ 1.2e-7
# per operation), accumulating with the number of terms: measured <= 2.1e-6 of each gradient's largest entry
# (loss bit-identical). Bound: 2e-5 of the largest entry (~170 float32 ulps), with an order of magnitude margin.
GRAD_REL = 2e-5
LOSS_REL = 1e-6


def small_discriminator() -> CodecDiscriminator:
    torch.manual_seed(0)
    return CodecDiscriminator(periods=[2, 3], fft_sizes=[256, 128], channels=4, period_channels=[4, 8, 8, 8])


def audio_pair(batch: int = 3, n: int = 4000) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    fake = (0.3 * torch.randn(batch, 1, n, generator=g)).requires_grad_()
    real = 0.3 * torch.randn(batch, 1, n, generator=g)
    return fake, real


def d_grads(d: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in d.named_parameters()}


def weight_norms(d: nn.Module) -> list[nn.Module]:
    """The weight-norm parametrization modules of ``d`` (one per parametrized weight)."""
    return [m.parametrizations.weight[0] for m in d.modules() if parametrize.is_parametrized(m, "weight")]


def test_one_call_discriminator_step_equals_two_calls():
    d = small_discriminator()
    fake, real = audio_pair()

    one = discriminator_step_loss(d, fake, real)
    one.backward()
    grads_one = d_grads(d)
    assert fake.grad is None  # the D step never reaches the generator (fake is detached inside)
    d.zero_grad(set_to_none=True)

    two = discriminator_loss(d(fake.detach()), d(real))
    two.backward()
    grads_two = d_grads(d)

    assert one.item() == pytest.approx(two.item(), rel=LOSS_REL)
    assert grads_one.keys() == grads_two.keys() and len(grads_one) > 0
    for name, g2 in grads_two.items():
        g1 = grads_one[name]
        assert g2.abs().max() > 0, name
        err = (g1 - g2).abs().max() / g2.abs().max()
        assert err <= GRAD_REL, (name, float(err))


def test_generator_terms_freeze_the_discriminator_and_reach_the_generator():
    d = small_discriminator()
    fake, real = audio_pair()
    frozen_for_good = next(d.parameters())
    frozen_for_good.requires_grad_(False)  # a parameter frozen before stays frozen after
    trainable = [p for p in d.parameters() if p.requires_grad]

    adv, feat = generator_gan_terms(d, fake, real)
    assert all(p.requires_grad for p in trainable) and not frozen_for_good.requires_grad
    (adv + 2 * feat).backward()
    assert all(p.grad is None for p in d.parameters())  # no D weight gradient computed (none would be used)
    assert fake.grad is not None and fake.grad.abs().max() > 0

    # The same generator gradient as an unfrozen D (whose weight gradients are then computed and thrown away).
    frozen_for_good.requires_grad_(True)
    fake_ref = fake.detach().clone().requires_grad_()
    d_fake = d(fake_ref)
    with torch.no_grad():
        d_real = d(real)
    adv_ref, feat_ref = generator_adversarial_loss(d_fake), feature_matching_loss(d_fake, d_real)
    (adv_ref + 2 * feat_ref).backward()
    assert adv.item() == pytest.approx(adv_ref.item(), rel=LOSS_REL)
    assert feat.item() == pytest.approx(feat_ref.item(), rel=LOSS_REL)
    torch.testing.assert_close(fake.grad, fake_ref.grad, rtol=1e-5, atol=1e-9)


def test_requires_grad_is_restored_when_the_discriminator_raises():
    d = small_discriminator()
    with pytest.raises(ValueError, match="discriminator input"):
        generator_gan_terms(d, torch.zeros(2, 4000, requires_grad=True), torch.zeros(2, 4000))  # not [B, 1, T]
    assert all(p.requires_grad for p in d.parameters())


class CountCalls:
    """Forward hooks on every weight-norm parametrization: how often each computed its weight."""

    def __init__(self, d: nn.Module):
        self.modules = weight_norms(d)
        self.calls = [0] * len(self.modules)
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(self.modules)]

    def _hook(self, i: int):
        def hook(module, args, output):
            self.calls[i] += 1
        return hook

    def take(self) -> list[int]:
        calls, self.calls = self.calls, [0] * len(self.modules)
        return calls

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_weight_norm_is_computed_once_per_parametrized_weight_in_each_phase():
    d = small_discriminator()
    fake, real = audio_pair()
    counter = CountCalls(d)
    n = len(counter.modules)
    assert n == sum(1 for name, _ in d.named_parameters() if name.endswith("weight.original0")) > 10

    # the counter sees every evaluation: two plain D calls compute every weight twice
    discriminator_loss(d(fake.detach()), d(real))
    assert counter.take() == [2] * n

    loss_d = discriminator_step_loss(d, fake, real)  # D step: one call on cat([fake, real])
    assert counter.take() == [1] * n
    loss_d.backward()  # the backward re-evaluates nothing
    assert counter.take() == [0] * n

    adv, feat = generator_gan_terms(d, fake, real)  # G pass: two calls (fake with grad, real without), cached
    assert counter.take() == [1] * n
    (adv + feat).backward()
    assert counter.take() == [0] * n
    counter.remove()
