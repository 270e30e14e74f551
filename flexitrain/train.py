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


def build_callbacks(cfg: DictConfig) -> list:
    return [instantiate(conf) for conf in _enabled(cfg.get("callbacks"))]


def save_resolved_config(cfg: DictConfig, output_dir: Path) -> None:
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    output_dir.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(OmegaConf.create(plain), output_dir / "config.yaml")


def run(cfg: DictConfig) -> dict:
    import lightning as L

    if cfg.get("torch_threads"):
        torch.set_num_threads(int(cfg.torch_threads))
    output_dir = Path(cfg.paths.output_dir)
    L.seed_everything(cfg.seed, workers=True)
    if _is_rank_zero():
        save_resolved_config(cfg, output_dir)

    datamodule = instantiate(cfg.data)
    task = instantiate(cfg.task, _recursive_=False)
    resume = resolve_resume_checkpoint(cfg.get("ckpt_path"), cfg.paths.checkpoint_dir, output_dir)
    if cfg.get("init_from") and resume is None:
        task.init_from(cfg.init_from)  # strict; only for fresh runs: a resumed run already holds its weights
    trainer = instantiate(cfg.trainer, logger=build_loggers(cfg) or False, callbacks=build_callbacks(cfg),
                          default_root_dir=str(output_dir))
    if resume:
        log.info("resuming from %s", resume)
    start = time.time()
    if cfg.get("validate_first") and resume is None:
        trainer.validate(task, datamodule=datamodule)
    trainer.fit(task, datamodule=datamodule, ckpt_path=resume)
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
