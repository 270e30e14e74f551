"""Strict loading of AR TTS weights: the released ``artts.safetensors`` (keys ``transformer_lm.*``, possibly
with the frozen codec's ``flexicodec_model.*`` beside them), an ARTTSTask Lightning checkpoint (``model.*``)
or a plain state dict of ``ARTTSModel``."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

RELEASED_PREFIX = "transformer_lm."
IGNORED_PREFIXES = ("flexicodec_model.", "dualcodec_model.")  # the frozen codec stored inside the wrapper


def read_state_dict(path: str | Path, what: str = "AR checkpoint") -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, or of a ``.pt`` / ARTTSTask ``.ckpt`` read weights-only; one clear
    error (naming the file) for an empty, damaged, unsafe or another model's file."""
    from flexitrain.utils.safe_load import (CheckpointError, check_kind, checkpoint_task, guess_kind,
                                            read_safetensors, safe_torch_load)

    path = Path(path)
    if path.suffix == ".safetensors":
        state = read_safetensors(path, what)
        found = guess_kind(state)
    else:
        ckpt = safe_torch_load(path, what)
        if not isinstance(ckpt, dict):
            raise CheckpointError(path, f"holds a {type(ckpt).__name__}, not a state dict", what)
        found = checkpoint_task(ckpt) if "state_dict" in ckpt else None
        state = ckpt.get("state_dict", ckpt.get("model", ckpt))
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(path, "holds no state dict of tensors (state_dict / model)", what)
        found = found or guess_kind(state)
    if found not in (None, "ARTTSModel", "ARTTSTask"):
        check_kind(path, found, "ARTTSModel", what)
    return state


def to_model_keys(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Released / Lightning / plain keys -> ARTTSModel keys; returns (state, skipped codec keys)."""
    skipped = [k for k in state if k.startswith(IGNORED_PREFIXES)]
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    for prefix in (RELEASED_PREFIX, "model."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
            break
    return state, skipped


def check_compatible(model: nn.Module, state: dict[str, torch.Tensor], path: str | Path | None = None,
                     what: str = "AR checkpoint") -> None:
    """Raise one error (naming ``path``) listing the missing keys, unexpected keys and shape mismatches (a
    handful of each, with their counts)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in sorted(set(own) & set(state)) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        from flexitrain.utils.safe_load import WrongCheckpointError, format_keys

        lines = ["does not match the AR model configuration:"]
        for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + format_keys(items))
        if shapes:
            lines.append("  (the released model needs model=ar_tts, i.e. released_config(): d 1024, LM FFN 5376, "
                         "51866 text ids, 32768 speech tokens)")
        if path is None:
            raise ValueError(f"{what} " + "\n".join(lines))
        raise WrongCheckpointError(path, "\n".join(lines), what)


def load_ar_weights(model: nn.Module, path: str | Path, what: str = "AR checkpoint") -> list[str]:
    """Strictly load ``path`` into ``model`` (nothing is loaded unless every key fits); returns the skipped codec
    keys."""
    state, skipped = to_model_keys(read_state_dict(path, what))
    check_compatible(model, state, path, what)
    model.load_state_dict({k: v.to(model.state_dict()[k].dtype) for k, v in state.items()}, strict=True)
    return skipped


CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_pretrained(model: nn.Module, path: str | Path, config: dict) -> Path:
    """An AR inference directory: ``config.json`` (ARTTSModel arguments) + ``model.safetensors``."""
    import json

    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / WEIGHTS_NAME))
    (path / CONFIG_NAME).write_text(json.dumps(dict(config), indent=2))
    return path


def load_pretrained(path: str | Path, what: str = "AR directory") -> nn.Module:
    """An `ARTTSModel` from a ``config.json`` + ``model.safetensors`` directory (tools/import_artts.py --out,
    `save_pretrained`), strictly and without pickle; a bad file raises one error naming it."""
    from flexitrain.models.tts.ar_tts import ARTTSModel
    from flexitrain.utils.safe_load import CheckpointError, check_dir, check_kind, guess_config_kind, read_json

    expects = f"an AR directory with {CONFIG_NAME} + {WEIGHTS_NAME} (tools/import_artts.py --out)"
    p = check_dir(path, what, expects)
    if not (p / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{p} has no {CONFIG_NAME} (write it with tools/import_artts.py --out)")
    config = read_json(p / CONFIG_NAME, f"{what} config")
    if not isinstance(config, dict):
        raise CheckpointError(p / CONFIG_NAME, "is not a mapping of ARTTSModel arguments", f"{what} config")
    check_kind(p, guess_config_kind(config), "ARTTSModel", what)
    try:
        model = ARTTSModel(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(p / CONFIG_NAME, f"does not build an ARTTSModel: {err}", f"{what} config") from None
    if not (p / WEIGHTS_NAME).exists():
        raise FileNotFoundError(f"{p / WEIGHTS_NAME} not found: expected {expects}")
    load_ar_weights(model, p / WEIGHTS_NAME, f"{what} weights")
    return model.eval()
