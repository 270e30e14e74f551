#!/usr/bin/env python
"""Synthesise the demo corpus (Harvard sentences spoken by espeak-ng voices) as WebDataset shards.

    python tools/make_demo_corpus.py --out data/demo

Cached: re-running with the same parameters prints "cached" and does nothing. See `--help`;
the work is done by flexitrain.data.demo_corpus.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a clone without install

from flexitrain.data.demo_corpus import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
