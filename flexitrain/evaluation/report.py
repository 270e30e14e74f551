"""Aggregate per-utterance records into metrics.json, per_utterance.csv, report.md and the rate–quality plot."""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from flexitrain.metrics.rates import RateAccumulator, flexicodec_codebook_sizes
from flexitrain.metrics.wer import char_error_rate, word_error_rate

GT = "ground_truth"
SIGNAL_KEYS = ("pesq_wb", "pesq_nb", "stoi", "estoi", "si_sdr", "mel_distance", "sim", "mos")


def setting_name(threshold: float, num_quantizers: int | None) -> str:
    return f"tau{threshold:g}_q{num_quantizers if num_quantizers is not None else 'all'}"


def token_cap(generator) -> int:
    """Longest possible token in frames: the merge cap (uncapped models are reported against 8)."""
    return int(getattr(generator, "max_tokens_per_group", None) or 8)


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def codec_rate_info(generator) -> dict[str, int]:
    """What the rate metrics need from a codec: merge cap, RVQ stages and codebook sizes."""
    fsq = generator.semantic_vq
    return {"max_tokens_per_group": token_cap(generator), "n_codebooks": int(generator.n_codebooks),
            "semantic_size": int(fsq.codebook_size) ** int(getattr(fsq.fsq, "num_codebooks", 1)),
            "acoustic_size": int(generator.dac.quantizer.codebook_size)}


def group_by_setting(records: list[dict]) -> dict[str, list[dict]]:
    by_setting: dict[str, list[dict]] = {}
    for r in records:
        by_setting.setdefault(r["setting"], []).append(r)
    return by_setting


def text_errors(recs: list[dict]) -> dict[str, float]:
    """Pooled WER and CER over the records that have a transcript and a reference text ({} if none)."""
    pairs = [(r["text"], r["hypothesis"]) for r in recs if r.get("hypothesis") is not None and r.get("text")]
    if not pairs:
        return {}
    refs, hyps = map(list, zip(*pairs))
    return {"wer": word_error_rate(refs, hyps), "cer": char_error_rate(refs, hyps)}


def aggregate(records: list[dict], max_tokens_per_group: int, n_codebooks: int, semantic_size: int = 32768,
              acoustic_size: int = 4096) -> dict[str, Any]:
    """One summary per setting (pooled WER/CER, mean signal metrics, rates) plus the ground-truth row."""
    out: dict[str, Any] = {}
    for name, recs in group_by_setting(records).items():
        summary: dict[str, Any] = {"n": len(recs), **text_errors(recs)}
        for key in SIGNAL_KEYS:
            vals = [r[key] for r in recs if key in r]
            if vals:
                summary[key] = _mean(vals)
        if name != GT:
            first = recs[0]
            summary["threshold"], summary["num_quantizers"] = first["threshold"], first["num_quantizers"]
            acc = RateAccumulator(max_tokens_per_group)
            for r in recs:
                acc.update(r["token_lengths"], r["duration"])
            nq = first["num_quantizers"] if first["num_quantizers"] is not None else n_codebooks + 1
            summary["rates"] = acc.compute(flexicodec_codebook_sizes(nq, semantic_size, acoustic_size))
            summary["frame_rate"] = summary["rates"]["frame_rate"]["pooled"]
            summary["kbps"] = summary["rates"]["bitrate_with_side_bps"] / 1000
        out[name] = summary
    return out


def write_per_utterance_csv(records: list[dict], path: Path) -> None:
    cols = ["key", "setting", "threshold", "num_quantizers", "duration", "num_tokens", "frame_rate",
            *SIGNAL_KEYS, "wer", "text", "hypothesis"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, "wer": r.get("utt_wer")})


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def plot_rate_quality(summary: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    settings = [s for k, s in summary.items() if k != GT]
    panels = [("wer", "WER"), ("pesq_wb", "PESQ-WB"), ("sim", "speaker similarity"), ("mel_distance", "mel distance")]
    panels = [p for p in panels if any(p[0] in s for s in settings)]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        for nq in sorted({s["num_quantizers"] or 0 for s in settings}):
            pts = sorted((s["frame_rate"], s[key]) for s in settings if (s["num_quantizers"] or 0) == nq and key in s)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{nq or 'all'} q")
        if key in summary.get(GT, {}):
            ax.axhline(summary[GT][key], color="gray", ls="--", lw=1, label="ground truth")
        ax.set_xlabel("frame rate (tokens/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out_dir: Path, summary: dict, meta: dict, extra_sections: Sequence[str] = ()) -> Path:
    settings = sorted(((k, s) for k, s in summary.items() if k != GT),
                      key=lambda kv: (kv[1]["num_quantizers"] or 99, -kv[1]["threshold"]))
    lines = [f"# Codec evaluation: {meta.get('model', '')}", "",
             f"- model hash: `{meta.get('model_hash')}`; seed {meta.get('seed')}; {meta.get('num_utterances')} utterances "
             f"({meta.get('audio_seconds', 0):.1f} s) from `{meta.get('data')}`", ""]
    cols = ["τ", "q", "frame rate (Hz)", "kbps", "WER", "CER", "PESQ-WB", "PESQ-NB", "STOI", "SI-SDR", "mel dist",
            "SIM", "MOS"]
    keys = ["wer", "cer", "pesq_wb", "pesq_nb", "stoi", "si_sdr", "mel_distance", "sim", "mos"]
    lines += ["## Quality against frame rate", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for _, s in settings:
        lines.append("| " + " | ".join([_fmt(s["threshold"], 2), str(s["num_quantizers"] or "all"),
                                        _fmt(s["frame_rate"], 2), _fmt(s["kbps"], 3)]
                                       + [_fmt(s.get(k)) for k in keys]) + " |")
    if GT in summary:
        gt = summary[GT]
        lines.append("| ground truth | – | – | – | " + " | ".join(_fmt(gt.get(k)) for k in keys) + " |")
    # The paper's Table 5 layout: one row per threshold, semantic-only WER beside the 8-quantizer metrics.
    by_tau: dict[float, dict] = {}
    for _, s in settings:
        by_tau.setdefault(s["threshold"], {})[s["num_quantizers"]] = s
    lines += ["", "## Table 5 layout", "",
              "| τ | WER (sem. only) | WER (8 q) | PESQ | MOS | mel | SIM | frame rate | kbps (8 q) |",
              "|---|---|---|---|---|---|---|---|---|"]
    for tau in sorted(by_tau, reverse=True):
        sem, full = by_tau[tau].get(1), by_tau[tau].get(8) or max(
            by_tau[tau].values(), key=lambda s: s["num_quantizers"] or 99)
        lines.append(f"| {tau:g} | {_fmt((sem or {}).get('wer'))} | {_fmt(full.get('wer'))} | {_fmt(full.get('pesq_wb'))} "
                     f"| {_fmt(full.get('mos'))} | {_fmt(full.get('mel_distance'))} | {_fmt(full.get('sim'))} "
                     f"| {_fmt(full['frame_rate'], 2)} | {_fmt(full['kbps'])} |")
    lines += ["", "## Rates", "", "| τ | q | pooled Hz | mean ± σ (min–max) per utt. | bits/token | bps | bps with durations | token-length histogram |",
              "|---|---|---|---|---|---|---|---|"]
    for _, s in settings:
        r, fr = s["rates"], s["rates"]["frame_rate"]
        lines.append(f"| {s['threshold']:g} | {s['num_quantizers'] or 'all'} | {fr['pooled']:.3f} | {fr['mean']:.2f} ± "
                     f"{fr['std']:.2f} ({fr['min']:.2f}–{fr['max']:.2f}) | {r['bits_per_token']:.0f} | "
                     f"{r['bitrate_bps']:.1f} | {r['bitrate_with_side_bps']:.1f} | {r['token_length_histogram']} |")
    if (out_dir / "rate_quality.png").is_file():
        lines += ["", "## Rate–quality curves", "", "![rate-quality](rate_quality.png)"]
    lines += list(extra_sections)
    lines += ["", "## Evaluation config", "", "```json", json.dumps(meta.get("config", {}), indent=2), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
