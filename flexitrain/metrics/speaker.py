"""Speaker similarity (cosine of speaker embeddings) with offline encoders.

Backends (config ``eval.speaker.backend``, weights at ``eval.speaker.path``):

- ``resemblyzer`` (default): the GE2E VoiceEncoder whose weights ship inside the ``resemblyzer``
  wheel (256-d). ``path`` may point to another ``pretrained.pt`` of the same architecture.
  Audio goes through resemblyzer's ``preprocess_wav`` (volume normalisation, long-silence trimming).
  webrtcvad imports ``pkg_resources`` (gone in setuptools >= 81); a stand-in is provided for
  that import, so any setuptools works.
- ``wavlm``: a local Hugging Face directory of ``WavLMForXVector`` (e.g. a saved
  microsoft/wavlm-base-plus-sv), ``local_files_only=True``. Package: ``transformers``.
- ``torchscript``: a TorchScript file mapping a 16 kHz waveform ``[1, T]`` to an embedding
  ``[1, D]`` or ``[D]`` (the way to plug in an exported ECAPA-TDNN or any other encoder).

Scores are cosine similarities in [-1, 1] (higher = more similar); the paper's SIM uses a
WavLM-TDNN verifier, so numbers from different backends are not comparable with each other.
"""

from __future__ import annotations

import sys
import types
from typing import Mapping, Sequence

import numpy as np
import torch

from ._assets import cfg_get, force_offline, import_optional, require_local_path, to_mono_16k

__all__ = ["SPEAKER_BACKENDS", "SpeakerEncoder", "ResemblyzerEncoder", "WavLMEncoder", "TorchScriptEncoder",
           "build_speaker_encoder", "build_speaker_encoder_from_config", "cosine_similarity"]

SPEAKER_BACKENDS = ("resemblyzer", "wavlm", "torchscript")


def cosine_similarity(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(np.dot(a, b) / denom) if denom > 0 else float("nan")


class SpeakerEncoder:
    """Interface: ``embed(wav, sample_rate) -> np.ndarray [D]`` (L2-normalised) and ``similarity``."""

    def embed(self, wav, sample_rate: int) -> np.ndarray:
        raise NotImplementedError

    def similarity(self, reference, degraded, sample_rate: int) -> float:
        """Cosine similarity of the two utterances' embeddings."""
        return cosine_similarity(self.embed(reference, sample_rate), self.embed(degraded, sample_rate))

    def similarities(self, references: Sequence, degraded: Sequence, sample_rate: int) -> list[float]:
        if len(references) != len(degraded):
            raise ValueError(f"got {len(references)} references but {len(degraded)} degraded waveforms")
        return [self.similarity(r, d, sample_rate) for r, d in zip(references, degraded)]


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


def _import_resemblyzer(key: str):
    # resemblyzer -> webrtcvad does `import pkg_resources` only to read its own version, and
    # setuptools >= 81 no longer ships pkg_resources. Provide a minimal stand-in for that import.
    stub = None
    try:
        import pkg_resources  # noqa: F401
    except ImportError:
        from importlib import metadata

        stub = sys.modules["pkg_resources"] = types.ModuleType("pkg_resources")
        stub.get_distribution = lambda name: types.SimpleNamespace(version=metadata.version(name))
    try:
        return import_optional("resemblyzer", "resemblyzer", key)
    finally:
        if stub is not None and sys.modules.get("pkg_resources") is stub:
            del sys.modules["pkg_resources"]


class ResemblyzerEncoder(SpeakerEncoder):
    def __init__(self, path: str | None = None, device: str = "cpu", key: str = "eval.speaker.path") -> None:
        weights = None if path is None else require_local_path(path, key, "file",
                                                               "Expected a resemblyzer VoiceEncoder state file (.pt).")
        rz = _import_resemblyzer(key.rsplit(".", 1)[0] + ".backend")
        self._preprocess = rz.preprocess_wav
        self.encoder = rz.VoiceEncoder(device=device, verbose=False, weights_fpath=weights)

    def embed(self, wav, sample_rate: int) -> np.ndarray:
        x = to_mono_16k(wav, sample_rate)
        if x.size == 0 or np.abs(x).max() < 1e-6:  # silence: resemblyzer's volume normalisation divides by 0
            return np.full(256, np.nan, dtype=np.float32)
        x = self._preprocess(x, source_sr=16000)
        if x.size == 0:  # nothing left after VAD trimming
            return np.full(256, np.nan, dtype=np.float32)
        return self.encoder.embed_utterance(x)


class WavLMEncoder(SpeakerEncoder):
    def __init__(self, path: str | None, device: str = "cpu", key: str = "eval.speaker.path") -> None:
        if path is None:
            raise FileNotFoundError(f"{key} is required for backend wavlm: a local WavLMForXVector directory")
        model_dir = require_local_path(path, key, "dir", "Expected a saved WavLMForXVector directory.")
        force_offline()
        tf = import_optional("transformers", "transformers", key.rsplit(".", 1)[0] + ".backend")
        self.extractor = tf.AutoFeatureExtractor.from_pretrained(str(model_dir), local_files_only=True)
        self.model = tf.WavLMForXVector.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
        self.device = device

    @torch.no_grad()
    def embed(self, wav, sample_rate: int) -> np.ndarray:
        inputs = self.extractor(to_mono_16k(wav, sample_rate), sampling_rate=16000, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        return _unit(self.model(**inputs).embeddings[0].float().cpu().numpy())


class TorchScriptEncoder(SpeakerEncoder):
    def __init__(self, path: str | None, device: str = "cpu", key: str = "eval.speaker.path") -> None:
        if path is None:
            raise FileNotFoundError(f"{key} is required for backend torchscript: a TorchScript speaker encoder file")
        self.model = torch.jit.load(str(require_local_path(path, key, "file")), map_location=device).eval()
        self.device = device

    @torch.no_grad()
    def embed(self, wav, sample_rate: int) -> np.ndarray:
        x = torch.from_numpy(to_mono_16k(wav, sample_rate))[None].to(self.device)
        return _unit(self.model(x).reshape(-1).float().cpu().numpy())


def build_speaker_encoder(backend: str = "resemblyzer", path: str | None = None, device: str = "cpu",
                          key: str = "eval.speaker") -> SpeakerEncoder:
    """Build an offline speaker encoder; ``key`` is the config prefix used in error messages."""
    if backend not in SPEAKER_BACKENDS:
        raise ValueError(f"{key}.backend={backend!r} is not supported; choose one of {SPEAKER_BACKENDS}")
    cls = {"resemblyzer": ResemblyzerEncoder, "wavlm": WavLMEncoder, "torchscript": TorchScriptEncoder}[backend]
    return cls(path, device=device, key=f"{key}.path")


def build_speaker_encoder_from_config(cfg: Mapping | None, key: str = "eval.speaker",
                                      device: str | None = None) -> SpeakerEncoder:
    return build_speaker_encoder(cfg_get(cfg, "backend", "resemblyzer"), cfg_get(cfg, "path"),
                                 device or cfg_get(cfg, "device", "cpu"), key=key)
