#!/usr/bin/env python
"""Summarise a training run from its CSV log: validation mel distance first → last (and the drop), losses.

    python tools/training_summary.py runs/codec_demo/main [--append reports/demo/report.md] [--min-drop 0.4]
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path


def read_series(run_dir: Path, key: str) -> list[tuple[int, float]]:
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: was the run logged with the CSV logger?")
    out = []
    with open(path) as fh:
        for row in csv.DictReader(fh):
            if row.get(key) not in (None, ""):
                out.append((int(float(row["step"])), float(row[key])))
    return out


def summarise(run_dir: Path) -> dict:
    mel = read_series(run_dir, "val/mel_distance")
    train_mel = read_series(run_dir, "train/loss_mel")
    if not mel:
        raise RuntimeError(f"no val/mel_distance in {run_dir}/csv/metrics.csv")
    first, last = mel[0], mel[-1]
    summary = {"run_dir": str(run_dir), "val_mel_first": first, "val_mel_last": last,
               "val_mel_drop": (first[1] - last[1]) / first[1] if first[1] else math.nan,
               "val_mel_curve": mel,
               "train_mel_first": train_mel[0] if train_mel else None,
               "train_mel_last": train_mel[-1] if train_mel else None}
    extra = run_dir / "summary.json"
    if extra.is_file():
        summary["fit"] = json.loads(extra.read_text())
    return summary


def to_markdown(s: dict) -> str:
    curve = " → ".join(f"{v:.3f} (step {k})" for k, v in s["val_mel_curve"])
    lines = ["", "## Training", "", f"- run: `{s['run_dir']}`",
             f"- validation mel distance (τ = first validation threshold): {curve}",
             f"- **drop from the first evaluation: {100 * s['val_mel_drop']:.1f} %**"]
    if s.get("train_mel_first"):
        lines.append(f"- training mel loss: {s['train_mel_first'][1]:.3f} (step {s['train_mel_first'][0]}) → "
                     f"{s['train_mel_last'][1]:.3f} (step {s['train_mel_last'][0]})")
    if s.get("fit"):
        lines.append(f"- generator steps: {s['fit'].get('global_step')}, fit time {s['fit'].get('fit_seconds')} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--append", type=Path, help="append the summary to this markdown report")
    ap.add_argument("--min-drop", type=float, default=None, help="exit 1 if the mel-distance drop is smaller")
    args = ap.parse_args(argv)
    s = summarise(args.run_dir)
    text = to_markdown(s)
    print(text)
    if args.append:
        with open(args.append, "a") as fh:
            fh.write(text)
    if args.min_drop is not None and not s["val_mel_drop"] >= args.min_drop:
        print(f"mel-distance drop {s['val_mel_drop']:.3f} < required {args.min_drop}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
