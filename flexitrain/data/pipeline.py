"""WebDataset shard reading for training and evaluation.

Training (`TrainAudioDataset`): an endless per-worker sample stream, either *resampled*
(each worker draws shards with replacement, seeded by seed/epoch/rank/worker) or *split*
(shards dealt to ranks x workers, reshuffled and cycled; with fewer shards than ranks x
workers every worker reads all shards and keeps every (ranks*workers)-th sample).  An epoch
is a fixed number of batches per worker, so every DDP rank makes the same number of steps.
A weighted mixture of corpora (`Mixture`, see mixing.py) draws each sample from one corpus's
stream of that kind, with the corpus's probability; augmentation (augment.py) changes the
collated batches in the workers.

Evaluation (`EvalAudioDataset`): a plan is made once in `__init__` (each rank reads and
decodes the whole eval set once) -- the usable samples, their lengths and the batches.  The
batches are dealt to ranks in contiguous blocks whose count is equal on every rank, so every
usable sample is seen exactly once over all ranks x workers and no rank waits at the end.

Both datasets batch in their workers; iterate them with `AudioLoader` (it completes worker
batches in the main process and recycles their shared memory).  Each shard is read through
webdataset's tar iteration and sample grouping (`shard_reader.iter_shard`), which counts empty and
broken shards instead of raising.
"""

from __future__ import annotations

import glob
import itertools
import json
import logging
import math
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import braceexpand
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import AugmentConfig, Augmenter
from .batching import BucketBatcher, Item, SlotPool, collate, finalize_batch, plan_batches
from .decode import AUDIO_KEYS, DecodeConfig, decode_audio, parse_meta
from .mixing import Mixture, mix
from .shard_reader import iter_shard
from .stats import DataStats, NullStats
from .teacher_features import SidecarReader, crop_features
from .worker_exit import track_workers

log = logging.getLogger(__name__)
_REMOTE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")  # pipe:, http:, s3:, ... (not C:\ style paths on Linux)


# ----------------------------------------------------------------------------- shard lists
def expand_shards(spec, what: str = "shards") -> list[str]:
    """A brace pattern, glob, directory (all *.tar inside), `pipe:`/remote URL, or a list of
    these -> shard URLs.  Local patterns that match nothing raise ValueError."""
    if spec is None:
        return []
    if not isinstance(spec, str):
        if not isinstance(spec, Sequence) and not hasattr(spec, "__iter__"):
            raise TypeError(f"{what}: expected a string or a list of strings, got {type(spec).__name__}")
        urls = [u for s in spec for u in expand_shards(s, what)]
        if not urls:
            raise ValueError(f"{what}: the shard list {list(spec)!r} is empty")
        return urls
    spec = spec.strip()
    if not spec:
        raise ValueError(f"{what}: empty shard specification")
    if _REMOTE.match(spec) and not spec.startswith("file:"):
        return list(braceexpand.braceexpand(spec))
    path = spec[5:] if spec.startswith("file:") else spec
    path = os.path.expanduser(path)
    if os.path.isdir(path):
        urls = sorted(glob.glob(os.path.join(path, "*.tar")))
        if not urls:
            raise ValueError(f"{what}: directory {path!r} contains no *.tar shards")
        return urls
    urls, missing = [], []
    for p in braceexpand.braceexpand(path):
        hits = sorted(glob.glob(p)) if glob.has_magic(p) else ([p] if os.path.isfile(p) else [])
        if not hits:
            missing.append(p)
        urls.extend(hits)
    if not urls:
        raise ValueError(f"{what}: {spec!r} matches no shard files")
    if missing:
        shown = ", ".join(missing[:3]) + (" ..." if len(missing) > 3 else "")
        raise ValueError(f"{what}: {len(missing)} shard(s) of {spec!r} do not exist: {shown}")
    return urls


def load_index(urls: list[str]) -> dict | None:
    """Sample counts and durations from `index.json` beside local shards, when it covers all of
    them: {"num_samples": N, "duration": secs, "per_shard": {url: n}}; otherwise None."""
    per_shard, duration, cache = {}, 0.0, {}
    for url in urls:
        if _REMOTE.match(url) and not url.startswith("file:"):
            return None
        path = os.path.abspath(url[5:] if url.startswith("file:") else url)
        folder = os.path.dirname(path)
        if folder not in cache:
            try:
                with open(os.path.join(folder, "index.json")) as f:
                    idx = json.load(f)
                cache[folder] = {s["name"]: s for s in idx.get("shards", [])}
            except (OSError, ValueError, TypeError, KeyError):
                cache[folder] = None
        entry = (cache[folder] or {}).get(os.path.basename(path))
        if entry is None or "num_samples" not in entry:
            return None
        per_shard[url] = int(entry["num_samples"])
        duration += float(entry.get("duration") or 0.0)
    return {"num_samples": sum(per_shard.values()), "duration": duration, "per_shard": per_shard}


def decode_sample(sample: dict, cfg: DecodeConfig, stats: DataStats, rng) -> Item | None:
    for ext in AUDIO_KEYS:
        data = sample.get(ext)
        if data is not None:
            break
    else:
        stats.add("too_long" if "__oversize__" in sample else "missing_audio")
        return None
    meta = parse_meta(sample.get("json"), stats)
    out = decode_audio(data, cfg, stats, rng)
    if out is None:
        return None
    semantic = sample.get("__semantic__")
    if semantic is not None:  # pre-extracted teacher frames of the whole utterance: keep the crop's
        hop = cfg.crop_align
        semantic = crop_features(semantic, round(out[1] * cfg.sample_rate / hop) * hop, out[0].shape[0], hop)
    return Item(out[0], sample["__key__"], meta, out[1], semantic, sample.get("__corpus__", -1))


def noise_clips(urls: list[str], cfg: DecodeConfig, rng: np.random.Generator) -> Iterator[np.ndarray | None]:
    """Endless noise clips for augmentation: shards drawn with replacement, every audio sample decoded
    (a random crop of cfg.crop_samples); None for an unusable sample or an empty/broken shard, so the
    consumer can tell a dead noise set from a slow one."""
    stats = NullStats()  # noise problems are not the corpus's bad input
    while True:
        got = False
        for sample in iter_shard(urls[int(rng.integers(len(urls)))], stats):
            data = next((sample[e] for e in AUDIO_KEYS if e in sample), None)
            out = None if data is None else decode_audio(data, cfg, stats, rng)
            got = got or out is not None
            yield None if out is None else out[0]
        if not got:
            yield None


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


@dataclass
class LoaderConfig:
    sample_rate: int = 16000
    batch_seconds: float = 48.0
    max_batch_size: int = 64
    num_buckets: int = 8
    pad_to_bucket: bool = True  # training batches padded to their bucket's upper edge: a fixed set of shapes

    @property
    def budget(self) -> int:
        return max(1, int(round(self.batch_seconds * self.sample_rate)))


# ----------------------------------------------------------------------------- loader
JOB_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGINT")


def ignore_job_signals(_worker_id: int = 0) -> None:
    """DataLoader worker init: leave the scheduler's signals to the main process. SLURM signals every process
    of a job step (preemption, `scontrol requeue`, the time-limit warning); a worker killed by one makes the
    main process raise "DataLoader worker is killed" at once, before it can finish the step, log it and write
    its checkpoint. The main process shuts the workers down itself (and they exit when it dies)."""
    import signal

    for name in JOB_SIGNALS:
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class AudioLoader(DataLoader):
    """DataLoader for the datasets below (they batch themselves).  It gives worker batches a
    reusable shared-memory SlotPool, finishes each batch in the main process (finalize_batch),
    and sets the dataset's epoch before each pass, from `epoch_fn` (e.g. the trainer's epoch, so
    a resumed run does not replay epoch 0) or by counting passes."""

    def __init__(self, dataset, epoch_fn=None, skip_fn=None, **kw):
        kw.setdefault("collate_fn", _as_is)  # batches are ready; default_convert would walk every string
        # Worker base seeds from a private generator: starting a pass never advances the global torch RNG,
        # so training randomness is identical whether or not a run was resumed (datasets seed themselves).
        kw.setdefault("generator", torch.Generator().manual_seed(0))
        kw.setdefault("worker_init_fn", ignore_job_signals)
        super().__init__(dataset, batch_size=None, **kw)
        self._epoch_fn, self._skip_fn, self._passes = epoch_fn, skip_fn, 0
        self.pool = None
        if self.num_workers > 0 and hasattr(dataset, "max_batch_numel"):
            slots = (self.prefetch_factor or 2) + 1  # the batches a worker may have queued, +1 in the making
            need = self.num_workers * slots * dataset.max_batch_numel() * 4
            if need <= 0.5 * _shm_free_bytes():  # a small /dev/shm (docker's 64 MB) would SIGBUS
                self.pool = SlotPool(self.num_workers, slots, dataset.max_batch_numel())
            else:
                log.info("shared memory too small for a %.0f MB batch pool; using per-batch tensors", need / 2**20)
            dataset.pool = self.pool

    def _epoch_len(self) -> int:
        try:
            return len(self)
        except TypeError:
            return 1 << 62

    def __iter__(self):
        skip = self._skip_fn() if self._skip_fn is not None else 0
        epoch = self._epoch_fn() if self._epoch_fn is not None else None
        epoch = self._passes if epoch is None else epoch
        if skip >= self._epoch_len():
            # The checkpoint was written after the epoch's last batch: Lightning resumes in that (finished) epoch
            # and asks for its loader before it moves on, then trains the next epoch on this very pass. So this
            # pass is the next epoch's stream, from its start.
            skip, epoch = 0, epoch + 1
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        self._passes += 1
        pool = self.pool
        if pool is not None:
            pool.reset()  # slots of an abandoned earlier pass
        pin = self.pin_memory and torch.cuda.is_available()
        workers = super().__iter__()
        track_workers(workers)  # stopped at interpreter exit if still running (they ignore SIGTERM)
        batches = (finalize_batch(batch, pool, pin) for batch in workers)
        # A run resumed mid-epoch replays the epoch's (deterministic) stream up to where it stopped.
        return itertools.islice(batches, skip, None) if skip else batches


def _as_is(batch):
    return batch


def _shm_free_bytes() -> float:
    try:
        st = os.statvfs("/dev/shm")
        return float(st.f_bavail * st.f_frsize)
    except OSError:
        return 0.0


def _max_batch_numel(decode: DecodeConfig, batching: LoaderConfig) -> int:
    """Largest B*T a batch can have: the budget, or one item of the longest possible length."""
    longest = decode.crop_samples or int(math.ceil(decode.max_duration * decode.sample_rate))
    return max(batching.budget, longest + 16)


# ----------------------------------------------------------------------------- training
class TrainAudioDataset(IterableDataset):
    """Endless shuffled stream of cropped utterances, batched in the worker; yields
    `batches_per_worker` batches per epoch (None: one pass over the split shards, single process).
    `mixture`: weighted corpora (urls must be mixture.all_urls; needs batches_per_worker): each sample
    is drawn from one corpus's own stream with its probability, counted as `corpus/<name>` in stats.
    `augment`: an AugmentConfig with expanded noise urls, applied to each collated batch (augment.py)."""

    max_consecutive_bad = 10000  # then the data is broken: raise instead of spinning forever

    def __init__(
        self,
        urls: list[str],
        decode: DecodeConfig,
        batching: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        resampled: bool = True,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        batches_per_worker: int | None = None,
        seed: int = 0,
        features: SidecarReader | None = None,
        mixture: Mixture | None = None,
        augment: AugmentConfig | None = None,
    ):
        if mixture is not None:
            if list(urls) != mixture.all_urls:
                raise ValueError("with a mixture, urls must be mixture.all_urls")
            if batches_per_worker is None:
                raise ValueError("a weighted corpus mixture needs a fixed epoch length (epoch_samples or index.json)")
        if augment is not None and augment.noise is not None and not augment.noise.urls:
            raise ValueError("augment.noise has no expanded shard urls (use augment.with_noise_urls)")
        if not urls:
            raise ValueError("TrainAudioDataset needs at least one shard")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        if batches_per_worker is None and world_size > 1:
            raise ValueError("with several ranks the epoch length must be fixed (epoch_samples or an index.json)")
        self.urls, self.decode, self.batching = list(urls), decode, batching
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.resampled, self.shuffle_shards, self.shuffle_buffer = resampled, shuffle_shards, shuffle_buffer
        self.batches_per_worker, self.seed = batches_per_worker, seed
        self.features = features  # pre-extracted teacher features: attached to each sample of a shard
        self.mixture, self.augment = mixture, augment
        self._augmenter: Augmenter | None = None  # made per worker and epoch in __iter__
        self.epoch = 0
        extra = (mixture.counter_names if mixture else ()) + (augment.counter_names if augment else ())
        self.stats = DataStats(num_workers, extra)
        self._corpus_col = self.stats.index["corpus/" + mixture.names[0]] if mixture else -1
        self.pool: SlotPool | None = None  # set by AudioLoader

    def max_batch_numel(self) -> int:
        copies = 2 if self.augment is not None and self.augment.keep_clean else 1  # audio + clean in one slot
        return copies * _max_batch_numel(self.decode, self.batching)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if self.batches_per_worker is None:
            raise TypeError("a single-pass training stream has no known length")
        return self.batches_per_worker * max(1, self.num_workers)

    def _read(self, url: str) -> Iterator[dict]:
        samples = iter_shard(url, self.stats)
        return samples if self.features is None else self.features.attach(url, samples)

    def _samples(self, wid: int, nw: int, rng: np.random.Generator) -> Iterator[dict]:
        """Raw samples for this worker; endless unless this is a single-pass epoch.  A mixture draws each
        sample's corpus from its own generator and the sample from that corpus's stream, which has a
        generator of its own too: the streams never shift one another, and the single-corpus stream
        (with `rng`) is the same as without mixing support."""
        if self.mixture is None:
            return self._corpus_samples(self.urls, wid, nw, rng)
        streams = [self._corpus_samples(list(urls), wid, nw,
                                        np.random.default_rng([self.seed, self.epoch, self.rank, wid, 101, c]), c)
                   for c, urls in enumerate(self.mixture.urls)]
        return mix(streams, self.mixture.probs, np.random.default_rng([self.seed, self.epoch, self.rank, wid, 100]))

    def _corpus_samples(self, urls: list[str], wid: int, nw: int, rng: np.random.Generator,
                        corpus: int | None = None) -> Iterator[dict]:
        """One corpus's samples for this worker (`corpus`: its index in the mixture, None without one)."""
        total, gid = self.world_size * nw, self.rank * nw + wid
        endless = self.batches_per_worker is not None
        n, barren = len(urls), 0
        what = "" if corpus is None else f" of corpus {self.mixture.names[corpus]!r}"
        if self.resampled:
            while True:
                got = False
                for sample in self._read(urls[int(rng.integers(n))]):
                    got = True
                    yield sample
                barren = 0 if got else barren + 1
                if barren > 3 * n + 10:
                    raise RuntimeError(f"{barren} shard draws{what} in a row gave no sample; shards unreadable? "
                                       f"{self.stats.totals()}")
        split_by_shard = n >= total
        mine = urls[gid::total] if split_by_shard else urls
        epoch_pass = 0
        while True:
            order = list(mine)
            if self.shuffle_shards:  # the sample-split fallback needs the same order on all workers
                parts = [self.seed, self.epoch, epoch_pass, 7] + ([] if corpus is None else [corpus])
                shared = np.random.default_rng(parts)
                (rng if split_by_shard else shared).shuffle(order)
            got, index = False, 0
            for url in order:
                for sample in self._read(url):
                    index += 1
                    if split_by_shard or (index - 1) % total == gid:
                        got = True
                        yield sample
            if not endless:
                return
            if not got:
                raise RuntimeError(f"a full pass over {len(order)} shards{what} gave this worker no sample: "
                                   f"{self.stats.totals()}")
            epoch_pass += 1

    def __iter__(self) -> Iterator[dict]:
        wid, nw = _worker()
        self.stats.start()
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, wid])
        samples = self._samples(wid, nw, rng)
        if self.shuffle_buffer > 1:
            samples = _shuffle(samples, self.shuffle_buffer, rng)
        bcfg = self.batching
        max_len = self.decode.crop_samples or int(self.decode.max_duration * self.decode.sample_rate)
        batcher = BucketBatcher(bcfg.budget, bcfg.max_batch_size, bcfg.num_buckets, max_len)
        self._augmenter = self._make_augmenter(wid, max_len)
        try:
            yield from self._batches(samples, batcher, rng)
        finally:
            self.stats.flush()

    def _make_augmenter(self, wid: int, max_len: int) -> Augmenter | None:
        """Augmentation draws and noise reads come from generators of their own (seeded like the sample
        stream), so the items and crops are those of the run without augmentation."""
        cfg = self.augment
        if cfg is None:
            return None
        clips = None
        if cfg.noise is not None:
            noise_decode = DecodeConfig(sample_rate=self.decode.sample_rate, crop_samples=max_len, random_crop=True,
                                        max_duration=math.inf, min_duration=self.decode.min_duration,
                                        silence_threshold=self.decode.silence_threshold)
            clips = noise_clips(list(cfg.noise.urls), noise_decode,
                                np.random.default_rng([self.seed, self.epoch, self.rank, wid, 202]))
        return Augmenter(cfg, self.decode.sample_rate, max_len,
                         np.random.default_rng([self.seed, self.epoch, self.rank, wid, 201]), self.stats, clips)

    def _batches(self, samples, batcher: BucketBatcher, rng) -> Iterator[dict]:
        emitted, barren = 0, 0
        quota = self.batches_per_worker
        if quota == 0:
            return
        for sample in samples:
            item = decode_sample(sample, self.decode, self.stats, rng)
            if item is None:
                barren += 1
                if barren >= self.max_consecutive_bad:
                    self.stats.flush()
                    raise RuntimeError(f"{barren} samples in a row were unusable: {self.stats.totals()}")
                continue
            barren = 0
            batch = batcher.add(item)
            if batch is not None:
                yield self._emit(batch, batcher)
                emitted += 1
                if quota is not None and emitted >= quota:
                    return
        for batch in batcher.flush():  # single-pass epochs only
            yield self._emit(batch, batcher)

    def _emit(self, items: list[Item], batcher: BucketBatcher) -> dict:
        self.stats.add("samples", len(items))
        self.stats.add("batches")
        if self.mixture is not None:  # samples per corpus in emitted batches (what the model sees)
            for it in items:
                self.stats.local[self._corpus_col + it.corpus] += 1
        pad_to = batcher.padded_length(items) if self.batching.pad_to_bucket else None
        aug = self._augmenter
        batch = collate(items, pool=self.pool, pad_to=pad_to, transform=aug,
                        keep_clean=aug is not None and self.augment.keep_clean)
        self.stats.flush()  # after collate: the augmentation counts of this batch too
        return batch


def _shuffle(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Shuffle buffer: starts yielding after 64 samples and grows (by one every other sample) to `size`."""
    buf: list[dict] = []
    start = min(size, 64)
    for sample in samples:
        buf.append(sample)
        if len(buf) >= size or (len(buf) >= start and rng.random() < 0.5):
            j = int(rng.integers(len(buf)))
            buf[j], buf[-1] = buf[-1], buf[j]
            yield buf.pop()
    rng.shuffle(buf)
    yield from buf


# ----------------------------------------------------------------------------- evaluation
class EvalAudioDataset(IterableDataset):
    """Deterministic, complete, non-duplicated evaluation batches for one rank (see module doc)."""

    def __init__(
        self,
        urls: list[str],
        decode: DecodeConfig,
        batching: LoaderConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
    ):
        if not urls:
            raise ValueError("EvalAudioDataset needs at least one shard")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.urls, self.decode, self.batching = list(urls), decode, batching
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.stats = DataStats(num_workers)
        self.pool: SlotPool | None = None  # set by AudioLoader
        self.batches = self._plan()  # this rank's batches: [(shard index, [keys])]

    def _plan(self) -> list[tuple[int, list[str]]]:
        # Scan (read + decode) the shards in the DataLoader workers, then plan in shard order.
        scan = _ShardScan(self.urls, self.decode, self.stats)
        found = dict(DataLoader(scan, batch_size=None, num_workers=min(self.num_workers, len(self.urls))))
        plan: list[tuple[int, list[str]]] = []
        total_items = 0
        for s in range(len(self.urls)):
            keys, lengths = found.get(s, ([], []))
            total_items += len(keys)
            for idx in plan_batches(lengths, self.batching.budget, self.batching.max_batch_size):
                plan.append((s, [keys[i] for i in idx]))
        if total_items == 0:
            raise ValueError(f"no usable evaluation sample in {len(self.urls)} shard(s): {self.stats.totals()}")
        plan = _equalize(plan, self.world_size)
        per_rank = len(plan) // self.world_size
        mine = plan[self.rank * per_rank : (self.rank + 1) * per_rank]
        self.stats.add("eval_padding_batches", sum(1 for b in mine if b[2]))
        self.stats.flush()
        return mine

    def __len__(self) -> int:
        return len(self.batches)

    def max_batch_numel(self) -> int:
        return _max_batch_numel(self.decode, self.batching)

    def __iter__(self) -> Iterator[dict]:
        wid, nw = _worker()
        self.stats.start()
        per = math.ceil(len(self.batches) / nw)  # contiguous block per worker: fewer shards to read
        mine = self.batches[wid * per : (wid + 1) * per]
        by_shard: dict[int, list[tuple[list[str], bool]]] = {}
        for s, keys, dup in mine:
            by_shard.setdefault(s, []).append((keys, dup))
        for s in sorted(by_shard):
            yield from self._shard_batches(s, by_shard[s])
        self.stats.flush()

    def _shard_batches(self, s: int, batches: list[tuple[list[str], bool]]) -> Iterator[dict]:
        """Read shard s once, keeping only the compressed bytes of wanted samples; decode and yield
        each batch as soon as all its samples have been read (memory: at most one shard's bytes)."""
        users: dict[str, list[int]] = {}
        for b, (keys, _) in enumerate(batches):
            for k in keys:
                users.setdefault(k, []).append(b)
        missing = [len(keys) for keys, _ in batches]
        uses = {k: len(v) for k, v in users.items()}
        raw: dict[str, dict] = {}
        for sample in iter_shard(self.urls[s], NullStats()):  # problems were counted by the plan
            key = sample["__key__"]
            if key not in users or key in raw:
                continue
            raw[key] = sample
            for b in users[key]:
                missing[b] -= 1
                if missing[b] == 0:
                    yield from self._batch(s, batches[b], raw)
                    for k in batches[b][0]:
                        uses[k] -= 1
                        if uses[k] == 0:
                            del raw[k]
        for b, n in enumerate(missing):
            if n:  # the shard changed since the plan (or a read failed this time)
                log.warning("evaluation shard %s: %d planned samples not found; batch shrunk", self.urls[s], n)
                yield from self._batch(s, batches[b], raw)

    def _batch(self, s: int, batch: tuple[list[str], bool], raw: dict[str, dict]) -> Iterator[dict]:
        keys, dup = batch
        items = [decode_sample(raw[k], self.decode, NullStats(), None) for k in keys if k in raw]
        items = [it for it in items if it is not None]
        if not items:
            log.warning("evaluation shard %s: a planned batch has no decodable sample now; dropped", self.urls[s])
            return
        out = collate(items, pool=self.pool)
        if dup:
            out["duplicate"] = True
        else:
            self.stats.add("samples", len(items))
        self.stats.add("batches")
        self.stats.flush()
        yield out


class _ShardScan(IterableDataset):
    """(shard index, (usable keys, lengths at the model rate)) per shard; shards dealt to workers."""

    def __init__(self, urls: list[str], decode: DecodeConfig, stats: DataStats):
        self.urls, self.decode, self.stats = urls, decode, stats

    def __iter__(self):
        wid, nw = _worker()
        self.stats.start()
        try:
            for s in range(wid, len(self.urls), nw):
                keys, lengths = [], []
                for sample in iter_shard(self.urls[s], self.stats):
                    item = decode_sample(sample, self.decode, self.stats, None)
                    if item is not None:
                        keys.append(item.key)
                        lengths.append(item.audio.shape[0])
                yield s, (keys, lengths)
        finally:
            self.stats.flush()


def _equalize(plan: list[tuple[int, list[str]]], world: int) -> list[tuple[int, list[str], bool]]:
    """Make len(plan) a multiple of `world` by halving the largest batches (within their shard),
    then, if only single-item batches are left, by repeating batches flagged duplicate=True."""
    plan = [(s, list(k)) for s, k in plan]
    while len(plan) % world:
        i = max(range(len(plan)), key=lambda j: len(plan[j][1]))
        s, keys = plan[i]
        if len(keys) < 2:
            break
        half = len(keys) // 2
        plan[i : i + 1] = [(s, keys[:half]), (s, keys[half:])]
    out = [(s, k, False) for s, k in plan]
    j = 0
    while len(out) % world:
        s, k, _ = out[j % len(plan)]
        out.append((s, k, True))
        j += 1
    return out
