"""Demo corpus: the Harvard sentences spoken by many espeak-ng voices, as WebDataset shards.

Layout under ``out``::

    manifest.json                 build parameters, their hash, per-split totals (written last)
    train/ valid/ test/           shard-NNNNNN.tar + index.json each (format: shard_writer)

A speaker is one (voice, variant, speed, pitch) combination, e.g. ``en-gb+f2-s150-p70``.
Sentences are split disjointly: ``valid_sentences`` and ``test_sentences`` sentence indices
are drawn (seeded) for valid/test and the rest are train, so no transcript is shared between
splits. Each split cycles through its sentences and speakers in seeded shuffled order.

Deterministic: same parameters and espeak-ng version give the same bytes. Cached: when
``manifest.json`` matches the parameter hash and all shards exist, nothing is rebuilt.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import soundfile as sf
import soxr

from flexitrain.data.shard_writer import INDEX_NAME, ShardSink, remove_build, write_index

BUILD_VERSION = 1  # bump when the synthesis or layout changes, to invalidate old caches
MANIFEST_NAME = "manifest.json"
SPLITS = ("train", "valid", "test")
HARVARD_SENTENCES = Path(__file__).resolve().parents[1] / "assets" / "harvard_sentences.txt"

DEFAULT_VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
                  "en-029", "en-us-nyc")
DEFAULT_VARIANTS = ("", "m1", "m2", "m3", "m4", "m5", "m7", "f1", "f2", "f3", "f4", "f5",
                    "klatt", "klatt2", "klatt3")
DEFAULT_SPEEDS = (130, 150, 170, 190)  # words per minute (espeak -s)
DEFAULT_PITCHES = (30, 50, 70)  # 0..99 (espeak -p)


@dataclass(frozen=True)
class DemoCorpusConfig:
    """Build parameters. All but ``out``, ``jobs`` and ``espeak`` (the executable) go into the cache hash."""

    out: str = "data/demo"
    sentences_file: str | None = None  # one sentence a line, '#' comments; None: Harvard asset
    num_sentences: int | None = None  # use only the first N sentences (None: all)
    valid_sentences: int = 36
    test_sentences: int = 36
    train_utterances: int = 1200
    valid_utterances: int = 100
    test_utterances: int = 100
    voices: tuple[str, ...] = DEFAULT_VOICES
    variants: tuple[str, ...] = DEFAULT_VARIANTS
    speeds: tuple[int, ...] = DEFAULT_SPEEDS
    pitches: tuple[int, ...] = DEFAULT_PITCHES
    num_speakers: int = 48  # drawn (seeded) from the voice x variant x speed x pitch grid
    sample_rate: int = 16000
    samples_per_shard: int = 100
    min_shards: int = 4  # per split, so 2 ranks x 2 workers all get a shard
    seed: int = 1234
    espeak: str = "espeak-ng"
    jobs: int = 2  # espeak threads


@dataclass(frozen=True)
class Speaker:
    voice: str
    variant: str
    speed: int
    pitch: int

    @property
    def id(self) -> str:
        return f"{self.voice}{'+' + self.variant if self.variant else ''}-s{self.speed}-p{self.pitch}"

    @property
    def espeak_voice(self) -> str:
        return f"{self.voice}+{self.variant}" if self.variant else self.voice


# ----------------------------------------------------------------------------- inputs


def load_sentences(path: str | Path | None = None) -> list[str]:
    """Sentences, one a line; blank lines and '#' comments ignored. Default: Harvard list."""
    path = Path(path) if path is not None else HARVARD_SENTENCES
    sentences = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()
                 if s.strip() and not s.startswith("#")]
    if not sentences:
        raise ValueError(f"no sentences in {path}")
    return sentences


def espeak_version(espeak: str = "espeak-ng") -> str:
    """'eSpeak NG text-to-speech: 1.51 ...' -> '1.51'. Clear error when espeak-ng is missing."""
    exe = shutil.which(espeak)
    if exe is None:
        raise FileNotFoundError(
            f"{espeak} not found: install it (Debian/Ubuntu: `sudo apt-get install -y espeak-ng`, "
            "macOS: `brew install espeak-ng`) to build the demo corpus")
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, check=True).stdout
    words = out.split()
    return words[words.index("text-to-speech:") + 1] if "text-to-speech:" in words else out.strip()


def espeak_variants(espeak: str = "espeak-ng") -> set[str]:
    """Variant names espeak-ng knows (``--voices=variant``, file column ``!v/<name>``)."""
    out = subprocess.run([espeak, "--voices=variant"], capture_output=True, text=True).stdout
    return {w[3:] for line in out.splitlines() for w in line.split() if w.startswith("!v/")}


def synthesize(text: str, speaker: Speaker, sample_rate: int = 16000,
               espeak: str = "espeak-ng") -> np.ndarray:
    """Speak ``text`` with espeak-ng; mono float32 at ``sample_rate``."""
    cmd = [espeak, "-v", speaker.espeak_voice, "-s", str(speaker.speed), "-p", str(speaker.pitch),
           "--stdout", "--", text]
    proc = subprocess.run(cmd, capture_output=True, timeout=120)
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        raise RuntimeError(f"espeak-ng failed ({' '.join(cmd)}): "
                           f"{proc.stderr.decode(errors='replace').strip() or 'no audio'}")
    audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32", always_2d=True)
    audio = audio.mean(axis=1)
    if sr != sample_rate:
        audio = soxr.resample(audio, sr, sample_rate, quality="HQ")
    return np.ascontiguousarray(audio, dtype=np.float32)


# ----------------------------------------------------------------------------- plan


def config_params(cfg: DemoCorpusConfig) -> dict:
    """The parameters that decide the output bytes (not ``out`` nor ``jobs``)."""
    params = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("out", "jobs", "espeak")}
    for k, v in params.items():
        if isinstance(v, tuple):
            params[k] = list(v)
    return params


def params_hash(cfg: DemoCorpusConfig, sentences: Sequence[str], version: str) -> str:
    blob = json.dumps({"params": config_params(cfg), "sentences": list(sentences),
                       "espeak_version": version, "build_version": BUILD_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def choose_speakers(cfg: DemoCorpusConfig) -> list[Speaker]:
    if cfg.num_speakers < 1:
        raise ValueError(f"num_speakers must be >= 1, got {cfg.num_speakers}")
    grid = [Speaker(v, var, s, p) for v in cfg.voices for var in cfg.variants
            for s in cfg.speeds for p in cfg.pitches]
    if not grid:
        raise ValueError("empty speaker grid: give at least one voice, variant, speed and pitch")
    random.Random(cfg.seed).shuffle(grid)
    return sorted(grid[:cfg.num_speakers], key=lambda s: s.id)


def split_sentences(num: int, cfg: DemoCorpusConfig) -> dict[str, list[int]]:
    """Disjoint sentence indices per split (seeded draw; each list sorted)."""
    if cfg.valid_sentences + cfg.test_sentences >= num:
        raise ValueError(f"valid_sentences + test_sentences ({cfg.valid_sentences} + "
                         f"{cfg.test_sentences}) must leave train sentences out of {num}")
    order = list(range(num))
    random.Random(cfg.seed + 1).shuffle(order)
    nv, nt = cfg.valid_sentences, cfg.test_sentences
    return {"valid": sorted(order[:nv]), "test": sorted(order[nv:nv + nt]),
            "train": sorted(order[nv + nt:])}


def plan_split(split: str, sentence_ids: list[int], speakers: list[Speaker], count: int,
               seed: int) -> list[tuple[int, Speaker]]:
    """``count`` (sentence, speaker) pairs cycling through shuffled sentences and speakers."""
    if count and not sentence_ids:
        raise ValueError(f"split {split!r} asks for {count} utterances but has no sentences")
    rng = random.Random(f"{seed}-{split}")
    plan: list[tuple[int, Speaker]] = []
    sents: list[int] = []
    spks: list[Speaker] = []
    for _ in range(count):
        if not sents:
            sents = rng.sample(sentence_ids, len(sentence_ids))
        if not spks:
            spks = rng.sample(speakers, len(speakers))
        plan.append((sents.pop(), spks.pop()))
    return plan


# ----------------------------------------------------------------------------- build


def is_cached(out: Path, expected_hash: str) -> bool:
    try:
        manifest = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if manifest.get("params_hash") != expected_hash:
        return False
    for split in manifest.get("splits", {}):
        try:
            index = json.loads((out / split / INDEX_NAME).read_text())
        except (OSError, json.JSONDecodeError):
            return False
        if not all((out / split / s["name"]).is_file() for s in index["shards"]):
            return False
    return True


def build_demo_corpus(cfg: DemoCorpusConfig = DemoCorpusConfig(), *, force: bool = False,
                      log: Callable[[str], None] = print) -> dict:
    """Build (or reuse) the demo corpus under ``cfg.out``; returns the manifest dict."""
    t0 = time.time()
    out = Path(cfg.out)
    version = espeak_version(cfg.espeak)
    sentences = load_sentences(cfg.sentences_file)
    if cfg.num_sentences is not None:
        sentences = sentences[:cfg.num_sentences]
    digest = params_hash(cfg, sentences, version)
    if not force and is_cached(out, digest):
        manifest = json.loads((out / MANIFEST_NAME).read_text())
        log(f"demo corpus cached at {out} (params_hash {digest}): " + _totals(manifest))
        return manifest

    # espeak-ng silently ignores an unknown variant, which would make two "speakers" identical.
    unknown = sorted(set(v for v in cfg.variants if v) - espeak_variants(cfg.espeak))
    if unknown:
        raise ValueError(f"unknown espeak-ng variants {unknown}; see `espeak-ng --voices=variant`")
    speakers = choose_speakers(cfg)
    split_ids = split_sentences(len(sentences), cfg)
    counts = {"train": cfg.train_utterances, "valid": cfg.valid_utterances,
              "test": cfg.test_utterances}
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # no manifest = incomplete build

    splits: dict[str, Any] = {}
    with ThreadPoolExecutor(max_workers=max(1, cfg.jobs)) as pool:
        for split in SPLITS:
            plan = plan_split(split, split_ids[split], speakers, counts[split], cfg.seed)
            split_dir = out / split
            split_dir.mkdir(exist_ok=True)
            remove_build(split_dir)
            per_shard = max(1, min(cfg.samples_per_shard, -(-len(plan) // max(1, cfg.min_shards))))
            sink = ShardSink(split_dir, max_samples=per_shard)

            def render(item: tuple[int, Speaker]) -> tuple[bytes, int]:
                audio = synthesize(sentences[item[0]], item[1], cfg.sample_rate, cfg.espeak)
                buf = io.BytesIO()
                sf.write(buf, np.clip(audio, -1.0, 1.0), cfg.sample_rate, format="FLAC",
                         subtype="PCM_16")
                return buf.getvalue(), len(audio)

            for i, ((sent, spk), (flac, n)) in enumerate(zip(plan, pool.map(render, plan))):
                meta = {"id": f"harvard-{split}-{i:05d}", "text": sentences[sent],
                        "speaker": spk.id, "language": "en", "sample_rate": cfg.sample_rate,
                        "num_samples": n, "duration": round(n / cfg.sample_rate, 6),
                        "sentence_index": sent, "harvard_list": sent // 10 + 1,
                        "voice": spk.voice, "variant": spk.variant, "speed": spk.speed,
                        "pitch": spk.pitch, "split": split, "synthesizer": f"espeak-ng {version}"}
                sink.write(meta["id"], flac, meta)
            index = write_index(split_dir, sink.close(), cfg.sample_rate, {}, split=split,
                                params_hash=digest)
            splits[split] = {"num_samples": index["num_samples"], "duration": index["duration"],
                             "num_shards": len(index["shards"]),
                             "num_sentences": len(split_ids[split]),
                             "num_speakers": len({s.id for _, s in plan}),
                             "sentence_indices": split_ids[split]}

    manifest = {"version": 1, "name": "flexitrain demo corpus (Harvard sentences x espeak-ng)",
                "sample_rate": cfg.sample_rate, "params": config_params(cfg),
                "params_hash": digest, "espeak_version": version,
                "build_version": BUILD_VERSION,
                "sentences_sha256": hashlib.sha256("\n".join(sentences).encode()).hexdigest(),
                "num_sentences": len(sentences), "speakers": [s.id for s in speakers],
                "splits": splits,
                "source": "Harvard sentences, IEEE 1969 (public domain); audio synthesised "
                          "with espeak-ng"}
    tmp = out / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, out / MANIFEST_NAME)
    log(f"demo corpus built at {out} in {time.time() - t0:.1f}s with {cfg.jobs} espeak "
        f"threads: " + _totals(manifest))
    return manifest


def _totals(manifest: dict) -> str:
    parts = [f"{k} {v['num_samples']} utts / {v['duration'] / 60:.1f} min / "
             f"{v['num_sentences']} sentences / {v['num_shards']} shards"
             for k, v in manifest["splits"].items()]
    total = sum(v["duration"] for v in manifest["splits"].values())
    n = sum(v["num_samples"] for v in manifest["splits"].values())
    return "; ".join(parts) + f"; total {n} utts, {total / 3600:.2f} h, " \
                              f"{len(manifest['speakers'])} speakers"


# ----------------------------------------------------------------------------- CLI


def _csv(cast: Callable = str) -> Callable[[str], tuple]:
    return lambda text: tuple(cast(x.strip()) for x in text.split(","))


def build_parser() -> argparse.ArgumentParser:
    d = DemoCorpusConfig()
    p = argparse.ArgumentParser(
        prog="flexitrain-demo-corpus",
        description="Synthesise the demo corpus: Harvard sentences spoken by espeak-ng voices, "
                    "16 kHz, train/valid/test with disjoint sentences, as WebDataset shards. "
                    "Cached: does nothing when the output matches the parameters.")
    p.add_argument("--out", default=d.out, help=f"output folder (default {d.out})")
    p.add_argument("--sentences-file", default=None, help="default: bundled Harvard sentences")
    p.add_argument("--num-sentences", type=int, default=None, help="use only the first N")
    for split in SPLITS:
        p.add_argument(f"--{split}-utterances", type=int, default=getattr(d, f"{split}_utterances"))
    p.add_argument("--valid-sentences", type=int, default=d.valid_sentences)
    p.add_argument("--test-sentences", type=int, default=d.test_sentences)
    p.add_argument("--voices", type=_csv(), default=d.voices, help="comma list of espeak voices")
    p.add_argument("--variants", type=_csv(), default=d.variants,
                   help="comma list of espeak variants ('' = none), e.g. ',m3,f2,klatt'")
    p.add_argument("--speeds", type=_csv(int), default=d.speeds, help="comma list (words/min)")
    p.add_argument("--pitches", type=_csv(int), default=d.pitches, help="comma list (0-99)")
    p.add_argument("--num-speakers", type=int, default=d.num_speakers)
    p.add_argument("--sample-rate", type=int, default=d.sample_rate)
    p.add_argument("--samples-per-shard", type=int, default=d.samples_per_shard)
    p.add_argument("--min-shards", type=int, default=d.min_shards)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--espeak", default=d.espeak, help="espeak-ng executable")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="espeak threads")
    p.add_argument("--force", action="store_true", help="rebuild even when cached")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    force = args.pop("force")
    try:
        build_demo_corpus(DemoCorpusConfig(**args), force=force)
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
