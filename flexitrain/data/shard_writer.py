"""Write speech corpora as WebDataset tar shards of FLAC + JSON, with an index.

Layout written under ``out_dir``::

    shard-000000.tar, shard-000001.tar, ...   each sample: <key>.flac + <key>.json
    index.json                                counts and durations per shard, skip reasons

``index.json`` is written last, so its presence marks a complete build. Every shard is written
under a temporary name and renamed when complete, so a crash never leaves a half shard that
looks whole. The output does not depend on the number of workers: items are cut into fixed
chunks of ``max_samples_per_shard`` and shard numbers follow chunk order.

Inputs: a folder in LibriSpeech layout (``*.trans.txt`` next to the audio) or a JSONL/TSV
manifest with ``path``, ``text``, ``speaker``, ``language`` (and optional ``id`` plus any
extra fields, kept in the sample's JSON).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import multiprocessing as mp
import os
import random
import re
import sys
import tarfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import soundfile as sf
import soxr

INDEX_VERSION = 1
INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-{:06d}.tar"
AUDIO_EXTENSIONS = (".flac", ".wav", ".ogg", ".opus", ".mp3")
MAX_SKIP_EXAMPLES = 20  # per build, kept in index.json to explain skip counts


# ----------------------------------------------------------------------------- items


@dataclass
class Utterance:
    """One input utterance before encoding. ``extra`` goes into the sample's JSON as is."""

    id: str
    path: str
    text: str = ""
    speaker: str = "unknown"
    language: str = "en"
    extra: dict[str, Any] = field(default_factory=dict)


_KEY_BAD_CHARS = re.compile(r"[^A-Za-z0-9_\-+]")


def sanitize_key(name: str) -> str:
    """WebDataset splits a member name at its first dot, so keys must have no dots or slashes."""
    key = _KEY_BAD_CHARS.sub("_", name).strip("_")
    if not key:
        raise ValueError(f"cannot make a sample key from {name!r}")
    return key


def scan_librispeech(root: str | Path, language: str = "en",
                     require_text: bool = True) -> tuple[list[Utterance], Counter, list[dict]]:
    """Find audio files and ``*.trans.txt`` transcripts under ``root`` (LibriSpeech layout).

    Returns (utterances sorted by id, skip counts, skip examples). An audio file with no
    transcript line is skipped as ``missing_transcript`` unless ``require_text`` is False;
    a transcript line with no audio file is counted as ``missing_audio``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder not found: {root}")
    transcripts: dict[str, tuple[str, Path]] = {}
    for trans in sorted(root.rglob("*.trans.txt")):
        for line in trans.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if line:
                utt_id, _, text = line.partition(" ")
                transcripts[utt_id] = (text.strip(), trans.parent)
    audio = {p.stem: p for p in sorted(root.rglob("*"))
             if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file()}
    if not audio and not transcripts:
        raise FileNotFoundError(f"no audio files ({', '.join(AUDIO_EXTENSIONS)}) under {root}")

    skipped: Counter = Counter()
    examples: list[dict] = []
    items = []
    for utt_id in sorted(set(audio) | set(transcripts)):
        if utt_id not in audio:
            _note_skip(skipped, examples, "missing_audio", utt_id, "transcript line without audio file")
            continue
        path = audio[utt_id]
        if utt_id not in transcripts and require_text:
            _note_skip(skipped, examples, "missing_transcript", utt_id, str(path))
            continue
        text = transcripts.get(utt_id, ("", None))[0]
        rel = path.relative_to(root)
        parts = utt_id.split("-")
        # LibriSpeech ids are speaker-chapter-utterance; otherwise use the speaker folder.
        if len(parts) == 3 and all(p.isdigit() for p in parts):
            speaker, extra = parts[0], {"chapter": parts[1]}
        else:
            speaker, extra = (rel.parts[0] if len(rel.parts) > 1 else "unknown"), {}
        extra["source_path"] = rel.as_posix()
        items.append(Utterance(id=utt_id, path=str(path), text=text, speaker=speaker,
                               language=language, extra=extra))
    return items, skipped, examples


_MANIFEST_FIELDS = ("id", "path", "text", "speaker", "language")


def read_manifest(path: str | Path, language: str = "en") -> tuple[list[Utterance], Counter, list[dict]]:
    """Read a JSONL (one object per line) or TSV (header row) manifest.

    Required: ``path``; optional: ``id`` (default: file stem), ``text``, ``speaker``,
    ``language`` (default ``language``); other fields are kept. Relative paths are relative to
    the manifest's folder. Malformed rows are skipped as ``bad_manifest_row``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    rows: list[tuple[int, dict | None, str]] = []
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        text = path.read_text(encoding="utf-8")
        if suffix == ".json" and text.lstrip().startswith("["):  # a JSON array of rows
            text = "\n".join(json.dumps(r) for r in json.loads(text))
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                rows.append((n, row if isinstance(row, dict) else None, "not a JSON object"))
            except json.JSONDecodeError as e:
                rows.append((n, None, f"invalid JSON: {e}"))
    elif suffix in (".tsv", ".txt", ".csv"):
        # TSV fields are taken verbatim (quotes are text); CSV uses standard quoting.
        style = {"delimiter": ","} if suffix == ".csv" else \
            {"delimiter": "\t", "quoting": csv.QUOTE_NONE}
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f, **style)
            if reader.fieldnames is None or "path" not in reader.fieldnames:
                raise ValueError(f"{path}: the first row must be a header with a 'path' column "
                                 f"(got {reader.fieldnames})")
            for n, row in enumerate(reader, 2):
                ok = None not in row and all(v is not None for v in row.values())
                rows.append((n, row if ok else None, "wrong number of columns"))
    else:
        raise ValueError(f"{path}: manifest must end in .jsonl or .tsv (or .csv)")

    skipped: Counter = Counter()
    examples: list[dict] = []
    items = []
    for n, row, why in rows:
        if row is None or not row.get("path"):
            _note_skip(skipped, examples, "bad_manifest_row", f"{path.name}:{n}",
                       why if row is None else "no 'path'")
            continue
        audio = Path(str(row["path"]))
        if not audio.is_absolute():
            audio = path.parent / audio
        extra = {k: v for k, v in row.items() if k not in _MANIFEST_FIELDS}
        extra.setdefault("source_path", str(row["path"]))
        items.append(Utterance(
            id=str(row.get("id") or audio.stem), path=str(audio),
            text=str(row.get("text") or ""), speaker=str(row.get("speaker") or "unknown"),
            language=str(row.get("language") or language), extra=extra))
    return items, skipped, examples


def _note_skip(skipped: Counter, examples: list, reason: str, utt_id: str, detail: str) -> None:
    skipped[reason] += 1
    if len(examples) < MAX_SKIP_EXAMPLES:
        examples.append({"reason": reason, "id": utt_id, "detail": detail[:300]})


# ----------------------------------------------------------------------------- audio


class SkipUtterance(Exception):
    """Raised by ``load_audio`` with a short reason (the key in ``index.json['skipped']``)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def load_audio(path: str, sample_rate: int, max_duration: float | None = None,
               min_duration: float = 0.0) -> tuple[np.ndarray, dict]:
    """Read any soundfile-readable file as mono float32 at ``sample_rate``.

    Raises SkipUtterance with reason missing_file / unreadable / empty / too_long / too_short /
    nan / silent. Duration limits are checked from the header before decoding.
    """
    if not os.path.exists(path):
        raise SkipUtterance("missing_file", path)
    try:
        info = sf.info(path)
    except Exception as e:  # libsndfile raises several types for corrupt headers
        raise SkipUtterance("unreadable", f"{path}: {e}") from None
    if info.frames <= 0 or info.samplerate <= 0:
        raise SkipUtterance("empty", path)
    src_duration = info.frames / info.samplerate
    if max_duration and src_duration > max_duration:
        raise SkipUtterance("too_long", f"{path}: {src_duration:.1f}s > {max_duration}s")
    if src_duration < min_duration:
        raise SkipUtterance("too_short", f"{path}: {src_duration:.3f}s < {min_duration}s")
    try:
        audio, sr = sf.read(path, dtype="float32", always_2d=True)
    except Exception as e:
        raise SkipUtterance("unreadable", f"{path}: {e}") from None
    if audio.shape[0] == 0:
        raise SkipUtterance("empty", path)
    if not np.isfinite(audio).all():
        raise SkipUtterance("nan", f"{path}: NaN/inf samples")
    mono = audio.mean(axis=1) if audio.shape[1] > 1 else audio[:, 0]
    if not np.any(mono):
        raise SkipUtterance("silent", path)
    if sr != sample_rate:
        mono = soxr.resample(mono, sr, sample_rate, quality="HQ")
    source = {"source_sample_rate": int(sr), "source_channels": int(audio.shape[1])}
    return np.ascontiguousarray(mono, dtype=np.float32), source


def encode_flac(audio: np.ndarray, sample_rate: int) -> bytes:
    """Mono float audio -> FLAC PCM_16 bytes (clipped to [-1, 1])."""
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio, -1.0, 1.0), sample_rate, format="FLAC", subtype="PCM_16")
    return buf.getvalue()


def sample_metadata(utt: Utterance, num_samples: int, sample_rate: int, **more: Any) -> dict:
    meta = {"id": utt.id, "text": utt.text, "speaker": utt.speaker, "language": utt.language,
            "sample_rate": sample_rate, "num_samples": int(num_samples),
            "duration": round(num_samples / sample_rate, 6)}
    for k, v in {**utt.extra, **more}.items():
        meta.setdefault(k, v)
    return meta


# ----------------------------------------------------------------------------- tar writing


class ShardSink:
    """Append samples to tar shards, rolling over by sample count and byte size.

    Shards are written as ``<tmp_prefix><n>.tar.tmp`` and renamed to ``name_fn(n)`` when
    closed. Member headers carry fixed mtime/owner so equal inputs give equal bytes.
    """

    def __init__(self, out_dir: str | Path, max_samples: int = 1000, max_bytes: int | None = None,
                 name_fn: Callable[[int], str] = SHARD_PATTERN.format, tmp_prefix: str = ".tmp-"):
        if max_samples < 1:
            raise ValueError(f"max_samples must be >= 1, got {max_samples}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.name_fn, self.tmp_prefix = name_fn, tmp_prefix
        self.shards: list[dict] = []  # {"name", "num_samples", "duration"}
        self._tar: tarfile.TarFile | None = None
        self._count = self._bytes = 0
        self._duration = 0.0

    def write(self, key: str, flac: bytes, meta: dict) -> None:
        if "." in key or "/" in key:
            raise ValueError(f"sample key {key!r} must not contain '.' or '/'")
        js = json.dumps(meta, sort_keys=True, ensure_ascii=False).encode("utf-8")
        size = len(flac) + len(js) + 3 * 512  # payload + headers + padding, roughly
        if self._tar is not None and (self._count >= self.max_samples or (
                self.max_bytes and self._bytes + size > self.max_bytes)):
            self._close_shard()
        if self._tar is None:
            self._tmp = self.out_dir / f"{self.tmp_prefix}{len(self.shards):06d}.tar.tmp"
            self._tar = tarfile.open(self._tmp, "w", format=tarfile.USTAR_FORMAT)
        for ext, data in (("flac", flac), ("json", js)):
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self._bytes += size
        self._duration += float(meta["duration"])

    def _close_shard(self) -> None:
        assert self._tar is not None
        self._tar.close()
        name = self.name_fn(len(self.shards))
        os.replace(self._tmp, self.out_dir / name)
        self.shards.append({"name": name, "num_samples": self._count,
                            "duration": round(self._duration, 3)})
        self._tar, self._count, self._bytes, self._duration = None, 0, 0, 0.0

    def close(self) -> list[dict]:
        if self._tar is not None:
            self._close_shard()
        return self.shards


def write_index(out_dir: str | Path, shards: Sequence[dict], sample_rate: int,
                skipped: Counter | dict, **extra: Any) -> dict:
    """Write ``index.json`` atomically (temp file + rename) and return it."""
    index = {"version": INDEX_VERSION, "sample_rate": sample_rate,
             "num_samples": sum(s["num_samples"] for s in shards),
             "duration": round(sum(s["duration"] for s in shards), 3),
             "shards": list(shards), "skipped": dict(sorted(dict(skipped).items())), **extra}
    out = Path(out_dir) / INDEX_NAME
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, out)
    return index


def remove_build(out_dir: Path) -> None:
    """Delete what a previous build wrote (index first, so a partial rebuild never looks done)."""
    (out_dir / INDEX_NAME).unlink(missing_ok=True)
    for p in list(out_dir.glob("shard-*.tar")) + list(out_dir.glob(".tmp-*")):
        p.unlink()


# ----------------------------------------------------------------------------- workers


@dataclass
class _Options:
    out_dir: str
    sample_rate: int
    max_samples: int
    max_bytes: int | None
    max_duration: float | None
    min_duration: float


_progress_counter = None


def _init_worker(counter) -> None:
    global _progress_counter
    _progress_counter = counter


def _write_chunk(chunk_index: int, items: list[Utterance], opt: _Options) -> tuple:
    """Encode one chunk into temp shards named by chunk, so order is independent of scheduling."""
    sink = ShardSink(opt.out_dir, opt.max_samples, opt.max_bytes,
                     name_fn=lambda n: f".tmp-c{chunk_index:06d}-{n:04d}.tar",
                     tmp_prefix=f".tmp-c{chunk_index:06d}-w")
    skipped: Counter = Counter()
    examples: list[dict] = []
    for utt in items:
        try:
            audio, source = load_audio(utt.path, opt.sample_rate, opt.max_duration, opt.min_duration)
            sink.write(sanitize_key(utt.id), encode_flac(audio, opt.sample_rate),
                       sample_metadata(utt, len(audio), opt.sample_rate, **source))
        except SkipUtterance as e:
            _note_skip(skipped, examples, e.reason, utt.id, e.detail)
        if _progress_counter is not None:
            with _progress_counter.get_lock():
                _progress_counter.value += 1
    return chunk_index, sink.close(), skipped, examples


def parse_size(text: str | int | None) -> int | None:
    """'512MB', '2G', '100k', 12345 -> bytes (decimal units); None/0 -> None."""
    if text in (None, "", 0, "0"):
        return None
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([kmgt]?)i?b?\s*", str(text).lower())
    if not m:
        raise ValueError(f"cannot parse size {text!r} (use e.g. 500MB, 2G, 100000)")
    return int(float(m.group(1)) * 1000 ** " kmgt".index(m.group(2) or " "))


def _params_hash(items: Sequence[Utterance], params: dict) -> str:
    h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
    for u in items:
        try:  # a replaced file changes size or mtime, so it is re-encoded
            st = os.stat(u.path)
            stamp = [st.st_size, st.st_mtime_ns]
        except OSError:
            stamp = None
        h.update(json.dumps([asdict(u), stamp], sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


def _progress(total: int, enabled: bool):
    if not enabled:
        return None
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                               TimeElapsedColumn, TimeRemainingColumn)
    return Progress(TextColumn("[bold]writing shards"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), TimeRemainingColumn(), transient=False)


def write_shards(items: Sequence[Utterance], out_dir: str | Path, *, sample_rate: int = 16000,
                 max_samples_per_shard: int = 1000, max_shard_size: int | str | None = "500MB",
                 workers: int = 1, max_duration: float | None = 60.0, min_duration: float = 0.0,
                 order: str = "input", seed: int = 0, overwrite: bool = False,
                 progress: bool = True, skipped: Counter | None = None,
                 skip_examples: list[dict] | None = None, log: Callable[[str], None] = print) -> dict:
    """Encode ``items`` into WebDataset shards + ``index.json`` under ``out_dir``.

    ``order``: "input" keeps the given order, "sorted" sorts by id, "shuffle" shuffles with
    ``seed`` (mixes speakers across shards). ``skipped``/``skip_examples`` carry counts from
    the input scan into the index. Returns the index dict. If ``out_dir`` already holds a
    complete build of the same inputs and options it is kept (idempotent) unless ``overwrite``.
    """
    if order not in ("input", "sorted", "shuffle"):
        raise ValueError(f"order must be input, sorted or shuffle, got {order!r}")
    if sample_rate <= 0:
        raise ValueError(f"sample_rate must be positive, got {sample_rate}")
    out_dir = Path(out_dir)
    max_bytes = parse_size(max_shard_size)
    skipped = Counter(skipped or {})
    examples = list(skip_examples or [])
    items = list(items)
    if order == "sorted":
        items.sort(key=lambda u: u.id)
    elif order == "shuffle":
        random.Random(seed).shuffle(items)
    # Duplicate keys would silently shadow each other in the loader.
    seen: set[str] = set()
    unique = []
    for u in items:
        key = sanitize_key(u.id)
        if key in seen:
            _note_skip(skipped, examples, "duplicate_id", u.id, u.path)
        else:
            seen.add(key)
            unique.append(u)
    items = unique

    params = {"sample_rate": sample_rate, "max_samples_per_shard": max_samples_per_shard,
              "max_shard_size": max_bytes, "max_duration": max_duration,
              "min_duration": min_duration, "order": order, "seed": seed,
              "index_version": INDEX_VERSION}
    params_hash = _params_hash(items, params)
    index_path = out_dir / INDEX_NAME
    if index_path.exists() and not overwrite:
        try:
            old = json.loads(index_path.read_text())
            if old.get("params_hash") == params_hash and all(
                    (out_dir / s["name"]).is_file() for s in old["shards"]):
                log(f"{out_dir}: up to date ({old['num_samples']} samples, "
                    f"{len(old['shards'])} shards); use --overwrite (overwrite=True) to rebuild")
                return old
        except (json.JSONDecodeError, KeyError, TypeError):
            pass
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_build(out_dir)

    t0 = time.time()
    opt = _Options(str(out_dir), sample_rate, max_samples_per_shard, max_bytes, max_duration,
                   min_duration)
    chunks = [items[i:i + max_samples_per_shard] for i in range(0, len(items), max_samples_per_shard)]
    bar = _progress(len(items), progress)
    task = bar.add_task("write", total=len(items)) if bar else None
    results = []
    try:
        if bar:
            bar.start()
        if workers <= 1 or len(chunks) <= 1:
            for i, chunk in enumerate(chunks):
                results.append(_write_chunk(i, chunk, opt))
                if bar:
                    bar.update(task, advance=len(chunk))
        else:
            counter = mp.get_context("spawn").Value("q", 0)
            ctx = mp.get_context("spawn")  # fork is unsafe with threads (torch, rich)
            with ctx.Pool(min(workers, len(chunks)), initializer=_init_worker,
                          initargs=(counter,)) as pool:
                pending = pool.starmap_async(_write_chunk, [(i, c, opt) for i, c in enumerate(chunks)],
                                             chunksize=1)
                while not pending.ready():
                    pending.wait(0.2)
                    if bar:
                        bar.update(task, completed=counter.value)
                results = pending.get()
        if bar:
            bar.update(task, completed=len(items))
    except BaseException:
        remove_build(out_dir)
        raise
    finally:
        if bar:
            bar.stop()

    # Rename chunk shards to their final, contiguous names in chunk order.
    shards = []
    for _, chunk_shards, chunk_skipped, chunk_examples in sorted(results, key=lambda r: r[0]):
        skipped.update(chunk_skipped)
        examples.extend(chunk_examples)
        for s in chunk_shards:
            name = SHARD_PATTERN.format(len(shards))
            os.replace(out_dir / s["name"], out_dir / name)
            shards.append({**s, "name": name})
    index = write_index(out_dir, shards, sample_rate, skipped, params=params,
                        params_hash=params_hash, skip_examples=examples[:MAX_SKIP_EXAMPLES])
    index["elapsed_s"] = round(time.time() - t0, 2)
    log(format_summary(index, out_dir))
    return index


def format_summary(index: dict, out_dir: str | Path = "") -> str:
    skipped = index.get("skipped", {})
    lines = [f"wrote {index['num_samples']} utterances ({index['duration'] / 3600:.3f} h) "
             f"in {len(index['shards'])} shards to {out_dir}"
             + (f" in {index['elapsed_s']:.1f}s" if "elapsed_s" in index else ""),
             f"skipped {sum(skipped.values())}" + (": " + ", ".join(
                 f"{k}={v}" for k, v in sorted(skipped.items())) if skipped else "")]
    for ex in index.get("skip_examples", [])[:5]:
        lines.append(f"  e.g. {ex['reason']}: {ex['id']} ({ex['detail']})")
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flexitrain-make-shards",
        description="Convert a LibriSpeech-style folder or a JSONL/TSV manifest into WebDataset "
                    "shards (FLAC + JSON) with an index.json.")
    p.add_argument("input", nargs="?", help="folder (LibriSpeech layout: *.trans.txt beside the "
                   "audio) or manifest (.jsonl with path/text/speaker/language keys, or .tsv with "
                   "a header row of those columns); same as --input / --manifest")
    p.add_argument("out", nargs="?", help="output folder for shard-NNNNNN.tar and index.json "
                                          "(same as --out)")
    p.add_argument("--input", dest="input_opt", metavar="DIR", help="input folder (LibriSpeech layout)")
    p.add_argument("--manifest", metavar="FILE", help="input manifest (.jsonl / .tsv)")
    p.add_argument("--out", dest="out_opt", metavar="DIR", help="output folder")
    p.add_argument("--sample-rate", type=int, default=16000, help="target rate (default 16000)")
    p.add_argument("--max-samples-per-shard", type=int, default=1000)
    p.add_argument("--max-shard-size", default="500MB", help="e.g. 500MB, 1G; 0 = no limit")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 1)),
                   help="parallel encoder processes (default: all cores)")
    p.add_argument("--max-duration", type=float, default=60.0,
                   help="skip clips longer than this many seconds (0 = no limit)")
    p.add_argument("--min-duration", type=float, default=0.0)
    p.add_argument("--language", default="en", help="language when the input does not say")
    p.add_argument("--allow-missing-text", action="store_true",
                   help="keep folder audio with no transcript (text '') instead of skipping it")
    p.add_argument("--order", choices=["input", "sorted", "shuffle"], default="input",
                   help="sample order across shards: input (folder scans are sorted by id; "
                        "manifests keep their row order), sorted by id, or shuffle with --seed")
    p.add_argument("--seed", type=int, default=0, help="seed for --order shuffle")
    p.add_argument("--overwrite", action="store_true", help="rebuild even if up to date")
    p.add_argument("--no-progress", action="store_true")
    return p


def make_shards(input_path: str | Path, out: str | Path, *, language: str = "en",
                require_text: bool = True, **kwargs: Any) -> dict:
    """Scan a folder or read a manifest, then ``write_shards``. Returns the index."""
    input_path = Path(input_path)
    if input_path.is_dir():
        items, skipped, examples = scan_librispeech(input_path, language, require_text)
    else:
        items, skipped, examples = read_manifest(input_path, language)
    return write_shards(items, out, skipped=skipped, skip_examples=examples, **kwargs)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    sources = [x for x in (args.input, args.input_opt, args.manifest) if x]
    out = args.out_opt or args.out
    if len(sources) != 1 or not out or (args.out and args.out_opt):
        parser.error("give one input (positional, --input DIR or --manifest FILE) and one output "
                     "(positional or --out DIR)")
    if args.manifest and not Path(args.manifest).is_file():
        parser.error(f"--manifest {args.manifest}: not a file")
    try:
        make_shards(sources[0], out, language=args.language,
                    require_text=not args.allow_missing_text, sample_rate=args.sample_rate,
                    max_samples_per_shard=args.max_samples_per_shard,
                    max_shard_size=args.max_shard_size, workers=args.workers,
                    max_duration=args.max_duration or None, min_duration=args.min_duration,
                    order=args.order, seed=args.seed, overwrite=args.overwrite,
                    progress=not args.no_progress and sys.stderr.isatty())
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
