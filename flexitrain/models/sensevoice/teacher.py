"""Frozen SenseVoiceSmall semantic teacher for FlexiCodec, native PyTorch (no FunASR at run time).

``wav [B, 1, T] | [B, T]`` at 16 kHz -> fbank/LFR/CMVN -> prepend the 4 prompt embeddings
(language "auto", event, emotion, "woitn") -> SAN-M encoder -> ``hidden_out`` without the prompt
positions, transposed to ``[B, 512, T_lfr]``. This is the ``semantic_repr`` of the official
``_extract_semantic_code`` (before the 16.67 -> 12.5 Hz interpolation), but with padding masks,
so a batch gives the same features as each item alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from torch import nn

from flexitrain.models.sensevoice.encoder import SANMEncoder
from flexitrain.models.sensevoice.frontend import SenseVoiceFrontend, load_am_mvn

__all__ = ["SenseVoiceTeacher", "SenseVoiceLoadError", "UNUSED_KEY_PREFIXES", "PROMPT_IDS"]

# FunASR SenseVoiceSmall prompt: lid "auto"=0, event=1, emotion=2, textnorm "woitn"=15.
PROMPT_IDS = (0, 1, 2, 15)
NUM_EMBEDDINGS = 16  # 7 + len(lid_dict) + len(textnorm_dict) in FunASR
# Keys of FunASR's model.pt that FlexiCodec does not use (CTC head, the tp_encoders stack).
UNUSED_KEY_PREFIXES = ("ctc.", "encoder.tp_encoders.", "encoder.tp_norm.")
CONFIG_KEY = "model.semantic_teacher.model_dir"
FRONTEND_KEYS = ("fs", "window", "n_mels", "frame_length", "frame_shift", "lfr_m", "lfr_n")


class SenseVoiceLoadError(ValueError):
    """A SenseVoice checkpoint does not match the architecture (lists every bad key)."""


class SenseVoiceTeacher(nn.Module):
    """Frozen, always-eval SenseVoiceSmall encoder that returns FlexiCodec's semantic features.

    Args:
        encoder_conf: FunASR ``encoder_conf`` (output_size, attention_heads, linear_units, num_blocks,
            kernel_size, sanm_shfit, ...).
        frontend_conf: FunASR ``frontend_conf`` (fs, window, n_mels, frame_length, frame_shift, lfr_m, lfr_n).
        cmvn: ``(add_shift, rescale)`` from ``am.mvn``; None skips CMVN.
        dither: Kaldi dither added to the int16-scaled frames; 0 (default) is deterministic,
            the official FlexiCodec front end uses FunASR's default 1.0.
        prompt_ids: embedding ids prepended before the encoder.
    """

    def __init__(self, encoder_conf: Mapping | None = None, frontend_conf: Mapping | None = None,
                 cmvn: tuple[torch.Tensor, torch.Tensor] | None = None, *, dither: float = 0.0,
                 prompt_ids: tuple[int, ...] = PROMPT_IDS, input_size: int | None = None):
        super().__init__()
        fe = {k: v for k, v in dict(frontend_conf or {}).items() if k in FRONTEND_KEYS}
        self.frontend = SenseVoiceFrontend(*(cmvn or (None, None)), dither=dither, **fe)
        input_size = int(input_size or self.frontend.output_size)
        if input_size != self.frontend.output_size:
            raise ValueError(f"input_size {input_size} != n_mels*lfr_m = {self.frontend.output_size}")
        if any(not 0 <= i < NUM_EMBEDDINGS for i in prompt_ids):
            raise ValueError(f"prompt_ids must be in [0, {NUM_EMBEDDINGS}), got {prompt_ids}")
        self.embed = nn.Embedding(NUM_EMBEDDINGS, input_size)
        self.encoder = SANMEncoder(input_size=input_size, **dict(encoder_conf or {}))
        self.register_buffer("prompt_ids", torch.tensor(prompt_ids, dtype=torch.long), persistent=False)
        self.output_size = self.encoder.output_size
        self.requires_grad_(False)
        super().train(False)

    # ---- frozen, always in eval mode -------------------------------------------------------
    def train(self, mode: bool = True) -> "SenseVoiceTeacher":
        """The teacher never trains: ``train()`` keeps it in eval mode (dropout off)."""
        return super().train(False)

    # ---- loading ---------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_dir: str | Path, *, dither: float = 0.0, map_location="cpu",
                        config_key: str = CONFIG_KEY) -> "SenseVoiceTeacher":
        """Build from a local FunASR SenseVoiceSmall directory: ``config.yaml``, ``model.pt``
        (or ``model.safetensors``) and ``am.mvn``. Nothing is downloaded. ``config_key`` is the config
        entry named in error messages."""
        import yaml

        model_dir = Path(model_dir).expanduser()
        if not model_dir.is_dir():
            raise FileNotFoundError(f"SenseVoiceSmall directory not found: {str(model_dir)!r}. Set `{config_key}` to a local "
                                    "copy of iic/SenseVoiceSmall (config.yaml, model.pt, am.mvn).")
        weights = next((model_dir / n for n in ("model.pt", "model.safetensors") if (model_dir / n).is_file()), None)
        needed = {"config.yaml": (model_dir / "config.yaml").is_file(), "am.mvn": (model_dir / "am.mvn").is_file(),
                  "model.pt": weights is not None}
        if not all(needed.values()):
            missing = [n for n, ok in needed.items() if not ok]
            raise FileNotFoundError(f"{model_dir} lacks {', '.join(missing)} (set `{config_key}` to a SenseVoiceSmall directory)")
        config = yaml.safe_load((model_dir / "config.yaml").read_text(encoding="utf-8")) or {}
        if config.get("encoder", "SenseVoiceEncoderSmall") != "SenseVoiceEncoderSmall":
            raise ValueError(f"{model_dir}/config.yaml: encoder {config.get('encoder')!r} is not SenseVoiceEncoderSmall")
        model = cls(config.get("encoder_conf") or {}, config.get("frontend_conf") or {}, load_am_mvn(model_dir / "am.mvn"),
                    dither=dither, input_size=config.get("input_size"))
        model.load_funasr_state_dict(_read_weights(weights, map_location), source=str(weights), config_key=config_key)
        return model

    def load_funasr_state_dict(self, state_dict: Mapping[str, torch.Tensor], source: str = "state dict",
                               config_key: str = CONFIG_KEY) -> None:
        """Strictly load FunASR ``SenseVoiceSmall.state_dict()`` keys. Keys under ``UNUSED_KEY_PREFIXES``
        are dropped; any other missing, unexpected or mis-shaped key raises ``SenseVoiceLoadError``."""
        own = self.state_dict()
        used = {k: v for k, v in state_dict.items() if not k.startswith(UNUSED_KEY_PREFIXES)}
        missing = sorted(set(own) - set(used))
        unexpected = sorted(set(used) - set(own))
        shapes = sorted(f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                        for k, v in used.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
        if missing or unexpected or shapes:
            parts = [f"SenseVoice checkpoint {source} does not match the architecture "
                     f"(num_blocks={1 + len(self.encoder.encoders)}, input_size={self.encoder.input_size}, "
                     f"output_size={self.output_size}):"]
            for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
                if keys:
                    parts.append(f"  {title} ({len(keys)}): " + ", ".join(keys))
            parts.append(f"  (ignored prefixes: {', '.join(UNUSED_KEY_PREFIXES)}; model dir config key: `{config_key}`)")
            raise SenseVoiceLoadError("\n".join(parts))
        self.load_state_dict({k: v.float() for k, v in used.items()}, strict=True)

    # ---- inference -------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, wav: torch.Tensor, lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Front end only: ``(feats [B, T_lfr, 560], feat_lengths [B])``."""
        return self.frontend(wav, lengths)

    @torch.no_grad()
    def encode_features(self, feats: torch.Tensor, feat_lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``feats [B, T, 560]`` (LFR+CMVN) -> ``(semantic [B, 512, T], lengths [B])``; zero beyond each length."""
        if feats.dim() != 3 or feats.shape[-1] != self.encoder.input_size:
            raise ValueError(f"expected features [B, T, {self.encoder.input_size}], got {tuple(feats.shape)}")
        b, t, _ = feats.shape
        if feat_lengths is None:
            feat_lengths = torch.full((b,), t, dtype=torch.long, device=feats.device)
        feat_lengths = torch.as_tensor(feat_lengths, device=feats.device).long()
        dtype = self.embed.weight.dtype
        # Autocast off: the encoder runs in its weights' dtype (fp32 as released, or what the caller cast it to),
        # not a per-op mix. Its output is a frozen target (distillation, REPA, codes of pre-extracted caches) that
        # must not depend on the trainer's precision; the caller decides the dtype explicitly.
        with torch.autocast(device_type=feats.device.type, enabled=False):
            prompt = self.embed(self.prompt_ids).to(dtype).expand(b, -1, -1)
            x = torch.cat([prompt, feats.to(dtype)], dim=1)
            n_prompt = prompt.shape[1]
            valid = torch.arange(t, device=feats.device)[None, :] < feat_lengths[:, None]
            mask = torch.cat([valid.new_ones(b, n_prompt), valid], dim=1)
            hidden = self.encoder(x, mask)[:, n_prompt:]
            hidden = hidden.masked_fill(~valid[..., None], 0.0)
        return hidden.transpose(1, 2), feat_lengths

    @torch.no_grad()
    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None,
                lengths_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``wav [B, 1, T] | [B, T]`` float in [-1, 1] at 16 kHz, ``lengths [B]`` samples (default full)
        -> ``(semantic [B, 512, T_lfr], semantic_lengths [B])``. ``T_lfr = ceil((1 + (T-400)//160) / 6)`` for the
        padded width T (1 below 400 samples); item b is valid up to ``semantic_lengths[b]`` (same formula on
        ``lengths[b]``) and zero after it. ``lengths_checked``: every length is known to lie in
        [``frontend.frame_samples``, T] (checked on the host where the batch was built): then nothing is read back
        to the host (no device sync)."""
        # fp32 island: the Kaldi fbank front end (pre-emphasis differences of neighbouring samples, power
        # spectrum, log with a float32-eps floor, CMVN) loses most of its precision in bf16's 8 significand bits
        # (and has no bf16 FFT); it is element-wise and cheap next to the encoder.
        with torch.autocast(device_type=wav.device.type, enabled=False):
            feats, feat_lengths = self.frontend(wav.float(), lengths, lengths_checked)
        return self.encode_features(feats, feat_lengths)


def _read_weights(path: Path, map_location) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path), device=str(map_location))
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the file name
        raise SenseVoiceLoadError(f"cannot read {path} as a tensor state dict: {e}") from e
    for wrapper in ("state_dict", "model_state_dict", "model"):  # FunASR's load_pretrained_model unwraps these
        if isinstance(obj, dict) and isinstance(obj.get(wrapper), dict):
            obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise SenseVoiceLoadError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in obj.items()}
