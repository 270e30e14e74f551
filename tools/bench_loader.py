#!/usr/bin/env python
"""Loader throughput: read + decode + resample + crop + batch over a shard directory.

    python tools/bench_loader.py --shards data/demo/train --seconds 20 --workers 2
    python tools/bench_loader.py --synth /tmp/bench_shards --synth-count 4000   # make ~3 s espeak-ng shards first

Prints utterances/s and audio-seconds/s of the training stream (random crops), and the
bad-input counters.  The figure depends on the CPU, the utterance length and how many
other processes share the cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SENTENCES = [
    "The birch canoe slid on the smooth planks.", "Glue the sheet to the dark blue background.",
    "It's easy to tell the depth of a well.", "These days a chicken leg is a rare dish.",
    "Rice is often served in round bowls.", "The juice of lemons makes fine punch.",
    "The box was thrown beside the parked truck.", "The hogs were fed chopped corn and garbage.",
    "Four hours of steady work faced us.", "A large size in stockings is hard to sell.",
    "The boy was there when the sun rose.", "A rod is used to catch pink salmon.",
    "The source of the huge river is the clear spring.", "Kick the ball straight and follow through.",
    "Help the woman get back to her feet.", "A pot of tea helps to pass the evening.",
]
VOICES = ["en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+f1", "en-us+m7"]


def _espeak(text: str, voice: str, speed: int, sr: int) -> np.ndarray | None:
    import soundfile as sf
    import soxr

    try:
        wav = subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "--stdout", text],
                             check=True, capture_output=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    x, rate = sf.read(io.BytesIO(wav), dtype="float32")
    return soxr.resample(x, rate, sr).astype(np.float32) if rate != sr else x


def synthesize(folder: Path, count: int, per_shard: int = 500, sr: int = 16000, seed: int = 0) -> None:
    """~3 s espeak-ng utterances (two sentences each; noise bursts if espeak-ng is missing) as
    FLAC shards with JSON metadata and an index.json."""
    import soundfile as sf

    rng = np.random.default_rng(seed)
    base = []
    for i in range(48):
        text = " ".join(rng.choice(SENTENCES, 2, replace=False))
        x = _espeak(text, VOICES[i % len(VOICES)], int(rng.integers(200, 260)), sr)
        if x is None:
            n = int(rng.uniform(2.5, 3.5) * sr)
            x = (0.2 * rng.standard_normal(n) * np.sin(np.linspace(0, 20, n)) ** 2).astype(np.float32)
        base.append((text, x, f"v{i % len(VOICES)}"))
    folder.mkdir(parents=True, exist_ok=True)
    shards, done = [], 0
    while done < count:
        name = f"shard-{len(shards):06d}.tar"
        n_here, dur = min(per_shard, count - done), 0.0
        with tarfile.open(folder / name, "w") as tar:
            for j in range(n_here):
                text, x, spk = base[int(rng.integers(len(base)))]
                y = np.clip(x * rng.uniform(0.5, 1.2) + 1e-3 * rng.standard_normal(x.size), -1, 1).astype(np.float32)
                buf = io.BytesIO()
                sf.write(buf, y, sr, format="FLAC", subtype="PCM_16")
                key = f"{spk}-{done + j:07d}"
                meta = {"id": key, "text": text, "speaker": spk, "language": "en", "sample_rate": sr,
                        "num_samples": int(y.size), "duration": y.size / sr}
                for ext, data in (("flac", buf.getvalue()), ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                dur += y.size / sr
        shards.append({"name": name, "num_samples": n_here, "duration": dur})
        done += n_here
    index = {"version": 1, "sample_rate": sr, "num_samples": done, "duration": sum(s["duration"] for s in shards),
             "shards": shards}
    (folder / "index.json").write_text(json.dumps(index, indent=1))
    print(f"wrote {done} utterances ({index['duration'] / done:.2f} s mean) in {len(shards)} shards to {folder}")


def _cpu() -> float:
    """CPU seconds of this process and its finished children (the DataLoader workers)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def bench(args) -> dict:
    from flexitrain.data.datamodule import AudioDataModule
    from flexitrain.data.stats import format_summary

    dm = AudioDataModule(train_shards=args.shards, val_shards=args.shards if args.mode == "eval" else None,
                         sample_rate=args.sample_rate, train_crop_seconds=args.crop, batch_seconds=args.batch_seconds,
                         max_batch_size=args.max_batch_size, num_workers=args.workers, epoch_samples=10**9,
                         shuffle_buffer=args.shuffle_buffer, rank=0, world_size=1)
    t0 = time.perf_counter()
    dm.setup("fit")
    setup_s = time.perf_counter() - t0
    loader = dm.train_dataloader() if args.mode == "train" else dm.val_dataloader()
    utts = samples = batches = 0
    load = os.getloadavg()[0]
    it = iter(loader)
    first = next(it)  # worker start-up is not throughput
    cpu0, start = _cpu(), time.perf_counter()
    for batch in it:
        utts += len(batch["keys"])
        samples += int(batch["lengths"].sum())
        batches += 1
        if time.perf_counter() - start >= args.seconds:
            break
    wall = time.perf_counter() - start
    del it, batch  # stops the workers, so their CPU time is counted
    cpu = _cpu() - cpu0
    res = {"mode": args.mode, "workers": args.workers, "wall_s": round(wall, 2), "batches": batches,
           "utterances_per_s": round(utts / wall, 1), "audio_seconds_per_s": round(samples / args.sample_rate / wall, 1),
           "mean_batch_size": round(utts / max(batches, 1), 2), "batch_shape": list(first["audio"].shape),
           "setup_s": round(setup_s, 2), "cpu_s": round(cpu, 2),
           "cpu_us_per_utterance": round(cpu / max(utts, 1) * 1e6, 1),
           # what 2 otherwise idle cores would give if the loader is CPU bound (this machine may be shared)
           "projected_utterances_per_s_2_idle_cores": round(2 * utts / max(cpu, 1e-9), 1),
           "load_average_before": round(load, 2)}
    print(json.dumps(res))
    split = "train" if args.mode == "train" else "val"
    print(f"[data] {split}: {format_summary(dm.bad_input_summary(split))}")
    return res


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", help="shard directory, brace pattern or list (as data.train_shards)")
    p.add_argument("--seconds", type=float, default=20.0, help="measure for this long")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--mode", choices=["train", "eval"], default="train")
    p.add_argument("--crop", type=float, default=3.0, help="train crop seconds")
    p.add_argument("--batch-seconds", type=float, default=48.0)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--synth", type=Path, help="first write ~3 s espeak-ng FLAC shards here (if missing)")
    p.add_argument("--synth-count", type=int, default=4000)
    args = p.parse_args(argv)
    if args.synth is not None:
        if not (args.synth / "index.json").exists():
            if args.synth.exists():
                shutil.rmtree(args.synth)
            synthesize(args.synth, args.synth_count, sr=args.sample_rate)
        args.shards = args.shards or str(args.synth)
    if not args.shards:
        p.error("--shards or --synth is required")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    bench(args)


if __name__ == "__main__":
    main()
