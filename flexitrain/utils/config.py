"""Locating and composing flexitrain's Hydra configuration outside of `@hydra.main` (tests, tools)."""
from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

REPO_ROOT = Path(__file__).resolve().parents[2]


def config_dir() -> Path:
    """The `configs/` directory (FLEXITRAIN_CONFIG_DIR overrides, e.g. for a non-editable install)."""
    path = Path(os.environ.get("FLEXITRAIN_CONFIG_DIR", REPO_ROOT / "configs"))
    if not (path / "train.yaml").is_file():
        raise FileNotFoundError(f"flexitrain configs not found at {path}; set FLEXITRAIN_CONFIG_DIR")
    return path


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (config_dir() / "recipe").glob("*.yaml"))


def compose(overrides: list[str] | None = None, config_name: str = "train", return_hydra_config: bool = True) -> DictConfig:
    """Compose the config as `train.py` would, with `${hydra:...}` resolvable (runtime.cwd = current dir)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    with initialize_config_dir(str(config_dir()), version_base="1.3"):
        cfg = hydra_compose(config_name, overrides=overrides or [], return_hydra_config=return_hydra_config)
        if return_hydra_config:
            OmegaConf.set_readonly(cfg.hydra, False)
            cfg.hydra.runtime.cwd = os.getcwd()
            HydraConfig.instance().set_config(cfg)
            OmegaConf.set_readonly(cfg.hydra, False)
            cfg.hydra.runtime.output_dir = cfg.hydra.run.dir  # as in a real (single) run
            HydraConfig.instance().set_config(cfg)
    return cfg
