#!/usr/bin/env python
"""Convert an official FlexiCodec checkpoint into a flexitrain checkpoint directory.

Released model (HF jiaqili3/flexicodec, downloaded by you beforehand; nothing is fetched here):
    python tools/import_official.py 12hz_v1_half.safetensors --config 12hz_v1_half_config.yaml \\
        --out checkpoints/flexicodec_12hz_v1
Stage-1 fixed-rate DualCodec-with-SenseVoice init (no merging / aggregators / bottleneck):
    python tools/import_official.py dualcodec_with_sensevoice_12hz_soundstream.safetensors --stage1 \\
        --out checkpoints/flexicodec_stage1

Weights are converted fp16 → fp32 and checked strictly: every model key must be present with the
right shape and every file key must be used, except the ignore list (training-only ``repa_mlp.*``
and the frozen teacher ``semantic_model.*``, plus ``--ignore`` patterns). On a mismatch the error
lists every missing, unexpected and mis-shaped key. The output directory holds ``config.yaml`` and
``model.safetensors`` for ``FlexiCodec.from_pretrained(out)``.
"""

from __future__ import annotations

import argparse
import sys

import yaml
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexitrain.models.codec.checkpoint import CheckpointMismatchError, import_official  # noqa: E402
from flexitrain.models.codec.config import RELEASED_CONFIG, load_config  # noqa: E402
from flexitrain.utils.safe_load import CheckpointError, check_file  # noqa: E402

# Stage 1 (paper recipe): the released dimensions at a fixed 12.5 Hz, decoded by the DAC decoder directly.
STAGE1_OVERRIDES = {"use_similarity_alignment": False, "use_query_token_aggregator": False,
                    "use_bottleneck_transformer": False}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("weights", type=Path, help="official .safetensors file")
    ap.add_argument("--config", type=Path, help="official config yaml (model: {...}); default: the released config")
    ap.add_argument("--stage1", action="store_true", help="fixed-rate stage-1 layout (overrides on top of the config)")
    ap.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    ap.add_argument("--ignore", action="append", default=[], help="extra fnmatch pattern of file keys to drop")
    ap.add_argument("--allow-missing", action="append", default=[],
                    help="fnmatch pattern of model keys that may be absent (kept at init)")
    ap.add_argument("--strip-prefix", default="", help="prefix to remove from file keys (e.g. 'module.')")
    args = ap.parse_args(argv)

    try:
        if args.config:
            check_file(args.config, "--config")
        config = load_config(args.config) if args.config else dict(RELEASED_CONFIG)
        if args.stage1:
            config.update(STAGE1_OVERRIDES)
        out = import_official(args.weights, config, args.out, extra_ignore=args.ignore,
                              allow_missing=args.allow_missing, strip_prefix=args.strip_prefix)
    except (CheckpointMismatchError, CheckpointError, FileNotFoundError, ValueError, yaml.YAMLError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
