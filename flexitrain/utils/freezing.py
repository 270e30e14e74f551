"""Temporarily frozen modules: for the generator pass of a GAN, where gradients must flow *through* the
discriminator to the generator but the discriminator's own weight gradients would only be thrown away."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from torch import nn


@contextmanager
def frozen(module: nn.Module) -> Iterator[nn.Module]:
    """``requires_grad=False`` on every parameter of ``module`` inside the block, restored on exit (also on error).

    Only parameters that required gradients are touched, so a parameter frozen for good stays frozen."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield module
    finally:
        for p in params:
            p.requires_grad_(True)
