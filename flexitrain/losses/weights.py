"""One dict of loss weights whose keys are also the log keys (codec.md §3.1).

The generator total is ``Σ_k weights[k] · terms[k]``; `combine_losses` returns it together with
every unweighted term (detached) for logging under the same keys.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

# Official FlexiCodec generator weights; "distill" carries the ×15 the official model applies inside.
DEFAULT_LOSS_WEIGHTS: dict[str, float] = {
    "mel": 15.0,
    "adv": 1.0,
    "feat": 2.0,
    "commit": 0.25,
    "codebook": 1.0,
    "distill": 15.0,
    "repa": 1.0,
}


def resolve_loss_weights(overrides: Mapping[str, float] | None = None) -> dict[str, float]:
    """Defaults updated with ``overrides``; an unknown key is an error (typos would be silent)."""
    weights = dict(DEFAULT_LOSS_WEIGHTS)
    for key, value in (overrides or {}).items():
        if key not in weights:
            raise KeyError(f"unknown loss weight {key!r}; known: {sorted(weights)}")
        weights[key] = float(value)
    return weights


def combine_losses(
    terms: Mapping[str, Tensor], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, Tensor]]:
    """``(total, logs)``: total = Σ weights[k]·terms[k]; logs = detached terms plus ``"total"``.

    Only the terms given are combined (e.g. no ``repa`` when REPA is off); a term without a weight
    is an error. Zero-weight terms are still logged but left out of the graph.
    """
    if not terms:
        raise ValueError("combine_losses needs at least one loss term")
    missing = [k for k in terms if k not in weights]
    if missing:
        raise KeyError(f"no weight for loss terms {missing}; known: {sorted(weights)}")
    total = None
    logs: dict[str, Tensor] = {}
    for key, value in terms.items():
        value = torch.as_tensor(value)
        logs[key] = value.detach()
        if weights[key] != 0:
            total = weights[key] * value if total is None else total + weights[key] * value
    if total is None:
        total = torch.zeros((), device=next(iter(logs.values())).device)
    logs["total"] = total.detach()
    return total, logs
