#!/usr/bin/env python
"""The project's shard reading against `webdataset`'s own pipeline (issue #19, item 7).

    python tools/bench_wds_reader.py --shards data/demo/train --workers 2 --repeats 5 --seconds 8
    python tools/bench_wds_reader.py --shards data/demo/train --mode split --skip-raw

Two measurements, each repeated --repeats times with the variants interleaved (A B, B A, A B, ...),
reported as median and min-max spread:

  * raw: tar reading only, in this process, over every shard (page cache warm): members/s and MB/s of
    `shard_reader.tar_members` against `webdataset.tariterators.tar_file_iterator` (both tarfile "r|*"),
    and whole samples/s of `iter_shard` against `wds.tarfile_to_samples`.
  * loader: utterances/s of the training stream with --workers DataLoader workers through `AudioLoader`:
      current = `TrainAudioDataset` (the project's shard split/resampling, counting and shuffle buffer over
                `iter_shard`);
      wds     = `wds.DataPipeline(SimpleShardList, split_by_node, split_by_worker, <cycle>, tarfile_to_samples,
                shuffle)` (--mode split) or `wds.DataPipeline(ResampledShards, tarfile_to_samples, shuffle)`
                (--mode resampled, the datamodule's mode when data.epoch_samples is set),
    both followed by the SAME decode (`decode_sample`, crops of --crop seconds) and batching
    (`BucketBatcher` + `collate` into the loader's shared-memory SlotPool). CPU microseconds per utterance
    (this process and its finished workers) are given too: a figure that other processes on the same
    cores perturb less than wall-clock throughput.

Issue #19's decision rule was: read through the library when it reaches >= 2/3 of the loader throughput
of the project's former hand-written tar parser.  It did (0.89x), so shards are now read through tarfile
the way webdataset reads them; the figures show what the project's stream costs next to the library's.
The last line is a one-line summary.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from torch.utils.data import IterableDataset, get_worker_info

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import webdataset as wds  # noqa: E402
from webdataset.gopen import gopen  # noqa: E402
from webdataset.tariterators import tar_file_iterator  # noqa: E402

from flexitrain.data.batching import BucketBatcher, collate  # noqa: E402
from flexitrain.data.decode import DecodeConfig  # noqa: E402
from flexitrain.data.pipeline import (AudioLoader, LoaderConfig, TrainAudioDataset, decode_sample,  # noqa: E402
                                      expand_shards)
from flexitrain.data.shard_reader import iter_shard, tar_members  # noqa: E402
from flexitrain.data.stats import DataStats, NullStats  # noqa: E402



# ----------------------------------------------------------------------------- the webdataset pipeline
def _cycle_shuffled(seed: int):
    """wds stage: this worker's shard list (after split_by_node/split_by_worker), reshuffled and repeated
    forever, as TrainAudioDataset's split mode does (webdataset's SimpleShardList is a single pass)."""

    def stage(src):
        mine = list(src)
        if not mine:
            return
        for epoch_pass in itertools.count():
            order = list(mine)
            random.Random(seed * 1000003 + epoch_pass).shuffle(order)
            yield from order

    return stage


class WdsTrainDataset(IterableDataset):
    """The training stream built from webdataset's stages, then the project's decode, bucketing and collate
    (as TrainAudioDataset._batches/_emit, without mixtures, features or augmentation)."""

    def __init__(self, urls, decode: DecodeConfig, batching: LoaderConfig, *, num_workers: int, resampled: bool,
                 shuffle_buffer: int, seed: int = 0):
        self.urls, self.decode, self.batching = list(urls), decode, batching
        self.num_workers, self.resampled, self.shuffle_buffer, self.seed = num_workers, resampled, shuffle_buffer, seed
        self.stats = DataStats(num_workers)
        self.pool = None  # set by AudioLoader
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def max_batch_numel(self) -> int:
        longest = self.decode.crop_samples or int(np.ceil(self.decode.max_duration * self.decode.sample_rate))
        return max(self.batching.budget, longest + 16)

    def pipeline(self, wid: int) -> wds.DataPipeline:
        seed = hash((self.seed, self.epoch, wid)) & 0x7FFFFFFF
        if self.resampled:
            shards = [wds.ResampledShards(self.urls, seed=seed, deterministic=True)]
        else:
            shards = [wds.SimpleShardList(self.urls), wds.split_by_node, wds.split_by_worker, _cycle_shuffled(seed)]
        stages = shards + [wds.tarfile_to_samples(handler=wds.warn_and_continue)]
        if self.shuffle_buffer > 1:
            stages.append(wds.shuffle(self.shuffle_buffer, initial=min(64, self.shuffle_buffer), seed=seed))
        return wds.DataPipeline(*stages)

    def __iter__(self):
        info = get_worker_info()
        wid = 0 if info is None else info.id
        self.stats.start()
        rng = np.random.default_rng([self.seed, self.epoch, 0, wid])
        d, b = self.decode, self.batching
        max_len = d.crop_samples or int(d.max_duration * d.sample_rate)
        batcher = BucketBatcher(b.budget, b.max_batch_size, b.num_buckets, max_len)
        for sample in self.pipeline(wid):
            item = decode_sample(sample, d, self.stats, rng)
            if item is None:
                continue
            items = batcher.add(item)
            if items is not None:
                self.stats.add("samples", len(items))
                self.stats.add("batches")
                pad_to = batcher.padded_length(items) if b.pad_to_bucket else None
                batch = collate(items, pool=self.pool, pad_to=pad_to)
                self.stats.flush()
                yield batch


# ----------------------------------------------------------------------------- measurements
def _cpu() -> float:
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _raw_current_members(urls) -> tuple[int, int]:
    members = nbytes = 0
    for url in urls:
        with gopen(url, "rb") as stream:
            for _name, read in tar_members(stream, url):
                nbytes += len(read())
                members += 1
    return members, nbytes


def _raw_wds_members(urls) -> tuple[int, int]:
    members = nbytes = 0
    for url in urls:
        with gopen(url, "rb") as stream:
            for d in tar_file_iterator(stream):
                nbytes += len(d["data"])
                members += 1
    return members, nbytes


def _raw_current_samples(urls) -> tuple[int, int]:
    stats = NullStats()
    return sum(1 for u in urls for _ in iter_shard(u, stats)), 0


def _raw_wds_samples(urls) -> tuple[int, int]:
    return sum(1 for _ in wds.tarfile_to_samples()(iter([{"url": u} for u in urls]))), 0


def _timed(fn, urls, min_seconds: float) -> tuple[float, float]:
    """(items/s, MB/s) over whole passes until min_seconds have passed."""
    n = nbytes = 0
    start = time.perf_counter()
    while True:
        a, b = fn(urls)
        n, nbytes = n + a, nbytes + b
        wall = time.perf_counter() - start
        if wall >= min_seconds:
            return n / wall, nbytes / wall / 1e6


def _loader_run(dataset, workers: int, seconds: float) -> dict:
    loader = AudioLoader(dataset, num_workers=workers, persistent_workers=False)
    it = iter(loader)
    next(it)  # worker start-up is not throughput
    utts = batches = 0
    cpu0, start = _cpu(), time.perf_counter()
    for batch in it:
        utts += len(batch["keys"])
        batches += 1
        if time.perf_counter() - start >= seconds:
            break
    wall = time.perf_counter() - start
    del it, batch  # stops the workers, so their CPU time is counted
    cpu = _cpu() - cpu0
    return {"utt_s": utts / wall, "cpu_us_per_utt": cpu / max(utts, 1) * 1e6, "batches": batches}


def _summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def _fmt(s: dict, digits: int = 1) -> str:
    return f"{s['median']:.{digits}f} (min {s['min']:.{digits}f}, max {s['max']:.{digits}f}, n={s['n']})"


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", default="data/demo/train", help="shard directory, brace pattern or glob")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs per variant")
    p.add_argument("--seconds", type=float, default=8.0, help="timed seconds per loader run")
    p.add_argument("--raw-seconds", type=float, default=1.0, help="timed seconds per raw-parsing run")
    p.add_argument("--mode", choices=["resampled", "split"], default="resampled",
                   help="shard order: resampled (data.epoch_samples set) or split over workers and cycled")
    p.add_argument("--crop", type=float, default=3.0, help="train crop seconds")
    p.add_argument("--batch-seconds", type=float, default=48.0)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--num-buckets", type=int, default=8)
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--sample-rate", type=int, default=16000)
    p.add_argument("--skip-raw", action="store_true")
    p.add_argument("--skip-loader", action="store_true")
    p.add_argument("--json", default=None, help="write all runs and summaries here")
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    urls = expand_shards(args.shards, "shards")
    out: dict = {"args": vars(args), "load_average_before": os.getloadavg()[0], "webdataset": wds.__version__}

    if not args.skip_raw:
        raw = {k: [] for k in ("current_members", "wds_members", "current_samples", "wds_samples")}
        mb = {"current_members": [], "wds_members": []}
        fns = {"current_members": _raw_current_members, "wds_members": _raw_wds_members,
               "current_samples": _raw_current_samples, "wds_samples": _raw_wds_samples}
        for r in range(args.repeats):
            for level in ("members", "samples"):
                order = ("current", "wds") if r % 2 == 0 else ("wds", "current")
                for v in order:
                    name = f"{v}_{level}"
                    rate, mbs = _timed(fns[name], urls, args.raw_seconds)
                    raw[name].append(rate)
                    if name in mb:
                        mb[name].append(mbs)
        out["raw"] = {k: _summary(v) for k, v in raw.items()}
        out["raw_mb_s"] = {k: _summary(v) for k, v in mb.items()}
        out["raw_runs"] = raw
        ratios_m = [w / c for w, c in zip(raw["wds_members"], raw["current_members"])]
        ratios_s = [w / c for w, c in zip(raw["wds_samples"], raw["current_samples"])]
        out["raw_ratio_members"], out["raw_ratio_samples"] = _summary(ratios_m), _summary(ratios_s)
        print(f"[raw] tar parsing, 1 process, {len(urls)} shards (page cache warm), {args.repeats} interleaved runs:")
        for v in ("current", "wds"):
            print(f"  {v:8s} members/s {_fmt(out['raw'][f'{v}_members'], 0)} | MB/s "
                  f"{_fmt(out['raw_mb_s'][f'{v}_members'], 0)} | samples/s {_fmt(out['raw'][f'{v}_samples'], 0)}")
        print(f"  wds/current (per-pair ratio) members {_fmt(out['raw_ratio_members'], 3)} | "
              f"samples {_fmt(out['raw_ratio_samples'], 3)}")

    if not args.skip_loader:
        from flexitrain.data.datamodule import AudioDataModule

        dm = AudioDataModule(train_shards=args.shards, sample_rate=args.sample_rate, train_crop_seconds=args.crop,
                             batch_seconds=args.batch_seconds, max_batch_size=args.max_batch_size,
                             num_buckets=args.num_buckets, num_workers=args.workers,
                             shuffle_buffer=args.shuffle_buffer, rank=0, world_size=1)
        decode, batching, resampled = dm.train_decode, dm.batching, args.mode == "resampled"

        def make(v: str):
            if v == "current":
                return TrainAudioDataset(urls, decode, batching, num_workers=args.workers, resampled=resampled,
                                         shuffle_shards=True, shuffle_buffer=args.shuffle_buffer,
                                         batches_per_worker=10**9, seed=0)
            return WdsTrainDataset(urls, decode, batching, num_workers=args.workers, resampled=resampled,
                                   shuffle_buffer=args.shuffle_buffer, seed=0)

        runs = {"current": [], "wds": []}
        for r in range(args.repeats):
            for v in (("current", "wds") if r % 2 == 0 else ("wds", "current")):
                res = _loader_run(make(v), args.workers, args.seconds)
                runs[v].append(res)
                print(f"  run {r + 1} {v:8s} {res['utt_s']:8.1f} utt/s  {res['cpu_us_per_utt']:8.0f} CPU us/utt  "
                      f"(load {os.getloadavg()[0]:.2f})", flush=True)
        ut = {v: [x["utt_s"] for x in runs[v]] for v in runs}
        cpu = {v: [x["cpu_us_per_utt"] for x in runs[v]] for v in runs}
        out["loader"] = {v: {"utt_s": _summary(ut[v]), "cpu_us_per_utt": _summary(cpu[v])} for v in runs}
        out["loader_runs"] = runs
        ratio = out["loader"]["wds"]["utt_s"]["median"] / out["loader"]["current"]["utt_s"]["median"]
        pair = _summary([w / c for w, c in zip(ut["wds"], ut["current"])])
        cpu = {v: out["loader"][v]["cpu_us_per_utt"]["median"] for v in runs}
        cpu_ratio = cpu["current"] / cpu["wds"]  # wds throughput / current's, if both were CPU bound
        out.update(ratio=ratio, pair_ratio=pair, cpu_ratio=cpu_ratio)
        print(f"[loader] {args.workers} workers, mode {args.mode}, crop {args.crop} s, {args.repeats} interleaved runs "
              f"of {args.seconds:g} s:")
        for v in ("current", "wds"):
            print(f"  {v:8s} utt/s {_fmt(out['loader'][v]['utt_s'])} | CPU us/utt "
                  f"{_fmt(out['loader'][v]['cpu_us_per_utt'], 0)}")
        print(f"  wds/current: ratio of medians {ratio:.3f} | per-pair ratio {_fmt(pair, 3)} | "
              f"by CPU per utterance {cpu_ratio:.3f}")

    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1, default=str))
    parts = []
    if "loader" in out:
        parts.append(f"loader wds {out['loader']['wds']['utt_s']['median']:.1f} utt/s vs current "
                     f"{out['loader']['current']['utt_s']['median']:.1f} utt/s = {out['ratio']:.2f}x "
                     f"(CPU/utt {out['cpu_ratio']:.2f}x)")
    if "raw" in out:
        parts.append(f"raw members/s wds {out['raw']['wds_members']['median']:.0f} vs current "
                     f"{out['raw']['current_members']['median']:.0f} = {out['raw_ratio_members']['median']:.2f}x")
    print("bench_wds_reader: " + " | ".join(parts))
    return out


if __name__ == "__main__":
    main()
