"""FlexiCodec configuration: the official constructor arguments (names, defaults) and yaml I/O."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

# The released model (amphionspace/FlexiCodec flexicodec/conf/model_config.yaml == HF 12hz_v1_half_config.yaml).
RELEASED_CONFIG: dict[str, Any] = {
    "sample_rate": 16000,
    "encoder_dim": 32,
    "encoder_rates": [4, 4, 5, 8, 2],
    "decoder_rates": [2, 8, 5, 4, 4],
    "n_codebooks": 24,
    "quantizer_dropout": 1.0,
    "codebook_size": 4096,
    "semantic_codebook_size": 32768,
    "is_causal": False,
    "use_similarity_alignment": True,
    "similarity_threshold": 0.91,
    "semantic_downsample_factor": 1.33333,
    "skip_normalize": True,
    "semantic_model_type": "sensevoice",
    "latent_dim": 512,
    "ssl_dim": 512,
    "use_bottleneck_transformer": True,
    "transformer_num_layers": 32,
    "transformer_dim_feedforward": 2048,
    "transformer_num_heads": 8,
    "transformer_causal": False,
    "transformer_context_frames": 16,
    "max_tokens_per_group": 8,
    "semantic_model_path": None,
    "use_query_token_aggregator": True,
    "use_dynamic_similarity_threshold": True,
    "similarity_threshold_lower": 0.8,
    "similarity_threshold_upper": 1.0,
}


def official_arg_names() -> list[str]:
    """Constructor arguments of ``FlexiCodec`` that mirror the official ones (no flexitrain extras)."""
    from .flexicodec import FlexiCodec, _EXTRA_ARGS

    names = inspect.signature(FlexiCodec.__init__).parameters
    return [n for n in names if n != "self" and n not in _EXTRA_ARGS]


def check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Reject unknown keys with a clear message (typos would otherwise silently use defaults)."""
    known = set(official_arg_names())
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"unknown FlexiCodec config keys: {unknown}; known keys: {sorted(known)}")
    return dict(config)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a config yaml: either the official layout (``model: {...}``) or a flat mapping."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    return check_config(data)


def save_config(config: dict[str, Any], path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump({"model": dict(config)}, f, sort_keys=False)
