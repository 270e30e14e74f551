#!/usr/bin/env python
"""Evaluate a codec at several merging thresholds (`python eval.py ckpt=PATH data=demo out_dir=reports/x`) or zero-shot
TTS per frame rate (`python eval.py --config-name eval_tts ar=AR nar=NAR vocoder=VOCOS`)."""
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="configs", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from flexitrain.evaluation.cli import run

    run(cfg)


if __name__ == "__main__":
    main()
