"""Exponential moving average (EMA) of a model's weights, shared by the four tasks.

Config (``task.ema``; ``null`` = off)::

    ema: {decay: 0.999, start_step: 1000, every: 1}

- ``decay``: ``ema ← decay·ema + (1 − decay)·weights`` at each update (``torch._foreach_lerp_``).
- ``start_step``: until this many optimiser steps have run, the EMA is a plain copy of the weights (the first
  updates would only average in the random initialisation); from then on it averages.
- ``every``: average every N-th optimiser step (the copy phase still copies at every step).

The averaged weights are the model's floating-point *parameters*, kept on the model's device in fp32 (whatever
the parameters' dtype), created lazily from the weights at the first use (after ``init_from``, a resume and
DDP's broadcast). Buffers are not averaged: the live ones are used (the tasks' models keep no running
statistics). An update reads nothing back to the host (no device sync): one ``_foreach_lerp_`` (or
``_foreach_copy_``) over the parameter list; the step counter is a host integer.

Checkpoints: the state goes into the Lightning checkpoint under the plain top-level key ``"ema"`` as
``{"decay", "start_step", "every", "num_updates", "weights": {name: tensor}}`` (plain containers and tensors:
loads with ``torch.load(weights_only=True)``); the names are the parameter names *inside* the averaged module
(e.g. ``dac.encoder...`` for the codec's ``generator``). A resume restores it exactly; a checkpoint without it
(EMA switched on mid-run) starts a fresh average from the loaded weights.

Evaluation: `swapped_in` puts the averaged weights into the model (the live ones are set aside and put back on
exit); the tasks validate and export inside it. A checkpoint written while swapped in (Lightning's
``ModelCheckpoint`` saves in its ``on_validation_end``, before the task's own hook swaps back) gets the live
weights in its ``state_dict`` (`fix_state_dict`), so resuming from it is exact too.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "ema"
__all__ = ["ModelEMA", "build_ema", "ema_config", "CHECKPOINT_KEY"]


def ema_config(cfg: Any) -> dict | None:
    """``task.ema`` as ``{decay, start_step, every}`` (None: off), checked; a clear error names the bad key."""
    if cfg is None or cfg is False:
        return None
    if not isinstance(cfg, Mapping):
        raise ValueError(f"task.ema must be null or a mapping {{decay, start_step, every}}, got {cfg!r}")
    unknown = set(cfg) - {"decay", "start_step", "every", "enabled"}
    if unknown:
        raise ValueError(f"task.ema has unknown keys {sorted(unknown)} (known: decay, start_step, every)")
    if not cfg.get("enabled", True):
        return None
    out = {"decay": float(cfg.get("decay", 0.999)), "start_step": int(cfg.get("start_step", 0)),
           "every": int(cfg.get("every", 1))}
    if not 0.0 <= out["decay"] < 1.0:
        raise ValueError(f"task.ema.decay must lie in [0, 1), got {out['decay']}")
    if out["every"] < 1 or out["start_step"] < 0:
        raise ValueError(f"task.ema.every must be >= 1 and task.ema.start_step >= 0, got {out}")
    return out


class ModelEMA:
    """EMA of ``module``'s floating-point parameters (see the module docstring). Not an ``nn.Module``: it stays
    out of the task's module tree, its state_dict, its optimiser and DDP."""

    def __init__(self, module: nn.Module, decay: float = 0.999, start_step: int = 0, every: int = 1):
        self.module = module
        self.decay, self.start_step, self.every = float(decay), int(start_step), max(1, int(every))
        named = [(n, p) for n, p in module.named_parameters() if p.is_floating_point()]
        self.names = [n for n, _ in named]
        self._params = [p for _, p in named]
        self.num_updates = 0               # optimiser steps seen (a host integer: no sync)
        self.shadow: list[Tensor] | None = None  # fp32, on the parameters' device; created lazily
        self._backup: list[Tensor] | None = None  # the live weights while the EMA is swapped in

    # ------------------------------------------------------------------ state
    def _live(self) -> list[Tensor]:
        return [p.detach() for p in self._params]

    def _refresh(self) -> None:
        """Re-read the parameters by name (a module whose parameters were replaced, e.g. loaded with assign=True)."""
        named = dict(self.module.named_parameters())
        self._params = [named[n] for n in self.names]

    def _ensure(self) -> list[Tensor]:
        """The averaged weights on the parameters' device (created from the weights, or moved, on first use)."""
        if self.shadow is None or (self._params and self.shadow[0].device != self._params[0].device):
            self._refresh()
        live = self._live()
        if self.shadow is None:
            self.shadow = [p.float().clone() if p.dtype != torch.float32 else p.clone() for p in live]
        elif live and self.shadow[0].device != live[0].device:  # a restored state (CPU) or a moved model
            self.shadow = [s.to(p.device, torch.float32) for s, p in zip(self.shadow, live)]
        return self.shadow

    @torch.no_grad()
    def update(self) -> None:
        """Call once after each optimiser step (of the averaged module). No host-device sync."""
        if self.swapped:
            raise RuntimeError("ModelEMA.update() while the EMA weights are swapped in")
        shadow = self._ensure()
        self.num_updates += 1
        live = self._live()
        if any(p.dtype != torch.float32 for p in live):
            live = [p.float() for p in live]
        if self.num_updates <= self.start_step:
            torch._foreach_copy_(shadow, live)
        elif self.num_updates % self.every == 0:
            torch._foreach_lerp_(shadow, live, 1.0 - self.decay)

    # ------------------------------------------------------------------ swapping
    @property
    def swapped(self) -> bool:
        return self._backup is not None

    @torch.no_grad()
    def swap_in(self) -> None:
        """Put the averaged weights into the module (the live ones are kept aside); no-op if already in."""
        if self.swapped:
            return
        shadow = self._ensure()
        live = self._live()
        self._backup = [p.clone() for p in live]
        torch._foreach_copy_(live, shadow)
        _clear_caches(self.module)

    @torch.no_grad()
    def swap_out(self) -> None:
        """Put the live weights back (exactly); no-op if the EMA is not swapped in."""
        if not self.swapped:
            return
        torch._foreach_copy_(self._live(), self._backup)
        self._backup = None
        _clear_caches(self.module)

    @contextlib.contextmanager
    def swapped_in(self) -> Iterator[None]:
        was = self.swapped
        self.swap_in()
        try:
            yield
        finally:
            if not was:
                self.swap_out()

    @torch.no_grad()
    def copy_to_model(self) -> None:
        """Overwrite the module's weights with the averaged ones for good (inference loaders)."""
        if self.swapped:
            self._backup = None
        else:
            torch._foreach_copy_(self._live(), self._ensure())
        _clear_caches(self.module)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        """Plain containers and tensors (weights-only loadable)."""
        shadow = self._ensure()
        return {"decay": self.decay, "start_step": self.start_step, "every": self.every,
                "num_updates": int(self.num_updates), "weights": dict(zip(self.names, shadow))}

    def check_state(self, state: Any) -> list[str]:
        """Every problem of a checkpoint's EMA entry against this EMA (missing / unexpected / shape), one line
        each, as `describe_mismatch`; empty when it fits."""
        if not isinstance(state, Mapping) or not isinstance(state.get("weights"), Mapping):
            return ["unexpected: ema (not a mapping with 'weights')"]
        weights = state["weights"]
        problems = [f"missing: ema.{n} {tuple(p.shape)}" for n, p in zip(self.names, self._params) if n not in weights]
        own = dict(zip(self.names, self._params))
        problems += [f"unexpected: ema.{n}" for n in weights if n not in own]
        problems += [f"shape: ema.{n} checkpoint {tuple(v.shape)} vs model {tuple(own[n].shape)}"
                     for n, v in weights.items() if n in own and isinstance(v, Tensor)
                     and tuple(v.shape) != tuple(own[n].shape)]
        problems += [f"unexpected: ema.{n} (not a tensor)" for n, v in weights.items() if not isinstance(v, Tensor)]
        return problems

    def load_state_dict(self, state: Mapping) -> None:
        problems = self.check_state(state)
        if problems:
            raise ValueError("the checkpoint's EMA state does not fit this model:\n  " + "\n  ".join(problems[:10]))
        weights = state["weights"]
        device = self._params[0].device if self._params else torch.device("cpu")
        self.shadow = [weights[n].detach().to(device, torch.float32).clone() for n in self.names]
        self.num_updates = int(state.get("num_updates", 0))
        self._backup = None
        for key in ("decay", "start_step", "every"):  # the configuration wins; say when it changed
            if key in state and float(state[key]) != float(getattr(self, key)):
                log.info("task.ema.%s is %s (the checkpoint's EMA ran with %s)", key, getattr(self, key), state[key])

    def fix_state_dict(self, state_dict: dict, prefix: str) -> None:
        """In a state_dict taken while the EMA is swapped in, put the live weights back under their keys."""
        if not self.swapped:
            return
        for name, live in zip(self.names, self._backup):
            key = prefix + name
            if key in state_dict:
                state_dict[key] = live.clone()


def _clear_caches(module: nn.Module) -> None:
    """Weight-norm layers cache their folded inference weight (keyed on version counters that in-place copies
    by some kernels do not bump): drop the caches after the weights change under them."""
    try:
        from flexitrain.models.codec.layers import clear_folded_weights
    except ImportError:  # pragma: no cover
        return
    clear_folded_weights(module)


def build_ema(cfg: Any, module: nn.Module) -> ModelEMA | None:
    """A `ModelEMA` of ``module`` for ``task.ema`` (None when off)."""
    c = ema_config(cfg)
    return None if c is None else ModelEMA(module, **c)
