"""Strict import of the released NAR checkpoint (``hf://jiaqili3/flexicodec/nartts.safetensors``).

The released file is the official `VoiceboxWrapper` state dict: ``voicebox_model.*``, ``repa_projection.*``
and (maybe) the frozen codec ``flexicodec_model.*`` / ``dualcodec_model.*``, which is dropped here (the
TTS codec is loaded on its own). Sizes are read from the tensor shapes; the head count and the REPA tap
cannot be, so they are arguments (released: 16 heads, layer 6). Every other key must match exactly.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Mapping

import torch

from flexitrain.models.codec.checkpoint import check_state_dict
from flexitrain.models.tts.voicebox import VoiceboxNAR

log = logging.getLogger(__name__)
CODEC_PREFIXES = ("flexicodec_model.", "dualcodec_model.")
UNSUPPORTED = {"framerate_embedding.": "add_framerate_embedding", "spk_linear.": "concat_speaker_embedding",
               "speaker_model.": "concat_speaker_embedding"}


def infer_voicebox_config(state: Mapping[str, torch.Tensor], num_heads: int = 16, repa_layer_idx: int = 6) -> dict:
    try:
        emb = state["voicebox_model.cond_emb.weight"]
        mel_in = state["voicebox_model.diff_estimator.mel_mlp.0.weight"]
    except KeyError as e:
        raise ValueError(f"not a Voicebox NAR state dict: key {e} is missing") from None
    layers = {int(m.group(1)) for k in state
              if (m := re.match(r"voicebox_model\.diff_estimator\.layers\.(\d+)\.", k))}
    use_repa = "repa_projection.0.weight" in state
    cfg = dict(mel_dim=mel_in.shape[1], hidden_size=emb.shape[1], num_layers=len(layers), num_heads=num_heads,
               cond_codebook_size=emb.shape[0], repa_layer_idx=repa_layer_idx, use_repa=use_repa)
    if use_repa:
        cfg.update(ssl_feature_dim=state["repa_projection.0.weight"].shape[0] // 4,
                   repa_projection_dim=state["repa_projection.2.weight"].shape[0])
    return cfg


def import_released_nartts(state_or_path: str | Path | Mapping[str, torch.Tensor], num_heads: int = 16,
                           repa_layer_idx: int = 6, what: str = "NAR weights") -> VoiceboxNAR:
    """Build a `VoiceboxNAR` from a released-format state dict / ``.safetensors`` file, strictly (no pickle; a bad
    file raises one error naming it)."""
    from flexitrain.models.codec.checkpoint import CheckpointMismatchError
    from flexitrain.utils.safe_load import WrongCheckpointError, check_kind, guess_kind, read_safetensors

    path = None
    if isinstance(state_or_path, (str, Path)):
        path = Path(state_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{what} {str(path)!r} does not exist (download nartts.safetensors yourself first)")
        state = read_safetensors(path, what)
        own = [k.removeprefix("module.") for k in state]
        check_kind(path, guess_kind(k for k in own if not k.startswith(CODEC_PREFIXES)), "VoiceboxNAR", what)
    else:
        state = dict(state_or_path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    codec_keys = [k for k in state if k.startswith(CODEC_PREFIXES)]
    if codec_keys:
        log.info("dropping %d frozen-codec keys (%s...)", len(codec_keys), codec_keys[0])
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items() if not k.startswith(CODEC_PREFIXES)}
    for prefix, option in UNSUPPORTED.items():
        if any(k.startswith(prefix) for k in state):
            raise ValueError(f"{path or 'checkpoint'}: uses the official `{option}` variant ({prefix}* keys): "
                             f"not supported")
    try:
        config = infer_voicebox_config(state, num_heads, repa_layer_idx)
    except ValueError as err:
        if path is None:
            raise
        raise WrongCheckpointError(path, f"is {err}", what) from None
    model = VoiceboxNAR(**config)
    try:
        model.load_state_dict(check_state_dict(model, state, ignore=()), strict=True)
    except CheckpointMismatchError as err:
        raise (err.with_path(path, what) if path is not None else err) from None
    return model.eval()
