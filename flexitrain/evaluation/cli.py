"""Hydra entry of eval.py / flexitrain-eval."""
from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict:
    from flexitrain.evaluation.codec_eval import run_codec_eval

    result = run_codec_eval(cfg)
    print(f"report: {result['report']}")
    return result
