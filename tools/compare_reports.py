#!/usr/bin/env python
"""Put several evaluation reports (eval.py output directories) side by side: one table and overlaid curves.

    python tools/compare_reports.py reports/a reports/b [--names A B] --out reports/a_vs_b
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

KEYS = [("frame_rate", "Hz"), ("kbps", "kbps"), ("wer", "WER"), ("pesq_wb", "PESQ-WB"), ("stoi", "STOI"),
        ("mel_distance", "mel"), ("sim", "SIM"), ("mos", "MOS")]


def load(report_dir: Path) -> dict:
    path = report_dir / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {report_dir} an eval.py report directory?")
    return json.loads(path.read_text())


def fmt(v) -> str:
    return "–" if v is None or (isinstance(v, float) and not math.isfinite(v)) else (f"{v:.3f}" if isinstance(v, float) else str(v))


def table(reports: dict[str, dict]) -> str:
    lines = ["| report | τ | q | " + " | ".join(label for _, label in KEYS) + " |", "|---|---|---|" + "---|" * len(KEYS)]
    for name, rep in reports.items():
        settings = rep["settings"]
        for key in sorted((k for k in settings if k != "ground_truth"),
                          key=lambda k: (settings[k]["num_quantizers"] or 99, -settings[k]["threshold"])):
            s = settings[key]
            lines.append(f"| {name} | {s['threshold']:g} | {s['num_quantizers'] or 'all'} | "
                         + " | ".join(fmt(s.get(k)) for k, _ in KEYS) + " |")
        if "ground_truth" in settings:
            gt = settings["ground_truth"]
            lines.append(f"| {name} | ground truth | – | " + " | ".join(fmt(gt.get(k)) for k, _ in KEYS) + " |")
    return "\n".join(lines)


def plot(reports: dict[str, dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = [k for k in ("wer", "pesq_wb", "sim", "mel_distance")
              if any(k in s for r in reports.values() for n, s in r["settings"].items() if n != "ground_truth")]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, key in zip(axes[0], panels):
        for name, rep in reports.items():
            groups: dict = {}
            for n, s in rep["settings"].items():
                if n != "ground_truth" and key in s:
                    groups.setdefault(s["num_quantizers"], []).append((s["frame_rate"], s[key]))
            for nq, pts in sorted(groups.items(), key=lambda kv: kv[0] or 99):
                ax.plot(*zip(*sorted(pts)), marker="o", label=f"{name} ({nq or 'all'} q)")
        ax.set_xlabel("frame rate (tokens/s)")
        ax.set_ylabel(dict(KEYS).get(key, key))
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path)
    ap.add_argument("--names", nargs="+")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    names = args.names or [p.name for p in args.reports]
    if len(names) != len(args.reports):
        ap.error("--names needs one name per report")
    reports = {n: load(p) for n, p in zip(names, args.reports)}
    args.out.mkdir(parents=True, exist_ok=True)
    md = ["# Report comparison", "", table(reports)]
    if plot(reports, args.out / "comparison.png"):
        md += ["", "![comparison](comparison.png)"]
    (args.out / "comparison.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
