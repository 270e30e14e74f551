#!/usr/bin/env python
"""Convert a LibriSpeech-style folder or a JSONL/TSV manifest into WebDataset shards.

    python tools/make_shards.py /data/LibriSpeech/dev-clean data/shards/dev-clean --workers 8

See `python tools/make_shards.py --help`; the work is done by flexitrain.data.shard_writer.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install

from flexitrain.data.shard_writer import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
