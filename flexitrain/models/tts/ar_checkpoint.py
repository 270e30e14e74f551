"""Strict loading of AR TTS weights: the released ``artts.safetensors`` (keys ``transformer_lm.*``, possibly
with the frozen codec's ``flexicodec_model.*`` beside them), an ARTTSTask Lightning checkpoint (``model.*``)
or a plain state dict of ``ARTTSModel``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

RELEASED_PREFIX = "transformer_lm."
IGNORED_PREFIXES = ("flexicodec_model.", "dualcodec_model.")  # the frozen codec stored inside the wrapper


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"AR checkpoint {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    ckpt = torch.load(str(path), map_location="cpu", weights_only=True)
    return ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else ckpt


def to_model_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Released / Lightning / plain keys -> ARTTSModel keys; returns (state, skipped codec keys)."""
    skipped = [k for k in state if k.startswith(IGNORED_PREFIXES)]
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    for prefix in (RELEASED_PREFIX, "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            break
    return state, skipped


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Raise one error listing every missing key, unexpected key and shape mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        lines = ["AR checkpoint does not match the model configuration:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items[:8]) + (" ..." if len(items) > 8 else ""))
        if shapes:
            lines.append("  (the released model needs model=ar_tts, i.e. released_config(): d 1024, LM FFN 5376, "
                         "51866 text ids, 32768 speech tokens)")
        raise ValueError("\n".join(lines))


def load_ar_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Strictly load ``path`` into ``model``; returns the skipped codec keys."""
    state, skipped = to_model_keys(read_state_dict(path))
    check_compatible(model, state)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
    return skipped
