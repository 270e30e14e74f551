#!/usr/bin/env python
"""Convert the released FlexiCodec-TTS NAR (nartts.safetensors) into a flexitrain Voicebox directory.

    python tools/import_nartts.py nartts.safetensors --out checkpoints/nartts
    # then: VoiceboxNAR.from_pretrained("checkpoints/nartts")

The file is a local download (HF jiaqili3/flexicodec); nothing is fetched. Its frozen-codec keys
(flexicodec_model.*) are dropped; every other key must match the model exactly (missing, unexpected and
mis-shaped keys are all listed on failure). Sizes come from the tensor shapes; --num-heads and
--repa-layer cannot be inferred (released: 16 and 6).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexitrain.models.codec.checkpoint import CheckpointMismatchError  # noqa: E402
from flexitrain.models.tts.voicebox_import import import_released_nartts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("weights", type=Path, help="released nartts .safetensors file")
    ap.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    ap.add_argument("--num-heads", type=int, default=16)
    ap.add_argument("--repa-layer", type=int, default=6)
    args = ap.parse_args(argv)
    try:
        model = import_released_nartts(args.weights, args.num_heads, args.repa_layer)
    except (CheckpointMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: cannot import {args.weights}:\n{e}", file=sys.stderr)
        return 1
    model.save_pretrained(args.out)
    n = sum(p.numel() for p in model.parameters())
    print(f"wrote {args.out} ({n:,} parameters, config {model.config})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
