"""Vocos vocoder: normalised 24 kHz / 50 Hz mel → 24 kHz waveform (tts.md §2.8).

ConvNeXt backbone + ISTFT head, module names as the released `vocos_emilia.safetensors`
(``backbone.embed / norm / convnext.i.{dwconv,norm,pwconv1,pwconv2,gamma} / final_layer_norm``,
``head.out``, ``head.istft.window``). The head predicts log-magnitude and phase for n_fft / 2 + 1 bins;
the inverse STFT uses "same" padding: overlap-add, trim (win − hop) / 2 samples each side, divide by the
window envelope, so T frames give exactly T·hop samples.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CONFIG_NAME = "config.yaml"
WEIGHTS_NAME = "model.safetensors"
RELEASED_VOCOS = dict(input_channels=128, dim=1024, intermediate_dim=4096, num_layers=30, n_fft=1920, hop_size=480)
TINY_VOCOS = dict(input_channels=128, dim=64, intermediate_dim=192, num_layers=2, n_fft=1920, hop_size=480)


class ISTFT(nn.Module):
    """Complex spectrogram ``[B, n_fft/2+1, T]`` → ``[B, T·hop]`` ("same" padding, window-envelope normalised)."""

    def __init__(self, n_fft: int, hop_length: int, win_length: int | None = None):
        super().__init__()
        self.n_fft, self.hop_length = n_fft, hop_length
        self.win_length = win_length or n_fft
        if (self.win_length - hop_length) % 2:
            raise ValueError("win_length - hop_length must be even for 'same' padding")
        self.register_buffer("window", torch.hann_window(self.win_length))  # persistent: in released keys

    def _overlap_add(self, frames: Tensor) -> Tensor:
        T = frames.shape[-1]
        size = (T - 1) * self.hop_length + self.win_length
        return F.fold(frames, output_size=(1, size), kernel_size=(1, self.win_length),
                      stride=(1, self.hop_length))[:, 0, 0]

    def forward(self, spec: Tensor) -> Tensor:
        if spec.dim() != 3:
            raise ValueError(f"expected a complex spectrogram [B, F, T], got {tuple(spec.shape)}")
        pad = (self.win_length - self.hop_length) // 2
        frames = torch.fft.irfft(spec, self.n_fft, dim=1, norm="backward") * self.window[None, :, None]
        y = self._overlap_add(frames)[:, pad:-pad]
        env = self._overlap_add(self.window.square()[None, :, None].expand(1, -1, spec.shape[-1]))[0, pad:-pad]
        return y / env.clamp(min=1e-11)

    def stft(self, x: Tensor) -> Tensor:
        """Analysis matching this ISTFT ("same" padding): ``[B, T·hop] → [B, F, T]``; ``istft(stft(x)) ≈ x``."""
        pad = (self.win_length - self.hop_length) // 2
        x = F.pad(x.unsqueeze(1), (pad, pad), mode="reflect").squeeze(1)
        return torch.stft(x, self.n_fft, self.hop_length, self.win_length, self.window, center=False,
                          return_complex=True)


class ConvNeXtBlock(nn.Module):
    def __init__(self, dim: int, intermediate_dim: int, layer_scale_init_value: float):
        super().__init__()
        self.dwconv = nn.Conv1d(dim, dim, kernel_size=7, padding=3, groups=dim)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.pwconv1 = nn.Linear(dim, intermediate_dim)
        self.act = nn.GELU()
        self.pwconv2 = nn.Linear(intermediate_dim, dim)
        self.gamma = nn.Parameter(layer_scale_init_value * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:  # [B, C, T]
        y = self.norm(self.dwconv(x).transpose(1, 2))
        y = self.gamma * self.pwconv2(self.act(self.pwconv1(y)))
        return x + y.transpose(1, 2)


class VocosBackbone(nn.Module):
    def __init__(self, input_channels: int, dim: int, intermediate_dim: int, num_layers: int):
        super().__init__()
        self.embed = nn.Conv1d(input_channels, dim, kernel_size=7, padding=3)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.convnext = nn.ModuleList(ConvNeXtBlock(dim, intermediate_dim, 1 / num_layers) for _ in range(num_layers))
        self.final_layer_norm = nn.LayerNorm(dim, eps=1e-6)
        for m in self.modules():
            if isinstance(m, (nn.Conv1d, nn.Linear)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, mel: Tensor) -> Tensor:
        """``[B, C_in, T] → [B, T, dim]``."""
        x = self.norm(self.embed(mel).transpose(1, 2)).transpose(1, 2)
        for block in self.convnext:
            x = block(x)
        return self.final_layer_norm(x.transpose(1, 2))


class ISTFTHead(nn.Module):
    def __init__(self, dim: int, n_fft: int, hop_length: int):
        super().__init__()
        self.out = nn.Linear(dim, n_fft + 2)
        self.istft = ISTFT(n_fft, hop_length, n_fft)

    def forward(self, x: Tensor) -> Tensor:
        log_mag, phase = self.out(x).transpose(1, 2).float().chunk(2, dim=1)
        mag = log_mag.exp().clamp(max=1e2)  # released safeguard against huge magnitudes
        return self.istft(torch.complex(mag * torch.cos(phase), mag * torch.sin(phase)))


class Vocos(nn.Module):
    """``forward(mel [B, 128, T]) → wav [B, 1, T·hop]`` at 24 kHz (normalised mel, see `flexitrain.audio.mel24k`)."""

    def __init__(self, input_channels: int = 128, dim: int = 1024, intermediate_dim: int = 4096,
                 num_layers: int = 30, n_fft: int = 1920, hop_size: int = 480, sample_rate: int = 24000):
        super().__init__()
        self.config = dict(input_channels=input_channels, dim=dim, intermediate_dim=intermediate_dim,
                           num_layers=num_layers, n_fft=n_fft, hop_size=hop_size, sample_rate=sample_rate)
        self.sample_rate, self.hop_size, self.input_channels = sample_rate, hop_size, input_channels
        self.backbone = VocosBackbone(input_channels, dim, intermediate_dim, num_layers)
        self.head = ISTFTHead(dim, n_fft, hop_size)

    def forward(self, mel: Tensor) -> Tensor:
        if mel.dim() != 3 or mel.shape[1] != self.input_channels:
            raise ValueError(f"expected a mel [B, {self.input_channels}, T], got {tuple(mel.shape)}")
        return self.head(self.backbone(mel))[:, None]

    # ------------------------------------------------------------------ checkpoint directory
    def save_pretrained(self, path: str | Path) -> None:
        from omegaconf import OmegaConf
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(OmegaConf.create(self.config), path / CONFIG_NAME)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))

    @classmethod
    def from_pretrained(cls, path: str | Path, map_location: str | torch.device = "cpu",
                        what: str = "vocoder") -> "Vocos":
        """A `save_pretrained` directory (config.yaml + model.safetensors), or a released-format ``.safetensors``
        file, loaded strictly and without pickle; a bad file raises one error naming it."""
        from flexitrain.utils.safe_load import check_dir

        path = Path(path)
        if path.is_file():
            return import_released_vocos(path, what=what)
        expects = f"a Vocos directory with {CONFIG_NAME} + {WEIGHTS_NAME} (save_pretrained / tools/import_vocos.py)"
        path = check_dir(path, what, expects)
        for f in (path / CONFIG_NAME, path / WEIGHTS_NAME):
            if not f.is_file():
                raise FileNotFoundError(f"{f} not found: {path} is neither a .safetensors file nor {expects}")
        return _load_export(cls, path, "Vocos", what, map_location)


def _load_export(cls, path: Path, kind: str, what: str, map_location="cpu"):
    """A save_pretrained directory of ``cls`` (Vocos / VoiceboxNAR): safe YAML config + safetensors, strictly."""
    from flexitrain.models.codec.checkpoint import CheckpointMismatchError, check_state_dict
    from flexitrain.utils.safe_load import (CheckpointError, check_kind, guess_config_kind, guess_kind,
                                            read_safetensors, read_yaml)

    config = read_yaml(path / CONFIG_NAME, f"{what} config")
    if not isinstance(config, dict):
        raise CheckpointError(path / CONFIG_NAME, f"is not a mapping of {kind} settings", f"{what} config")
    check_kind(path, guess_config_kind(config), kind, what)
    state = read_safetensors(path / WEIGHTS_NAME, f"{what} weights", device=map_location)
    check_kind(path / WEIGHTS_NAME, guess_kind(state), kind, f"{what} weights")
    try:
        model = cls(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(path / CONFIG_NAME, f"does not build a {kind}: {err}", f"{what} config") from None
    try:
        model.load_state_dict(check_state_dict(model, state, ignore=()), strict=True)
    except CheckpointMismatchError as err:
        raise err.with_path(path / WEIGHTS_NAME, f"{what} weights") from None
    return model.eval()


def import_released_vocos(state_or_path, hop_size: int = 480, what: str = "Vocos weights") -> Vocos:
    """Released ``vocos_emilia.safetensors`` (or its state dict) → `Vocos`, sizes read from the shapes, strict."""
    import re

    from flexitrain.models.codec.checkpoint import CheckpointMismatchError, check_state_dict
    from flexitrain.utils.safe_load import WrongCheckpointError, check_kind, guess_kind, read_safetensors

    path = None
    if isinstance(state_or_path, (str, Path)):
        path = Path(state_or_path)
        if not path.exists():
            raise FileNotFoundError(f"{what} {str(path)!r} does not exist (download vocos_emilia.safetensors first)")
        state = read_safetensors(path, what)
        check_kind(path, guess_kind(state), "Vocos", what)
    else:
        state = dict(state_or_path)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    try:
        embed, pw1, out = (state[k] for k in ("backbone.embed.weight", "backbone.convnext.0.pwconv1.weight",
                                              "head.out.weight"))
    except KeyError as e:
        if path is not None:
            raise WrongCheckpointError(path, f"is not a Vocos (ConvNeXt + ISTFT head) state dict: key {e} is "
                                             f"missing", what) from None
        raise ValueError(f"not a Vocos (ConvNeXt + ISTFT head) state dict: key {e} is missing") from None
    if any(k.startswith("backbone.norm.scale") or ".norm.scale." in k for k in state):
        raise ValueError(f"{path or 'state dict'}: AdaLayerNorm (bandwidth-conditioned) Vocos checkpoints are not "
                         f"supported")
    layers = {int(m.group(1)) for k in state if (m := re.match(r"backbone\.convnext\.(\d+)\.", k))}
    model = Vocos(input_channels=embed.shape[1], dim=embed.shape[0], intermediate_dim=pw1.shape[0],
                  num_layers=len(layers), n_fft=out.shape[0] - 2, hop_size=hop_size)
    try:
        model.load_state_dict(check_state_dict(model, state, ignore=()), strict=True)
    except CheckpointMismatchError as err:
        raise (err.with_path(path, what) if path is not None else err) from None
    return model.eval()
