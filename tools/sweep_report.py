#!/usr/bin/env python
"""Collect a Hydra multirun directory into one table (markdown + CSV) and a plot, failed/unfinished trials marked.

    python tools/sweep_report.py runs/codec_12hz/sweep_tau_lower [--out DIR] [--metric val/mel_distance]

A trial is any directory under the sweep holding `.hydra/overrides.yaml`. Per trial: its overrides (the swept
ones become columns), `summary.json` (written by train.py when fit ends: global step, final metrics), the latest
`eval/step_*/metrics.json` (CodecEvalCallback) or `eval/metrics.json` (eval.py), flattened to
`eval/<setting>/<metric>`. Status: `finished` (summary.json), `failed` (submitit recorded an error for the job,
or its log shows a traceback), `unfinished` (anything else: running, preempted and waiting, killed; the last
step comes from the CSV log or the newest checkpoint). Writes <out>/sweep.md, sweep.csv, sweep.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import pickle
import sys
from pathlib import Path

import yaml

PRIORITY = ("val/mel_distance", "val/", "eval/", "test/", "train/loss")
EVAL_KEYS = ("mel_distance", "pesq_wb", "stoi", "si_sdr", "wer", "sim", "mos", "frame_rate", "kbps")


def parse_overrides(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        key, _, value = str(line).partition("=")
        out[key.lstrip("+~")] = value
    return out


def latest_eval(run_dir: Path) -> dict[str, float]:
    steps = sorted(run_dir.glob("eval/step_*/metrics.json"))
    path = steps[-1] if steps else run_dir / "eval" / "metrics.json"
    if not path.is_file():
        return {}
    try:
        settings = json.loads(path.read_text()).get("settings", {})
    except (json.JSONDecodeError, AttributeError):
        return {}
    return {f"eval/{name}/{k}": float(v) for name, row in settings.items() if isinstance(row, dict)
            for k, v in row.items() if k in EVAL_KEYS and isinstance(v, (int, float))}


def last_logged_step(run_dir: Path) -> int | None:
    path = run_dir / "csv" / "metrics.csv"
    if path.is_file():
        with open(path) as fh:
            steps = [int(float(r["step"])) for r in csv.DictReader(fh) if r.get("step") not in (None, "")]
        if steps:
            return max(steps)
    try:
        from flexitrain.cluster.resume import checkpoint_step, newest_checkpoint

        newest = newest_checkpoint(run_dir / "checkpoints", run_dir)
        return checkpoint_step(newest) if newest else None
    except ImportError:
        return None


def submitit_results(sweep_dir: Path) -> dict[int, dict]:
    """Job number -> {"state": "success"|"error", "error": str, "overrides": [...]} from submitit's pickles."""
    out: dict[int, dict] = {}
    for submitted in sweep_dir.glob(".submitit/*/*_submitted.pkl"):
        try:
            with open(submitted, "rb") as fh:
                args = pickle.load(fh).args  # (overrides, "hydra.sweep.dir", job num, job id, singleton state)
            num, overrides = int(args[2]), list(args[0])
        except Exception:
            continue
        entry = out.setdefault(num, {"overrides": overrides})
        for result in submitted.parent.glob("*_result.pkl"):
            try:
                with open(result, "rb") as fh:
                    state, payload = pickle.load(fh)[:2]
            except Exception:
                continue
            entry["state"] = state
            if state == "error":
                entry["error"] = str(payload).strip().splitlines()[-1] if str(payload).strip() else "error"
    return out


def _traceback_in_logs(trial: Path) -> str | None:
    for log in [*trial.glob("*.log"), *trial.glob("*.err")]:
        text = log.read_text(errors="replace")
        if "Traceback (most recent call last)" in text or "Error executing job" in text:
            return text.strip().splitlines()[-1][:200]
    return None


def collect(sweep_dir: Path) -> list[dict]:
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"{sweep_dir} is not a directory")
    jobs = submitit_results(sweep_dir)
    trials, seen = [], set()
    for ov in sorted(sweep_dir.rglob(".hydra/overrides.yaml")):
        trial = ov.parent.parent
        if ".submitit" in trial.parts:
            continue
        hydra_cfg = yaml.safe_load((trial / ".hydra" / "hydra.yaml").read_text()) if (trial / ".hydra" / "hydra.yaml").is_file() else {}
        num = (hydra_cfg or {}).get("hydra", {}).get("job", {}).get("num")
        row = {"trial": str(trial.relative_to(sweep_dir)), "num": num, "params": parse_overrides(yaml.safe_load(ov.read_text()) or [])}
        run_dir = trial
        resolved = trial / "config.yaml"
        if resolved.is_file():
            out_dir = ((yaml.safe_load(resolved.read_text()) or {}).get("paths") or {}).get("output_dir")
            if out_dir and Path(out_dir).is_absolute() and Path(out_dir).is_dir():
                run_dir = Path(out_dir)
        row["run_dir"] = str(run_dir)
        row["metrics"] = {}
        summary = run_dir / "summary.json"
        job = jobs.get(num) if num is not None else None
        if summary.is_file():
            data = json.loads(summary.read_text())
            row["status"], row["global_step"] = "finished", data.get("global_step")
            row["metrics"].update({k: float(v) for k, v in (data.get("metrics") or {}).items()
                                   if isinstance(v, (int, float))})
            row["metrics"].update({k: float(v) for k, v in (data.get("test_metrics") or {}).items()
                                   if isinstance(v, (int, float))})
        else:
            error = (job or {}).get("error") if (job or {}).get("state") == "error" else _traceback_in_logs(trial)
            row["status"] = "failed" if error else "unfinished"
            row["error"] = error
            row["global_step"] = last_logged_step(run_dir)
        row["metrics"].update(latest_eval(run_dir))
        trials.append(row)
        seen.add(num)
    for num, job in sorted(jobs.items()):  # jobs that died before Hydra made their directory
        if num not in seen:
            trials.append({"trial": f"job {num}", "num": num, "params": parse_overrides(job["overrides"]),
                           "run_dir": "", "metrics": {}, "global_step": None,
                           "status": "failed" if job.get("state") == "error" else "unfinished",
                           "error": job.get("error")})
    trials.sort(key=lambda r: (r["num"] if isinstance(r["num"], int) else 1 << 30, r["trial"]))
    return trials


def swept_keys(trials: list[dict]) -> list[str]:
    keys = sorted({k for t in trials for k in t["params"]})
    return [k for k in keys if len({t["params"].get(k) for t in trials}) > 1] or keys[:1]


def metric_columns(trials: list[dict], first: str | None, limit: int) -> list[str]:
    names = sorted({k for t in trials for k in t["metrics"]})
    rank = lambda k: next((i for i, p in enumerate(PRIORITY) if k.startswith(p)), len(PRIORITY))  # noqa: E731
    ordered = sorted(names, key=lambda k: (k != first, rank(k), k))
    return ordered[:limit]


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def write_table(trials: list[dict], out: Path, metric: str | None, limit: int = 8, title: str = "") -> tuple[Path, Path]:
    params = swept_keys(trials)
    all_metrics = sorted({k for t in trials for k in t["metrics"]})
    shown = metric_columns(trials, metric, limit)
    csv_path, md_path = out / "sweep.csv", out / "sweep.md"
    with open(csv_path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["trial", *params, "status", "global_step", *all_metrics, "error", "run_dir"])
        for t in trials:
            w.writerow([t["trial"], *(t["params"].get(p, "") for p in params), t["status"], t.get("global_step") or "",
                        *(t["metrics"].get(m, "") for m in all_metrics), t.get("error") or "", t["run_dir"]])
    counts = {s: sum(t["status"] == s for t in trials) for s in ("finished", "failed", "unfinished")}
    lines = [f"# Sweep report: {title or out.name}", "",
             f"{len(trials)} trials: {counts['finished']} finished, {counts['failed']} failed, "
             f"{counts['unfinished']} unfinished.", "",
             "| " + " | ".join(["trial", *params, "status", "step", *shown]) + " |",
             "|" + "---|" * (3 + len(params) + len(shown))]
    for t in trials:
        status = t["status"] if t["status"] == "finished" else f"**{t['status']}**"
        lines.append("| " + " | ".join([t["trial"], *(t["params"].get(p, "") for p in params), status,
                                         _fmt(t.get("global_step")), *(_fmt(t["metrics"].get(m)) for m in shown)]) + " |")
    errors = [t for t in trials if t.get("error")]
    if errors:
        lines += ["", "Errors:", ""] + [f"- {t['trial']}: `{t['error']}`" for t in errors]
    md_path.write_text("\n".join(lines) + "\n")
    return md_path, csv_path


def plot(trials: list[dict], out: Path, metric: str | None, title: str = "") -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot", file=sys.stderr)
        return None
    if metric is None:
        return None
    params = swept_keys(trials)
    fig, ax = plt.subplots(figsize=(7, 4))
    labels = [",".join(f"{p.split('.')[-1]}={t['params'].get(p, '')}" for p in params) or t["trial"] for t in trials]
    values = [t["metrics"].get(metric) if t["status"] == "finished" else None for t in trials]
    xs = list(range(len(trials)))
    ax.bar([x for x, v in zip(xs, values) if v is not None], [v for v in values if v is not None], color="tab:blue")
    top = max([v for v in values if v is not None], default=1.0)
    for x, t, v in zip(xs, trials, values):
        if v is None:  # failed or unfinished: a labelled gap
            ax.text(x, 0.02 * top, t["status"], rotation=90, ha="center", va="bottom",
                    color="tab:red" if t["status"] == "failed" else "tab:orange")
    ax.set_xticks(xs, labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_title(f"{title or out.name}: {metric}", fontsize=10)
    fig.tight_layout()
    path = out / "sweep.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("sweep_dir", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="output directory (default: the sweep directory)")
    ap.add_argument("--metric", default=None, help="metric to plot and list first (default: the first of "
                    "val/mel_distance, val/*, eval/*, train/loss* found)")
    ap.add_argument("--columns", type=int, default=8, help="metric columns in the markdown table")
    args = ap.parse_args(argv)
    trials = collect(args.sweep_dir)
    if not trials:
        print(f"no trials (no .hydra/overrides.yaml) under {args.sweep_dir}", file=sys.stderr)
        return 1
    out = args.out or args.sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    metric = args.metric or next(iter(metric_columns(trials, None, 1)), None)
    title = args.sweep_dir.resolve().name
    md, csv_path = write_table(trials, out, metric, args.columns, title)
    png = plot(trials, out, metric, title)
    print(md.read_text())
    print(f"wrote {md}, {csv_path}" + (f", {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
