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
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from flexitrain.audio.mel24k import HOP_LENGTH, SAMPLE_RATE as OUT_RATE, Mel24k
from flexitrain.audio.resample import resample
from flexitrain.models.tts.sampling import SamplingConfig, encode_prompt, generate, generate_batch
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
    timings: dict = field(default_factory=dict)  # seconds: prompt, ar, nar, vocoder, total

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


def read_prompt(path: str | Path) -> tuple[Tensor, int]:
    import soundfile as sf

    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"prompt wav {str(path)!r} does not exist")
    audio, sr = sf.read(str(p), dtype="float32", always_2d=True)
    if audio.shape[0] == 0:
        raise ValueError(f"prompt wav {str(path)!r} is empty")
    return torch.from_numpy(np.ascontiguousarray(audio.mean(axis=1))), int(sr)


class TTSPipeline:
    def __init__(self, ar: nn.Module, nar: nn.Module, vocoder: nn.Module, codec: nn.Module, teacher: nn.Module,
                 frame_rates: dict[float, float] | None = None, sampling: SamplingConfig | None = None,
                 nar_config: NARConfig | None = None, device: str | torch.device = "cpu", min_prompt_pace: float = 0.0):
        self.device = torch.device(device)
        self.ar, self.nar, self.vocoder = ar.eval().to(self.device), nar.eval().to(self.device), vocoder.eval().to(self.device)
        self.codec, self.teacher = codec.eval().to(self.device), teacher.eval().to(self.device)
        self.frame_rates = dict(frame_rates or DEFAULT_FRAME_RATES)
        self.sampling = sampling or SamplingConfig()
        self.nar_config = nar_config or NARConfig()
        # > 0: no EOS before min_prompt_pace × (prompt tokens per prompt-text id) × target-text ids. Off by default
        # (the official decoder has only the text-ratio floor); it keeps weak models (the CPU demos) from stopping
        # at the typical utterance length counted from the start of the prompt.
        self.min_prompt_pace = float(min_prompt_pace)
        self.mel = Mel24k().to(self.device)
        self._frontend = None
        self._prompt_cache: dict[tuple, tuple[Tensor, Tensor, Tensor]] = {}
        self._check_compatible()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_checkpoints(cls, ar: str | Path, nar: str | Path, vocoder: str | Path, codec: str | Path | None = None,
                         teacher: dict | None = None, **kwargs) -> "TTSPipeline":
        """Each stage from a local file (see `flexitrain.tts.loading`). The codec that tokenises the prompt is
        `codec` (a CodecTask ``.ckpt`` or an exported FlexiCodec directory, with `teacher` settings for the
        latter), else the one the AR checkpoint was trained against, else the NAR's."""
        ar_model, ar_codec = loading.load_ar(ar)
        nar_model, nar_codec = loading.load_nar(nar)
        vocoder_model = loading.load_vocoder(vocoder)
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
        if codes > self.ar.speech_token_size:
            raise ValueError(f"the codec has {codes} semantic codes but the AR model only {self.ar.speech_token_size}")
        if codes > self.nar.config.cond_codebook_size:
            raise ValueError(f"the codec has {codes} semantic codes but the NAR only {self.nar.config.cond_codebook_size}")
        if self.nar.config.mel_dim != self.vocoder.input_channels:
            raise ValueError(f"NAR mel_dim {self.nar.config.mel_dim} != vocoder input {self.vocoder.input_channels}")
        if getattr(self.vocoder, "hop_size", HOP_LENGTH) != HOP_LENGTH:
            raise ValueError(f"the vocoder's hop must be {HOP_LENGTH} (the NAR's 50 Hz mel at 24 kHz)")

    @property
    def frontend(self):
        if self._frontend is None:
            from flexitrain.text import TextFrontend

            self._frontend = TextFrontend(g2p=True, g2p_prob=1.0)  # inference: always full G2P (official)
        return self._frontend

    def threshold_for(self, frame_rate: float | None = None, threshold: float | None = None) -> float:
        """A merging threshold from a frame rate in Hz (nearest configured within 0.3 Hz) or as given."""
        if threshold is None:
            if frame_rate is None:
                raise ValueError("give a frame rate (Hz) or a merging threshold")
            best = min(self.frame_rates, key=lambda hz: abs(hz - float(frame_rate)))
            if abs(best - float(frame_rate)) > 0.3:
                raise ValueError(f"frame rate {frame_rate} Hz is not configured; choose one of "
                                 f"{sorted(self.frame_rates)} Hz (frame_rates maps Hz to merging thresholds)")
            threshold = self.frame_rates[best]
        if self.ar.framerate_options:
            self.ar.framerate_index(threshold)  # a clear error for a threshold the AR was not trained at
        return float(threshold)

    # ------------------------------------------------------------------ stages
    @torch.no_grad()
    def encode_prompt(self, audio: Tensor, sample_rate: int, threshold: float) -> tuple[Tensor, Tensor, Tensor]:
        """Prompt waveform → (tokens [P], durations [P], normalised 24 kHz mel [T, 128])."""
        audio = audio.float().reshape(-1).to(self.device)
        audio16 = resample(audio[None], sample_rate, self.codec.sample_rate)[0]
        feats, feat_lens = loading.teacher_features(self.teacher, audio16)
        tokens, durations = encode_prompt(self.codec, audio16[None], torch.tensor([audio16.numel()], device=self.device),
                                          threshold, feats, feat_lens)
        audio24 = resample(audio[None], sample_rate, OUT_RATE)
        mel = self.mel(audio24)[0].transpose(0, 1)
        return tokens[0], durations[0], mel

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

    def _render(self, tokens: Tensor, durations: Tensor, prompt: tuple[Tensor, Tensor, Tensor], seed: int,
                stopped: bool, threshold: float, timings: dict) -> TTSResult:
        """NAR + vocoder for one utterance's generated tokens."""
        if tokens.numel() == 0:
            raise RuntimeError("the AR model produced no tokens (EOS first): an untrained model or a too strict "
                               "min/max token ratio")
        p_tokens, p_durations, p_mel = prompt
        nc = self.nar_config
        t0 = time.perf_counter()
        mel = self.nar.synthesize(tokens, durations, torch.repeat_interleave(p_tokens, p_durations), p_mel,
                                  n_timesteps=nc.n_timesteps, cfg=nc.cfg, rescale_cfg=nc.rescale_cfg, seed=int(seed))
        t1 = time.perf_counter()
        audio = self.vocoder(mel.transpose(0, 1)[None].float())[0, 0].clamp(-1, 1).cpu()
        t2 = time.perf_counter()
        timings = {**timings, "nar": t1 - t0, "vocoder": t2 - t1}
        timings["total"] = sum(timings[k] for k in ("prompt", "ar", "nar", "vocoder"))
        return TTSResult(audio, OUT_RATE, tokens.cpu(), durations.cpu(), p_tokens.cpu(), p_durations.cpu(), threshold,
                         stopped, timings)

    @torch.no_grad()
    def synthesize(self, text: str, prompt_wav: str | Path | None = None, prompt_text: str = "", *,
                   prompt_audio: Tensor | None = None, prompt_sample_rate: int = 16000, frame_rate: float | None = None,
                   threshold: float | None = None, language: str = "en", seed: int = 0) -> TTSResult:
        if not text.strip():
            raise ValueError("text is empty")
        thr = self.threshold_for(frame_rate, threshold)
        t0 = time.perf_counter()
        prompt = self._prompt(prompt_wav, prompt_audio, prompt_sample_rate, thr)
        t1 = time.perf_counter()
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        gen = generate(self.ar, self.text_ids(text, prompt_text, language), thr, prompt_tokens=prompt[0][None],
                       prompt_durations=prompt[1][None], config=self.sampling, generator=generator,
                       min_tokens=self.min_tokens(text, prompt_text, language, prompt[0].numel()))
        t2 = time.perf_counter()
        return self._render(gen.tokens[0], gen.durations[0], prompt, seed, gen.stopped_by_eos, thr,
                            {"prompt": t1 - t0, "ar": t2 - t1})

    def synthesize_request(self, request: TTSRequest) -> TTSResult:
        return self.synthesize(request.text, request.prompt_wav, request.prompt_text, prompt_audio=request.prompt_audio,
                               prompt_sample_rate=request.prompt_sample_rate, frame_rate=request.frame_rate,
                               threshold=request.threshold, language=request.language, seed=request.seed)

    @torch.no_grad()
    def synthesize_batch(self, requests: list[TTSRequest], max_batch: int = 16) -> list[TTSResult | Exception]:
        """Several utterances: the AR decodes up to `max_batch` of them together (KV-cached, each with its own
        threshold and prompt); the NAR and vocoder run per utterance. The AR draws from one generator seeded by
        the batch's first request (greedy decoding equals one-at-a-time). A request that fails (missing prompt,
        unknown frame rate, no tokens) gets its exception in its slot; the others are synthesised."""
        results: list[TTSResult | Exception | None] = [None] * len(requests)
        ready = []
        for i, r in enumerate(requests):
            try:
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
            for (i, thr, prompt, _, prompt_s, _), gen in zip(chunk, gens):
                try:
                    results[i] = self._render(gen.tokens[0], gen.durations[0], prompt, requests[i].seed,
                                              gen.stopped_by_eos, thr, {"prompt": prompt_s, "ar": ar_share})
                except RuntimeError as e:
                    results[i] = e
        return results


def expected_num_samples(durations: Tensor, scale_factor: int = 4, hop: int = HOP_LENGTH) -> int:
    """Output length for generated durations: 12.5 Hz frames × 4 (50 Hz mel) × 480 samples."""
    return int(durations.sum()) * scale_factor * hop


def summarise(results: list[TTSResult]) -> dict:
    """Mean frame rate, total audio seconds and overall RTF of a set of results."""
    seconds = sum(r.seconds for r in results)
    total = sum(r.timings.get("total", 0.0) for r in results)
    rates = [r.frame_rate for r in results if math.isfinite(r.frame_rate)]
    return {"utterances": len(results), "audio_seconds": seconds, "synthesis_seconds": total,
            "rtf": total / seconds if seconds else float("nan"),
            "frame_rate": float(np.mean(rates)) if rates else float("nan"),
            "stage_seconds": {k: sum(r.timings.get(k, 0.0) for r in results) for k in ("prompt", "ar", "nar", "vocoder")}}
