"""Pre-extract AR-TTS targets: FlexiCodec semantic codes + token lengths (durations) per merging threshold,
written into copies of WebDataset shards beside the audio.

    python tools/extract_tokens.py --shards data/demo/train --out data/demo_tokens/train \
        --ckpt runs/codec_demo/main/checkpoints/last.ckpt --thresholds 0.86 0.91 [--teacher-random-init]

Every input shard ``<name>.tar`` becomes ``<out>/<name>.tar`` with all original members plus
``<key>.tokens.json``::

    {"codec": "<ckpt path>", "sample_rate": 16000,
     "t0.86": {"codes": [...], "durations": [...]}, "t0.91": {...}}

(``durations`` = 12.5 Hz frames merged into each token, 1..8). ``index.json`` is copied when present.
Shards are written under a temporary name and renamed when complete; existing outputs are skipped, so an
interrupted run can be restarted. The codec runs in eval mode in fp32 with padding masks, items batched by
similar length.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import shutil
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flexitrain.tasks.ar_tts_data import TOKENS_MEMBER, codec_targets, threshold_key  # noqa: E402

log = logging.getLogger("extract_tokens")


def read_shard(path: Path) -> list[tuple[str, dict[str, bytes]]]:
    """[(key, {ext: bytes})] in file order (local tar files)."""
    samples: list[tuple[str, dict[str, bytes]]] = []
    with tarfile.open(path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name
            slash = base.rfind("/") + 1
            dot = base.find(".", slash)
            key, ext = (base, "") if dot < 0 else (base[:dot], base[dot + 1:])
            if not samples or samples[-1][0] != key:
                samples.append((key, {}))
            samples[-1][1][ext] = tar.extractfile(member).read()
    return samples


def decode(data: bytes, sample_rate: int) -> np.ndarray:
    import soundfile as sf
    import soxr

    x, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    x = x.mean(1)
    return soxr.resample(x, sr, sample_rate).astype(np.float32) if sr != sample_rate else x


def extract_samples(samples, codec, teacher, thresholds: list[float], sample_rate: int = 16000,
                    batch_seconds: float = 120.0, device: str = "cpu") -> dict[str, dict]:
    """{key: tokens-json dict} for samples with audio; batches of similar length up to ``batch_seconds``."""
    audio = {}
    for key, members in samples:
        data = members.get("flac") or members.get("wav")
        if data is not None:
            audio[key] = decode(data, sample_rate)
    order = sorted(audio, key=lambda k: len(audio[k]))
    out: dict[str, dict] = {k: {} for k in order}
    start = 0
    while start < len(order):
        end = start + 1
        while end < len(order) and (end + 1 - start) * len(audio[order[end]]) <= batch_seconds * sample_rate:
            end += 1
        keys = order[start:end]
        lengths = torch.tensor([len(audio[k]) for k in keys])
        wav = torch.zeros(len(keys), int(lengths.max()))
        for i, k in enumerate(keys):
            wav[i, : len(audio[k])] = torch.from_numpy(audio[k])
        wav, lengths = wav.to(device), lengths.to(device)
        for thr in thresholds:
            codes, durations, num = codec_targets(codec, teacher, wav, lengths, thr)
            for i, k in enumerate(keys):
                n = int(num[i])
                out[k][threshold_key(thr)] = {"codes": codes[i, :n].tolist(), "durations": durations[i, :n].tolist()}
        start = end
    return out


def write_shard(path: Path, samples, tokens: dict[str, dict], codec_id: str, sample_rate: int) -> int:
    tmp = path.with_name(path.name + ".tmp")
    written = 0
    with tarfile.open(tmp, "w") as tar:
        for key, members in samples:
            members = dict(members)
            if key in tokens:
                members[TOKENS_MEMBER] = json.dumps({"codec": codec_id, "sample_rate": sample_rate,
                                                     **tokens[key]}).encode()
                written += 1
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}" if ext else key)
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    os.replace(tmp, path)
    return written


def extract_dir(shards: list[Path], out_dir: Path, codec, teacher, thresholds: list[float], codec_id: str,
                sample_rate: int = 16000, batch_seconds: float = 120.0, device: str = "cpu") -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = {"shards": 0, "skipped_existing": 0, "items": 0}
    for shard in shards:
        target = out_dir / shard.name
        if target.exists():
            stats["skipped_existing"] += 1
            continue
        samples = read_shard(shard)
        tokens = extract_samples(samples, codec, teacher, thresholds, sample_rate, batch_seconds, device)
        stats["items"] += write_shard(target, samples, tokens, codec_id, sample_rate)
        stats["shards"] += 1
        log.info("%s: %d items", target, len(tokens))
    index = shards[0].parent / "index.json" if shards else None
    if index is not None and index.exists():
        shutil.copy(index, out_dir / "index.json")
    return stats


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", required=True, help="a folder of .tar shards or one .tar file")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--ckpt", required=True, help="CodecTask checkpoint (.ckpt) or exported FlexiCodec folder")
    p.add_argument("--thresholds", type=float, nargs="+", default=[0.86, 0.91])
    p.add_argument("--teacher-dir", default=None, help="local SenseVoiceSmall folder (overrides the checkpoint's)")
    p.add_argument("--teacher-random-init", action="store_true", help="random teacher (demo codecs only)")
    p.add_argument("--batch-seconds", type=float, default=120.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    src = Path(args.shards)
    shards = sorted(src.glob("*.tar")) if src.is_dir() else [src] if src.is_file() else []
    if not shards:
        raise SystemExit(f"no .tar shards under {src}")
    teacher_cfg = None
    if args.teacher_dir or args.teacher_random_init:
        teacher_cfg = {"model_dir": args.teacher_dir, "random_init": args.teacher_random_init, "num_blocks": 2
                       if args.teacher_random_init else 50}
    from flexitrain.evaluation.loading import load_codec

    codec, teacher = load_codec(args.ckpt, teacher_cfg, device=args.device)
    start = time.time()
    stats = extract_dir(shards, Path(args.out), codec, teacher, args.thresholds, str(args.ckpt),
                        batch_seconds=args.batch_seconds, device=args.device)
    stats["seconds"] = round(time.time() - start, 2)
    print(json.dumps(stats))
    return stats


if __name__ == "__main__":
    main()
