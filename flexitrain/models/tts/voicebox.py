"""FlexiCodec-TTS NAR: Voicebox flow matching from 12.5 Hz semantic codes to the 24 kHz / 50 Hz mel.

Module tree = the official `VoiceboxWrapper` minus its frozen codec, so the released
`nartts.safetensors` (less its ``flexicodec_model.*`` keys) loads strictly:

    VoiceboxNAR
      voicebox_model: VoiceBox
        cond_emb        Embedding(cond_codebook_size, H)   12.5 Hz code → ×4 nearest → 50 Hz cond
        diff_estimator  DiffLlama                           velocity estimator
      repa_projection   Linear(H, 4·ssl) – SiLU – Linear(4·ssl, repa_dim)   (training only)

Training losses live in `flexitrain.tasks.voicebox`; the ODE sampler in `flow_sampling`.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flexitrain.models.tts.voicebox_llama import DiffLlama, mlp

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class VoiceboxConfig:
    mel_dim: int = 128
    hidden_size: int = 1024
    num_layers: int = 16
    num_heads: int = 16
    cond_codebook_size: int = 32768
    cond_scale_factor: int = 4
    rope_theta: float = 10000.0
    repa_layer_idx: int = 6
    use_repa: bool = True
    ssl_feature_dim: int = 512
    repa_projection_dim: int = 512


RELEASED_CONFIG = VoiceboxConfig()
TINY_CONFIG = VoiceboxConfig(hidden_size=64, num_layers=2, num_heads=4, cond_codebook_size=1024, repa_layer_idx=1,
                             ssl_feature_dim=32, repa_projection_dim=32)


def expand_codes(tokens: Tensor, durations: Tensor) -> Tensor:
    """Merged tokens ``[T]`` with durations ``[T]`` (12.5 Hz frames each) → ``[Σ durations]`` codes."""
    if tokens.shape != durations.shape or tokens.dim() != 1:
        raise ValueError(f"tokens {tuple(tokens.shape)} and durations {tuple(durations.shape)} must be equal 1-D")
    if bool((durations < 0).any()):
        raise ValueError("durations must be >= 0")
    return torch.repeat_interleave(tokens, durations.long())


class VoiceBox(nn.Module):
    def __init__(self, mel_dim: int = 128, hidden_size: int = 1024, num_layers: int = 16, num_heads: int = 16,
                 cond_codebook_size: int = 32768, cond_scale_factor: int = 4, rope_theta: float = 10000.0,
                 repa_layer_idx: int = 6):
        super().__init__()
        if not 0 <= repa_layer_idx < num_layers:
            raise ValueError(f"repa_layer_idx {repa_layer_idx} must index one of the {num_layers} layers")
        self.mel_dim, self.hidden_size = mel_dim, hidden_size
        self.cond_codebook_size, self.cond_scale_factor = cond_codebook_size, int(cond_scale_factor)
        self.repa_layer_idx = repa_layer_idx
        self.cond_emb = nn.Embedding(cond_codebook_size, hidden_size)
        nn.init.normal_(self.cond_emb.weight, std=0.02)
        self.diff_estimator = DiffLlama(mel_dim, hidden_size, num_heads, num_layers, rope_theta)

    # The range check is free on host tensors and a device sync on a GPU: it runs on host codes only, and a
    # training task turns it off (it checks batches on the host and the codec's codebook size at set-up).
    checks_in_forward = True

    def embed_codes(self, codes: Tensor) -> Tensor:
        """12.5 Hz codes ``[B, Tc]`` → 50 Hz condition ``[B, Tc·scale, H]`` (nearest upsampling)."""
        if codes.dtype not in (torch.int32, torch.int64) or codes.dim() != 2:
            raise ValueError(f"codes must be an integer [B, Tc] tensor, got {codes.dtype} {tuple(codes.shape)}")
        if self.checks_in_forward and codes.device.type == "cpu" and codes.numel() and (
                int(codes.min()) < 0 or int(codes.max()) >= self.cond_codebook_size):
            raise ValueError(f"codes must lie in [0, {self.cond_codebook_size}), got "
                             f"[{int(codes.min())}, {int(codes.max())}]: wrong codec / codebook size?")
        return self.cond_emb(codes.long()).repeat_interleave(self.cond_scale_factor, dim=1)

    def forward(self, x_t: Tensor, t: Tensor, cond: Tensor, x_mask: Tensor | None = None,
                return_hidden: bool = False):
        """Velocity ``[B, T, mel]`` (and the hidden state after ``repa_layer_idx`` if asked)."""
        return self.diff_estimator(x_t, t, cond, x_mask, self.repa_layer_idx if return_hidden else None)


class VoiceboxNAR(nn.Module):
    """The NAR TTS model: `voicebox_model` plus the training-time REPA projector (official names)."""

    def __init__(self, mel_dim: int = 128, hidden_size: int = 1024, num_layers: int = 16, num_heads: int = 16,
                 cond_codebook_size: int = 32768, cond_scale_factor: int = 4, rope_theta: float = 10000.0,
                 repa_layer_idx: int = 6, use_repa: bool = True, ssl_feature_dim: int = 512,
                 repa_projection_dim: int = 512):
        super().__init__()
        self.config = VoiceboxConfig(mel_dim, hidden_size, num_layers, num_heads, cond_codebook_size,
                                     cond_scale_factor, rope_theta, repa_layer_idx, use_repa, ssl_feature_dim,
                                     repa_projection_dim)
        self.voicebox_model = VoiceBox(mel_dim, hidden_size, num_layers, num_heads, cond_codebook_size,
                                       cond_scale_factor, rope_theta, repa_layer_idx)
        self.repa_projection = mlp(hidden_size, 4 * ssl_feature_dim, repa_projection_dim) if use_repa else None
        if self.repa_projection is not None:
            for m in self.repa_projection:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
                    nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, config: VoiceboxConfig | dict) -> "VoiceboxNAR":
        return cls(**(asdict(config) if isinstance(config, VoiceboxConfig) else dict(config)))

    @property
    def mel_dim(self) -> int:
        return self.config.mel_dim

    def _condition(self, gen_tokens: Tensor, gen_durations: Tensor,
                   prompt_codes: Tensor | None) -> tuple[Tensor, int]:
        """The 50 Hz condition ``[1, T, H]`` of [prompt codes ; expanded generated codes] and its prompt frames."""
        codes = expand_codes(gen_tokens, gen_durations)
        if prompt_codes is not None:
            codes = torch.cat([prompt_codes.reshape(-1).to(codes), codes])
        n_prompt_frames = 0 if prompt_codes is None else prompt_codes.numel() * self.config.cond_scale_factor
        return self.voicebox_model.embed_codes(codes[None]), n_prompt_frames

    @torch.inference_mode()
    def synthesize(self, gen_tokens: Tensor, gen_durations: Tensor, prompt_codes: Tensor | None = None,
                   prompt_mel: Tensor | None = None, estimator: nn.Module | None = None,
                   **sampler_kwargs) -> Tensor:
        """One utterance: AR tokens ``[T]`` + durations ``[T]`` (+ 12.5 Hz prompt codes ``[Tp]`` and the prompt's
        normalised mel ``[Tm, 128]``) → generated mel ``[T_gen, 128]`` (prompt excluded). Sampler arguments:
        `flow_sampling.sample_mel`; `estimator`: the velocity model to call (default `voicebox_model`, or e.g.
        a compiled wrapper of it)."""
        from flexitrain.models.tts.flow_sampling import sample_mel

        cond, n_prompt_frames = self._condition(gen_tokens, gen_durations, prompt_codes)
        prompt = None if prompt_mel is None else prompt_mel[None]
        model = self.voicebox_model if estimator is None else estimator
        return sample_mel(model, cond, prompt, prompt_cond_frames=n_prompt_frames, **sampler_kwargs)[0]

    @torch.inference_mode()
    def synthesize_batch(self, gen_tokens: list[Tensor], gen_durations: list[Tensor],
                         prompt_codes: list[Tensor | None] | None = None,
                         prompt_mels: list[Tensor | None] | None = None, seeds: list[int | None] | None = None,
                         estimator: nn.Module | None = None, **sampler_kwargs) -> list[Tensor]:
        """`synthesize` for several utterances, sampled together (`flow_sampling.sample_mel_batch`: one model
        call per Euler step for all of them); item b equals ``synthesize(..., seed=seeds[b])`` up to float
        rounding."""
        from flexitrain.models.tts.flow_sampling import sample_mel_batch

        n = len(gen_tokens)
        prompt_codes = [None] * n if prompt_codes is None else prompt_codes
        if len(gen_durations) != n or len(prompt_codes) != n:
            raise ValueError(f"{n} token sequences but {len(gen_durations)} durations, {len(prompt_codes)} prompts")
        conds = [self._condition(t, d, p) for t, d, p in zip(gen_tokens, gen_durations, prompt_codes)]
        model = self.voicebox_model if estimator is None else estimator
        return sample_mel_batch(model, [c[0] for c, _ in conds], prompt_mels,
                                prompt_cond_frames=[p for _, p in conds], seeds=seeds, **sampler_kwargs)

    # ------------------------------------------------------------------ checkpoint directory
    def save_pretrained(self, path: str | Path) -> None:
        from omegaconf import OmegaConf
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(asdict(self.config)), path / CONFIG_NAME)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu",
                        what: str = "NAR directory") -> "VoiceboxNAR":
        """Load a directory written by `save_pretrained` / tools/import_nartts.py (strict; YAML config +
        safetensors, no pickle; a bad file raises one error naming it)."""
        from flexitrain.models.vocos import _load_export
        from flexitrain.utils.safe_load import check_dir

        expects = f"a Voicebox checkpoint directory ({CONFIG_NAME} + {WEIGHTS_NAME})"
        path = check_dir(path, what, expects)
        if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(f"{path} is not {expects}")
        return _load_export(cls, path, "VoiceboxNAR", what, map_location)
