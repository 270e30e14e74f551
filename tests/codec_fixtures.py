"""Shared pieces for codec-task tests: a tiny espeak corpus and a micro model that trains in seconds on CPU."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# A FlexiCodec small enough for a few CPU steps per second (latent stays 512 = the teacher's width).
MICRO_MODEL = [
    "model=codec_tiny", "model.encoder_dim=4", "model.decoder_dim=32", "model.n_codebooks=2",
    "model.codebook_size=32", "model.transformer_num_layers=1", "model.transformer_dim=32",
    "model.transformer_dim_feedforward=64", "model.transformer_num_heads=2", "model.convnext_dim=32",
    "model.agg_transformer_dim=32", "model.agg_transformer_dim_feedforward=64", "model.agg_transformer_num_heads=2",
]
MICRO_TASK = [
    "task=codec_demo", "task.teacher.num_blocks=1", "task.discriminator.periods=[2]",
    "task.discriminator.period_channels=[4,8,8,8]", "task.discriminator.fft_sizes=[256]",
    "task.discriminator.channels=4", "task.disc_start_step=0", "task.scheduler.warmup_steps=2",
]

# A tiny FlexiCodec for model-level tests (constructor arguments; a few ms per call on CPU).
TINY_CODEC = dict(
    sample_rate=16000, encoder_dim=8, encoder_rates=[4, 4, 5, 8, 2], decoder_rates=[2, 8, 5, 4, 4],
    n_codebooks=4, quantizer_dropout=1.0, codebook_size=64, is_causal=False, use_similarity_alignment=True,
    similarity_threshold=0.91, semantic_downsample_factor=1.33333, latent_dim=64, use_bottleneck_transformer=True,
    transformer_num_layers=2, transformer_dim_feedforward=128, transformer_num_heads=4, transformer_dim=64,
    max_tokens_per_group=8, use_query_token_aggregator=True, use_dynamic_similarity_threshold=True,
    decoder_dim=64, convnext_dim=64, convnext_layers=1, agg_transformer_num_layers=1, agg_transformer_dim=64,
    agg_transformer_num_heads=4, agg_transformer_dim_feedforward=128)


def build_tiny_corpus(out: Path) -> Path:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng not installed")
    from flexitrain.data.demo_corpus import DemoCorpusConfig, build_demo_corpus

    build_demo_corpus(DemoCorpusConfig(out=str(out), num_sentences=24, valid_sentences=4, test_sentences=4,
                                       train_utterances=32, valid_utterances=8, test_utterances=8, num_speakers=4,
                                       samples_per_shard=8, min_shards=2))
    return out


def data_overrides(corpus: Path, workers: int = 0) -> list[str]:
    return [f"data.train_shards={corpus}/train", f"data.val_shards={corpus}/valid", f"data.test_shards={corpus}/test",
            "data.train_crop_seconds=0.64", "data.batch_seconds=2.6", "data.max_batch_size=4",
            f"data.num_workers={workers}", "data.epoch_samples=64"]


def run_train(root: Path, overrides: list[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "FLEXITRAIN_ROOT": str(root), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "train.py"), *overrides]
    out = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise AssertionError(f"train.py failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-6000:]}")
    return out
