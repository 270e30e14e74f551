"""ARTTSTask under 2-process gloo DDP on CPU (train.py, recipe ar_tts_demo): plain `ddp` (no unused-parameter
detection) trains on both ranks, the replicas end bit-identical, each rank reads its own disjoint share of
the shards, and the losses are finite. Plus the dataset's rank split on its own."""
from __future__ import annotations

import json
import math
import os
import tarfile
from pathlib import Path

import lightning as L
import pytest
import torch

from codec_fixtures import build_tiny_corpus, run_train
from flexitrain.callbacks.replica_check import parameter_digest
from flexitrain.data.pipeline import expand_shards
from flexitrain.tasks.ar_tts_data import ARTTSDataset

SEED = 1234  # configs/train.yaml seed = data.seed


class RankProbe(L.Callback):
    """Test-only callback (imported by train.py through PYTHONPATH): per rank, the keys, threshold and loss of
    every training batch and the final parameter digest -> <run dir>/probe_rank<r>.json."""

    def __init__(self):
        self.steps = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        # training_step draws from (seed, global_step, rank) too: the same value
        self.steps.append({"keys": list(batch["keys"]), "threshold": pl_module.draw_threshold()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.steps[-1]["loss"] = float(outputs["loss"])

    def on_train_end(self, trainer, pl_module):
        out = {"rank": trainer.global_rank, "world_size": trainer.world_size, "global_step": trainer.global_step,
               "steps": self.steps, "digest": parameter_digest(pl_module),
               "trainable": sorted(n for n, p in pl_module.named_parameters() if p.requires_grad)}
        path = Path(trainer.default_root_dir) / f"probe_rank{trainer.global_rank}.json"
        path.write_text(json.dumps(out, indent=1))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus") / "demo")


def shard_keys(url: str) -> set[str]:
    with tarfile.open(url) as tar:
        return {name.split(".", 1)[0] for name in tar.getnames()}


def test_dataset_splits_shards_disjointly_across_ranks(corpus):
    urls = expand_shards(str(corpus / "train"))
    everything = set().union(*(shard_keys(u) for u in urls))
    for epoch in (0, 1, 2):
        seen = []
        for rank in range(2):
            ds = ARTTSDataset(urls, thresholds=[0.91], source="codec", token_budget=10_000, shuffle=True,
                              repeat=False, g2p=False, seed=SEED, rank=rank, world_size=2)
            ds.epoch = epoch
            seen.append({k for batch in ds for k in batch["keys"]})
        assert not seen[0] & seen[1], epoch
        assert seen[0] | seen[1] == everything, epoch


def test_two_process_ddp_ar_tts(corpus, tmp_path, monkeypatch):
    tests_dir = str(Path(__file__).resolve().parent)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests_dir, os.environ.get("PYTHONPATH")])))
    steps = 4
    run_train(tmp_path, [
        "recipe=ar_tts_demo", f"data.train_shards={corpus}/train", f"data.val_shards={corpus}/valid",
        "data.num_workers=0", "data.token_budget=600", "data.max_batch_size=4", "data.buffer_size=8",
        "trainer=ddp_cpu", "trainer.strategy=ddp",  # plain DDP: fails on any parameter without a gradient
        f"trainer.max_steps={steps}", "trainer.val_check_interval=2", "trainer.limit_val_batches=1",
        "validate_first=false", "logger=csv", "~callbacks.progress", "task.targets.teacher.num_blocks=1",
        "+callbacks.replicas._target_=flexitrain.callbacks.ReplicaConsistencyCheck",
        "+callbacks.probe._target_=test_ar_tts_ddp.RankProbe", "experiment=ar_ddp", "torch_threads=1"], timeout=600)
    run = tmp_path / "runs" / "ar_ddp" / "main"
    replicas = json.loads((run / "replicas.json").read_text())
    assert replicas["world_size"] == 2 and replicas["consistent"] and replicas["global_step"] == steps, replicas
    probes = [json.loads((run / f"probe_rank{r}.json").read_text()) for r in range(2)]
    assert [p["rank"] for p in probes] == [0, 1] and all(p["world_size"] == 2 for p in probes)
    for p in probes:  # both ranks ran every step with a finite loss
        assert p["global_step"] == steps and len(p["steps"]) == steps
        assert all(math.isfinite(s["loss"]) for s in p["steps"]), p["steps"]
        assert "model.spk_embed_affine_layer.weight" not in p["trainable"]
    assert probes[0]["digest"] == probes[1]["digest"]  # identical weights after 4 synchronised updates
    # each rank read only its own shards of epoch 0 (4 steps of <= 4 items stay inside one 16-item share)
    urls = ARTTSDataset(expand_shards(str(corpus / "train")), thresholds=[0.91], source="codec",
                        seed=SEED).shard_order(0)
    seen = [{k for s in p["steps"] for k in s["keys"]} for p in probes]
    for rank in range(2):
        assert seen[rank] <= set().union(*(shard_keys(u) for u in urls[rank::2])), rank
    assert seen[0] and seen[1] and not seen[0] & seen[1]
    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["metrics"]["val/loss"]) and math.isfinite(summary["metrics"]["train/loss"])
    # the rank-0 checkpoint holds finite weights
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values())


def test_resumed_stream_does_not_replay_the_first_shards(corpus):
    from types import SimpleNamespace

    from flexitrain.tasks.ar_tts_data import ARTTSDataModule

    dm = ARTTSDataModule(f"{corpus}/train", source="codec", num_workers=0, g2p=False)
    fresh = dm.train_dataloader().dataset
    dm.trainer = SimpleNamespace(global_step=40)  # what Lightning has restored when it asks for the loader
    resumed = dm.train_dataloader().dataset
    assert (fresh.epoch, resumed.epoch) == (0, 40)
    assert len(fresh.urls) >= 3 and resumed.shard_order(40) != fresh.shard_order(0)
