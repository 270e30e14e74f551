"""Every kind of bad input is skipped (or repaired), counted by reason, and never kills the loader."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pytest
import torch

from flexitrain.data.datamodule import AudioDataModule
from flexitrain.data.decode import DecodeConfig
from flexitrain.data.pipeline import EvalAudioDataset, LoaderConfig, TrainAudioDataset, expand_shards
from helpers_shards import audio_bytes, good_sample, meta, tone, write_shard

SR = 16000


def _bad_corpus(folder):
    """shard 0: one sample of each bad kind between good ones; shard 1: empty; shard 2: a tar
    truncated inside its 3rd sample (2 readable); shard 3: not a tar at all."""
    flac = audio_bytes(tone(1.0, SR, 1))
    nan = tone(1.0, SR, 2)
    nan[::400] = np.nan
    inf = tone(1.0, SR, 3)
    inf[5::400] = np.inf
    samples = [
        good_sample("good-0", 1.0, 10),
        ("truncated", {"flac": flac[: len(flac) // 2], "json": meta("truncated", 1.0)}),
        ("garbage", {"flac": bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)), "json": b"{}"}),
        ("zero", {"wav": audio_bytes(np.zeros(0, np.float32), fmt="WAV"), "json": meta("zero", 0.0)}),
        ("silent", {"flac": audio_bytes(np.zeros(SR, np.float32)), "json": meta("silent", 1.0)}),
        ("nan", {"wav": audio_bytes(nan, fmt="WAV", subtype="FLOAT")}),
        ("inf", {"wav": audio_bytes(inf, fmt="WAV", subtype="FLOAT")}),
        ("short", {"flac": audio_bytes(tone(0.05, SR, 4))}),
        ("long", {"flac": audio_bytes(tone(3.0, SR, 5))}),  # max_duration=2.5 in these tests
        ("nojson-noaudio", {"json": meta("nojson-noaudio", 1.0)}),
        ("badjson", {"flac": audio_bytes(tone(1.0, SR, 6)), "json": b"{not json"}),
        ("listjson", {"flac": audio_bytes(tone(1.0, SR, 7)), "json": b"[1, 2]"}),
        ("rate22k", {"flac": audio_bytes(tone(1.0, 22050, 8), 22050), "json": meta("rate22k", 1.0, 22050)}),
        ("stereo", {"flac": audio_bytes(tone(1.0, SR, 9, channels=2))}),
        ("pcm8", {"wav": audio_bytes(tone(1.0, SR, 11), fmt="WAV", subtype="PCM_U8")}),
        ("pcm24", {"flac": audio_bytes(tone(1.0, SR, 12), subtype="PCM_24")}),
        ("ogg", {"ogg": audio_bytes(tone(1.0, SR, 13), fmt="OGG", subtype="VORBIS")}),
        good_sample("good-1", 1.5, 14),
    ]
    write_shard(folder / "shard-000000.tar", samples)
    write_shard(folder / "shard-000001.tar", [])
    full = write_shard(folder / "tmp.tar", [good_sample(f"t-{i}", 1.0, 20 + i) for i in range(3)])
    data = full.read_bytes()
    full.unlink()
    offsets = []  # start of each member's data: cut in the middle of the 3rd sample's audio
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        offsets = [m.offset_data for m in tar.getmembers()]
    (folder / "shard-000002.tar").write_bytes(data[: offsets[4] + 100])
    (folder / "shard-000003.tar").write_bytes(b"this is not a tar file" * 50)
    kept = ["good-0", "badjson", "listjson", "rate22k", "stereo", "pcm8", "pcm24", "ogg", "good-1", "t-0", "t-1"]
    return kept


EXPECTED = {
    "corrupt_audio": 2, "empty_audio": 1, "silent_audio": 1, "nonfinite_audio": 2, "too_short": 1,
    "too_long": 1, "missing_audio": 1, "bad_json": 2, "resampled": 1, "multichannel": 1, "pcm_8bit": 1,
    "pcm_24bit": 1, "empty_shard": 1, "bad_shard": 2,
}


def _check(counts):
    for reason, n in EXPECTED.items():
        assert counts[reason] == n, (reason, counts)


def test_eval_skips_and_counts_every_bad_kind(tmp_path):
    kept = _bad_corpus(tmp_path)
    urls = expand_shards(str(tmp_path))
    ds = EvalAudioDataset(urls, DecodeConfig(max_duration=2.5), LoaderConfig(batch_seconds=4.0), num_workers=0)
    batches = list(ds)
    keys = [k for b in batches for k in b["keys"]]
    assert sorted(keys) == sorted(kept)
    _check(ds.stats.totals())
    assert ds.stats.totals()["samples"] == len(kept)
    by_key = {k: (b, i) for b in batches for i, k in enumerate(b["keys"])}
    b, i = by_key["rate22k"]
    assert abs(int(b["lengths"][i]) - SR) <= 1  # 1 s at 22.05 kHz -> 1 s at 16 kHz
    b, i = by_key["badjson"]
    assert b["texts"][i] == "" and b["speakers"][i] == ""  # kept with empty metadata
    b, i = by_key["good-0"]
    assert b["texts"][i] == "text of good-0" and b["languages"][i] == "en"
    for b in batches:
        assert torch.isfinite(b["audio"]).all()


def test_long_clips_can_be_capped_instead_of_skipped(tmp_path):
    write_shard(tmp_path / "a.tar", [good_sample("long", 3.0, 1), good_sample("ok", 1.0, 2)])
    ds = EvalAudioDataset([str(tmp_path / "a.tar")], DecodeConfig(max_duration=2.5, long_clip_policy="crop"),
                          LoaderConfig(batch_seconds=10.0))
    lengths = {k: int(n) for b in ds for k, n in zip(b["keys"], b["lengths"])}
    assert lengths == {"long": int(2.5 * SR), "ok": SR}
    assert ds.stats.totals()["long_cropped"] == 1 and ds.stats.totals()["too_long"] == 0


def test_train_workers_count_bad_input_in_the_main_process(tmp_path):
    kept = _bad_corpus(tmp_path)
    dm = AudioDataModule(train_shards=str(tmp_path), val_shards=str(tmp_path), train_crop_seconds=3.0,
                         batch_seconds=6.0, max_batch_size=4, num_workers=2, max_duration=2.5,
                         shuffle_buffer=4, rank=0, world_size=1)
    (tmp_path / "index.json").unlink(missing_ok=True)  # no index: one pass per epoch in one process
    dm.setup("fit")
    keys = [k for b in dm.train_dataloader() for k in b["keys"]]
    # Workers split the 4 shards; the one pass sees every usable sample once.
    assert sorted(keys) == sorted(kept)
    train = dm.bad_input_summary("train")
    _check(train)
    assert train["samples"] == len(kept)
    total = dm.bad_input_summary()
    assert total["corrupt_audio"] == 2 * EXPECTED["corrupt_audio"]  # train + val


def test_unusable_data_is_a_clear_error_not_a_hang(tmp_path):
    write_shard(tmp_path / "s.tar", [("silent", {"flac": audio_bytes(np.zeros(SR, np.float32))})])
    with pytest.raises(ValueError, match="no usable evaluation sample"):
        EvalAudioDataset([str(tmp_path / "s.tar")], DecodeConfig(), LoaderConfig())
    ds = TrainAudioDataset([str(tmp_path / "s.tar")], DecodeConfig(crop_samples=SR), LoaderConfig(),
                           batches_per_worker=3, resampled=True)
    ds.max_consecutive_bad = 50
    with pytest.raises(RuntimeError, match="gave no sample|unusable"):
        next(iter(ds))


def test_huge_members_are_skipped_unread(tmp_path, monkeypatch):
    import flexitrain.data.shard_reader as shard_reader

    monkeypatch.setattr(shard_reader, "MAX_MEMBER_BYTES", 20000)
    write_shard(tmp_path / "h.tar", [good_sample("big", 2.0, 1), good_sample("small", 0.3, 2)])
    ds = EvalAudioDataset([str(tmp_path / "h.tar")], DecodeConfig(), LoaderConfig())
    assert [k for b in ds for k in b["keys"]] == ["small"]
    assert ds.stats.totals()["too_long"] == 1


def test_pipe_urls_are_read(tmp_path):
    write_shard(tmp_path / "p.tar", [good_sample("a", 1.0, 1), good_sample("b", 1.0, 2)])
    urls = expand_shards(f"pipe:cat {tmp_path}/p.tar")
    ds = EvalAudioDataset(urls, DecodeConfig(), LoaderConfig())
    assert sorted(k for b in ds for k in b["keys"]) == ["a", "b"]
    bad = EvalAudioDataset([f"pipe:cat {tmp_path}/p.tar", f"pipe:cat {tmp_path}/missing.tar"], DecodeConfig(),
                           LoaderConfig())
    assert bad.stats.totals()["bad_shard"] + bad.stats.totals()["empty_shard"] == 1
    assert json.dumps(bad.stats.totals())  # plain ints
