#!/usr/bin/env python
"""Convert the released 24 kHz Vocos (vocos_emilia.safetensors) into a flexitrain Vocos directory.

    python tools/import_vocos.py vocos_emilia.safetensors --out checkpoints/vocos_24k
    # then: Vocos.from_pretrained("checkpoints/vocos_24k")

The file is a local download (HF amphion/dualcodec-tts); nothing is fetched. Sizes come from the tensor
shapes (--hop-size cannot be inferred: 480); the import is strict and lists every mismatching key.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexitrain.models.codec.checkpoint import CheckpointMismatchError  # noqa: E402
from flexitrain.models.vocos import import_released_vocos  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("weights", type=Path, help="released Vocos .safetensors file")
    ap.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    ap.add_argument("--hop-size", type=int, default=480)
    args = ap.parse_args(argv)
    try:
        model = import_released_vocos(args.weights, args.hop_size)
    except (CheckpointMismatchError, ValueError, FileNotFoundError) as e:
        print(f"error: cannot import {args.weights}:\n{e}", file=sys.stderr)
        return 1
    model.save_pretrained(args.out)
    print(f"wrote {args.out} ({sum(p.numel() for p in model.parameters()):,} parameters, config {model.config})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
