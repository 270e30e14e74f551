"""The official inference modes besides plain TTS, end to end on tiny random models: AR-only output through the
codec's own decoder (``use_nar=False``), no duration prediction (``predict_duration=False``) and NAR-only
resynthesis (``infer_voicebox_tts``): sample rates, exact lengths, seeded determinism, the Python API, the
`flexitrain-tts` CLI and their errors."""
from __future__ import annotations

import io
import re
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import pytest
import soundfile as sf
import torch
from torch import nn

from conftest import requires_espeak
from test_tts_pipeline import _modules
from tts_fixtures import write_task_checkpoints

pytestmark = requires_espeak  # the AR text front end phonemises with espeak-ng

SOURCE_SECONDS, SOURCE_FRAMES = 2.1, 26  # 2.1 s at 12.5 Hz: 26 whole codec frames


@pytest.fixture(scope="module")
def modules():
    return _modules()


def _pipeline(modules, **kw):
    from flexitrain.models.tts.sampling import SamplingConfig
    from flexitrain.tts import TTSPipeline
    from flexitrain.tts.pipeline import NARConfig

    ar, nar, vocoder, codec, teacher = modules
    # An untrained AR would often stop at once: forbid EOS and cap the length instead.
    sampling = kw.pop("sampling", SamplingConfig(top_k=5, min_token_text_ratio=100.0, max_tokens=9))
    stages = {"ar": ar, "nar": nar, "vocoder": vocoder, **kw}
    return TTSPipeline(stages["ar"], stages["nar"], stages["vocoder"], codec, teacher, sampling=sampling,
                       nar_config=NARConfig(n_timesteps=2))


@pytest.fixture(scope="module")
def tts(modules):
    return _pipeline(modules)


@pytest.fixture(scope="module")
def wavs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wavs")
    t = np.arange(int(1.3 * 22050)) / 22050
    sf.write(str(root / "prompt.wav"), (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 22050)
    t = np.arange(int(SOURCE_SECONDS * 24000)) / 24000  # a chirp at 24 kHz: resampled to 16 kHz for the codec
    sf.write(str(root / "source.wav"), (0.3 * np.sin(2 * np.pi * (150 + 200 * t) * t)).astype(np.float32), 24000)
    return root / "prompt.wav", root / "source.wav"


# ------------------------------------------------------------------------------------------------ AR-only
def test_ar_only_decodes_the_ar_tokens_with_the_codec_at_16k(tts, modules, wavs):
    from flexitrain.tts.pipeline import expected_num_samples

    codec = modules[3]
    prompt, _ = wavs
    r = tts.synthesize("Hello world.", prompt, "A prompt.", frame_rate=8.3, seed=1, ar_only=True)
    assert r.mode == "ar-only" and r.sample_rate == codec.sample_rate == 16000 and codec.hop_length == 1280
    assert r.audio.numel() == int(r.durations.sum()) * 1280 == expected_num_samples(r.durations, 1, 1280)
    assert torch.isfinite(r.audio).all() and float(r.audio.abs().max()) > 0
    assert set(r.timings) == {"prompt", "ar", "codec", "total"}
    # the AR part is the one of full synthesis; only the renderer changes
    full = tts.synthesize("Hello world.", prompt, "A prompt.", frame_rate=8.3, seed=1)
    assert torch.equal(full.tokens, r.tokens) and torch.equal(full.durations, r.durations)
    # the audio is the codec's semantic-only decode of those tokens with their durations
    with torch.no_grad():
        ref = codec.decode_codes(r.tokens[None], None, r.durations[None])[0, 0]
    n = min(ref.numel(), r.audio.numel())
    assert torch.allclose(r.audio[:n], ref[:n].clamp(-1, 1), atol=1e-6)
    again = tts.synthesize("Hello world.", prompt, "A prompt.", frame_rate=8.3, seed=1, ar_only=True)
    other = tts.synthesize("Hello world.", prompt, "A prompt.", frame_rate=8.3, seed=2, ar_only=True)
    assert torch.equal(again.audio, r.audio) and not torch.equal(other.tokens, r.tokens)


class _EncoderOnly(nn.Module):
    """A codec that can tokenise prompts but has no decoder."""

    def __init__(self, codec):
        super().__init__()
        self.inner, self.semantic_vq, self.sample_rate = codec, codec.semantic_vq, codec.sample_rate

    def encode(self, *args, **kwargs):
        return self.inner.encode(*args, **kwargs)


def test_ar_only_needs_only_the_ar_and_a_codec_decoder(modules, wavs):
    prompt, _ = wavs
    ar_only = _pipeline(modules, nar=None, vocoder=None)
    r = ar_only.synthesize("Hi there.", prompt, frame_rate=6.25, ar_only=True)
    assert r.sample_rate == 16000 and r.audio.numel() == int(r.durations.sum()) * 1280
    with pytest.raises(ValueError, match="needs a NAR model and a vocoder"):
        ar_only.synthesize("Hi there.", prompt, frame_rate=6.25)
    ar, _, _, codec, teacher = modules
    from flexitrain.tts import TTSPipeline

    no_decoder = TTSPipeline(ar, None, None, _EncoderOnly(codec), teacher)
    with pytest.raises(ValueError, match="codec's own decoder.*_EncoderOnly"):
        no_decoder.synthesize("Hi there.", prompt, frame_rate=6.25, ar_only=True)


# ------------------------------------------------------------------------------------------------ durations
def test_no_duration_prediction_renders_one_frame_per_token(tts, wavs):
    prompt, _ = wavs
    r = tts.synthesize("Hello world.", prompt, "A prompt.", frame_rate=8.3, seed=2, predict_duration=False)
    assert r.tokens.numel() == 9 and torch.equal(r.durations, torch.ones(9, dtype=torch.long))
    assert r.sample_rate == 24000 and r.audio.numel() == 9 * 1920 and r.frame_rate == pytest.approx(12.5)
    again = tts.synthesize("Hello world.", prompt, "A prompt.", frame_rate=8.3, seed=2, predict_duration=False)
    assert torch.equal(again.audio, r.audio) and torch.equal(again.tokens, r.tokens)
    codec_out = tts.synthesize("Hello world.", prompt, "A prompt.", frame_rate=8.3, seed=2, predict_duration=False,
                               ar_only=True)
    assert torch.equal(codec_out.tokens, r.tokens) and codec_out.audio.numel() == 9 * 1280


def test_no_duration_decode_follows_the_official_conditioning(modules, wavs):
    """Greedy tokens equal a full-sequence recomputation of the official predict_duration=False decode: prompt
    tokens without duration embeddings, every generated token + the last prompt duration's embedding."""
    from flexitrain.models.tts.sampling import SamplingConfig

    ar = modules[0]
    prompt, _ = wavs
    tts = _pipeline(modules, sampling=SamplingConfig(top_k=1, min_token_text_ratio=100.0, max_tokens=6))
    r = tts.synthesize("Hello world.", prompt, "A prompt.", threshold=0.91, predict_duration=False)
    p_tokens, p_durations, _ = tts._prompt(prompt, None, 16000, 0.91)
    text = tts.text_ids("Hello world.", "A prompt.", "en")
    with torch.no_grad():
        seq = torch.cat([ar.decode_prefix(text, 0.91), ar.speech_embedding(p_tokens[None])], dim=1)
        last = ar.duration_embedding.weight[int(p_durations[-1])]
        expected = []
        for _ in range(6):
            logits = ar.llm_decoder(ar.llm(seq, torch.tensor([seq.size(1)]))[:, -1])[0]
            logits[ar.eos_id] = float("-inf")
            expected.append(int(logits.argmax()))
            seq = torch.cat([seq, (ar.speech_embedding.weight[expected[-1]] + last).view(1, 1, -1)], dim=1)
    assert r.tokens.tolist() == expected


# ------------------------------------------------------------------------------------------------ resynthesis
def test_resynthesis_renders_the_source_tokens_in_the_prompt_voice(tts, wavs):
    prompt, source = wavs
    r = tts.resynthesize(source, prompt, frame_rate=8.3, seed=3)
    assert r.mode == "resynthesis" and r.sample_rate == 24000 and r.threshold == 0.91
    assert int(r.durations.sum()) == SOURCE_FRAMES and r.audio.numel() == SOURCE_FRAMES * 1920
    assert torch.isfinite(r.audio).all() and float(r.audio.abs().max()) > 0
    audio, sr = sf.read(str(source), dtype="float32")
    tokens, durations = tts.encode_tokens(torch.from_numpy(audio), sr, 0.91)
    assert torch.equal(r.tokens, tokens.cpu()) and torch.equal(r.durations, durations.cpu())
    same = tts.resynthesize(source_audio=torch.from_numpy(audio), source_sample_rate=sr, prompt_wav=prompt,
                            threshold=0.91, seed=3)
    assert torch.equal(same.audio, r.audio)
    assert not torch.equal(tts.resynthesize(source, prompt, frame_rate=8.3, seed=4).audio, r.audio)
    # a lower threshold merges more: fewer tokens, the same frames and output length
    low = tts.resynthesize(source, prompt, frame_rate=6.25, seed=3)
    assert low.tokens.numel() <= r.tokens.numel() and low.audio.numel() == SOURCE_FRAMES * 1920


def test_resynthesis_needs_no_ar_and_says_what_is_missing(modules, wavs, tmp_path):
    prompt, source = wavs
    nar_only = _pipeline(modules, ar=None)
    r = nar_only.resynthesize(source, prompt, threshold=0.5)  # any τ: the NAR is frame-rate agnostic
    assert r.audio.numel() == SOURCE_FRAMES * 1920
    with pytest.raises(ValueError, match="text-to-speech needs an AR model"):
        nar_only.synthesize("Hi.", prompt, frame_rate=8.3)
    with pytest.raises(ValueError, match="resynthesis needs source audio"):
        nar_only.resynthesize(prompt_wav=prompt, frame_rate=8.3)
    with pytest.raises(FileNotFoundError, match="source wav"):
        nar_only.resynthesize(tmp_path / "missing.wav", prompt, frame_rate=8.3)
    with pytest.raises(ValueError, match="zero-shot"):
        nar_only.resynthesize(source, frame_rate=8.3)
    with pytest.raises(ValueError, match="resynthesis needs a NAR model and a vocoder"):
        _pipeline(modules, nar=None, vocoder=None).resynthesize(source, prompt, frame_rate=8.3)


def test_batch_mixes_modes(tts, wavs):
    from flexitrain.tts import TTSRequest

    prompt, source = wavs
    requests = [TTSRequest("One two.", prompt, frame_rate=8.3, seed=1, ar_only=True),
                TTSRequest("", prompt, frame_rate=8.3, seed=3, source_wav=source),
                TTSRequest("Three.", prompt, frame_rate=8.3, seed=2, predict_duration=False),
                TTSRequest("", prompt, frame_rate=8.3, source_audio=None, source_wav=None),  # plain TTS, empty text
                TTSRequest("", prompt, frame_rate=8.3, source_wav=source, ar_only=True)]
    out = tts.synthesize_batch(requests)
    assert isinstance(out[4], ValueError) and "does not go with ar_only" in str(out[4])
    assert out[0].mode == "ar-only" and out[0].sample_rate == 16000
    assert out[1].mode == "resynthesis" and out[1].audio.numel() == SOURCE_FRAMES * 1920
    assert torch.equal(out[2].durations, torch.ones_like(out[2].tokens))
    assert isinstance(out[3], ValueError) and "text is empty" in str(out[3])
    assert torch.equal(out[1].audio, tts.resynthesize(source, prompt, frame_rate=8.3, seed=3).audio)


# ------------------------------------------------------------------------------------------------ CLI
@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    return write_task_checkpoints(tmp_path_factory.mktemp("ckpt"))


def _cli(*args) -> tuple[int, str, str]:
    from flexitrain.tts import cli

    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        rc = cli.main([str(a) for a in args])
    return rc, out.getvalue(), err.getvalue()


LENGTH = ["--max-token-text-ratio", "0.5", "--min-token-text-ratio", "0.5", "--steps", "2"]


def test_cli_ar_only_speaks_chinese_through_pinyin(ckpts, wavs, tmp_path):
    pytest.importorskip("pypinyin")
    prompt, _ = wavs
    out = tmp_path / "ar.wav"
    rc, stdout, err = _cli("--ar", ckpts["ar"], "--ar-only", "--text", "你好，世界。", "--language", "zh",
                           "--zh-g2p", "pinyin", "--prompt-wav", prompt, "--frame-rate", "6.25", "--out", out, *LENGTH)
    assert rc == 0, err
    audio, sr = sf.read(str(out))
    assert sr == 16000 and len(audio) > 0 and len(audio) % 1280 == 0 and "(ar-only)" in stdout


def test_cli_no_duration_prediction(ckpts, wavs, tmp_path):
    prompt, _ = wavs
    out = tmp_path / "fixed.wav"
    rc, stdout, err = _cli("--ar", ckpts["ar"], "--nar", ckpts["nar"], "--vocoder", ckpts["vocoder"],
                           "--no-duration-prediction", "--text", "Hello there, world.", "--prompt-wav", prompt,
                           "--out", out, *LENGTH)
    assert rc == 0, err
    tokens = int(re.search(r"(\d+) tokens", stdout).group(1))
    audio, sr = sf.read(str(out))
    assert sr == 24000 and tokens > 0 and len(audio) == tokens * 1920 and "frame rate 12.50 Hz" in stdout


def test_cli_resynthesis(ckpts, wavs, tmp_path):
    prompt, source = wavs
    out = tmp_path / "resynth.wav"
    rc, stdout, err = _cli("--nar", ckpts["nar"], "--vocoder", ckpts["vocoder"], "--resynthesize", source,
                           "--prompt-wav", prompt, "--out", out, "--steps", "2")
    assert rc == 0, err
    audio, sr = sf.read(str(out))
    assert sr == 24000 and len(audio) == SOURCE_FRAMES * 1920 and "(resynthesis)" in stdout


@pytest.mark.parametrize("args, message", [
    (["--resynthesize", "s.wav", "--nar", "n", "--vocoder", "v"], "--resynthesize needs --prompt-wav"),
    (["--resynthesize", "s.wav", "--prompt-wav", "p.wav", "--ar-only"], "does not go with --ar-only"),
    (["--resynthesize", "s.wav", "--prompt-wav", "p.wav"], "--resynthesize needs --nar and --vocoder"),
    (["--text", "Hi.", "--prompt-wav", "p.wav", "--nar", "n", "--vocoder", "v"], "text-to-speech needs --ar"),
    (["--text", "Hi.", "--prompt-wav", "p.wav", "--ar", "a"], "needs --nar and --vocoder (or --ar-only"),
    (["--text", "Hi."], "give --text and --prompt-wav"),
    # checked before any model is loaded: no silent nonsense for a language without a reliable G2P
    (["--text", "こんにちは", "--prompt-wav", "p.wav", "--ar", "a", "--language", "ja"],
     "no reliable G2P for language 'ja': supported are ca, cs, da, de, el, en,"),
])
def test_cli_rejects_incomplete_mode_options(args, message):
    rc, _, err = _cli(*args)
    assert rc == 2 and err.startswith("error: ") and message in err, err
