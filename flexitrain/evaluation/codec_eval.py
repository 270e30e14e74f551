"""`python eval.py ckpt=... data=... thresholds=[...] num_quantizers=[...]`: quality against frame rate.

Every utterance of the chosen split is encoded once per (threshold, num_quantizers) setting, decoded and
scored; records are appended to `per_utterance.jsonl` as they are produced, so an interrupted evaluation
resumes without recomputing anything already scored.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import soundfile as sf
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from flexitrain.evaluation.loading import encode_decode, file_hash, load_codec
from flexitrain.evaluation.report import GT, codec_rate_info, aggregate, plot_rate_quality, setting_name, write_per_utterance_csv, write_report
from flexitrain.evaluation.scorers import Scorers
from flexitrain.metrics.wer import word_error_rate

log = logging.getLogger(__name__)


def _read_records(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by an interruption: recomputed
            continue
    return records


def resumable_records(out_dir: Path, fingerprint: dict) -> tuple[Path, list[dict]]:
    """`(per_utterance.jsonl path, records to keep)`. Records are reused only if they were scored with the
    same models and scoring settings (`fingerprint`, kept in eval_state.json); otherwise the old file is moved
    aside to per_utterance.<its fingerprint>.jsonl (nothing is lost) and the evaluation starts afresh."""
    path, state = out_dir / "per_utterance.jsonl", out_dir / "eval_state.json"
    key = hashlib.sha256(json.dumps(fingerprint, sort_keys=True, default=str).encode()).hexdigest()[:16]
    old = json.loads(state.read_text()).get("fingerprint") if state.is_file() else None
    if path.is_file() and old != key:
        stale = out_dir / f"per_utterance.{old or 'unknown'}.jsonl"
        log.warning("%s was scored with other models or settings: moved to %s, starting afresh", path, stale.name)
        path.replace(stale)
    state.write_text(json.dumps({"fingerprint": key, "inputs": fingerprint}, indent=2, default=str))
    return path, _read_records(path)


def append_records(sink, new: list[dict], done: set, records: list[dict]) -> int:
    """Stream new per-utterance records to the open jsonl `sink` (flushed: an interruption loses nothing
    scored) and note them as done; returns how many were written."""
    for rec in new:
        sink.write(json.dumps(rec) + "\n")
        done.add((rec["key"], rec["setting"]))
    sink.flush()
    records += new
    return len(new)


def _eval_batches(data_cfg: dict, split: str, max_utterances: int | None):
    """Yield full-length utterance batches of the chosen split (rank 0 of 1; every utterance once)."""
    dm = instantiate(data_cfg)
    dm.setup("test" if split == "test" else "validate")
    loader = dm.test_dataloader() if split == "test" else dm.val_dataloader()
    seen = 0
    for batch in loader:
        if max_utterances is not None and seen >= max_utterances:
            return
        take = batch["audio"].shape[0] if max_utterances is None else min(batch["audio"].shape[0], max_utterances - seen)
        seen += take
        yield {k: (v[:take] if isinstance(v, (torch.Tensor, list)) else v) for k, v in batch.items()}


def run_codec_eval(cfg: DictConfig | dict) -> dict[str, Any]:
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True)) if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    torch.manual_seed(int(cfg.seed))
    out_dir = Path(cfg.out_dir)
    (out_dir / "samples").mkdir(parents=True, exist_ok=True)
    generator, teacher = load_codec(cfg.ckpt, OmegaConf.to_container(cfg.teacher) if cfg.get("teacher") else None,
                                    device=cfg.device)
    sr = int(generator.sample_rate)
    spectrograms: list[tuple[str, str]] = []  # (setting, png path relative to out_dir): merge boundaries
    scorers = Scorers.from_config(OmegaConf.to_container(cfg.metrics), sr)
    settings = [(float(t), None if q in (None, "all") else int(q)) for q in cfg.num_quantizers for t in cfg.thresholds]
    model_hash = file_hash(cfg.ckpt)
    records_path, records = resumable_records(out_dir, {
        "model": model_hash, "teacher": OmegaConf.to_container(cfg.teacher) if cfg.get("teacher") else None,
        "metrics": OmegaConf.to_container(cfg.metrics), "seed": int(cfg.seed)})
    done = {(r["key"], r["setting"]) for r in records}
    data_cfg = OmegaConf.to_container(cfg.data)
    data_cfg.update(num_workers=0, eval_crop_seconds=None, max_batch_size=int(cfg.batch_size))
    start, n_new, n_utts, seconds = time.time(), 0, 0, 0.0
    from rich.progress import Progress

    with Progress(transient=False) as progress, open(records_path, "a") as sink:
        task = progress.add_task("evaluating", total=cfg.max_utterances)
        for batch in _eval_batches(data_cfg, cfg.split, cfg.max_utterances):
            audio, lengths = batch["audio"].to(cfg.device), batch["lengths"].to(cfg.device)
            keys, texts = batch["keys"], batch.get("texts") or [""] * len(batch["keys"])
            refs = [audio[i, 0, : int(lengths[i])].float().cpu().numpy() for i in range(len(keys))]
            n_utts += len(keys)
            seconds += float(lengths.sum()) / sr
            new: list[dict] = []
            if any((k, GT) not in done for k in keys):
                hyps, mos = scorers.transcribe(refs), scorers.mos_scores(refs)
                for i, k in enumerate(keys):
                    new.append({"key": k, "setting": GT, "text": texts[i], "duration": len(refs[i]) / sr,
                                **({"hypothesis": hyps[i], "utt_wer": word_error_rate(texts[i], hyps[i])} if hyps else {}),
                                **({"mos": mos[i]} if mos else {})})
            semantic = None
            for tau, nq in settings:
                name = setting_name(tau, nq)
                todo = [i for i, k in enumerate(keys) if (k, name) not in done]
                if not todo:
                    continue
                if semantic is None:
                    with torch.no_grad():
                        semantic = teacher(audio, lengths)
                tokens, recon, recon_lengths = encode_decode(generator, teacher, audio, lengths, tau, nq, semantic)
                degs = [recon[i, 0, : int(lengths[i])].float().cpu().numpy() for i in todo]
                sub_refs = [refs[i] for i in todo]
                quality = scorers.quality_batch(sub_refs, degs)
                hyps, sims, mos = scorers.transcribe(degs), scorers.similarity(sub_refs, degs), scorers.mos_scores(degs)
                tl = tokens.token_lengths.cpu()
                for j, i in enumerate(todo):
                    lens = tl[i][tl[i] > 0].tolist()
                    rec = {"key": keys[i], "setting": name, "threshold": tau, "num_quantizers": nq, "text": texts[i],
                           "duration": len(refs[i]) / sr, "num_tokens": len(lens), "token_lengths": lens,
                           "frame_rate": len(lens) / (len(refs[i]) / sr), **quality[j]}
                    if hyps:
                        rec.update(hypothesis=hyps[j], utt_wer=word_error_rate(texts[i], hyps[j]) if texts[i] else None)
                    if sims:
                        rec["sim"] = float(sims[j])
                    if mos:
                        rec["mos"] = mos[j]
                    new.append(rec)
                    if n_utts - len(keys) + i < int(cfg.num_audio_samples):
                        sf.write(out_dir / "samples" / f"{keys[i]}_{name}.wav", degs[j], sr)
                    if n_utts - len(keys) + i < int(cfg.get("num_spectrograms", 1)):
                        spectrograms.append(_merge_spectrogram(out_dir, keys[i], name, tau, refs[i], lens, sr,
                                                               int(generator.hop_length)))
            for i, k in enumerate(keys[: max(0, int(cfg.num_audio_samples) - (n_utts - len(keys)))]):
                sf.write(out_dir / "samples" / f"{k}_reference.wav", refs[i], sr)
            n_new += append_records(sink, new, done, records)
            progress.update(task, advance=len(keys))
    scorers.close()
    if not records:
        raise RuntimeError(f"no utterances evaluated: is the {cfg.split} split of {cfg.data} empty?")
    summary = aggregate(records, **codec_rate_info(generator))
    meta = {"model": str(cfg.ckpt), "model_hash": model_hash, "seed": int(cfg.seed),
            "data": cfg.data.get(f"{cfg.split}_shards"), "num_utterances": n_utts, "audio_seconds": seconds,
            "new_records": n_new, "eval_seconds": round(time.time() - start, 2),
            "config": OmegaConf.to_container(cfg)}
    (out_dir / "metrics.json").write_text(json.dumps({"meta": meta, "settings": summary}, indent=2))
    write_per_utterance_csv(records, out_dir / "per_utterance.csv")
    plot_rate_quality(summary, out_dir / "rate_quality.png")
    extra = teacher_section(teacher, cfg) + spectrogram_section(out_dir, spectrograms) + list(cfg.get("extra_sections") or [])
    report = write_report(out_dir, summary, meta, extra_sections=extra)
    log.info("report: %s (%d new records, %.1f s)", report, n_new, meta["eval_seconds"])
    return {"summary": summary, "meta": meta, "report": str(report)}


def _merge_spectrogram(out_dir: Path, key: str, name: str, tau: float, audio, token_lengths: list[int], sr: int,
                       hop: int) -> tuple[str, str]:
    """The reference's spectrogram with the token boundaries of one setting (merged silences / steady sounds show
    as long spans without lines)."""
    from flexitrain.callbacks.codec_eval import plot_merge_spectrogram

    rel = f"spectrograms/{key.replace('/', '_')}_{name}.png"
    (out_dir / "spectrograms").mkdir(exist_ok=True)
    rate = len(token_lengths) / (len(audio) / sr)
    plot_merge_spectrogram(audio, token_lengths, sr, hop, out_dir / rel,
                           title=f"{key}  τ = {tau:g}: {len(token_lengths)} tokens, {rate:.2f} tokens/s")
    return name, rel


def spectrogram_section(out_dir: Path, spectrograms: list[tuple[str, str]]) -> list[str]:
    if not spectrograms:  # a resumed evaluation: the ones drawn before are still there
        spectrograms = [(p.stem, f"spectrograms/{p.name}") for p in sorted((out_dir / "spectrograms").glob("*.png"))]
    if not spectrograms:
        return []
    lines = ["", "## Merge boundaries", "",
             "Spectrogram of a test utterance with a line at every token boundary: merged frames (silences, steady "
             "sounds) are the spans without lines; lower τ merges more.", ""]
    return lines + [f"![{name}]({rel})" for name, rel in spectrograms]


def teacher_section(teacher, cfg) -> list[str]:
    """Which semantic teacher set the merging; a warning when WER is scored by Whisper and the teacher is Whisper."""
    name = type(teacher).__name__
    lines = ["", "## Semantic teacher", "", f"- `{name}`" + (f" ({teacher.model_dir})" if hasattr(teacher, "model_dir")
                                                          else "")]
    asr = (cfg.get("metrics") or {}).get("asr") or {}
    if name == "WhisperCT2Teacher" and asr.get("enabled", True) and asr.get("backend", "faster_whisper") in (
            "faster_whisper", "openai_whisper"):
        lines.append("- **WER is scored with a Whisper model too** (`metrics.asr`: "
                     f"{asr.get('backend', 'faster_whisper')}, {asr.get('path') or 'the bundled tiny.en'}), the same "
                     "model family as this teacher (with the defaults, the very same tiny.en): the codec was trained "
                     "to keep what that Whisper encoder represents, so this WER is not an independent measure of "
                     "intelligibility. Use another ASR (`metrics.asr.backend=hf`) for an independent one.")
    return lines
