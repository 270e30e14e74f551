"""Rank-agreed skipping of non-finite optimiser steps, shared by the GAN tasks (CodecTask, VocosTask).

A step whose loss or clipped gradient norm is non-finite on *any* rank is skipped on *every* rank (so the
replicas never drift apart), and ``skipped_steps`` — a buffer, hence saved with the weights and restored on
resume — counts it.

The decision never leaves the device (no host sync per step): the non-finite flag is a 0-dim float tensor,
all-reduced with MAX across ranks on the device (`all_ranks_max`), handed to the optimiser as its
``found_inf`` attribute — the device-side skip that ``torch.cuda.amp.GradScaler`` uses: fused Adam/AdamW
(``fused=True``) leave parameters, moments and the step count untouched when ``found_inf`` is 1 — and added
to ``skipped_steps`` on the device. Optimisers without that skip (``_step_supports_amp_scaling`` unset) fall
back to a host-side check (one sync per step).

Semantics, since the device-side skip (the optimiser is always *called*):
- a skipped update leaves the parameters and the optimiser state (moments, step count) unchanged, as before;
- the LR scheduler steps on every step, skipped or not, and Lightning's ``global_step`` (which counts calls of
  the generator optimiser's ``step``) advances on skipped generator steps too — as for the steps AMP's
  GradScaler skips in Lightning and in plain PyTorch. Before, a skipped step stepped neither.
- skips are not logged one by one (that needs a host read): ``train/skipped_steps`` carries the count.
With 16-bit AMP (``precision=16-mixed``) GradScaler sets ``found_inf`` itself (from the scaled gradients),
which replaces this flag for that step.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor


def all_ranks_max(flag: Tensor, strategy: Any = None) -> Tensor:
    """MAX of ``flag`` over all ranks, in place and on the device. No barrier and no host read: Lightning's
    ``strategy.reduce`` puts a ``barrier`` (a host wait) before its all-reduce, so it is not used here."""
    dist = torch.distributed
    world = getattr(strategy, "world_size", 1) if strategy is not None else 1
    if world > 1 and dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return flag


def non_finite_flag(loss: Tensor, grad_norm: Tensor | None = None) -> Tensor:
    """0-dim float32 tensor on the loss's device: 1.0 if ``loss`` or ``grad_norm`` has a non-finite value."""
    ok = torch.isfinite(loss.detach()).all()
    if grad_norm is not None:
        ok = ok & torch.isfinite(grad_norm.detach()).all()
    return (~ok).to(torch.float32)


class NonFiniteStepGuard:
    """Mixin for manual-optimisation ``LightningModule``s; call ``_init_step_guard()`` in ``__init__`` and create
    the optimisers with ``fused=True`` (see the module docstring)."""

    def _init_step_guard(self) -> None:
        self.register_buffer("skipped_steps", torch.zeros((), dtype=torch.long))

    def _found_inf(self, loss: Tensor, grad_norm: Tensor | None) -> Tensor:
        """The rank-agreed skip flag (1.0: skip), on the device."""
        return all_ranks_max(non_finite_flag(loss, grad_norm), getattr(self.trainer, "strategy", None))

    def _guarded_step(self, loss: Tensor, grad_norm: Tensor | None, optimizer: Any, scheduler: Any,
                      step: Callable[[], Any] | None = None) -> Tensor:
        """Step ``optimizer`` (through ``step()`` if given, e.g. a raw step that bypasses Lightning's counter)
        unless the step is non-finite on some rank, then ``scheduler``; count a skip. ``optimizer`` may be a
        ``LightningOptimizer``. Returns the flag (0-dim float tensor, 1.0 = skipped); nothing is read back."""
        found_inf = self._found_inf(loss, grad_norm)
        raw = getattr(optimizer, "optimizer", optimizer)  # LightningOptimizer wraps the torch optimiser
        run = step if step is not None else optimizer.step
        if getattr(raw, "_step_supports_amp_scaling", False):
            raw.found_inf = found_inf
            try:
                run()
            finally:
                raw.__dict__.pop("found_inf", None)  # (GradScaler, under 16-mixed, removes it itself)
        elif not bool(found_inf):  # no device-side skip in this optimiser: decide on the host (a sync)
            run()
        scheduler.step()
        self.skipped_steps.add_(found_inf.to(self.skipped_steps.dtype))
        return found_inf

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # Checkpoints written before the counter existed resume (strictly) with a zero count.
        state = checkpoint.get("state_dict")
        if state is not None and "skipped_steps" not in state:
            state["skipped_steps"] = torch.zeros((), dtype=torch.long)
        super().on_load_checkpoint(checkpoint)
