"""Checkpoint I/O for FlexiCodec: strict loading with an explicit ignore list, official import,
and the flexitrain checkpoint directory format (``config.yaml`` + ``model.safetensors``)."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"

# Keys an official checkpoint may hold that a flexitrain codec does not load:
# training-only REPA head, and the frozen SenseVoice teacher (loaded separately).
DEFAULT_IGNORE = ("repa_mlp.*", "semantic_model.*")
# Constant dummy buffers (zeros(1) / ones(1) for SenseVoice) that a checkpoint may omit.
DEFAULT_ALLOW_MISSING = ("semantic_mean", "semantic_std")


class CheckpointMismatchError(RuntimeError):
    """Raised with the full list of missing / unexpected / mis-shaped keys."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str]):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = ["checkpoint does not match the model:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines += [f"    {k}" for k in keys]
        super().__init__("\n".join(lines))


def _ignored(key: str, patterns: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(key, p) for p in patterns)


def to_float32(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """fp16 / bf16 tensors → fp32 (integer buffers untouched)."""
    return {k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}


def check_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor],
                     ignore: Iterable[str] = DEFAULT_IGNORE,
                     allow_missing: Iterable[str] = ()) -> dict[str, torch.Tensor]:
    """Return the entries of ``state`` to load; raise :class:`CheckpointMismatchError` listing
    every missing, unexpected and mis-shaped key. ``ignore`` patterns (fnmatch) are skipped on
    both sides (e.g. a teacher the model holds but the file does not); model keys matching
    ``allow_missing`` may be absent from the file (they keep their init, e.g. new modules when a
    fixed-rate stage-1 checkpoint initialises the flexible model)."""
    ignore, allow_missing = tuple(ignore), tuple(allow_missing)
    expected = {k: v for k, v in model.state_dict().items() if not _ignored(k, ignore)}
    given = {k: v for k, v in state.items() if not _ignored(k, ignore)}
    missing = sorted(k for k in set(expected) - set(given) if not _ignored(k, allow_missing))
    unexpected = sorted(set(given) - set(expected))
    mismatched = sorted(f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(expected[k].shape)}"
                        for k in set(given) & set(expected) if tuple(given[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched)
    return given


def load_state_dict_strict(model: nn.Module, state: Mapping[str, torch.Tensor],
                           ignore: Iterable[str] = DEFAULT_IGNORE, allow_missing: Iterable[str] = (),
                           strip_prefix: str = "") -> None:
    """Load (after fp16→fp32) with strict key/shape checking except the ``ignore`` /
    ``allow_missing`` patterns. ``strip_prefix`` removes e.g. ``module.`` from file keys."""
    if strip_prefix:
        state = {(k[len(strip_prefix):] if k.startswith(strip_prefix) else k): v for k, v in state.items()}
    given = check_state_dict(model, to_float32(state), ignore, allow_missing)
    model.load_state_dict(given, strict=False)  # strictness already enforced above


def save_pretrained(model: nn.Module, path: str | Path) -> Path:
    """Write ``config.yaml`` + ``model.safetensors`` (teacher weights excluded)."""
    from safetensors.torch import save_file

    from .config import save_config

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    save_config(model.config, path / CONFIG_NAME)
    state = {k: v.detach().contiguous().cpu() for k, v in model.codec_state_dict().items()}
    save_file(state, str(path / WEIGHTS_NAME), metadata={"format": "pt", "producer": "flexitrain"})
    return path


def load_pretrained(path: str | Path, semantic_teacher: nn.Module | None = None,
                    map_location: str | torch.device = "cpu"):
    """Build a FlexiCodec from a local checkpoint directory and load it strictly."""
    from safetensors.torch import load_file

    from .config import load_config
    from .flexicodec import FlexiCodec

    path = Path(path)
    cfg_file, weights = path / CONFIG_NAME, path / WEIGHTS_NAME
    for f in (cfg_file, weights):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected a flexitrain checkpoint directory "
                                    f"({CONFIG_NAME} + {WEIGHTS_NAME}); see tools/import_official.py")
    model = FlexiCodec(**load_config(cfg_file), semantic_teacher=semantic_teacher)
    load_state_dict_strict(model, load_file(str(weights), device=str(map_location)))
    return model.to(map_location).eval()


def import_official(weights: str | Path, config: dict, out_dir: str | Path,
                    extra_ignore: Iterable[str] = (), allow_missing: Iterable[str] = (),
                    strip_prefix: str = "") -> Path:
    """Official safetensors (+ its config dict) → flexitrain checkpoint directory.

    fp16 → fp32; keys checked strictly except ``DEFAULT_IGNORE`` + ``extra_ignore`` (and
    ``allow_missing`` model keys, which keep their init).
    """
    from safetensors.torch import load_file

    from .config import check_config
    from .flexicodec import FlexiCodec

    config = check_config(config)
    with torch.device("cpu"):
        model = FlexiCodec(**config)
    load_state_dict_strict(model, load_file(str(weights)), ignore=DEFAULT_IGNORE + tuple(extra_ignore),
                           allow_missing=DEFAULT_ALLOW_MISSING + tuple(allow_missing), strip_prefix=strip_prefix)
    return save_pretrained(model, out_dir)
