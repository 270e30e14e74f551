"""Every documented toggle of `python train.py` works: composed in-process with Hydra's compose API (as train.py
composes it) and trained for one step with the micro codec, or stopped with a clear message naming the option where
it needs hardware that is absent (`trainer=gpu`, `trainer=ddp` without a GPU)."""
from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
import torch

from codec_fixtures import MICRO_MODEL, MICRO_TASK, build_tiny_corpus, data_overrides
from flexitrain.utils.config import compose, config_dir

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus") / "demo")


@pytest.fixture
def in_tmp(tmp_path, monkeypatch, caplog) -> Path:
    monkeypatch.setenv("FLEXITRAIN_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    caplog.set_level(logging.INFO, logger="flexitrain")
    return tmp_path


def one_step_config(corpus: Path, *overrides: str):
    return compose(["recipe=codec_demo", *MICRO_MODEL, *MICRO_TASK, *data_overrides(corpus), "trainer.max_steps=1",
                    "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "validate_first=false",
                    "torch_threads=1", "ckpt_path=null", *overrides])


def train_one_step(corpus: Path, *overrides: str) -> Path:
    from flexitrain.train import run

    cfg = one_step_config(corpus, *overrides)
    summary = run(cfg)
    assert summary["global_step"] == 1
    assert "train/loss_g" in summary["metrics"]
    return Path(cfg.paths.output_dir)


def metrics_steps(run_dir: Path) -> list[int]:
    with open(run_dir / "csv" / "metrics.csv", newline="") as fh:
        return [int(r["step"]) for r in csv.DictReader(fh) if r.get("train/loss_g")]


def test_the_readme_names_the_trainer_options_tested_here():
    import re

    readme = (config_dir().parent / "README.md").read_text()
    options = {p.stem for p in (config_dir() / "trainer").glob("*.yaml")}
    assert options == {"default", "cpu", "gpu", "ddp", "ddp_cpu"}  # each has a test below
    assert set(re.findall(r"trainer=(\w+)", readme)) <= options
    assert all(f"`{option}`" in readme for option in options)


def test_progress_bar_off(corpus, in_tmp, caplog):
    # The command: `python train.py recipe=codec_demo trainer.enable_progress_bar=false` failed with
    # "Trainer was configured with `enable_progress_bar=False` but found `RichProgressBar` in callbacks list".
    run_dir = train_one_step(corpus, "trainer.enable_progress_bar=false")
    assert "callback RichProgressBar left out: trainer.enable_progress_bar=false" in caplog.text
    assert metrics_steps(run_dir) == [0]


def test_checkpointing_off(corpus, in_tmp, caplog):
    run_dir = train_one_step(corpus, "+trainer.enable_checkpointing=false")
    assert "callback ModelCheckpoint left out" in caplog.text
    assert not (run_dir / "checkpoints").exists()


def test_logger_none(corpus, in_tmp, caplog):
    # LearningRateMonitor (default callbacks) refuses a trainer without a logger; it is left out.
    run_dir = train_one_step(corpus, "logger=none")
    assert "callback LearningRateMonitor left out" in caplog.text
    assert not (run_dir / "csv").exists() and not (run_dir / "tensorboard").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


def test_logger_csv(corpus, in_tmp):
    run_dir = train_one_step(corpus, "logger=csv")
    assert metrics_steps(run_dir) == [0]
    assert not (run_dir / "tensorboard").exists()


def test_logger_default_writes_csv_and_tensorboard(corpus, in_tmp):
    run_dir = train_one_step(corpus, "logger=default")
    assert metrics_steps(run_dir) == [0]
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_logger_wandb_offline(corpus, in_tmp, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = train_one_step(corpus, "logger=wandb")
    assert list((run_dir / "wandb").glob("offline-run-*"))
    assert metrics_steps(run_dir) == [0]  # logger=wandb adds to the default loggers


def test_callbacks_none(corpus, in_tmp):
    # No callbacks at all: Lightning's own progress bar and checkpointing, no LR monitor or data counters.
    run_dir = train_one_step(corpus, "callbacks=none")
    with open(run_dir / "csv" / "metrics.csv", newline="") as fh:
        header = next(csv.reader(fh))
    assert "train/loss_g" in header and not any(h.startswith(("lr-", "data/")) for h in header)


@pytest.mark.parametrize("option", ["default", "cpu"])
def test_cpu_trainer_options(corpus, in_tmp, option):
    train_one_step(corpus, f"trainer={option}")


@pytest.mark.parametrize("option", ["gpu", "ddp"])
def test_gpu_trainer_options_run_or_name_the_missing_gpu(corpus, in_tmp, option):
    if torch.cuda.is_available():
        train_one_step(corpus, f"trainer={option}", "trainer.devices=1")  # one process (in pytest: no launcher)
        return
    from flexitrain.train import run

    with pytest.raises(RuntimeError) as err:
        run(one_step_config(corpus, f"trainer={option}"))
    message = str(err.value)
    assert f"trainer={option}" in message and "no CUDA GPU" in message and "trainer=cpu" in message, message
    assert not (in_tmp / "runs").exists()  # stopped before doing anything


def test_ddp_cpu_builds_a_two_process_gloo_trainer(corpus, in_tmp):
    # Running it starts two processes (train.py again per rank), which an in-process test cannot do; the two-step
    # 2-process run through train.py is test_two_process_ddp_keeps_replicas_identical in
    # tests/test_codec_training_runs.py (default suite).
    from hydra.utils import instantiate
    from lightning.pytorch.strategies import DDPStrategy

    from flexitrain.train import build_callbacks, build_loggers

    cfg = one_step_config(corpus, "trainer=ddp_cpu")
    loggers = build_loggers(cfg)
    trainer = instantiate(cfg.trainer, logger=loggers, callbacks=build_callbacks(cfg, loggers))
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2 and trainer.world_size == 2
    assert trainer.strategy.root_device.type == "cpu" and trainer.strategy._get_process_group_backend() == "gloo"
