"""Learning-rate schedules as LambdaLR multipliers of the optimiser's base LR, chosen by ``task.scheduler.name``.

Every schedule starts with a linear warm-up ``(step + 1) / warmup_steps`` over ``warmup_steps`` steps (none when
0); ``n = step − warmup_steps`` counts the steps after it, ``T = total_steps − warmup_steps`` its length, and
``m = min_lr_ratio`` is the lowest multiplier:

==============  ====================================================================  ==========================
name            after the warm-up                                                     extra keys
==============  ====================================================================  ==========================
cosine          ``m + (1 − m)·½(1 + cos(π·min(n/T, 1)))`` (the default; the official  —
                codec trainer's warm-up + cosine, codec.md §3.8)
constant        ``1``                                                                  —
linear          ``m + (1 − m)·(1 − min(n/T, 1))``                                      —
polynomial      ``m + (1 − m)·(1 − min(n/T, 1))^power`` (audiocraft's polynomial       ``power`` (1.0)
                decay)
exponential     ``max(m, gamma^n)`` (DAC's ``ExponentialLR``, stepped every            ``gamma`` (0.999996)
                iteration)
inverse_sqrt    ``max(m, sqrt(warmup_steps / (step + 1)))`` (Noam / CosyVoice's       —
                ``WarmupLR``; ``1/sqrt(step + 1)`` without warm-up)
==============  ====================================================================  ==========================

Schedules are closures, not objects: ``LambdaLR.state_dict`` stores nothing of them, so a checkpoint carries no
schedule settings and a resumed run follows the configuration it is started with (as before).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping

SCHEDULES = ("cosine", "constant", "linear", "polynomial", "exponential", "inverse_sqrt")
ALIASES = {"warmup_cosine": "cosine", "cos": "cosine", "none": "constant", "linear_decay": "linear",
           "poly": "polynomial", "exp": "exponential", "exponential_decay": "exponential", "noam": "inverse_sqrt",
           "rsqrt": "inverse_sqrt"}
# Keys a scheduler config may hold (`schedule_d`: CodecTask's switch for the discriminator's LR).
KNOWN_KEYS = {"name", "warmup_steps", "total_steps", "min_lr_ratio", "gamma", "power", "schedule_d"}


def warmup_cosine(warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.1) -> Callable[[int], float]:
    """Linear warmup 0 -> 1 over `warmup_steps`, then cosine decay to `min_lr_ratio` at `total_steps`."""
    warmup_steps, total_steps = max(0, int(warmup_steps)), max(1, int(total_steps))

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def schedule_name(cfg: Mapping[str, Any] | None) -> str:
    name = str((cfg or {}).get("name") or "cosine").lower()
    name = ALIASES.get(name, name)
    if name not in SCHEDULES:
        raise ValueError(f"task.scheduler.name={name!r} is not a schedule; choose one of {', '.join(SCHEDULES)}")
    return name


def lr_lambda(cfg: Mapping[str, Any] | None) -> Callable[[int], float]:
    """The multiplier function of ``task.scheduler`` (``name`` defaults to ``cosine``, today's behaviour)."""
    cfg = dict(cfg or {})
    unknown = set(cfg) - KNOWN_KEYS
    if unknown:
        raise ValueError(f"task.scheduler has unknown keys {sorted(unknown)} (known: {', '.join(sorted(KNOWN_KEYS))})")
    name = schedule_name(cfg)
    warmup = max(0, int(cfg.get("warmup_steps", 0) or 0))
    total = max(1, int(cfg.get("total_steps", 1) or 1))
    floor = float(cfg.get("min_lr_ratio", 0.0) if cfg.get("min_lr_ratio") is not None else 0.0)
    if name == "cosine":
        return warmup_cosine(warmup, total, floor)
    gamma, power = float(cfg.get("gamma", 0.999996)), float(cfg.get("power", 1.0))
    if name == "exponential" and not 0.0 < gamma <= 1.0:
        raise ValueError(f"task.scheduler.gamma must lie in (0, 1], got {gamma}")
    if name == "polynomial" and power <= 0:
        raise ValueError(f"task.scheduler.power must be > 0, got {power}")
    span = max(1, total - warmup)

    def decay(n: int) -> float:  # n >= 0 steps after the warm-up
        if name == "constant":
            return 1.0
        if name in ("linear", "polynomial"):
            left = 1.0 - min(1.0, n / span)
            return floor + (1.0 - floor) * left ** (1.0 if name == "linear" else power)
        if name == "exponential":
            return max(floor, gamma ** n)
        # inverse_sqrt (Noam): continuous with the warm-up at step = warmup_steps - 1
        return max(floor, math.sqrt(max(1, warmup) / (n + warmup + 1)))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return decay(step - warmup)

    return factor
