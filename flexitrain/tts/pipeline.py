"""End-to-end FlexiCodec-TTS: text + a spoken prompt → 24 kHz speech, AR → NAR → Vocos (tts.md §3, new version).

    tts = TTSPipeline.from_checkpoints(ar="ar.ckpt", nar="nar.ckpt", vocoder="vocos.ckpt")
    result = tts.synthesize("Hello there.", prompt_wav="ref.wav", prompt_text="The prompt's words.",
                            frame_rate=8.3)
    soundfile.write("out.wav", result.audio.numpy(), result.sample_rate)

1. The prompt (any rate, mono) is resampled to 16 kHz and tokenised by the codec at the threshold of the chosen
   frame rate (fixes B1: the official AR always used 0.91), giving prompt tokens and their durations.
2. The AR continues `prompt text + ", " + text` (one G2P + BPE pass, as the official) from the prompt tokens and
   predicts tokens and per-token durations.
3. The NAR conditions on [prompt codes ; generated codes], both expanded to 12.5 Hz by their durations, with the
   prompt's real 24 kHz mel as the infilling prompt, and samples the generated part only.
4. Vocos turns that mel into 24 kHz audio of exactly (Σ durations) × 4 × 480 samples.

Other modes of the official inference code (tts.md §3):
- ``ar_only=True`` (official ``use_nar=False``): the AR tokens and durations go straight to the codec's own
  decoder (semantic codes only, no acoustic codes), giving the codec's rate (16 kHz) and (Σ durations) × hop
  samples; no NAR or vocoder is needed.
- ``predict_duration=False`` (official ``predict_duration=False``): the duration head is not used; every
  generated token counts as one 12.5 Hz frame downstream (the official passes no durations: the NAR
  expands with ones, the codec decodes without de-aggregation). In the AR the prompt tokens enter without
  duration embeddings and every generated token carries the embedding of the last prompt token's duration
  (the official decoder never updates it). Exact for τ = 1.0 (all durations are 1); at a merging threshold the
  tokens of a duration-trained AR are rendered one frame each, i.e. faster speech.
- ``resynthesize`` (official ``infer_voicebox_tts`` / ``infer_voicebox_librispeech``): source audio → codec
  tokens and durations at a threshold → the NAR in the voice of a reference prompt → Vocos (24 kHz,
  (source frames) × 1920 samples). NAR-only: no AR, no text.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flexitrain.audio.mel24k import HOP_LENGTH, SAMPLE_RATE as OUT_RATE, Mel24k
from flexitrain.audio.io import read_mono
from flexitrain.audio.resample import resample
from flexitrain.models.tts.sampling import (GenerationResult, SamplingConfig, encode_prompt, generate, generate_batch,
                                            generate_fixed_rate)
from flexitrain.tts import loading

log = logging.getLogger(__name__)

TOKEN_RATE = 12.5  # codec frames per second before merging
# FlexiCodec's published operating points (tts.md §2.7): frame rate in Hz → merging threshold.
DEFAULT_FRAME_RATES = {12.5: 1.0, 8.3: 0.91, 6.25: 0.86}


@dataclass
class NARConfig:
    n_timesteps: int = 15
    cfg: float = 2.0
    rescale_cfg: float = 0.75
    # synthesize_batch: sample a chunk's mels together, one velocity-model call per Euler step (True), or per
    # utterance (False). None: together except on the CPU, where the padding to the chunk's longest utterance
    # costs more compute than the saved calls (4 utterances of 1-2 s: ~1.4x slower batched, one thread).
    batch: bool | None = None
    # torch.compile the velocity model (dynamic shapes: each batch pads to its own length). Off by default: the
    # first call compiles for a while, which pays off only over many utterances on an accelerator.
    compile: bool = False


@dataclass
class TTSRequest:
    text: str
    prompt_wav: str | Path | None = None
    prompt_text: str = ""
    prompt_audio: Tensor | None = None   # instead of prompt_wav: a mono waveform [N] at prompt_sample_rate
    prompt_sample_rate: int = 16000
    language: str = "en"
    frame_rate: float | None = None      # Hz (a key of the pipeline's frame_rates); or give threshold
    threshold: float | None = None
    seed: int = 0
    id: str = ""
    ar_only: bool = False                # decode the AR tokens with the codec (16 kHz), no NAR / vocoder
    predict_duration: bool = True        # False: every generated token is one 12.5 Hz frame
    source_wav: str | Path | None = None  # set (or source_audio): resynthesise this audio, `text` is unused
    source_audio: Tensor | None = None
    source_sample_rate: int = 16000

    @property
    def is_resynthesis(self) -> bool:
        return self.source_wav is not None or self.source_audio is not None


@dataclass
class TTSResult:
    audio: Tensor                 # [N] float32 at sample_rate
    sample_rate: int
    tokens: Tensor                # [T] generated tokens
    durations: Tensor             # [T] 12.5 Hz frames per generated token
    prompt_tokens: Tensor         # [P]
    prompt_durations: Tensor      # [P]
    threshold: float
    stopped_by_eos: bool
    timings: dict = field(default_factory=dict)  # seconds per stage that ran (prompt, ar, nar, vocoder, ...) + total
    mode: str = "tts"             # "tts", "ar-only" (codec decoder) or "resynthesis" (tokens = the source's)

    @property
    def seconds(self) -> float:
        return self.audio.numel() / self.sample_rate

    @property
    def frame_rate(self) -> float:
        """Tokens per second of the generated speech."""
        frames = int(self.durations.sum())
        return TOKEN_RATE * self.tokens.numel() / frames if frames else float("nan")

    @property
    def frame_rate_with_prompt(self) -> float:
        """The official report: (prompt + generated tokens) / (prompt + generated frames) × 12.5."""
        frames = int(self.durations.sum()) + int(self.prompt_durations.sum())
        return TOKEN_RATE * (self.tokens.numel() + self.prompt_tokens.numel()) / frames if frames else float("nan")

    @property
    def rtf(self) -> float:
        return self.timings.get("total", float("nan")) / self.seconds if self.seconds else float("nan")


def read_prompt(path: str | Path, what: str = "prompt wav") -> tuple[Tensor, int]:
    """A mono float waveform and its rate (channels averaged)."""
    return read_mono(path, what)


class TTSPipeline:
    """The three stages plus the codec (and its SenseVoice teacher) that tokenises prompts and sources.

    ar / nar / vocoder may be None when a mode does not need them: ``ar_only`` needs the AR and a codec with a
    decoder; ``resynthesize`` needs the NAR and the vocoder; plain synthesis needs all three."""

    def __init__(self, ar: nn.Module | None, nar: nn.Module | None, vocoder: nn.Module | None, codec: nn.Module,
                 teacher: nn.Module, frame_rates: dict[float, float] | None = None,
                 sampling: SamplingConfig | None = None, nar_config: NARConfig | None = None,
                 device: str | torch.device = "cpu", min_prompt_pace: float = 0.0, zh_g2p: str = "hanzi",
                 g2p: bool = True):
        self.device = torch.device(device)
        self.ar, self.nar, self.vocoder = (None if m is None else m.eval().to(self.device) for m in (ar, nar, vocoder))
        self.codec, self.teacher = codec.eval().to(self.device), teacher.eval().to(self.device)
        self.frame_rates = dict(frame_rates or DEFAULT_FRAME_RATES)
        self.sampling = sampling or SamplingConfig()
        self.nar_config = nar_config or NARConfig()
        # > 0: no EOS before min_prompt_pace × (prompt tokens per prompt-text id) × target-text ids. Off by default
        # (the official decoder has only the text-ratio floor); it keeps weak models (the CPU demos) from stopping
        # at the typical utterance length counted from the start of the prompt.
        self.min_prompt_pace = float(min_prompt_pace)
        self.zh_g2p, self.g2p = zh_g2p, bool(g2p)
        self.mel = Mel24k().to(self.device)
        self._frontend = None
        self._prompt_cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self._compiled_estimator: nn.Module | None = None
        self._check_compatible()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoints(cls, ar: str | Path | None, nar: str | Path | None, vocoder: str | Path | None,
                         codec: str | Path | None = None, teacher: dict | None = None, **kwargs) -> "TTSPipeline":
        """Each stage from a local file (see `flexitrain.tts.loading`); a stage given as None is not loaded
        (AR-only: no NAR / vocoder; resynthesis: no AR). The codec that tokenises the prompt is `codec` (a
        CodecTask ``.ckpt`` or an exported FlexiCodec directory, with `teacher` settings for the latter), else
        the one the AR checkpoint was trained against, else the NAR's."""
        ar_model, ar_codec = loading.load_ar(ar) if ar is not None else (None, None)
        nar_model, nar_codec = loading.load_nar(nar) if nar is not None else (None, None)
        vocoder_model = loading.load_vocoder(vocoder) if vocoder is not None else None
        if codec is not None:
            from flexitrain.evaluation.loading import load_codec

            pair = load_codec(codec, teacher)
        else:
            pair = ar_codec or nar_codec
            if pair is None:
                raise ValueError("no codec to tokenise the prompt: pass codec= (the FlexiCodec the AR and NAR were "
                                 "trained on); these AR/NAR checkpoints do not carry one")
        if ar_codec is not None and nar_codec is not None and not loading.same_codec(ar_codec[0], nar_codec[0]):
            raise ValueError("the AR and NAR checkpoints were trained on tokens of different codecs: their token "
                             "ids are not interchangeable (tts.md §4)")
        return cls(ar_model, nar_model, vocoder_model, *pair, **kwargs)

    def _check_compatible(self) -> None:
        codes = int(self.codec.semantic_vq.codebook_size)
        if self.ar is not None and codes > self.ar.speech_token_size:
            raise ValueError(f"the codec has {codes} semantic codes but the AR model only {self.ar.speech_token_size}")
        if self.nar is not None and codes > self.nar.config.cond_codebook_size:
            raise ValueError(f"the codec has {codes} semantic codes but the NAR only {self.nar.config.cond_codebook_size}")
        if self.nar is not None and self.vocoder is not None and self.nar.config.mel_dim != self.vocoder.input_channels:
            raise ValueError(f"NAR mel_dim {self.nar.config.mel_dim} != vocoder input {self.vocoder.input_channels}")
        if self.vocoder is not None and getattr(self.vocoder, "hop_size", HOP_LENGTH) != HOP_LENGTH:
            raise ValueError(f"the vocoder's hop must be {HOP_LENGTH} (the NAR's 50 Hz mel at 24 kHz)")

    def _require(self, *, ar: bool = False, nar_vocoder: bool = False, codec_decoder: bool = False, why: str) -> None:
        """A clear error when the stages a mode needs were not given."""
        missing = [name for name, need, have in (("an AR model", ar, self.ar), ("a NAR model", nar_vocoder, self.nar),
                                                 ("a vocoder", nar_vocoder, self.vocoder)) if need and have is None]
        if missing:
            raise ValueError(f"{why} needs {' and '.join(missing)}, which this pipeline was built without")
        if codec_decoder and not (callable(getattr(self.codec, "decode_codes", None))
                                  and hasattr(self.codec, "hop_length")):
            raise ValueError(f"{why} decodes the AR tokens with the codec's own decoder, but the codec "
                             f"({type(self.codec).__name__}) has no decode_codes/hop_length: use a FlexiCodec, "
                             "or the NAR + vocoder path")

    @property
    def frontend(self):
        if self._frontend is None:
            from flexitrain.text import TextFrontend

            # inference: always full G2P (official)
            self._frontend = TextFrontend(g2p=self.g2p, g2p_prob=1.0, zh_g2p=self.zh_g2p)
        return self._frontend

    def threshold_for(self, frame_rate: float | None = None, threshold: float | None = None,
                      check_ar: bool = True) -> float:
        """A merging threshold from a frame rate in Hz (nearest configured within 0.3 Hz) or as given;
        `check_ar`: it must be one the AR was trained at (not needed for NAR-only resynthesis)."""
        if threshold is None:
            if frame_rate is None:
                raise ValueError("give a frame rate (Hz) or a merging threshold")
            best = min(self.frame_rates, key=lambda hz: abs(hz - float(frame_rate)))
            if abs(best - float(frame_rate)) > 0.3:
                raise ValueError(f"frame rate {frame_rate} Hz is not configured; choose one of "
                                 f"{sorted(self.frame_rates)} Hz (frame_rates maps Hz to merging thresholds)")
            threshold = self.frame_rates[best]
        if check_ar and self.ar is not None and self.ar.framerate_options:
            self.ar.framerate_index(threshold)  # a clear error for a threshold the AR was not trained at
        return float(threshold)

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def encode_tokens(self, audio: Tensor, sample_rate: int, threshold: float) -> tuple[Tensor, Tensor]:
        """Waveform [N] at any rate → codec (tokens [P], durations [P]) at `threshold`."""
        audio16 = resample(audio.float().reshape(-1).to(self.device)[None], sample_rate, self.codec.sample_rate)[0]
        feats, feat_lens = loading.teacher_features(self.teacher, audio16)
        tokens, durations = encode_prompt(self.codec, audio16[None], torch.tensor([audio16.numel()], device=self.device),
                                          threshold, feats, feat_lens)
        return tokens[0], durations[0]

    @torch.no_grad()
    def encode_prompt(self, audio: Tensor, sample_rate: int, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
        """Prompt waveform → (tokens [P], durations [P], normalised 24 kHz mel [T, 128])."""
        tokens, durations = self.encode_tokens(audio, sample_rate, threshold)
        audio24 = resample(audio.float().reshape(-1).to(self.device)[None], sample_rate, OUT_RATE)
        mel = self.mel(audio24)[0].transpose(0, 1)
        return tokens, durations, mel

    def min_tokens(self, text: str, prompt_text: str, language: str, prompt_tokens: int) -> int:
        if self.min_prompt_pace <= 0 or not prompt_text.strip() or prompt_tokens == 0:
            return 0
        n_prompt, n_text = (len(self.frontend(t, language)) - 1 for t in (prompt_text, text))  # minus the language id
        return int(self.min_prompt_pace * prompt_tokens / max(1, n_prompt) * n_text)

    def text_ids(self, text: str, prompt_text: str, language: str) -> Tensor:
        joined = f"{prompt_text.strip()}, {text.strip()}" if prompt_text.strip() else text.strip()
        ids = self.frontend(joined, language)
        return torch.tensor([ids], dtype=torch.long, device=self.device)

    def _prompt(self, prompt_wav, prompt_audio, prompt_sample_rate: int, threshold: float):
        """The encoded prompt; a prompt file is read and encoded once per threshold (bounded cache)."""
        if prompt_audio is not None:
            return self.encode_prompt(prompt_audio, prompt_sample_rate, threshold)
        if prompt_wav is None:
            raise ValueError("give prompt_wav (a file) or prompt_audio (a waveform): FlexiCodec-TTS is zero-shot")
        key = (str(Path(prompt_wav).resolve()), threshold)
        if key not in self._prompt_cache:
            if len(self._prompt_cache) >= 512:  # drop the oldest prompt
                self._prompt_cache.pop(next(iter(self._prompt_cache)))
            self._prompt_cache[key] = self.encode_prompt(*read_prompt(prompt_wav), threshold)
        return self._prompt_cache[key]

    def _generate(self, text_ids: Tensor, threshold: float, prompt, seed: int, min_tokens: int,
                  predict_duration: bool) -> GenerationResult:
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        if not predict_duration:
            return generate_fixed_rate(self.ar, text_ids, threshold, prompt[0][None], prompt[1][None],
                                       config=self.sampling, generator=generator, min_tokens=min_tokens)
        return generate(self.ar, text_ids, threshold, prompt_tokens=prompt[0][None], prompt_durations=prompt[1][None],
                        config=self.sampling, generator=generator, min_tokens=min_tokens)

    def _render(self, tokens: Tensor, durations: Tensor, prompt: tuple[Tensor, Tensor, Tensor], seed: int,
                stopped: bool, threshold: float, timings: dict, ar_only: bool = False,
                mode: str = "tts", mel: Tensor | None = None) -> TTSResult:
        """Generated tokens → audio: the codec decoder (AR-only) or NAR + vocoder (the NAR is skipped when its
        `mel` is given, already sampled with a batch)."""
        if tokens.numel() == 0:
            raise RuntimeError("the AR model produced no tokens (EOS first): an untrained model or a too strict "
                               "min/max token ratio")
        if ar_only:
            audio, sample_rate, stage_timings = self._decode_with_codec(tokens, durations)
        else:
            audio, sample_rate, stage_timings = self._nar_vocoder(tokens, durations, prompt, seed, mel)
        timings = {**timings, **stage_timings}
        timings["total"] = sum(timings.values())
        p_tokens, p_durations = prompt[0], prompt[1]
        return TTSResult(audio, sample_rate, tokens.cpu(), durations.cpu(), p_tokens.cpu(), p_durations.cpu(),
                         threshold, stopped, timings, "ar-only" if ar_only else mode)

    def _estimator(self) -> nn.Module | None:
        """The compiled velocity model when `NARConfig.compile` is set (compiled once), else None (the plain one)."""
        if not self.nar_config.compile:
            return None
        if self._compiled_estimator is None:
            self._compiled_estimator = torch.compile(self.nar.voicebox_model, dynamic=True)
        return self._compiled_estimator

    def _sampler_kwargs(self) -> dict:
        nc = self.nar_config
        return {"n_timesteps": nc.n_timesteps, "cfg": nc.cfg, "rescale_cfg": nc.rescale_cfg,
                "estimator": self._estimator()}

    def _nar_vocoder(self, tokens: Tensor, durations: Tensor, prompt, seed: int,
                     mel: Tensor | None = None) -> tuple[Tensor, int, dict]:
        p_tokens, p_durations, p_mel = prompt
        stage_timings = {}
        if mel is None:
            t0 = time.perf_counter()
            mel = self.nar.synthesize(tokens, durations, torch.repeat_interleave(p_tokens, p_durations), p_mel,
                                      seed=int(seed), **self._sampler_kwargs())
            stage_timings["nar"] = time.perf_counter() - t0
        t1 = time.perf_counter()
        audio = self.vocoder(mel.transpose(0, 1)[None].float())[0, 0].clamp(-1, 1).cpu()
        return audio, OUT_RATE, {**stage_timings, "vocoder": time.perf_counter() - t1}

    def _chunk_mels(self, chunk: list, gens: list, requests: list) -> tuple[dict, float]:
        """The NAR mels of a decoded chunk, sampled together (one velocity-model call per Euler step for all, each
        utterance from its own seed): {chunk position: mel, or the RuntimeError that stopped the batch} for every
        utterance that is not AR-only and has tokens (an empty one is left to _render's error), and each one's
        even share of the NAR time. Nothing when `NARConfig.batch` says per utterance."""
        together = self.device.type != "cpu" if self.nar_config.batch is None else self.nar_config.batch
        todo = [k for k, gen in enumerate(gens) if not requests[chunk[k][0]].ar_only and gen.tokens.numel()]
        if not todo or not together:
            return {}, 0.0  # _render samples each one alone
        prompts = [chunk[k][2] for k in todo]
        t0 = time.perf_counter()
        try:
            mels = self.nar.synthesize_batch(
                [gens[k].tokens[0] for k in todo], [gens[k].durations[0] for k in todo],
                [torch.repeat_interleave(p_tokens, p_durations) for p_tokens, p_durations, _ in prompts],
                [p_mel for _, _, p_mel in prompts], seeds=[int(requests[chunk[k][0]].seed) for k in todo],
                **self._sampler_kwargs())
        except RuntimeError as e:
            mels = [e] * len(todo)
        return dict(zip(todo, mels)), (time.perf_counter() - t0) / len(todo)

    def _decode_with_codec(self, tokens: Tensor, durations: Tensor) -> tuple[Tensor, int, dict]:
        """Official ``use_nar=False``: semantic codes only (no acoustic codes) through the codec's decoder,
        trimmed / zero-padded to exactly (Σ durations) × hop samples at the codec's rate."""
        t0 = time.perf_counter()
        audio = self.codec.decode_codes(tokens[None].to(self.device), None, durations[None].to(self.device))[0, 0]
        n = int(durations.sum()) * int(self.codec.hop_length)
        audio = F.pad(audio.float(), (0, max(0, n - audio.numel())))[:n].clamp(-1, 1).cpu()
        return audio, int(self.codec.sample_rate), {"codec": time.perf_counter() - t0}

    @torch.no_grad()
    def synthesize(self, text: str, prompt_wav: str | Path | None = None, prompt_text: str = "", *,
                   prompt_audio: Tensor | None = None, prompt_sample_rate: int = 16000, frame_rate: float | None = None,
                   threshold: float | None = None, language: str = "en", seed: int = 0, ar_only: bool = False,
                   predict_duration: bool = True) -> TTSResult:
        """Text in the voice of the prompt. ar_only: decode with the codec instead of NAR + vocoder;
        predict_duration=False: every generated token is one 12.5 Hz frame (see the module docstring)."""
        self._require(ar=True, nar_vocoder=not ar_only, codec_decoder=ar_only,
                      why="AR-only synthesis" if ar_only else "text-to-speech")
        if not text.strip():
            raise ValueError("text is empty")
        thr = self.threshold_for(frame_rate, threshold)
        t0 = time.perf_counter()
        prompt = self._prompt(prompt_wav, prompt_audio, prompt_sample_rate, thr)
        t1 = time.perf_counter()
        gen = self._generate(self.text_ids(text, prompt_text, language), thr, prompt, seed,
                             self.min_tokens(text, prompt_text, language, prompt[0].numel()), predict_duration)
        t2 = time.perf_counter()
        return self._render(gen.tokens[0], gen.durations[0], prompt, seed, gen.stopped_by_eos, thr,
                            {"prompt": t1 - t0, "ar": t2 - t1}, ar_only=ar_only)

    @torch.no_grad()
    def resynthesize(self, source_wav: str | Path | None = None, prompt_wav: str | Path | None = None, *,
                     source_audio: Tensor | None = None, source_sample_rate: int = 16000,
                     prompt_audio: Tensor | None = None, prompt_sample_rate: int = 16000,
                     frame_rate: float | None = None, threshold: float | None = None, seed: int = 0) -> TTSResult:
        """NAR-only resynthesis (official ``infer_voicebox_tts``): the source's codec tokens and durations at the
        threshold, rendered by the NAR in the prompt's voice, then Vocos → 24 kHz, (source frames) × 1920
        samples. The prompt may be the source itself (plain reconstruction through the NAR)."""
        self._require(nar_vocoder=True, why="resynthesis")
        if source_wav is None and source_audio is None:
            raise ValueError("resynthesis needs source audio: give source_wav (a file) or source_audio (a waveform)")
        thr = self.threshold_for(frame_rate, threshold, check_ar=False)  # the NAR is frame-rate agnostic
        t0 = time.perf_counter()
        if source_audio is None:
            source_audio, source_sample_rate = read_prompt(source_wav, "source wav")
        tokens, durations = self.encode_tokens(source_audio, source_sample_rate, thr)
        t1 = time.perf_counter()
        prompt = self._prompt(prompt_wav, prompt_audio, prompt_sample_rate, thr)
        t2 = time.perf_counter()
        return self._render(tokens, durations, prompt, seed, True, thr, {"source": t1 - t0, "prompt": t2 - t1},
                            mode="resynthesis")

    def synthesize_request(self, request: TTSRequest) -> TTSResult:
        r = request
        if r.is_resynthesis:
            if r.ar_only or not r.predict_duration:
                raise ValueError("a resynthesis request renders the source's own tokens and durations with the "
                                 "NAR: it does not go with ar_only or predict_duration=False")
            return self.resynthesize(r.source_wav, r.prompt_wav, source_audio=r.source_audio,
                                     source_sample_rate=r.source_sample_rate, prompt_audio=r.prompt_audio,
                                     prompt_sample_rate=r.prompt_sample_rate, frame_rate=r.frame_rate,
                                     threshold=r.threshold, seed=r.seed)
        return self.synthesize(r.text, r.prompt_wav, r.prompt_text, prompt_audio=r.prompt_audio,
                               prompt_sample_rate=r.prompt_sample_rate, frame_rate=r.frame_rate,
                               threshold=r.threshold, language=r.language, seed=r.seed, ar_only=r.ar_only,
                               predict_duration=r.predict_duration)

    def _one_at_a_time(self, request: TTSRequest) -> TTSResult | Exception:
        try:
            return self.synthesize_request(request)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            return e

    @torch.no_grad()
    def synthesize_batch(self, requests: list[TTSRequest], max_batch: int = 16) -> list[TTSResult | Exception]:
        """Several utterances: the AR decodes up to `max_batch` of them together (KV-cached, each with its own
        threshold and prompt), then the NAR samples the chunk's mels together (each from its own seed: equal to
        one-at-a-time up to float rounding; `NARConfig.batch`, by default not on the CPU); the vocoder (or the
        codec decoder) runs per utterance. The AR draws from one generator seeded by the batch's first request
        (greedy decoding equals one-at-a-time). Resynthesis and ``predict_duration=False`` requests run one at a
        time. A request that fails (missing prompt, unknown frame rate, no tokens) gets its exception in its
        slot; the others are synthesised."""
        results: list[TTSResult | Exception | None] = [None] * len(requests)
        ready = []
        for i, r in enumerate(requests):
            if r.is_resynthesis or not r.predict_duration:
                results[i] = self._one_at_a_time(r)
                continue
            try:
                self._require(ar=True, nar_vocoder=not r.ar_only, codec_decoder=r.ar_only,
                              why="AR-only synthesis" if r.ar_only else "text-to-speech")
                if not r.text.strip():
                    raise ValueError("text is empty")
                thr = self.threshold_for(r.frame_rate, r.threshold)
                t0 = time.perf_counter()
                prompt = self._prompt(r.prompt_wav, r.prompt_audio, r.prompt_sample_rate, thr)
                ready.append((i, thr, prompt, self.text_ids(r.text, r.prompt_text, r.language),
                              time.perf_counter() - t0,
                              self.min_tokens(r.text, r.prompt_text, r.language, prompt[0].numel())))
            except (ValueError, FileNotFoundError) as e:
                results[i] = e
        for start in range(0, len(ready), max_batch):
            chunk = ready[start:start + max_batch]
            generator = torch.Generator(device="cpu").manual_seed(int(requests[chunk[0][0]].seed))
            t0 = time.perf_counter()
            gens = generate_batch(self.ar, [c[3] for c in chunk], [c[1] for c in chunk],
                                  prompt_tokens=[c[2][0][None] for c in chunk],
                                  prompt_durations=[c[2][1][None] for c in chunk], config=self.sampling,
                                  generator=generator, min_tokens=[c[5] for c in chunk])
            ar_share = (time.perf_counter() - t0) / len(chunk)  # one decode for the chunk: shared evenly
            mels, nar_share = self._chunk_mels(chunk, gens, requests)
            for k, ((i, thr, prompt, _, prompt_s, _), gen) in enumerate(zip(chunk, gens)):
                mel = mels.get(k)
                if isinstance(mel, RuntimeError):
                    results[i] = mel
                    continue
                timings = {"prompt": prompt_s, "ar": ar_share, **({} if mel is None else {"nar": nar_share})}
                try:
                    results[i] = self._render(gen.tokens[0], gen.durations[0], prompt, requests[i].seed,
                                              gen.stopped_by_eos, thr, timings, ar_only=requests[i].ar_only, mel=mel)
                except RuntimeError as e:
                    results[i] = e
        return results


def expected_num_samples(durations: Tensor, scale_factor: int = 4, hop: int = HOP_LENGTH) -> int:
    """Output length for generated durations: 12.5 Hz frames × 4 (50 Hz mel) × 480 samples (NAR + Vocos);
    for AR-only output pass scale_factor=1, hop=codec.hop_length (1280 at 16 kHz)."""
    return int(durations.sum()) * scale_factor * hop


def summarise(results: list[TTSResult]) -> dict:
    """Mean frame rate, total audio seconds and overall RTF of a set of results."""
    seconds = sum(r.seconds for r in results)
    total = sum(r.timings.get("total", 0.0) for r in results)
    rates = [r.frame_rate for r in results if math.isfinite(r.frame_rate)]
    return {"utterances": len(results), "audio_seconds": seconds, "synthesis_seconds": total,
            "rtf": total / seconds if seconds else float("nan"),
            "frame_rate": float(np.mean(rates)) if rates else float("nan"),
            "stage_seconds": {k: sum(r.timings.get(k, 0.0) for r in results)
                              for k in ("source", "prompt", "ar", "nar", "vocoder", "codec")}}
