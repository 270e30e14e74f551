"""Import the released FlexiCodec-TTS AR checkpoint (``artts.safetensors``, keys ``transformer_lm.*`` and
possibly the frozen codec's ``flexicodec_model.*``) from a local file, strictly.

    python tools/import_artts.py --src /path/artts.safetensors --out runs/import/artts
        -> runs/import/artts/{model.safetensors, config.json}   (ARTTSModel keys and constructor arguments)

The codec keys are skipped (the AR stage uses its own codec object); every other key must match the
model built from ``--config`` (``released`` = configs/model/ar_tts.yaml, or a JSON file of ARTTSModel
arguments) in name and shape, else the tool lists every missing/unexpected/mis-shaped key and exits 1.
``python train.py recipe=ar_tts init_from=/path/artts.safetensors`` loads the same file directly.
Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexitrain.models.tts.ar_checkpoint import load_ar_weights, save_pretrained  # noqa: E402
from flexitrain.utils.safe_load import CheckpointError, read_json  # noqa: E402
from flexitrain.models.tts.ar_tts import ARTTSModel, released_config, tiny_config  # noqa: E402


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--src", required=True, help="local artts.safetensors (or .pt / ARTTSTask .ckpt)")
    p.add_argument("--out", default=None, help="output folder; omit to only check")
    p.add_argument("--config", default="released", help="released | tiny | path to a JSON of ARTTSModel args")
    args = p.parse_args(argv)

    presets = {"released": released_config, "tiny": tiny_config}
    try:
        config = presets[args.config]() if args.config in presets else read_json(args.config, "--config")
        model = ARTTSModel(**config).eval()
        skipped = load_ar_weights(model, args.src, "--src")
    except (CheckpointError, ValueError, TypeError, FileNotFoundError) as e:
        print(f"import failed: {e}", file=sys.stderr)
        raise SystemExit(1)
    report = {"src": str(args.src), "parameters": sum(p.numel() for p in model.parameters()),
              "tensors": len(model.state_dict()), "skipped_codec_keys": len(skipped)}
    if args.out:
        out = save_pretrained(model, args.out, config)
        report["out"] = str(out)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
