"""Weighted corpus mixtures (data.train_shards as [{shards, weight, name}]): parsing and errors, drawing
proportions, determinism, rank/worker splitting, resume replay, epoch sizing and per-corpus data stats."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from flexitrain.data import AudioDataModule
from flexitrain.data.decode import DecodeConfig
from flexitrain.data.mixing import build_mixture, parse_corpora
from flexitrain.data.pipeline import AudioLoader, LoaderConfig, TrainAudioDataset, expand_shards
from flexitrain.data.stats import DataStatsLogger, format_summary
from helpers_shards import good_sample, write_shard

SR = 16000


def make_corpus(folder: Path, prefix: str, n_shards: int, per_shard: int, seconds=(0.2, 0.4), index=True) -> list[str]:
    """Shards whose keys start with `prefix` (so a sample's corpus is known from its key)."""
    rng = np.random.default_rng(sum(map(ord, prefix)))
    keys, entries = [], []
    for s in range(n_shards):
        samples, total = [], 0.0
        for i in range(per_shard):
            key, dur = f"{prefix}{s:02d}-{i:03d}", float(rng.uniform(*seconds))
            samples.append(good_sample(key, dur, seed=s * 1000 + i))
            keys.append(key)
            total += dur
        write_shard(folder / f"shard-{s:06d}.tar", samples)
        entries.append({"name": f"shard-{s:06d}.tar", "num_samples": per_shard, "duration": total})
    if index:
        (folder / "index.json").write_text(json.dumps({"version": 1, "shards": entries}))
    return keys


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix")
    return {
        "a": (root / "a", make_corpus(root / "a", "a", n_shards=8, per_shard=12)),  # 96: 24 per worker of 4
        "b": (root / "b", make_corpus(root / "b", "b", n_shards=2, per_shard=24)),  # 2 shards < 4 workers
        "c": (root / "c", make_corpus(root / "c", "c", n_shards=1, per_shard=4)),  # tiny: upsampled
    }


def spec(corpora, weights: dict[str, float]) -> list[dict]:
    return [{"name": n, "shards": str(corpora[n][0]), "weight": w} for n, w in weights.items()]


def mixed_dataset(corpora, weights, *, rank=0, world=1, workers=0, seed=0, resampled=False, per_worker=50, **kw):
    mixture = build_mixture(parse_corpora(spec(corpora, weights)), expand_shards)
    return TrainAudioDataset(mixture.all_urls, DecodeConfig(crop_samples=SR), LoaderConfig(batch_seconds=2.0),
                             rank=rank, world_size=world, num_workers=workers, resampled=resampled,
                             batches_per_worker=per_worker, seed=seed, mixture=mixture, **kw)


def draws(ds, n, wid=0, nw=1) -> list[str]:
    it = ds._samples(wid, nw, np.random.default_rng(0))
    return [next(it)["__key__"] for _ in range(n)]


# ----------------------------------------------------------------------------- parsing and errors
def test_plain_specs_are_not_mixtures_and_bad_entries_fail_naming_the_corpus(corpora, tmp_path):
    a = str(corpora["a"][0])
    assert parse_corpora(a) is None and parse_corpora([a, a]) is None and parse_corpora(None) is None
    parsed = parse_corpora(OmegaConf.create({"x": [{"shards": a, "weight": 2}, {"shards": [a], "name": "n"}]}).x)
    assert [(c.name, c.weight) for c in parsed] == [("corpus0", 2.0), ("n", 1.0)]  # weight defaults to 1
    bad = [
        ([{"shards": a, "weight": -1.0}], r"train_shards\[0\] \(corpus0\): weight must be finite and >= 0"),
        ([{"shards": a, "weight": 0}, {"shards": a, "weight": 0.0, "name": "z"}], "sum to 0.0"),
        ([{"shards": a, "weight": "3"}], r"\(corpus0\): weight must be a number, got '3'"),
        ([{"shards": a, "weight": True}], "weight must be a number"),
        ([{"shards": a, "weight": float("nan")}], "finite"),
        ([{"shards": a, "wieght": 1.0}], r"unknown key\(s\) \['wieght'\]"),
        ([{"weight": 1.0, "name": "lost"}], r"\(lost\): missing 'shards'"),
        ([{"shards": a, "name": "d"}, {"shards": a, "name": "d"}], r"unique, repeated: \['d'\]"),
        ([{"shards": a}, a], r"train_shards\[1\]: a weighted corpus list takes only"),
        ([{"shards": a, "name": "x/y"}], "without '/'"),
    ]
    for entries, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_corpora(entries)
    with pytest.raises(ValueError, match="weight must be finite"):  # at construction, before any shard is read
        AudioDataModule(train_shards=[{"shards": a, "weight": -2}])
    # A corpus whose shards do not exist fails at setup, naming it (also a zero-weight one).
    for weights in ({"good": 1.0, "ghost": 1.0}, {"good": 1.0, "ghost": 0.0}):
        entries = [{"name": "good", "shards": a, "weight": weights["good"]},
                   {"name": "ghost", "shards": str(tmp_path / "none-{0..3}.tar"), "weight": weights["ghost"]}]
        dm = AudioDataModule(train_shards=entries, epoch_samples=10, rank=0, world_size=1)
        with pytest.raises(ValueError, match=r"train_shards\[1\] \(ghost\): .* matches no shard files"):
            dm.setup("fit")


# ----------------------------------------------------------------------------- proportions and determinism
@pytest.mark.parametrize("resampled", [False, True])
def test_samples_are_drawn_in_proportion_to_the_weights_deterministically(corpora, resampled):
    weights = {"a": 3.0, "b": 1.5, "c": 0.5}
    n = 4000
    ds = mixed_dataset(corpora, weights, seed=3, resampled=resampled, shuffle_buffer=0)
    keys = draws(ds, n)
    counts = Counter(k[0] for k in keys)
    total = sum(weights.values())
    for name, w in weights.items():
        p = w / total
        # binomial: |count - np| within 4.5 standard deviations (a false alarm about once in 150000 runs;
        # the draws are seeded, so this run's outcome is fixed anyway)
        assert abs(counts[name] - n * p) < 4.5 * np.sqrt(n * p * (1 - p)), (name, counts)
    assert draws(ds, n) == keys  # same seed and epoch: the same stream
    ds.set_epoch(1)
    assert draws(ds, 200) != keys[:200]
    other = mixed_dataset(corpora, weights, seed=4, resampled=resampled, shuffle_buffer=0)
    assert draws(other, 200) != keys[:200]
    # A zero-weight corpus is never drawn (and never read).
    zero = mixed_dataset(corpora, {"a": 1.0, "b": 0.0, "c": 1.0}, resampled=resampled)
    assert zero.mixture.names == ("a", "c") and not any(k.startswith("b") for k in draws(zero, 300))


# ----------------------------------------------------------------------------- ranks and workers
def test_each_rank_and_worker_reads_its_share_and_nothing_repeats_unless_upsampled(corpora):
    # Weights 2:1:1 and 24 draws per worker: a expects 12 of its 24-sample share per worker, b 6 of 12 (b has 2
    # shards < 4 workers: sample-level split), c 6 of its 1 sample per worker -> only c repeats.
    weights, world, nw, per = {"a": 2.0, "b": 1.0, "c": 1.0}, 2, 2, 24
    a_urls = expand_shards(str(corpora["a"][0]))
    by_worker = {}
    for rank in range(world):
        ds = mixed_dataset(corpora, weights, rank=rank, world=world, workers=nw, seed=5)
        for wid in range(nw):
            by_worker[rank * nw + wid] = draws(ds, per, wid, nw)
    everything = [k for keys in by_worker.values() for k in keys]
    for name in "ab":
        got = [k for k in everything if k.startswith(name)]
        assert len(got) == len(set(got)) > 0, f"corpus {name} repeated a sample within the epoch"
    c = [k for k in everything if k.startswith("c")]
    assert len(c) > len(set(c))  # upsampled by its weight: repeats are expected
    assert len(set(c)) == 4  # 4 samples over 4 workers: each worker has its own one
    for gid, keys in by_worker.items():  # a: 8 shards over 4 workers, shard s belongs to worker s % 4
        mine = {Path(u).name for u in a_urls[gid::world * nw]}
        assert {f"shard-{int(k[1:3]):06d}.tar" for k in keys if k.startswith("a")} <= mine
    assert {k for k in everything if k.startswith("b")} <= set(corpora["b"][1])


# ----------------------------------------------------------------------------- batches, resume, stats
def test_resumed_epoch_replays_the_mixed_stream_and_stats_count_per_corpus(corpora):
    ds = mixed_dataset(corpora, {"a": 1.0, "b": 1.0, "c": 0.5}, workers=2, per_worker=6, seed=7, shuffle_buffer=16)
    full = list(AudioLoader(ds, num_workers=2, epoch_fn=lambda: 2))
    assert len(full) == 12
    totals = ds.stats.totals()
    per_corpus = Counter(k[0] for b in full for k in b["keys"])
    assert {n: totals[f"corpus/{n}"] for n in "abc"} == {n: per_corpus[n] for n in "abc"}
    assert sum(totals[f"corpus/{n}"] for n in "abc") == totals["samples"] == sum(len(b["keys"]) for b in full)
    assert "corpus/a=" in format_summary(totals) and "no bad input" in format_summary(totals)
    resumed = list(AudioLoader(ds, num_workers=2, epoch_fn=lambda: 2, skip_fn=lambda: 5))
    assert len(resumed) == 7
    for x, y in zip(full[5:], resumed):
        assert x["keys"] == y["keys"] and torch.equal(x["audio"], y["audio"])
    # A checkpoint written after the epoch's last batch: Lightning resumes in that finished epoch (epoch_fn still
    # says 2) and trains the next one on this pass, which must be epoch 3's stream from its start.
    after_boundary = list(AudioLoader(ds, num_workers=2, epoch_fn=lambda: 2, skip_fn=lambda: 12))
    next_epoch = list(AudioLoader(ds, num_workers=2, epoch_fn=lambda: 3))
    assert [b["keys"] for b in after_boundary] == [b["keys"] for b in next_epoch] != [b["keys"] for b in full]


def test_datamodule_sizes_mixed_epochs_and_logs_corpus_counts(corpora):
    weights = {"a": 1.0, "b": 1.0, "c": 1.0}
    dm = AudioDataModule(train_shards=spec(corpora, weights), train_crop_seconds=1.0, batch_seconds=2.0,
                         max_batch_size=8, num_workers=0, rank=0, world_size=1)
    dm.setup("fit")
    ds = dm.datasets["train"]
    assert ds.mixture.names == ("a", "b", "c") and ds.resampled is False
    # No epoch_samples: an epoch is the corpora's total size (96 + 48 + 4 samples) in nominal batches.
    index = dm._mixture_index(ds.mixture)
    assert index["num_samples"] == 148 and index["per_corpus"] == {"a": 96, "b": 48, "c": 4}
    nominal = dm.nominal_batch_size(index)
    assert len(ds) == int(np.ceil(148 / nominal)) > 1
    batches = list(dm.train_dataloader())
    assert len(batches) == len(ds)

    logged = {}

    class Module:
        def log(self, name, value, **kw):
            logged[name] = value

    DataStatsLogger()._log(type("T", (), {"datamodule": dm})(), Module(), "train")
    assert sum(logged[f"data/train/corpus/{n}"] for n in "abc") == logged["data/train/samples"] > 0
    assert "data/train/corrupt_audio" in logged


def test_mixture_without_epoch_length_fails_naming_the_unindexed_corpus(corpora, tmp_path):
    make_corpus(tmp_path / "x", "x", 1, 3, index=False)
    entries = spec(corpora, {"a": 1.0}) + [{"name": "noindex", "shards": str(tmp_path / "x"), "weight": 1.0}]
    dm = AudioDataModule(train_shards=entries, rank=0, world_size=1)
    with pytest.raises(ValueError, match=r"epoch_samples or put an index.json .*\['noindex'\]"):
        dm.setup("fit")
    dm = AudioDataModule(train_shards=entries, epoch_samples=20, train_crop_seconds=1.0, batch_seconds=2.0,
                         num_workers=0, rank=0, world_size=1)
    dm.setup("fit")
    assert dm.datasets["train"].resampled and len(dm.datasets["train"]) == 10
