#!/usr/bin/env python
"""Extract a semantic teacher's features once, into sidecar shards that training reads instead of running the teacher.

    python tools/extract_teacher_features.py --shards data/demo/train --teacher whisper_ct2 \
        --out data/demo/features/whisper_ct2/train
    python train.py recipe=... task/teacher=whisper_ct2 data.teacher_features=data/demo/features/whisper_ct2/train

`--teacher` is an option of the `task/teacher` config group (sensevoice, sensevoice_random, whisper_ct2) and `--set`
overrides its keys (`--set model_dir=/models/SenseVoiceSmall`), exactly as `task/teacher=...` and `task.teacher.*=`
do for train.py: training refuses features whose teacher or settings differ from its own. Each utterance is encoded
whole (features of a crop are then a slice of them). Cached: a shard whose sidecar exists for the same teacher and
shard size is skipped. Layout: flexitrain/data/teacher_features.py.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a shard directory, brace pattern or glob")
    p.add_argument("--teacher", default="whisper_ct2", help="task/teacher option (default whisper_ct2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="task.teacher.KEY=VALUE")
    p.add_argument("--out", required=True, help="features directory (one per shard directory)")
    p.add_argument("--sample-rate", type=int, default=16000)
    args = p.parse_args(argv)

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from flexitrain.data.pipeline import expand_shards
    from flexitrain.data.teacher_features import extract_features, is_cached
    from flexitrain.tasks.teacher import build_teacher, teacher_config

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = teacher_config(args.teacher, args.set)
    urls = expand_shards(args.shards, "--shards")
    if is_cached(urls, args.out, cfg):
        print(f"[features] {args.out}: cached ({len(urls)} shards, {cfg['name']})")
        return 0
    extract_features(urls, args.out, build_teacher(cfg), cfg, sample_rate=args.sample_rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
