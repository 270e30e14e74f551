"""Hydra entry of eval.py / flexitrain-eval: the codec evaluation (config `eval`) or, with
`--config-name eval_tts` (mode: tts), the zero-shot TTS evaluation."""
from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict:
    if cfg.get("mode", "codec") == "tts":
        from flexitrain.evaluation.tts_eval import run_tts_eval

        result = run_tts_eval(cfg)
    else:
        from flexitrain.evaluation.codec_eval import run_codec_eval

        result = run_codec_eval(cfg)
    print(f"report: {result['report']}")
    return result
