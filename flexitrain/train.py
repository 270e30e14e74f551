"""`python train.py recipe=...`: build data, task, loggers, callbacks and trainer from the config and fit."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flexitrain.cluster import resolve_resume_checkpoint
from flexitrain.utils.run_dir import stable_run_id

log = logging.getLogger("flexitrain")


def _is_rank_zero() -> bool:
    # Lightning derives the rank from RANK / LOCAL_RANK / SLURM_PROCID before any process group exists.
    from lightning.fabric.utilities.rank_zero import rank_zero_only

    return getattr(rank_zero_only, "rank", 0) == 0


def _enabled(group) -> list:
    """Entries of a callbacks/logger group that name a class: a recipe may tweak a key (e.g.
    callbacks.checkpoint.every_n_train_steps) of an entry that the chosen group option left out."""
    return [conf for conf in (group or {}).values() if conf is not None and "_target_" in conf]


def build_loggers(cfg: DictConfig) -> list:
    loggers = []
    for conf in _enabled(cfg.get("logger")):
        if "WandbLogger" in conf.get("_target_", "") and conf.get("id") is None:
            conf = OmegaConf.merge(conf, {"id": stable_run_id(cfg.paths.output_dir)})
        loggers.append(instantiate(conf))
    return loggers


def build_callbacks(cfg: DictConfig, loggers: list | None = None) -> list:
    """The callbacks group, minus those that a trainer toggle switches off: Lightning refuses a progress bar with
    `enable_progress_bar=false` or a ModelCheckpoint with `enable_checkpointing=false`, and a LearningRateMonitor
    without a logger (`logger=none`), so a documented toggle must not need a second override to remove them."""
    from lightning.pytorch.callbacks import Checkpoint, LearningRateMonitor, ProgressBar

    callbacks = [instantiate(conf) for conf in _enabled(cfg.get("callbacks"))]
    trainer_cfg = cfg.get("trainer") or {}
    drop = []
    if not trainer_cfg.get("enable_progress_bar", True):
        drop.append((ProgressBar, "trainer.enable_progress_bar=false"))
    if not trainer_cfg.get("enable_checkpointing", True):
        drop.append((Checkpoint, "trainer.enable_checkpointing=false"))
    if loggers is not None and not loggers:
        drop.append((LearningRateMonitor, "no logger configured (logger=none)"))
    kept = []
    for cb in callbacks:
        reason = next((why for cls, why in drop if isinstance(cb, cls)), None)
        if reason is None:
            kept.append(cb)
        else:
            log.info("callback %s left out: %s", type(cb).__name__, reason)
    return kept


def _trainer_option() -> str | None:
    """The `trainer=` option Hydra chose (None outside a Hydra run)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().runtime.choices.get("trainer")
    except Exception:
        return None


def check_accelerator(cfg: DictConfig) -> None:
    """Fail early, naming the option, when the trainer asks for GPUs that this machine does not have (Lightning's
    own message is "No supported gpu backend found!")."""
    accelerator = str((cfg.get("trainer") or {}).get("accelerator", "auto")).lower()
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        option = _trainer_option()
        chosen = f" (config option trainer={option})" if option else ""
        raise RuntimeError(
            f"trainer.accelerator={accelerator}{chosen}, but no CUDA GPU is available here "
            f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'none'}). The trainer=gpu and trainer=ddp "
            "options need GPUs; on CPU use trainer=cpu (one process), trainer=ddp_cpu (two gloo processes) or "
            "trainer=default (accelerator=auto).")


def save_resolved_config(cfg: DictConfig, output_dir: Path) -> None:
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(plain), output_dir / "config.yaml")


def run(cfg: DictConfig) -> dict:
    import lightning as L

    from flexitrain.utils.console import quiet_console

    quiet_console()  # each message once, no library chatter (after Hydra set up logging and Lightning's import)
    check_accelerator(cfg)  # before any work: a missing GPU is a configuration error
    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    if _is_rank_zero():
        save_resolved_config(cfg, output_dir)

    datamodule = instantiate(cfg.data)
    task = instantiate(cfg.task, _recursive_=False)
    # Checked against the task (weights-only read, right task, every key and size) before training starts.
    resume = resolve_resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.checkpoint_dir, output_dir, task=task)
    if cfg.get("init_from") and resume is None:
        task.init_from(cfg.init_from)  # strict; only for fresh runs: a resumed run already holds its weights
    loggers = build_loggers(cfg)
    trainer = instantiate(cfg.trainer, logger=loggers or False, callbacks=build_callbacks(cfg, loggers),
                          default_root_dir=str(output_dir))
    if resume:
        log.info("resuming from %s", resume)
    start = time.time()
    if cfg.get("validate_first") and resume is None:
        trainer.validate(task, datamodule=datamodule, verbose=False)  # logged; no metric table on the console
    trainer.fit(task, datamodule=datamodule, ckpt_path=resume, weights_only=True)  # a checkpoint never runs code
    summary = {
        "run_dir": str(output_dir),
        "global_step": int(trainer.global_step),
        "resumed_from": resume,
        "fit_seconds": round(time.time() - start, 2),
        "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1},
    }
    if cfg.get("test_after_fit"):
        trainer.test(task, datamodule=datamodule)
        summary["test_metrics"] = {k: float(v) for k, v in trainer.callback_metrics.items()
                                   if torch.as_tensor(v).numel() == 1}
    if trainer.is_global_zero:
        (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        log.info("run directory: %s", output_dir)
    return summary
