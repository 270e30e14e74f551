"""End-to-end FlexiCodec-TTS (AR → NAR → Vocos) on tiny random models: lengths, determinism, prompt handling,
loading from exported directories, the CLI (single and batch) and its errors."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from conftest import REPO_ROOT, requires_espeak
from tts_fixtures import write_task_checkpoints

pytestmark = requires_espeak  # the AR text front end phonemises with espeak-ng


def _modules():
    from hydra.utils import instantiate

    from flexitrain.models.tts.ar_tts import ARTTSModel, tiny_config
    from flexitrain.models.tts.voicebox import VoiceboxNAR
    from flexitrain.models.vocos import Vocos
    from flexitrain.tasks.teacher import build_teacher
    from flexitrain.utils.config import compose

    torch.manual_seed(0)
    codec = instantiate(compose(["model=codec_tiny"], return_hydra_config=False).model).eval()
    teacher = build_teacher({"random_init": True, "num_blocks": 1})
    size = int(codec.semantic_vq.codebook_size)
    ar = ARTTSModel(**{**tiny_config(), "text_token_size": 51866, "speech_token_size": size}).eval()
    nar = VoiceboxNAR(hidden_size=32, num_layers=2, num_heads=2, cond_codebook_size=size, repa_layer_idx=1,
                      use_repa=False).eval()
    vocoder = Vocos(dim=32, intermediate_dim=64, num_layers=1).eval()
    return ar, nar, vocoder, codec, teacher


@pytest.fixture(scope="module")
def modules():
    return _modules()


@pytest.fixture(scope="module")
def pipeline(modules):
    from flexitrain.models.tts.sampling import SamplingConfig
    from flexitrain.tts import TTSPipeline
    from flexitrain.tts.pipeline import NARConfig

    # An untrained AR would often stop at once: forbid EOS and cap the length instead.
    sampling = SamplingConfig(top_k=5, min_token_text_ratio=100.0, max_tokens=9)
    return TTSPipeline(*modules, sampling=sampling, nar_config=NARConfig(n_timesteps=3))


@pytest.fixture(scope="module")
def prompt_wav(tmp_path_factory):
    t = np.arange(int(1.3 * 22050)) / 22050  # an odd rate: resampled to 16 kHz (codec) and 24 kHz (mel)
    wav = 0.3 * np.sin(2 * np.pi * 220 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
    path = tmp_path_factory.mktemp("prompt") / "prompt.wav"
    sf.write(str(path), wav.astype(np.float32), 22050)
    return path


def test_speaks_the_expected_length_and_reports_rates(pipeline, prompt_wav):
    from flexitrain.tts.pipeline import expected_num_samples

    r = pipeline.synthesize("Hello world.", prompt_wav, "A prompt.", frame_rate=8.3, seed=1)
    assert r.sample_rate == 24000 and r.threshold == 0.91
    assert r.tokens.numel() == 9 and not r.stopped_by_eos and r.durations.numel() == 9
    assert bool((r.durations >= 1).all())
    assert r.audio.numel() == expected_num_samples(r.durations) == int(r.durations.sum()) * 1920
    assert torch.isfinite(r.audio).all() and float(r.audio.abs().max()) > 0
    assert r.frame_rate == pytest.approx(12.5 * 9 / int(r.durations.sum()))
    assert r.prompt_tokens.numel() >= 1 and int(r.prompt_durations.sum()) == 16  # 1.3 s → 16 frames at 12.5 Hz
    assert set(r.timings) == {"prompt", "ar", "nar", "vocoder", "total"} and r.rtf > 0


def test_seeded_and_threshold_dependent(pipeline, prompt_wav):
    a = pipeline.synthesize("Hello world.", prompt_wav, "A prompt.", frame_rate=8.3, seed=3)
    b = pipeline.synthesize("Hello world.", prompt_wav, "A prompt.", frame_rate=8.3, seed=3)
    c = pipeline.synthesize("Hello world.", prompt_wav, "A prompt.", frame_rate=8.3, seed=4)
    assert torch.equal(a.audio, b.audio) and torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.audio, c.audio)
    low = pipeline.synthesize("Hello world.", prompt_wav, "A prompt.", frame_rate=6.25, seed=3)
    assert low.threshold == 0.86
    # the prompt is tokenised at the generation threshold (official: always 0.91, bug B1): fewer or equal tokens
    assert low.prompt_tokens.numel() <= a.prompt_tokens.numel()
    assert int(low.prompt_durations.sum()) == int(a.prompt_durations.sum())


def test_prompt_as_waveform_equals_prompt_file(pipeline, prompt_wav):
    audio, sr = sf.read(str(prompt_wav), dtype="float32")
    a = pipeline.synthesize("Hello world.", prompt_wav, "A prompt.", threshold=0.91, seed=2)
    b = pipeline.synthesize("Hello world.", prompt_audio=torch.from_numpy(audio), prompt_sample_rate=sr,
                            prompt_text="A prompt.", threshold=0.91, seed=2)
    assert torch.equal(a.audio, b.audio)


def test_batch_mode_equals_one_at_a_time_and_isolates_failures(modules, prompt_wav, tmp_path):
    from flexitrain.models.tts.sampling import SamplingConfig
    from flexitrain.tts import TTSPipeline, TTSRequest
    from flexitrain.tts.pipeline import NARConfig

    # greedy AR decoding: the batched KV-cached decode must give each utterance exactly its own result
    greedy = TTSPipeline(*modules, sampling=SamplingConfig(top_k=1, duration_top_k=1, min_token_text_ratio=0.3,
                                                           max_token_text_ratio=0.6),
                         nar_config=NARConfig(n_timesteps=2))
    requests = [TTSRequest("One two three.", prompt_wav, "A prompt.", frame_rate=8.3, seed=1),
                TTSRequest("Four.", tmp_path / "missing.wav", frame_rate=8.3),
                TTSRequest("Five six seven eight nine ten.", prompt_wav, "", frame_rate=6.25, seed=2),
                TTSRequest("Eleven.", prompt_wav, "Another prompt text.", threshold=0.91, seed=3)]
    out = greedy.synthesize_batch(requests, max_batch=2)
    assert isinstance(out[1], FileNotFoundError)
    for i in (0, 2, 3):
        alone = greedy.synthesize_request(requests[i])
        assert torch.equal(out[i].tokens, alone.tokens) and torch.equal(out[i].durations, alone.durations), i
        assert torch.allclose(out[i].audio, alone.audio, atol=1e-6) and out[i].threshold == alone.threshold
        assert out[i].timings["ar"] > 0 and out[i].rtf > 0


def test_prompt_pace_floor_keeps_eos_away(modules, prompt_wav):
    from flexitrain.models.tts.sampling import SamplingConfig
    from flexitrain.tts import TTSPipeline
    from flexitrain.tts.pipeline import NARConfig

    tts = TTSPipeline(*modules, sampling=SamplingConfig(top_k=5, max_token_text_ratio=20.0),
                      nar_config=NARConfig(n_timesteps=1), min_prompt_pace=1.0)
    p_tokens = tts._prompt(prompt_wav, None, 16000, 0.91)[0].numel()
    short, long = (tts.min_tokens(t, "A prompt.", "en", p_tokens) for t in ("Hi.", "Hello there, this is longer."))
    assert 0 < short < long  # proportional to the target text at the prompt's tokens-per-text-id pace
    assert tts.min_tokens("Hi.", "", "en", p_tokens) == 0  # no prompt transcript: no pace to follow
    for seed in range(3):
        r = tts.synthesize("Hello there, this is longer.", prompt_wav, "A prompt.", threshold=0.91, seed=seed)
        assert r.tokens.numel() >= long
    off = TTSPipeline(*modules, min_prompt_pace=0.0)
    assert off.min_tokens("Hello there, this is longer.", "A prompt.", "en", p_tokens) == 0


def test_bad_requests_are_clear_errors(pipeline, prompt_wav, tmp_path):
    with pytest.raises(ValueError, match="frame rate 10.0 Hz is not configured"):
        pipeline.synthesize("Hi.", prompt_wav, frame_rate=10.0)
    with pytest.raises(ValueError, match="not one of this model's frame-rate options"):
        pipeline.synthesize("Hi.", prompt_wav, threshold=0.5)
    with pytest.raises(FileNotFoundError, match="prompt wav"):
        pipeline.synthesize("Hi.", tmp_path / "missing.wav", frame_rate=8.3)
    with pytest.raises(ValueError, match="zero-shot"):
        pipeline.synthesize("Hi.", frame_rate=8.3)
    with pytest.raises(ValueError, match="text is empty"):
        pipeline.synthesize("  ", prompt_wav, frame_rate=8.3)


@pytest.fixture(scope="module")
def exported(modules, tmp_path_factory):
    """The tiny models written as the directories the CLI loads (import/export formats)."""
    from safetensors.torch import save_file

    from flexitrain.models.tts.ar_tts import tiny_config

    ar, nar, vocoder, codec, _ = modules
    root = tmp_path_factory.mktemp("models")
    (root / "ar").mkdir()
    (root / "ar" / "config.json").write_text(json.dumps(
        {**tiny_config(), "text_token_size": 51866, "speech_token_size": ar.speech_token_size}))
    save_file({k: v.contiguous() for k, v in ar.state_dict().items()}, str(root / "ar" / "model.safetensors"))
    nar.save_pretrained(root / "nar")
    vocoder.save_pretrained(root / "vocos")
    codec.save_pretrained(root / "codec")
    return root


def test_from_checkpoints_needs_a_codec_and_loads_exported_models(exported, pipeline, prompt_wav):
    from flexitrain.tts import TTSPipeline

    with pytest.raises(ValueError, match="no codec to tokenise the prompt"):
        TTSPipeline.from_checkpoints(exported / "ar", exported / "nar", exported / "vocos")
    with pytest.raises(FileNotFoundError, match="NAR checkpoint"):
        TTSPipeline.from_checkpoints(exported / "ar", exported / "nope", exported / "vocos")
    loaded = TTSPipeline.from_checkpoints(exported / "ar", exported / "nar", exported / "vocos",
                                          codec=exported / "codec", teacher={"random_init": True, "num_blocks": 1},
                                          sampling=pipeline.sampling, nar_config=pipeline.nar_config)
    a = loaded.synthesize("Hello world.", prompt_wav, "A prompt.", frame_rate=8.3, seed=5)
    b = pipeline.synthesize("Hello world.", prompt_wav, "A prompt.", frame_rate=8.3, seed=5)
    assert torch.equal(a.tokens, b.tokens) and torch.allclose(a.audio, b.audio, atol=1e-6)


@pytest.fixture(scope="module")
def task_checkpoints(tmp_path_factory):
    return write_task_checkpoints(tmp_path_factory.mktemp("ckpt"))


def test_task_checkpoints_carry_the_codec(task_checkpoints, prompt_wav):
    from flexitrain.models.tts.sampling import SamplingConfig
    from flexitrain.tts import TTSPipeline
    from flexitrain.tts.pipeline import NARConfig

    tts = TTSPipeline.from_checkpoints(task_checkpoints["ar"], task_checkpoints["nar"], task_checkpoints["vocoder"],
                                       sampling=SamplingConfig(min_token_text_ratio=100.0, max_tokens=4),
                                       nar_config=NARConfig(n_timesteps=2))
    r = tts.synthesize("Hello.", prompt_wav, "A prompt.", frame_rate=6.25)
    assert r.tokens.numel() == 4 and r.audio.numel() == int(r.durations.sum()) * 1920


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "flexitrain.tts.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_cli_single_and_batch(task_checkpoints, exported, prompt_wav, tmp_path):
    models = ["--ar", task_checkpoints["ar"], "--nar", task_checkpoints["nar"], "--vocoder", task_checkpoints["vocoder"]]
    # an exported codec directory has no teacher: the error says what to add
    res = _cli(*models, "--codec", exported / "codec", "--text", "Hi.", "--prompt-wav", prompt_wav, cwd=REPO_ROOT)
    assert res.returncode == 2 and "teacher" in res.stderr, res.stderr[-2000:]
    res = _cli(*models, "--text", "Hi.", cwd=REPO_ROOT)
    assert res.returncode == 2 and "--prompt-wav" in res.stderr

    common = [*models, "--steps", "2", "--max-token-text-ratio", "0.5", "--min-token-text-ratio", "0.5"]
    out = tmp_path / "one.wav"
    res = _cli(*common, "--text", "Hello there, world.", "--prompt-wav", prompt_wav, "--prompt-text", "A prompt.",
               "--frame-rate", "6.25", "--out", out, cwd=REPO_ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    audio, sr = sf.read(str(out))
    assert sr == 24000 and len(audio) > 0 and len(audio) % 1920 == 0
    assert "RTF" in res.stdout and "frame rate" in res.stdout and "τ=0.86" in res.stdout

    items = tmp_path / "items.jsonl"
    rows = [{"id": "u0", "text": "One two three.", "prompt_wav": str(prompt_wav), "prompt_text": "A prompt."},
            {"id": "u1", "text": "Four five six seven.", "prompt_wav": "missing.wav"},
            {"id": "u2", "text": "Eight nine.", "prompt_wav": prompt_wav.name, "frame_rate": 8.3}]  # relative path
    (tmp_path / prompt_wav.name).write_bytes(prompt_wav.read_bytes())
    items.write_text("".join(json.dumps(r, default=str) + "\n" for r in rows))
    res = _cli(*common, "--batch", items, "--out-dir", tmp_path / "batch", "--threshold", "0.86", cwd=REPO_ROOT)
    assert res.returncode == 1 and "error: u1: prompt wav" in res.stderr, res.stderr[-2000:]  # skipped, counted
    done = [json.loads(line) for line in (tmp_path / "batch" / "results.jsonl").read_text().splitlines()]
    assert [(r["id"], r["threshold"]) for r in done] == [("u0", 0.86), ("u2", 0.91)]
    assert all((tmp_path / "batch" / f"{r['id']}.wav").is_file() and r["rtf"] > 0 for r in done)
    assert "2 utterance(s)" in res.stdout and "1 failed: u1" in res.stdout


def test_cli_sampling_options_reach_the_pipeline(monkeypatch):
    """--compile-step / --check-every (and the other sampling flags) become the pipeline's SamplingConfig;
    --nar-batch / --nar-compile / --steps its NARConfig."""
    from flexitrain.tts import cli
    from flexitrain.tts.pipeline import TTSPipeline

    seen = {}
    monkeypatch.setattr(TTSPipeline, "from_checkpoints", classmethod(lambda cls, *a, **k: seen.update(k) or "p"))
    args = cli.build_parser().parse_args(["--ar", "a", "--nar", "n", "--vocoder", "v", "--text", "Hi.",
                                          "--compile-step", "--check-every", "4", "--top-k", "1", "--nar-batch", "on",
                                          "--nar-compile", "--steps", "7"])
    assert cli.build_pipeline(args) == "p"
    s, n = seen["sampling"], seen["nar_config"]
    assert (s.compile_step, s.check_every, s.top_k) == (True, 4, 1)
    assert (n.n_timesteps, n.batch, n.compile) == (7, True, True)
    args = cli.build_parser().parse_args(["--ar", "a", "--nar", "n", "--vocoder", "v", "--text", "Hi.",
                                          "--nar-batch", "off"])
    cli.build_pipeline(args)
    assert (seen["sampling"].compile_step, seen["sampling"].check_every) == (False, 16)
    assert (seen["nar_config"].batch, seen["nar_config"].compile) == (False, False)
    cli.build_pipeline(cli.build_parser().parse_args(["--ar", "a", "--nar", "n", "--vocoder", "v", "--text", "Hi."]))
    assert seen["nar_config"].batch is None
