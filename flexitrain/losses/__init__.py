"""Codec training losses (plain functions / nn.Modules, masked over padding)."""

from flexitrain.losses.adversarial import (
    discriminator_loss,
    feature_matching_loss,
    generator_adversarial_loss,
    generator_gan_terms,
)
from flexitrain.losses.distill import group_mask, mean_pool_groups, semantic_distill_loss
from flexitrain.losses.masking import lengths_to_mask, masked_l1, masked_mean, masked_mse
from flexitrain.losses.mel import MultiScaleMelLoss
from flexitrain.losses.repa import build_repa_mlp, repa_loss
from flexitrain.losses.sisdr import si_sdr
from flexitrain.losses.weights import DEFAULT_LOSS_WEIGHTS, combine_losses, resolve_loss_weights

__all__ = [
    "DEFAULT_LOSS_WEIGHTS",
    "MultiScaleMelLoss",
    "build_repa_mlp",
    "combine_losses",
    "discriminator_loss",
    "feature_matching_loss",
    "generator_adversarial_loss",
    "generator_gan_terms",
    "group_mask",
    "lengths_to_mask",
    "masked_l1",
    "masked_mean",
    "masked_mse",
    "mean_pool_groups",
    "repa_loss",
    "resolve_loss_weights",
    "semantic_distill_loss",
    "si_sdr",
]
