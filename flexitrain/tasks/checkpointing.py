"""Strict weight loading: a checkpoint never loads half silently."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Weights from a Lightning `.ckpt` (its `state_dict`) or a `.safetensors` file, as fp32 where floating."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=False)
        state = state.get("state_dict", state)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def describe_mismatch(module: nn.Module, state: dict[str, torch.Tensor], ignore_prefixes=()) -> list[str]:
    """Every missing, unexpected and mis-shaped key, one line each (empty when the two agree)."""
    own = module.state_dict()
    keep = lambda k: not any(k.startswith(p) for p in ignore_prefixes)  # noqa: E731
    problems = [f"missing: {k} {tuple(v.shape)}" for k, v in own.items() if k not in state and keep(k)]
    problems += [f"unexpected: {k} {tuple(v.shape)}" for k, v in state.items() if k not in own and keep(k)]
    problems += [f"shape: {k} checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and keep(k) and tuple(v.shape) != tuple(own[k].shape)]
    return problems


def load_weights_strict(module: nn.Module, path: str | Path, ignore_prefixes=()) -> None:
    state = read_state_dict(path)
    problems = describe_mismatch(module, state, ignore_prefixes)
    if problems:
        raise RuntimeError(f"cannot load {path} strictly ({len(problems)} problems):\n  " + "\n  ".join(problems))
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(any(k.startswith(p) for p in ignore_prefixes) for k in missing), missing
