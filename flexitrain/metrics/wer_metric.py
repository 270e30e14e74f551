"""torchmetrics wrappers of the normalised WER/CER (kept apart: importing torchmetrics is slow)."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torchmetrics import Metric

from .wer import error_counts

__all__ = ["WordErrorRate", "CharErrorRate"]


class _ErrorRate(Metric):
    """torchmetrics Metric accumulating edit counts (summed across ranks on ``compute``)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False
    _unit = "word"

    def __init__(self, normalize: bool | Callable[[str], str] = True, **kwargs) -> None:
        super().__init__(**kwargs)
        self.normalize = normalize
        self.add_state("errors", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: str | Sequence[str], target: str | Sequence[str]) -> None:  # torchmetrics order
        c = error_counts(target, preds, self._unit, self.normalize)
        self.errors += c.errors
        self.total += c.reference_length

    def compute(self) -> torch.Tensor:
        if self.total == 0:
            return torch.tensor(float("nan") if self.errors == 0 else float("inf"))
        return self.errors.double() / self.total


class WordErrorRate(_ErrorRate):
    """WER with the fixed normaliser; ``update(preds=hypotheses, target=references)``."""

    _unit = "word"


class CharErrorRate(_ErrorRate):
    """CER with the fixed normaliser; ``update(preds=hypotheses, target=references)``."""

    _unit = "char"
