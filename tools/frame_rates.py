#!/usr/bin/env python
"""Tokens per second that FlexiCodec's merging gives per threshold τ for a teacher on a shard set, without codec
weights (the frame rate depends only on the teacher features and τ): pick a recipe's τ range before training.

    python tools/frame_rates.py --shards data/demo/test --teacher whisper_ct2 --thresholds 1.0,0.9,0.8,0.7 \
        [--max-utterances 100] [--set model_dir=...] [--max-tokens-per-group 8]

Prints the rate per τ pooled over the utterances and ends with one line:
`frame rates: 1.0→A Hz, 0.9→B Hz, 0.8→C Hz, 0.7→D Hz; span X.XX×`.
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a shard directory, brace pattern or glob")
    p.add_argument("--teacher", default="whisper_ct2", help="task/teacher option (sensevoice, sensevoice_random, "
                   "whisper_ct2)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="task.teacher.KEY=VALUE")
    p.add_argument("--thresholds", default="1.0,0.9,0.8,0.7", help="comma list of τ")
    p.add_argument("--max-utterances", type=int, default=None)
    p.add_argument("--max-tokens-per-group", type=int, default=8, help="the codec's cap (model.max_tokens_per_group)")
    p.add_argument("--sample-rate", type=int, default=16000)
    args = p.parse_args(argv)
    thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]

    import logging

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    from flexitrain.data.decode import DecodeConfig
    from flexitrain.data.pipeline import decode_sample, expand_shards, iter_shard
    from flexitrain.data.stats import NullStats
    from flexitrain.evaluation.frame_rates import measure_frame_rates, summary_line
    from flexitrain.tasks.teacher import build_teacher, teacher_config, teacher_min_samples

    cfg = teacher_config(args.teacher, args.set)
    teacher = build_teacher(cfg)
    lo = teacher_min_samples(teacher)
    decode = DecodeConfig(sample_rate=args.sample_rate, random_crop=False)

    def clips():
        n = 0
        for url in expand_shards(args.shards, "--shards"):
            for sample in iter_shard(url, NullStats()):
                if args.max_utterances is not None and n >= args.max_utterances:
                    return
                item = decode_sample(sample, decode, NullStats(), None)
                if item is not None and item.audio.shape[0] >= lo:
                    n += 1
                    yield torch.from_numpy(item.audio)

    out = measure_frame_rates(teacher, clips(), thresholds, float(cfg.get("downsample_factor", 1.33333)),
                              args.max_tokens_per_group or None, args.sample_rate)
    print(f"{out['utterances']} utterances, {out['seconds'] / 60:.1f} min, teacher {cfg['name']} "
          f"({out['frames_per_second']:.2f} frames/s before merging)")
    for tau, rate in out["rates"].items():
        print(f"  τ = {float(tau):<5} {rate:6.2f} tokens/s")
    print(summary_line(out["rates"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
