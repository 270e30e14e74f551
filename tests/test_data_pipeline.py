"""Shard lists, rank/worker splitting, dynamic batching, crops and epochs of the data pipeline."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from flexitrain.data import AudioDataModule
from flexitrain.data.batching import BucketBatcher, lengths_to_mask, plan_batches
from flexitrain.data.decode import DecodeConfig
from flexitrain.data.pipeline import AudioLoader, EvalAudioDataset, LoaderConfig, TrainAudioDataset, expand_shards, load_index
from helpers_shards import audio_bytes, good_sample, tone, write_corpus, write_shard

SR = 16000


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    folder = tmp_path_factory.mktemp("corpus")
    keys = write_corpus(folder, n_shards=3, per_shard=12, seconds=(0.3, 2.5))
    return folder, keys


def _eval_keys(urls, rank, world, workers, batch_seconds=3.0, max_batch=8):
    ds = EvalAudioDataset(urls, DecodeConfig(), LoaderConfig(batch_seconds=batch_seconds, max_batch_size=max_batch),
                          rank=rank, world_size=world, num_workers=workers)
    batches = list(AudioLoader(ds, num_workers=workers))
    assert len(batches) == len(ds)
    assert all(b["lengths"].dtype == torch.int64 and b["offsets"].dtype == torch.float32 for b in batches)
    return batches


# ----------------------------------------------------------------------------- shard lists
def test_shard_specs_expand_and_bad_specs_fail_clearly(corpus, tmp_path):
    folder, _ = corpus
    shards = sorted(str(p) for p in folder.glob("*.tar"))
    assert expand_shards(str(folder)) == shards
    assert expand_shards(str(folder / "shard-{000000..000002}.tar")) == shards
    assert expand_shards([shards[0], str(folder / "shard-00000[12].tar")]) == shards
    assert expand_shards("pipe:cat /x/a-{0..1}.tar") == ["pipe:cat /x/a-0.tar", "pipe:cat /x/a-1.tar"]
    with pytest.raises(ValueError, match="matches no shard files"):
        expand_shards(str(tmp_path / "nothing-{0..3}.tar"))
    with pytest.raises(ValueError, match="2 shard.*do not exist"):
        expand_shards(str(folder / "shard-{000001..000004}.tar"))
    with pytest.raises(ValueError, match="contains no"):
        expand_shards(str(tmp_path))
    dm = AudioDataModule(train_shards=str(tmp_path / "missing-*.tar"), rank=0, world_size=1)
    with pytest.raises(ValueError, match="train_shards.*matches no shard files"):
        dm.setup("fit")
    index = load_index(shards)
    assert index["num_samples"] == 36 and index["duration"] > 0
    assert load_index(shards + [str(tmp_path / "elsewhere.tar")]) is None


# ----------------------------------------------------------------------------- evaluation
@pytest.mark.parametrize("world,workers,batch_seconds", [(2, 2, 3.0), (3, 2, 3.0), (2, 2, 30.0), (4, 1, 1.0)])
def test_eval_sees_every_sample_once_over_ranks_and_workers(corpus, world, workers, batch_seconds):
    folder, keys = corpus
    urls = expand_shards(str(folder))
    per_rank = [_eval_keys(urls, r, world, workers, batch_seconds) for r in range(world)]
    assert len({len(b) for b in per_rank}) == 1  # equal batch counts: no rank waits at the end
    real = [k for batches in per_rank for b in batches if not b.get("duplicate") for k in b["keys"]]
    assert sorted(real) == sorted(keys)
    # Deterministic: the same plan twice.
    again = _eval_keys(urls, 0, world, workers, batch_seconds)
    assert [b["keys"] for b in again] == [b["keys"] for b in per_rank[0]]


def test_fewer_shards_and_samples_than_ranks_times_workers(tmp_path):
    write_shard(tmp_path / "one.tar", [good_sample(f"u{i}", 1.0 + 0.1 * i, i) for i in range(3)])
    urls = [str(tmp_path / "one.tar")]
    per_rank = [_eval_keys(urls, r, 4, 2, batch_seconds=100.0) for r in range(4)]
    assert [len(b) for b in per_rank] == [1, 1, 1, 1]  # 3 samples over 4 ranks: one repeat, flagged
    dups = [b for batches in per_rank for b in batches if b.get("duplicate")]
    real = sorted(k for batches in per_rank for b in batches if not b.get("duplicate") for k in b["keys"])
    assert len(dups) == 1 and real == ["u0", "u1", "u2"]


def test_eval_batches_respect_the_budget(corpus):
    folder, keys = corpus
    budget = int(1.5 * SR)
    for b in _eval_keys(expand_shards(str(folder)), 0, 1, 0, batch_seconds=1.5, max_batch=4):
        B, _, T = b["audio"].shape
        assert B <= 4 and (B * T <= budget or B == 1)
        assert T == int(b["lengths"].max())
        assert all(k.startswith("spk") for k in b["keys"]) and b["texts"][0].startswith("text of")


# ----------------------------------------------------------------------------- batching units
def test_bucket_batcher_budget_and_lone_long_items():
    from flexitrain.data.batching import Item

    rng = np.random.default_rng(0)
    budget, max_len = 10 * SR, 3 * SR
    batcher = BucketBatcher(budget, max_batch_size=6, num_buckets=4, max_samples=max_len)
    out = []
    for i, n in enumerate(rng.integers(100, max_len, 300).tolist() + [5 * SR, 12 * SR]):
        b = batcher.add(Item(np.ones(n, np.float32), str(i), {}, 0.0))
        if b:
            out.append(b)
    out += list(batcher.flush())
    assert sum(len(b) for b in out) == 302
    for b in out:
        lens = [len(it.audio) for it in b]
        assert len(b) <= 6 and (len(b) * max(lens) <= budget or len(b) == 1)
    assert [len(b) for b in out if max(len(it.audio) for it in b) > max_len] == [1, 1]
    plan = plan_batches([5, 1, 9, 3, 30, 2], budget_samples=10, max_batch_size=3)
    assert plan == [[1, 5, 3], [0], [2], [4]]


def test_worker_batches_through_the_slot_pool_equal_in_process_batches(corpus):
    folder, _ = corpus
    ds = EvalAudioDataset(expand_shards(str(folder)), DecodeConfig(), LoaderConfig(batch_seconds=3.0),
                          num_workers=2)
    reference = {tuple(b["keys"]): b for b in ds}  # in-process: plain tensors
    loader = AudioLoader(ds, num_workers=2)
    for _ in range(2):  # the second pass reuses slots that still hold the first pass's audio
        got = list(loader)
        assert len(got) == len(reference)
        for b in got:
            ref = reference[tuple(b["keys"])]
            assert "_slot" not in b and b["audio"].shape == ref["audio"].shape
            assert torch.equal(b["audio"], ref["audio"]) and torch.equal(b["lengths"], ref["lengths"])
    assert loader.pool.data.abs().sum() > 0 and bool(loader.pool.free.all())  # used, and all released


def test_lengths_to_mask():
    m = lengths_to_mask(torch.tensor([3, 1]), 4)
    assert m.shape == (2, 1, 4) and m.tolist() == [[[True, True, True, False]], [[True, False, False, False]]]


# ----------------------------------------------------------------------------- training
def _train(urls, crop, **kw):
    args = dict(batch_seconds=4.0, max_batch_size=8, num_buckets=4)
    args.update(kw.pop("batching", {}))
    return TrainAudioDataset(urls, DecodeConfig(crop_samples=int(crop * SR)), LoaderConfig(**args), **kw)


def test_train_crops_pad_short_utterances_and_respect_the_budget(corpus):
    folder, keys = corpus
    ds = _train(expand_shards(str(folder)), crop=1.0, batches_per_worker=None, resampled=False, shuffle_buffer=8)
    batches = list(ds)
    got = [k for b in batches for k in b["keys"]]
    assert sorted(got) == sorted(keys)  # single pass: short utterances kept, nothing dropped
    durations = {}
    for b in batches:
        B, _, T = b["audio"].shape
        # Padded to the bucket's upper edge (pad_to_bucket): within the budget, never shorter than an item.
        assert B * T <= 4 * SR and B <= 8 and T >= int(b["lengths"].max())
        mask = lengths_to_mask(b["lengths"], T)
        assert torch.all(b["audio"][~mask] == 0)  # zero padding exactly after `lengths`
        for i, k in enumerate(b["keys"]):
            n = int(b["lengths"][i])
            assert n <= SR and b["audio"][i, 0, n - 1] != 0
            durations[k] = (n, float(b["offsets"][i]))
    assert any(n < SR for n, _ in durations.values()) and any(n == SR for n, _ in durations.values())
    assert all(off == 0.0 for n, off in durations.values() if n < SR)
    assert any(off > 0 for _, off in durations.values())  # random offsets in longer utterances


def test_train_epochs_equal_over_ranks_seeded_and_varying(corpus):
    folder, _ = corpus
    urls = expand_shards(str(folder))
    counts = []
    for rank in range(2):
        ds = _train(urls, 1.0, rank=rank, world_size=2, num_workers=2, batches_per_worker=3, seed=1)
        batches = list(AudioLoader(ds, num_workers=2))
        counts.append(len(batches))
        assert len(ds) == 6
    assert counts == [6, 6]

    def first_batch(epoch, seed=1):
        ds = _train(urls, 1.0, batches_per_worker=2, seed=seed)
        ds.set_epoch(epoch)
        return next(iter(ds))

    a, b, c = first_batch(0), first_batch(0), first_batch(1)
    assert a["keys"] == b["keys"] and torch.equal(a["audio"], b["audio"])
    assert a["keys"] != c["keys"] or not torch.equal(a["audio"], c["audio"])


def test_split_mode_with_few_shards_covers_every_sample_once_per_pass(corpus):
    folder, keys = corpus
    urls = expand_shards(str(folder))  # 3 shards < 2 ranks x 2 workers: sample-level split
    seen = []
    for rank in range(2):
        for wid in range(2):
            ds = _train(urls, 3.0, rank=rank, world_size=2, resampled=False, shuffle_buffer=0, batches_per_worker=50,
                        batching={"batch_seconds": 3.0, "max_batch_size": 1})
            ds_iter = ds._samples(wid, 2, np.random.default_rng(0))
            seen += [next(ds_iter)["__key__"] for _ in range(9)]  # 36 samples / 4 workers
    assert sorted(seen) == sorted(keys)


def test_resampling_gives_the_right_length(tmp_path):
    write_shard(tmp_path / "r.tar", [("a", {"flac": audio_bytes(tone(1.5, 44100, 1), 44100)}),
                                     ("b", {"wav": audio_bytes(tone(0.5, 8000, 2), 8000, fmt="WAV")})])
    ds = EvalAudioDataset([str(tmp_path / "r.tar")], DecodeConfig(), LoaderConfig(batch_seconds=10))
    lengths = {k: int(n) for b in ds for k, n in zip(b["keys"], b["lengths"])}
    assert abs(lengths["a"] - 24000) <= 1 and abs(lengths["b"] - 8000) <= 1
    assert ds.stats.totals()["resampled"] == 2
    crop = _train([str(tmp_path / "r.tar")], 1.0, batches_per_worker=None, resampled=False)
    lengths = {k: int(n) for b in crop for k, n in zip(b["keys"], b["lengths"])}
    assert lengths == {"a": SR, "b": 8000}


# ----------------------------------------------------------------------------- datamodule
def test_datamodule_epoch_sizing_and_loaders(corpus):
    folder, keys = corpus
    dm = AudioDataModule(train_shards=str(folder), val_shards=str(folder), train_crop_seconds=1.0, batch_seconds=4.0,
                         max_batch_size=8, num_workers=2, epoch_samples=40, rank=0, world_size=1)
    dm.setup("fit")
    assert dm.nominal_batch_size() == 4
    train = dm.train_dataloader()
    assert len(train) == 2 * 5  # ceil(40 / (1 rank x 2 workers x 4)) per worker
    assert len(list(train)) == 10 and len(list(train)) == 10  # two epochs
    assert dm.datasets["train"].epoch == 1
    val = [k for b in dm.val_dataloader() for k in b["keys"]]
    assert sorted(val) == sorted(keys)
    s = dm.bad_input_summary()
    assert s["samples"] >= 80 + len(keys) and s["corrupt_audio"] == 0
    # Without epoch_samples the index gives the epoch size (36 utterances, batch ~4: 5 per worker).
    dm2 = AudioDataModule(train_shards=str(folder), train_crop_seconds=1.0, batch_seconds=4.0, num_workers=2,
                          rank=1, world_size=2)
    dm2.setup("fit")
    assert dm2.datasets["train"].resampled is False and len(dm2.datasets["train"]) == 2 * 3


def test_lightning_fit_gets_batches_and_logs_data_stats(corpus, tmp_path):
    import lightning.pytorch as pl

    from flexitrain.data import DataStatsLogger

    folder, keys = corpus

    class Tiny(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv1d(1, 1, 3, padding=1)
            self.val_keys = []

        def training_step(self, batch, i):
            assert batch["audio"].dtype == torch.float32 and batch["audio"].shape[1] == 1
            return self.conv(batch["audio"]).pow(2).mean()

        def validation_step(self, batch, i):
            self.val_keys += batch["keys"]

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01)

    dm = AudioDataModule(train_shards=str(folder), val_shards=str(folder), train_crop_seconds=1.0, batch_seconds=4.0,
                         num_workers=0, epoch_samples=16)
    model = Tiny()
    trainer = pl.Trainer(max_epochs=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                         enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=[DataStatsLogger()], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2 * 4  # 16 utterances / batches of 4 per epoch
    assert sorted(model.val_keys) == sorted(keys + keys)
    assert float(trainer.callback_metrics["data/train/samples"]) == 32
    assert float(trainer.callback_metrics["data/val/samples"]) == 2 * len(keys)


DDP_SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch.distributed as dist
    sys.path.insert(0, sys.argv[2])
    sys.path.insert(0, os.path.join(sys.argv[2], "tests"))
    from flexitrain.data import AudioDataModule
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:" + sys.argv[3],
                            rank=int(sys.argv[4]), world_size=2)
    dm = AudioDataModule(val_shards=sys.argv[1], batch_seconds=3.0, num_workers=2)
    dm.setup("validate")
    keys = [k for b in dm.val_dataloader() if not b.get("duplicate") for k in b["keys"]]
    out = [None, None]
    dist.all_gather_object(out, {"keys": keys, "batches": len(dm.val_dataloader())})
    if dist.get_rank() == 0:
        print("RESULT" + json.dumps(out))
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_real_two_process_gloo_validation(corpus, tmp_path):
    folder, keys = corpus
    script = tmp_path / "ddp_val.py"
    script.write_text(DDP_SCRIPT)
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    root = str(Path(__file__).resolve().parents[1])
    procs = [subprocess.Popen([sys.executable, str(script), str(folder), root, port, str(r)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    import json

    result = json.loads(outs[0][0].split("RESULT", 1)[1])
    assert result[0]["batches"] == result[1]["batches"]
    assert sorted(result[0]["keys"] + result[1]["keys"]) == sorted(keys)


def test_training_batches_are_padded_to_a_fixed_set_of_bucket_lengths(tmp_path):
    # Items of many lengths (0.3..2.0 s, crop 2 s): with pad_to_bucket every batch is padded to one of the
    # num_buckets bucket edges, so a run sees few shapes; lengths stay the true ones and padding is zero.
    write_shard(tmp_path / "a.tar", [good_sample(f"u{i}", 0.3 + 0.05 * i, i) for i in range(35)])
    urls = [str(tmp_path / "a.tar")]
    decode = DecodeConfig(crop_samples=2 * SR)
    padded = TrainAudioDataset(urls, decode, LoaderConfig(batch_seconds=4.0, num_buckets=4), resampled=False,
                               shuffle_buffer=1)
    edges = set(BucketBatcher(4 * SR, 64, 4, 2 * SR).upper)
    shapes = set()
    for b in padded:
        T = b["audio"].shape[-1]
        shapes.add(T)
        assert T in edges and int(b["lengths"].max()) <= T
        for row, n in zip(b["audio"][:, 0], b["lengths"].tolist()):
            assert torch.all(row[n:] == 0)
    assert len(shapes) <= 4
    plain = TrainAudioDataset(urls, decode, LoaderConfig(batch_seconds=4.0, num_buckets=4, pad_to_bucket=False),
                              resampled=False, shuffle_buffer=1)
    assert all(b["audio"].shape[-1] == int(b["lengths"].max()) for b in plain)
