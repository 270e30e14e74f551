"""End-to-end training runs through train.py: exact resume, 2-process DDP, every codec recipe."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from codec_fixtures import MICRO_MODEL, MICRO_TASK, build_tiny_corpus, data_overrides, run_train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus") / "demo")


def common(corpus: Path, steps: int, run_name: str, *extra: str) -> list[str]:
    return [*MICRO_MODEL, *MICRO_TASK, *data_overrides(corpus), *extra, "trainer=cpu", f"trainer.max_steps={steps}",
            "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "logger=csv", "validate_first=false",
            "callbacks.checkpoint.every_n_train_steps=1", "~callbacks.progress", "data.epoch_samples=12",
            f"run_name={run_name}", "experiment=resume",
            # One thread: multi-threaded CPU reductions differ run to run in the last bits, resumed or not.
            "torch_threads=1",
            # A kill, not a shorter run: the LR schedule must not depend on where the first process stopped.
            "task.scheduler.total_steps=7"]


def per_step_losses(run_dir: Path) -> dict[int, tuple[float, float]]:
    out = {}
    with open(run_dir / "csv" / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            if row.get("train/loss_g"):
                out[int(row["step"])] = (float(row["train/loss_g"]), float(row["train/loss_d"] or "nan"))
    return out


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]


def assert_same_run(a: Path, b: Path, steps: int) -> None:
    la, lb = per_step_losses(a), per_step_losses(b)
    assert sorted(la) == sorted(lb) and len(la) == steps, (la, lb)
    assert la == lb  # bit-exact per-step generator and discriminator losses
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


# EMA on (copy phase to step 2, then averaged at every 2nd step): the cut at step 5 lies in the averaging phase.
EMA = "task.ema={decay:0.8,start_step:2,every:2}"


def test_killed_and_resumed_run_reproduces_the_uninterrupted_run(corpus, tmp_path):
    # 12 samples/epoch in batches of 4: 3 steps per epoch; the cut at step 5 is mid-epoch 1.
    run_train(tmp_path, common(corpus, 7, "full", EMA))
    run_train(tmp_path, common(corpus, 5, "cut", EMA))
    out = run_train(tmp_path, common(corpus, 7, "cut", EMA))  # ckpt_path=auto: picks up checkpoints/last.ckpt
    runs = tmp_path / "runs" / "resume"
    assert json.loads((runs / "cut" / "summary.json").read_text())["resumed_from"].endswith("last.ckpt")
    assert_same_run(runs / "full", runs / "cut", 7)
    # the EMA (and the per-rank RNG bundle) came back exactly: the averaged weights are bit-identical
    full, cut = (torch.load(r / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
                 for r in (runs / "full", runs / "cut"))
    assert full["ema"]["num_updates"] == cut["ema"]["num_updates"] == 7
    assert full["ema"]["weights"].keys() == cut["ema"]["weights"].keys()
    assert all(torch.equal(v, cut["ema"]["weights"][k]) for k, v in full["ema"]["weights"].items())
    assert any(not torch.equal(v, full["state_dict"][f"generator.{k}"]) for k, v in full["ema"]["weights"].items())
    assert torch.equal(full["rng_states"]["ranks"][0]["torch"], cut["rng_states"]["ranks"][0]["torch"])


def test_resume_at_an_epoch_boundary_is_exact(corpus, tmp_path):
    """The cut at step 3 closes epoch 0: the resumed run must train epoch 1 on epoch 1's stream (it used to
    replay epoch 0's: Lightning asks for the loader while still in the finished epoch)."""
    run_train(tmp_path, common(corpus, 7, "full"))
    run_train(tmp_path, common(corpus, 3, "cut"))
    run_train(tmp_path, common(corpus, 7, "cut"))
    runs = tmp_path / "runs" / "resume"
    assert_same_run(runs / "full", runs / "cut", 7)


def test_two_process_ddp_keeps_replicas_identical(corpus, tmp_path):
    run_train(tmp_path, [*MICRO_MODEL, *MICRO_TASK, *data_overrides(corpus), "trainer=ddp_cpu",
                         "trainer.max_steps=2", "trainer.limit_val_batches=0", "validate_first=false", "logger=csv",
                         "~callbacks.progress", "+callbacks.replicas._target_=flexitrain.callbacks.ReplicaConsistencyCheck",
                         "experiment=ddp", "torch_threads=1", EMA, "callbacks.checkpoint.every_n_train_steps=1"],
              timeout=900)
    report = json.loads((tmp_path / "runs" / "ddp" / "main" / "replicas.json").read_text())
    assert report["world_size"] == 2 and report["consistent"] and report["global_step"] == 2
    # every rank's RNG streams are in the checkpoint (gathered when it is written), and the EMA
    ckpt = torch.load(tmp_path / "runs" / "ddp" / "main" / "checkpoints" / "last.ckpt", weights_only=True)
    ranks = ckpt["rng_states"]["ranks"]
    assert ckpt["rng_states"]["world_size"] == 2 and ranks[0]["attrs"]["_rng"] != ranks[1]["attrs"]["_rng"]
    assert ckpt["ema"]["num_updates"] == 2


def recipe_base(corpus: Path) -> list[str]:
    return [*MICRO_MODEL, *data_overrides(corpus), "trainer=cpu", "trainer.max_steps=2", "trainer.val_check_interval=2",
            "trainer.limit_val_batches=1", "~callbacks.progress", "logger=csv", "task.teacher.model_dir=null",
            "task.teacher.random_init=true", "task.teacher.num_blocks=1", "task.discriminator.periods=[2]",
            "task.discriminator.period_channels=[4,8,8,8]", "task.discriminator.fft_sizes=[256]",
            "task.discriminator.channels=4", "torch_threads=1"]


def test_stage_one_recipe_trains_and_stage_two_inits_from_it_strictly(corpus, tmp_path):
    run_train(tmp_path, ["recipe=codec_12hz", *recipe_base(corpus)])
    stage1 = tmp_path / "runs" / "codec_12hz" / "main" / "checkpoints" / "last.ckpt"
    assert stage1.is_file()
    run_train(tmp_path, ["recipe=codec_8hz", *recipe_base(corpus), f"init_from={stage1}"])
    assert (tmp_path / "runs" / "codec_8hz" / "main" / "checkpoints" / "last.ckpt").is_file()


@pytest.mark.slow
def test_remaining_codec_recipes_run_two_steps(corpus, tmp_path):
    run_train(tmp_path, ["recipe=codec_12hz", *recipe_base(corpus)])
    stage1 = tmp_path / "runs" / "codec_12hz" / "main" / "checkpoints" / "last.ckpt"
    run_train(tmp_path, ["recipe=codec_6hz", *recipe_base(corpus), f"init_from={stage1}"])
    run_train(tmp_path, ["recipe=codec_demo", *recipe_base(corpus), "validate_first=false"])
