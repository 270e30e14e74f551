#!/usr/bin/env python
"""Train a flexitrain model: `python train.py recipe=codec_demo [key=value ...]` (see `--help`)."""
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from flexitrain.train import run

    run(cfg)


if __name__ == "__main__":
    main()
