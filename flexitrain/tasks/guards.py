"""Rank-agreed skipping of non-finite optimiser steps, shared by the GAN tasks (CodecTask, VocosTask).

A step whose loss or clipped gradient norm is non-finite on *any* rank is skipped on *every* rank (so the
replicas never drift apart): neither the optimiser nor its LR scheduler steps, and ``skipped_steps`` — a
buffer, hence saved with the weights and restored on resume — counts it.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import Tensor

log = logging.getLogger(__name__)


class NonFiniteStepGuard:
    """Mixin for manual-optimisation ``LightningModule``s; call ``_init_step_guard()`` in ``__init__``."""

    def _init_step_guard(self) -> None:
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))

    def _step_ok(self, loss: Tensor, grad_norm: Tensor | None) -> bool:
        ok = torch.isfinite(loss.detach()).all()
        if grad_norm is not None:
            ok = ok & torch.isfinite(grad_norm)
        # Every rank must take the same decision, or the replicas drift apart.
        return bool(self.trainer.strategy.reduce_boolean_decision(bool(ok), all=True))

    def _guarded_step(self, loss: Tensor, grad_norm: Tensor | None, step: Callable[[], Any], scheduler: Any,
                      name: str) -> bool:
        """Run ``step()`` and ``scheduler.step()`` if the step is finite on all ranks, else count a skip."""
        if self._step_ok(loss, grad_norm):
            step()
            scheduler.step()
            return True
        self.skipped_steps += 1
        log.warning("non-finite %s loss/gradient at step %d: update skipped", name, self.global_step)
        return False

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints written before the counter existed resume (strictly) with a zero count.
        state = checkpoint.get("state_dict")
        if state is not None and "skipped_steps" not in state:
            state["skipped_steps"] = torch.zeros((), dtype=torch.long)
        super().on_load_checkpoint(checkpoint)
