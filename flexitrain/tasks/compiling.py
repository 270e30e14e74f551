"""`torch.compile` of a GAN codec task's hot modules behind one config switch (`task.compile`).

Compiled in place with `nn.Module.compile()`: parameters, state-dict keys and checkpoints are unchanged, and
the eager module stays reachable. What is compiled are the parts with fixed control flow — the DAC encoder and
decoder, the bottleneck transformer, each sub-discriminator, the mel loss and the teacher's encoder — not the
frame merging, whose token counts vary per batch. The element-wise chains there (Snake, weight norm, masks,
log-mel) become fused kernels, which is what a launch-bound GPU step needs.
"""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

DEFAULTS = {"enabled": False, "backend": "inductor", "mode": None, "dynamic": None, "fullgraph": False, "teacher": True,
            "cache_size_limit": 64}


def compile_options(cfg: Any) -> dict:
    """``task.compile``: a bool, or a dict of `DEFAULTS` keys (``backend``/``mode`` as `torch.compile`'s;
    ``backend: aot_eager`` traces the same graphs without generating kernels: a quick correctness check on CPU)."""
    if isinstance(cfg, bool) or cfg is None:
        return {**DEFAULTS, "enabled": bool(cfg)}
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        raise ValueError(f"task.compile: unknown keys {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    return {**DEFAULTS, "enabled": True, **dict(cfg)}


def codec_inference_targets(codec: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """A FlexiCodec's fixed-control-flow parts: the DAC encoder and decoder and the bottleneck transformer."""
    targets = [(f"{prefix}dac.encoder", codec.dac.encoder), (f"{prefix}dac.decoder", codec.dac.decoder)]
    bt = getattr(codec, "bottleneck_transformer", None)
    if bt is not None and not isinstance(bt, nn.Identity):
        targets.append((f"{prefix}bottleneck_transformer", bt))
    return targets


def codec_compile_targets(generator: nn.Module, discriminator: nn.Module, mel_loss: nn.Module,
                          teacher: nn.Module | None) -> list[tuple[str, nn.Module]]:
    targets = codec_inference_targets(generator, "generator.")
    for i, d in enumerate(getattr(discriminator, "discriminators", [])):
        targets.append((f"discriminator.discriminators.{i}", d))
    targets.append(("mel_loss", mel_loss))
    if teacher is not None and hasattr(teacher, "encoder"):
        targets.append(("teacher.encoder", teacher.encoder))
    return targets


def compile_modules(targets: list[tuple[str, nn.Module]], options: dict) -> list[str]:
    """Compile each module in place (idempotent); returns the names compiled now."""
    if not options["enabled"]:
        return []
    import torch._dynamo

    # Each bucketed batch length (and fake+real vs fake alone in D) is a shape: room for all of them.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                int(options["cache_size_limit"]))
    done = []
    for name, module in targets:
        if getattr(module, "_compiled_call_impl", None) is not None:
            continue
        module.compile(backend=options["backend"], mode=options["mode"], dynamic=options["dynamic"], fullgraph=options["fullgraph"])
        done.append(name)
    log.info("torch.compile: %s", ", ".join(done) or "nothing new")
    return done
