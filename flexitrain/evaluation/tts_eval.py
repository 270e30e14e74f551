"""`python eval.py --config-name eval_tts ar=... nar=... vocoder=...`: zero-shot TTS against frame rate.

Each (text, prompt) pair is synthesised once per configured frame rate and scored: WER/CER of an ASR
transcript against the text, speaker similarity of the output to the prompt, MOS, the measured frame rate
(generated tokens per second of generated speech) and the real-time factor (whole pipeline and per stage).
Pairs come from a JSON-lines file (`items`: text, prompt_wav, prompt_text, optional id) or are built from a
corpus split as cross-sentence pairs: every utterance's text is spoken in the voice of another utterance of the
same speaker (its audio is then the ground-truth row). Records stream to `per_utterance.jsonl` so an
interrupted evaluation resumes; the report has the codec evaluation's layout (metrics.json, per_utterance.csv,
report.md).
"""
from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from omegaconf import DictConfig, OmegaConf

from flexitrain.audio.resample import resample
from flexitrain.evaluation.codec_eval import _eval_batches, append_records, resumable_records
from flexitrain.evaluation.loading import file_hash
from flexitrain.evaluation.report import GT, _fmt, group_by_setting, text_errors
from flexitrain.evaluation.scorers import Scorers
from flexitrain.metrics.wer import word_error_rate
from flexitrain.tts.pipeline import read_prompt

log = logging.getLogger(__name__)
OUT_RATE = 24000


def setting_name(frame_rate: float) -> str:
    return f"fr{frame_rate:g}"


# ------------------------------------------------------------------ items
def corpus_pairs(cfg, out_dir: Path) -> list[dict]:
    """Cross-sentence pairs from a corpus split; prompts (and targets, for the ground-truth row) written as wavs."""
    data_cfg = OmegaConf.to_container(cfg.data)
    data_cfg.update(num_workers=0, eval_crop_seconds=None, max_batch_size=8)
    utts = []
    for batch in _eval_batches(data_cfg, cfg.split, None):
        sr = int(data_cfg.get("sample_rate", 16000))
        for i, key in enumerate(batch["keys"]):
            utts.append({"key": key, "text": (batch.get("texts") or [""] * len(batch["keys"]))[i],
                         "speaker": (batch.get("speakers") or [""] * len(batch["keys"]))[i],
                         "audio": batch["audio"][i, 0, : int(batch["lengths"][i])].numpy(), "sr": sr})
    by_speaker: dict[str, list[dict]] = {}
    for u in utts:
        by_speaker.setdefault(u["speaker"], []).append(u)
    folder = out_dir / "prompts"
    folder.mkdir(parents=True, exist_ok=True)
    pairs = []
    for u in utts:
        same = by_speaker[u["speaker"]]
        at = same.index(u)
        others = [o for o in same[at + 1:] + same[:at] if o["text"] != u["text"]]
        if not others or not u["text"]:
            continue  # no other sentence in this voice to prompt with, or nothing to say
        prompt = others[0]
        p_path, t_path = folder / f"{prompt['key']}.wav", folder / f"{u['key']}.target.wav"
        if not p_path.is_file():
            sf.write(p_path, prompt["audio"], prompt["sr"])
        if not t_path.is_file():
            sf.write(t_path, u["audio"], u["sr"])
        pairs.append({"id": u["key"], "text": u["text"], "prompt_wav": str(p_path), "prompt_text": prompt["text"],
                      "target_wav": str(t_path)})
        if cfg.max_utterances is not None and len(pairs) >= int(cfg.max_utterances):
            break
    if not pairs:
        raise RuntimeError(f"no cross-sentence pairs in the {cfg.split} split: it needs transcripts and two or more "
                           "utterances per speaker (or give items=FILE.jsonl)")
    return pairs


def read_items(path: str | Path, max_utterances: int | None) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"items={str(path)!r} does not exist")
    items = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if not row.get("text") or not row.get("prompt_wav"):
            raise ValueError(f"{path}:{n}: every item needs text and prompt_wav")
        for k in ("prompt_wav", "target_wav"):
            if row.get(k) and not Path(row[k]).is_absolute():
                row[k] = str(path.parent / row[k])
        row.setdefault("id", f"item{n:05d}")
        items.append(row)
    return items[: max_utterances] if max_utterances is not None else items


def _load(path: str, rate: int) -> np.ndarray:
    wav, sr = read_prompt(path)
    return resample(wav[None], sr, rate)[0].numpy() if sr != rate else wav.numpy()


# ------------------------------------------------------------------ aggregation and report
def aggregate_tts(records: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, recs in group_by_setting(records).items():
        s: dict[str, Any] = {"n": len(recs), **text_errors(recs)}  # every item has a text (read_items checks)
        for key in ("sim", "mos"):
            scored = [r[key] for r in recs if r.get(key) is not None]
            vals = [v for v in scored if math.isfinite(v)]
            if vals:
                s[key] = float(np.mean(vals))
            if len(vals) < len(scored):  # e.g. no voiced frame for the speaker encoder: counted, not averaged
                s[f"{key}_unscored"] = len(scored) - len(vals)
        if name != GT:
            seconds = sum(r["duration"] for r in recs)
            s["target_frame_rate"], s["threshold"] = recs[0]["target_frame_rate"], recs[0]["threshold"]
            s["frame_rate"] = sum(r["num_tokens"] for r in recs) / seconds if seconds else float("nan")
            s["audio_seconds"] = seconds
            s["rtf"] = sum(r["timings"]["total"] for r in recs) / seconds if seconds else float("nan")
            for stage in ("ar", "nar", "vocoder"):
                s[f"rtf_{stage}"] = sum(r["timings"][stage] for r in recs) / seconds if seconds else float("nan")
            s["stopped_by_eos"] = float(np.mean([bool(r["stopped_by_eos"]) for r in recs]))
        out[name] = s
    return out


def write_tts_per_utterance_csv(records: list[dict], path: Path) -> None:
    import csv

    cols = ["key", "setting", "target_frame_rate", "threshold", "duration", "num_tokens", "frame_rate", "rtf",
            "stopped_by_eos", "wer", "sim", "mos", "text", "hypothesis", "prompt_wav"]
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in records:
            w.writerow({**r, "wer": r.get("utt_wer"), "rtf": r.get("timings", {}).get("total", 0) / r["duration"]
                        if r.get("duration") and r["setting"] != GT else None})


def write_tts_report(out_dir: Path, summary: dict, meta: dict) -> Path:
    settings = sorted(((k, s) for k, s in summary.items() if k != GT), key=lambda kv: -kv[1]["target_frame_rate"])
    lines = ["# TTS evaluation", "",
             f"- AR `{meta['ar']}`, NAR `{meta['nar']}`, vocoder `{meta['vocoder']}` (hashes {meta['hashes']}); "
             f"seed {meta['seed']}", f"- {meta['num_items']} (text, prompt) pairs from `{meta['items']}`; "
             f"{meta['device']}", "",
             "## Quality and speed against frame rate", "",
             "| frame rate (Hz) | τ | measured (Hz) | WER | CER | SIM to prompt | MOS | RTF | RTF AR / NAR / voc. | EOS stop | audio (s) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for _, s in settings:
        lines.append(f"| {s['target_frame_rate']:g} | {s['threshold']:g} | {_fmt(s['frame_rate'], 2)} | {_fmt(s.get('wer'))} "
                     f"| {_fmt(s.get('cer'))} | {_fmt(s.get('sim'))} | {_fmt(s.get('mos'))} | {_fmt(s['rtf'])} "
                     f"| {_fmt(s['rtf_ar'])} / {_fmt(s['rtf_nar'])} / {_fmt(s['rtf_vocoder'])} "
                     f"| {s['stopped_by_eos']:.0%} | {s['audio_seconds']:.1f} |")
    if GT in summary:
        g = summary[GT]
        lines.append(f"| ground truth | – | – | {_fmt(g.get('wer'))} | {_fmt(g.get('cer'))} | {_fmt(g.get('sim'))} "
                     f"| {_fmt(g.get('mos'))} | – | – | – | – |")
    lines += ["", "SIM: speaker-embedding cosine between the output and its prompt (ground truth: the target utterance "
              "and the same prompt). Measured frame rate: generated tokens / generated seconds. RTF: synthesis "
              "seconds / audio seconds (prompt encoding included in the total).", "",
              "## Evaluation config", "", "```json", json.dumps(meta.get("config", {}), indent=2), "```", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    return path


# ------------------------------------------------------------------ run
def build_pipeline(cfg):
    from flexitrain.models.tts.sampling import SamplingConfig
    from flexitrain.tts.pipeline import NARConfig, TTSPipeline

    frame_rates = {float(k): float(v) for k, v in cfg.frame_rate_thresholds.items()}
    return TTSPipeline.from_checkpoints(
        cfg.ar, cfg.nar, cfg.vocoder, codec=cfg.get("codec"),
        teacher=OmegaConf.to_container(cfg.teacher) if cfg.get("teacher") else None, frame_rates=frame_rates,
        sampling=SamplingConfig(**OmegaConf.to_container(cfg.sampling)), nar_config=NARConfig(**cfg.nar_sampling),
        device=cfg.device, min_prompt_pace=float(cfg.get("min_prompt_pace", 0.0)))


def run_tts_eval(cfg: DictConfig | dict) -> dict[str, Any]:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    out_dir = Path(cfg.out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    tts = build_pipeline(cfg)
    items = read_items(cfg["items"], cfg.max_utterances) if cfg.get("items") else corpus_pairs(cfg, out_dir)
    scorers = Scorers.from_config({**OmegaConf.to_container(cfg.metrics), "quality": []}, OUT_RATE)
    hashes = {k: file_hash(cfg[k]) for k in ("ar", "nar", "vocoder")}  # once: released checkpoints are ~1 GB
    records_path, records = resumable_records(out_dir, {
        **hashes, "codec": file_hash(cfg.codec) if cfg.get("codec") else None,
        **{k: OmegaConf.to_container(cfg[k]) if isinstance(cfg.get(k), DictConfig) else cfg.get(k)
           for k in ("teacher", "metrics", "sampling", "nar_sampling", "frame_rate_thresholds", "min_prompt_pace", "seed",
                     "items", "split")}})
    done = {(r["key"], r["setting"]) for r in records}
    start, n_new = time.time(), 0
    with open(records_path, "a") as sink:
        for n, item in enumerate(items):
            prompt = _load(item["prompt_wav"], OUT_RATE)
            new: list[dict] = []
            if item.get("target_wav") and (item["id"], GT) not in done:
                target = _load(item["target_wav"], OUT_RATE)
                new.append(_score(scorers, target, prompt, item, {"key": item["id"], "setting": GT, "text": item["text"],
                                                                  "duration": len(target) / OUT_RATE}))
            for fr in cfg.frame_rates:
                name = setting_name(float(fr))
                if (item["id"], name) in done:
                    continue
                try:
                    r = tts.synthesize(item["text"], item["prompt_wav"], item.get("prompt_text", ""),
                                       frame_rate=float(fr), language=item.get("language", "en"),
                                       seed=int(cfg.seed) + n)
                except RuntimeError as e:  # e.g. EOS first: counted in the report, the others go on
                    log.warning("%s at %g Hz: %s", item["id"], fr, e)
                    new.append({"key": item["id"], "setting": name, "failed": str(e)})
                    continue
                audio = r.audio.numpy()
                if n < int(cfg.num_audio_samples):
                    sf.write(out_dir / "samples" / f"{item['id']}_{name}.wav", audio, OUT_RATE)
                new.append(_score(scorers, audio, prompt, item, {
                    "key": item["id"], "setting": name, "text": item["text"], "prompt_wav": item["prompt_wav"],
                    "target_frame_rate": float(fr), "threshold": r.threshold, "duration": r.seconds,
                    "num_tokens": int(r.tokens.numel()), "token_lengths": r.durations.tolist(),
                    "frame_rate": r.frame_rate, "frame_rate_with_prompt": r.frame_rate_with_prompt,
                    "stopped_by_eos": r.stopped_by_eos, "timings": r.timings}))
            n_new += append_records(sink, new, done, records)
    scorers.close()
    failed = [r for r in records if r.get("failed")]
    scored = [r for r in records if not r.get("failed")]
    if not any(r["setting"] != GT for r in scored):
        raise RuntimeError(f"no utterance was synthesised ({len(failed)} failed): see the log")
    summary = aggregate_tts(scored)
    for r in failed:
        summary.setdefault(r["setting"], {}).setdefault("failed", 0)
        summary[r["setting"]]["failed"] += 1
    meta = {"ar": str(cfg.ar), "nar": str(cfg.nar), "vocoder": str(cfg.vocoder),
            "hashes": hashes, "seed": int(cfg.seed),
            "items": cfg.get("items") or f"{cfg.data.get(f'{cfg.split}_shards')} (cross-sentence pairs)",
            "num_items": len(items), "failed": len(failed), "device": cfg.device, "new_records": n_new,
            "eval_seconds": round(time.time() - start, 2), "config": OmegaConf.to_container(cfg)}
    (out_dir / "metrics.json").write_text(json.dumps({"meta": meta, "settings": summary}, indent=2))
    write_tts_per_utterance_csv(scored, out_dir / "per_utterance.csv")
    report = write_tts_report(out_dir, summary, meta)
    log.info("report: %s (%d new records, %.1f s)", report, n_new, meta["eval_seconds"])
    return {"summary": summary, "meta": meta, "report": str(report)}


def _score(scorers: Scorers, audio: np.ndarray, prompt: np.ndarray, item: dict, rec: dict) -> dict:
    hyps = scorers.transcribe([audio])
    if hyps is not None:
        rec.update(hypothesis=hyps[0], utt_wer=word_error_rate(item["text"], hyps[0]))
    sims = scorers.similarity([prompt], [audio])
    if sims is not None:
        rec["sim"] = float(sims[0])
    mos = scorers.mos_scores([audio])
    if mos is not None:
        rec["mos"] = float(mos[0])
    return rec
