"""Frozen local ``transformers`` speech encoder (HuBERT, WavLM, wav2vec 2.0, w2v-BERT 2.0, ...) as the semantic teacher.

``wav [B, 1, N] | [B, N]`` at 16 kHz -> the directory's feature extractor (when it has ``preprocessor_config.json``;
else the raw waveform as ``input_values``) -> ``AutoModel`` with ``output_hidden_states`` -> hidden layer ``layer``
``[T, D]`` at the encoder's frame rate (20 ms for these models) -> mean of each ``1280 / hop`` frames onto the codec's
12.5 Hz grid (`pool_to_codec_grid`, see there why mean pooling). Items run one at a time on their own lengths (the
same features in a batch as alone, whatever padding the model does or does not mask); this reads the lengths on the
host (a device sync on a GPU: pre-extract features there). Loaded with ``local_files_only=True``: nothing downloads.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from flexitrain.models.teachers.pooling import CODEC_HOP_SAMPLES, pool_to_codec_grid

CONFIG_KEY = "task.teacher.model_dir"


class HFLocalTeacher(nn.Module):
    """Args: model_dir (a ``save_pretrained`` directory with ``config.json``), layer (index into ``hidden_states``:
    0 = the input embeddings, -1 = the last layer), hop_samples (samples per encoder frame; default from the
    config's ``conv_stride``, else 320), min_samples (the shortest input; default 400, one 25 ms receptive field)."""

    frame_rate = 16000 / CODEC_HOP_SAMPLES

    def __init__(self, model_dir: str | Path | None, *, layer: int = -1, hop_samples: int | None = None,
                 min_samples: int = 400, config_key: str = CONFIG_KEY):
        super().__init__()
        if not model_dir:
            raise FileNotFoundError(f"{config_key} is not set: a local transformers speech encoder directory "
                                    "(save_pretrained: config.json + weights)")
        path = Path(model_dir).expanduser()
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{config_key}={str(model_dir)!r} has no config.json: it must be a local "
                                    "transformers model directory (save_pretrained)")
        try:
            import transformers
        except ImportError as e:
            raise ImportError(f"the hf_local teacher ({config_key}) needs transformers: pip install transformers") from e
        self.model_dir = path.resolve()
        try:  # newer transformers would fetch hub "kernels" by default: never (nothing downloads)
            model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True, use_kernels=False)
        except TypeError:  # older versions without the option
            model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
        self.model = model.float().eval()
        self.model.requires_grad_(False)
        self.extractor = None
        if (path / "preprocessor_config.json").is_file():
            self.extractor = transformers.AutoFeatureExtractor.from_pretrained(str(path), local_files_only=True)
        cfg = self.model.config
        if hop_samples is None:
            hop_samples = math.prod(getattr(cfg, "conv_stride", None) or [320])
        self.hop_samples = int(hop_samples)
        if CODEC_HOP_SAMPLES % self.hop_samples:
            raise ValueError(f"{config_key}: encoder frames of {self.hop_samples} samples do not tile the codec's "
                             f"{CODEC_HOP_SAMPLES}-sample frame; set task.teacher.hop_samples")
        self.pool = CODEC_HOP_SAMPLES // self.hop_samples
        self.layer = int(layer)
        self.min_samples = int(min_samples)
        self.output_size = int(getattr(cfg, "output_hidden_size", None) or cfg.hidden_size)
        super().train(False)

    def train(self, mode: bool = True) -> "HFLocalTeacher":
        """The teacher never trains."""
        return super().train(False)

    def _hidden(self, clip: torch.Tensor) -> torch.Tensor:
        """One clip ``[N]`` -> the chosen layer ``[T, D]``."""
        device = next(self.model.parameters()).device
        if self.extractor is not None:
            inputs = self.extractor(clip.cpu().numpy(), sampling_rate=16000, return_tensors="pt")
            inputs = {k: v.to(device) for k, v in inputs.items() if torch.is_tensor(v)}
        else:
            inputs = {"input_values": clip[None].to(device)}
        out = self.model(**inputs, output_hidden_states=True)
        return out.hidden_states[self.layer][0].float()

    @torch.no_grad()
    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None,
                lengths_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features [B, D, T], lengths [B])`` on the codec's 12.5 Hz grid, zero after each item's length."""
        x = wav[:, 0] if wav.dim() == 3 else wav
        b, n = x.shape
        lens = [n] * b if lengths is None else [int(v) for v in torch.as_tensor(lengths).tolist()]  # host read
        feats = []
        for i, length in enumerate(lens):
            if not self.min_samples <= length <= n:
                raise ValueError(f"hf_local teacher: length {length} of item {i} outside [{self.min_samples}, {n}]")
            feats.append(pool_to_codec_grid(self._hidden(x[i, :length].float()), self.pool))
        t = max((f.shape[0] for f in feats), default=0)
        out = x.new_zeros(b, self.output_size, t, dtype=torch.float32)
        for i, f in enumerate(feats):
            out[i, :, : f.shape[0]] = f.T.to(out.device)
        return out, torch.tensor([f.shape[0] for f in feats], dtype=torch.long, device=wav.device)
