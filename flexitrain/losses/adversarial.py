"""LSGAN and feature-matching losses over discriminator outputs (codec.md §3.4).

Each argument is what `CodecDiscriminator` returns: per sub-discriminator a list of feature maps
whose last entry is the logit. Terms are summed over sub-discriminators (and layers), as the
official ``GANLoss`` does, so weights keep the official meaning.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parametrize

from flexitrain.utils.freezing import frozen

DiscOutputs = list[list[Tensor]]


def _check_pair(d_fake: DiscOutputs, d_real: DiscOutputs) -> None:
    if len(d_fake) != len(d_real) or any(len(a) != len(b) for a, b in zip(d_fake, d_real)):
        raise ValueError("fake and real discriminator outputs have different structures")


def discriminator_loss(d_fake: DiscOutputs, d_real: DiscOutputs) -> Tensor:
    """``Σ_d mean(D_d(fake)²) + mean((1 − D_d(real))²)``; pass outputs of ``D(fake.detach())``."""
    _check_pair(d_fake, d_real)
    return sum((f[-1].pow(2).mean() + (1 - r[-1]).pow(2).mean() for f, r in zip(d_fake, d_real)))


def generator_adversarial_loss(d_fake: DiscOutputs) -> Tensor:
    """``Σ_d mean((1 − D_d(fake))²)``."""
    return sum((1 - f[-1]).pow(2).mean() for f in d_fake)


def feature_matching_loss(d_fake: DiscOutputs, d_real: DiscOutputs) -> Tensor:
    """``Σ_d Σ_layers L1(fmap_fake, sg(fmap_real))`` over all maps but the logit (each L1 a mean)."""
    _check_pair(d_fake, d_real)
    return sum(
        F.l1_loss(f, r.detach()) for fakes, reals in zip(d_fake, d_real) for f, r in zip(fakes[:-1], reals[:-1])
    )


def split_outputs(outputs: DiscOutputs, batch: int) -> tuple[DiscOutputs, DiscOutputs]:
    """Outputs of one D call on ``cat([a, b])`` -> the outputs of ``D(a)`` and ``D(b)`` (first ``batch`` items: a)."""
    first = [[f[:batch] for f in maps] for maps in outputs]
    second = [[f[batch:] for f in maps] for maps in outputs]
    return first, second


def discriminator_step_loss(discriminator: nn.Module, fake: Tensor, real: Tensor) -> Tensor:
    """The D-step loss ``discriminator_loss(D(fake.detach()), D(real))`` from one D call on both halves.

    The discriminators have no batch-coupled layers, so one call on ``cat([fake, real])`` gives the outputs of
    two calls; the weight norms (parametrizations) are computed once for it instead of once per call."""
    with parametrize.cached():
        d_fake, d_real = split_outputs(discriminator(torch.cat([fake.detach(), real], 0)), fake.shape[0])
    return discriminator_loss(d_fake, d_real)


def generator_gan_terms(
    discriminator: Callable[[Tensor], DiscOutputs], fake: Tensor, real: Tensor
) -> tuple[Tensor, Tensor]:
    """Generator-side GAN terms ``(adv, feat)``: D runs on ``fake`` with gradients, on ``real`` without.

    A discriminator module is frozen for the call (gradients flow through it to the generator, but its own
    weight gradients would belong to no update: computing them would only waste the work) and its weight norms
    are computed once for both calls.
    """
    if not isinstance(discriminator, nn.Module):
        return _generator_gan_terms(discriminator, fake, real)
    with frozen(discriminator), parametrize.cached():
        return _generator_gan_terms(discriminator, fake, real)


def _generator_gan_terms(discriminator, fake: Tensor, real: Tensor) -> tuple[Tensor, Tensor]:
    d_fake = discriminator(fake)
    with torch.no_grad():
        d_real = discriminator(real)
    return generator_adversarial_loss(d_fake), feature_matching_loss(d_fake, d_real)
