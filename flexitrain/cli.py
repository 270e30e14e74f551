"""Console scripts: flexitrain-train, flexitrain-eval, flexitrain-make-shards, flexitrain-demo-corpus."""
from __future__ import annotations

import sys


def _hydra_entry(config_name: str, runner):
    import hydra

    from flexitrain.utils.config import config_dir

    @hydra.main(config_path=str(config_dir()), config_name=config_name, version_base="1.3")
    def _main(cfg):
        return runner(cfg)

    return _main


def train_main() -> None:
    from flexitrain.train import run

    _hydra_entry("train", run)()


def eval_main() -> None:
    from flexitrain.evaluation.cli import run as run_eval

    _hydra_entry("eval", run_eval)()


def make_shards_main(argv=None) -> None:
    from flexitrain.data.shard_writer import main

    sys.exit(main(argv))


def demo_corpus_main(argv=None) -> None:
    from flexitrain.data.demo_corpus import main

    sys.exit(main(argv))
