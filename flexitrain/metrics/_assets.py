"""Shared helpers of the offline model loaders: local paths only, clear errors naming config keys."""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def force_offline() -> None:
    """Make Hugging Face libraries fail fast instead of retrying the hub (they can hang for minutes)."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)


def require_local_path(path: str | os.PathLike, key: str, kind: str = "any", hint: str = "") -> Path:
    """Return ``path`` as an existing local Path of the given kind (``file``, ``dir`` or ``any``).

    Hub ids such as ``openai/whisper-tiny`` are never resolved: they simply do not exist locally,
    and the error says so and names the config ``key`` to fix.
    """
    p = Path(os.path.expanduser(str(path)))
    what = {"file": "a local file", "dir": "a local directory", "any": "a local file or directory"}[kind]
    extra = f" {hint}" if hint else ""
    if not p.exists():
        looks_like_hub = "/" in str(path) and not str(path).startswith(("/", ".", "~"))
        why = " It looks like a model-hub id: flexitrain never downloads models." if looks_like_hub else ""
        raise FileNotFoundError(f"{key}={str(path)!r} does not exist; it must be {what}.{why}{extra}")
    if kind == "file" and not p.is_file():
        raise FileNotFoundError(f"{key}={str(path)!r} is not a file; it must be {what}.{extra}")
    if kind == "dir" and not p.is_dir():
        raise FileNotFoundError(f"{key}={str(path)!r} is not a directory; it must be {what}.{extra}")
    return p


def import_optional(module: str, pip_name: str, key: str) -> Any:
    """Import ``module`` or raise ImportError saying which package the chosen ``key`` setting needs."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pin = torch.__version__.split("+")[0]
        raise ImportError(f"{key} needs the '{pip_name}' package ({e}); install it with "
                          f"`pip install torch=={pin} {pip_name}` (keep torch pinned on the same line) "
                          f"or choose another {key}") from e


def cfg_get(cfg: Mapping | None, name: str, default: Any = None) -> Any:
    """``cfg[name]`` for dicts and OmegaConf configs, ``default`` when absent or None."""
    if cfg is None:
        return default
    value = cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)
    return default if value is None else value


def to_mono_16k(wav, sample_rate: int, name: str = "wav") -> np.ndarray:
    """float32 mono numpy at 16 kHz, clipped to [-1, 1] (every bundled eval model expects that)."""
    if isinstance(wav, torch.Tensor):
        wav = wav.detach().to("cpu", torch.float32).numpy()
    x = np.asarray(wav, dtype=np.float32)
    if x.ndim > 1:
        x = x.squeeze()
    if x.ndim != 1:
        raise ValueError(f"{name} must be a mono waveform [T] (or [1, T]), got shape {np.shape(wav)}")
    if sample_rate != 16000:
        import soxr
        x = soxr.resample(x, sample_rate, 16000).astype(np.float32)
    return np.clip(x, -1.0, 1.0)
