"""Checkpoint I/O for FlexiCodec: strict loading with an explicit ignore list, official import,
and the flexitrain checkpoint directory format (``config.yaml`` + ``model.safetensors``)."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Iterable, Mapping

import torch
from torch import nn

from flexitrain.utils.safe_load import (MAX_LISTED, CheckpointError, WrongCheckpointError, check_dir, check_kind,
                                        guess_config_kind, guess_kind, read_safetensors, read_yaml)

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"

# Keys an official checkpoint may hold that a flexitrain codec does not load:
# training-only REPA head, and the frozen SenseVoice teacher (loaded separately).
DEFAULT_IGNORE = ("repa_mlp.*", "semantic_model.*")
# Constant dummy buffers (zeros(1) / ones(1) for SenseVoice) that a checkpoint may omit.
DEFAULT_ALLOW_MISSING = ("semantic_mean", "semantic_std")


class CheckpointMismatchError(WrongCheckpointError):
    """Missing / unexpected / mis-shaped keys: the full lists as attributes, the message names the file and a
    handful of each with their counts."""

    def __init__(self, missing: list[str], unexpected: list[str], mismatched: list[str],
                 path: str | Path | None = None, what: str = "checkpoint", limit: int = MAX_LISTED):
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = ["does not match the model:"]
        for title, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                            ("shape mismatches", mismatched)):
            if keys:
                lines.append(f"  {title} ({len(keys)}):")
                lines += [f"    {k}" for k in keys[:limit]]
                if len(keys) > limit:
                    lines.append(f"    ... and {len(keys) - limit} more")
        super().__init__(path if path is not None else "<state dict>", "\n".join(lines), what)

    def with_path(self, path: str | Path, what: str = "checkpoint") -> "CheckpointMismatchError":
        return CheckpointMismatchError(self.missing, self.unexpected, self.mismatched, path, what)


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


EXPECTS = (f"a FlexiCodec directory with {CONFIG_NAME} + {WEIGHTS_NAME}, from FlexiCodec.save_pretrained or "
           f"tools/import_official.py")


def read_pretrained_config(path: str | Path, what: str = "codec directory") -> dict:
    """The FlexiCodec constructor arguments of an export's ``config.yaml`` (safe YAML), or one clear error."""
    from .config import check_config

    path = Path(path)
    data = read_yaml(path / CONFIG_NAME, f"{what} config")
    if isinstance(data, dict) and isinstance(data.get("model"), dict):
        data = data["model"]
    if not isinstance(data, dict):
        raise CheckpointError(path / CONFIG_NAME, "is not a mapping of FlexiCodec settings", f"{what} config")
    check_kind(path, guess_config_kind(data), "FlexiCodec", what)
    try:
        return check_config(data)
    except ValueError as err:
        raise CheckpointError(path / CONFIG_NAME, str(err), f"{what} config") from None


def load_pretrained(path: str | Path, semantic_teacher: nn.Module | None = None,
                    map_location: str | torch.device = "cpu", what: str = "codec directory"):
    """Build a FlexiCodec from a local checkpoint directory and load it strictly. No pickle is read: the weights
    are safetensors, the configuration YAML. A bad directory raises one error naming the file and the problem."""
    from .flexicodec import FlexiCodec

    path = check_dir(path, what, EXPECTS)
    for f in (path / CONFIG_NAME, path / WEIGHTS_NAME):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected {EXPECTS}")
    config = read_pretrained_config(path, what)
    state = read_safetensors(path / WEIGHTS_NAME, f"{what} weights", device=map_location)
    check_kind(path / WEIGHTS_NAME, guess_kind(state), "FlexiCodec", f"{what} weights")
    try:
        model = FlexiCodec(**config, semantic_teacher=semantic_teacher)
    except (TypeError, ValueError) as err:
        raise CheckpointError(path / CONFIG_NAME, f"does not build a FlexiCodec: {err}", f"{what} config") from None
    try:
        load_state_dict_strict(model, state)
    except CheckpointMismatchError as err:
        raise err.with_path(path / WEIGHTS_NAME, f"{what} weights") from None
    return model.to(map_location).eval()


def import_official(weights: str | Path, config: dict, out_dir: str | Path,
                    extra_ignore: Iterable[str] = (), allow_missing: Iterable[str] = (),
                    strip_prefix: str = "") -> Path:
    """Official safetensors (+ its config dict) → flexitrain checkpoint directory.

    fp16 → fp32; keys checked strictly except ``DEFAULT_IGNORE`` + ``extra_ignore`` (and
    ``allow_missing`` model keys, which keep their init).
    """
    from .config import check_config
    from .flexicodec import FlexiCodec

    config = check_config(config)
    state = read_safetensors(weights, "official codec weights")
    found = guess_kind(k[len(strip_prefix):] if strip_prefix and k.startswith(strip_prefix) else k for k in state)
    check_kind(weights, found, "FlexiCodec", "official codec weights",
               hint="give tools/import_official.py the codec's .safetensors" if found else "")
    with torch.device("cpu"):
        model = FlexiCodec(**config)
    try:
        load_state_dict_strict(model, state, ignore=DEFAULT_IGNORE + tuple(extra_ignore),
                               allow_missing=DEFAULT_ALLOW_MISSING + tuple(allow_missing), strip_prefix=strip_prefix)
    except CheckpointMismatchError as err:
        raise err.with_path(weights, "official codec weights") from None
    return save_pretrained(model, out_dir)
