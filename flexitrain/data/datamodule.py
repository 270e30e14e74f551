"""LightningDataModule over WebDataset audio shards.

Shards: `<name>.tar` files whose samples hold `__key__`, one audio member (flac, wav, ogg, mp3)
and optional `json` metadata ({"text", "speaker", "language", ...}).  `*_shards` take a brace
pattern, a glob, a directory (all *.tar in it), `pipe:` URLs, or a list of these; a local spec
that matches nothing is an error at setup().  An `index.json` beside the shards (written by
tools/make_shards.py) sizes epochs.

`train_shards` may also be a weighted mixture of corpora, a list of {shards, weight, name}: each
training sample comes from corpus c with probability weight_c / sum(weights), from that corpus's own
stream (split over ranks x workers, or resampled, as a single corpus); an epoch is epoch_samples draws,
or the corpora's total size (index.json beside every corpus).  See flexitrain.data.mixing; the data
stats count samples per corpus (data/train/corpus/<name>).

`augment` (off by default): random gain, additive noise from a noise shard set at an SNR range and a
random low-pass, applied in the workers to training batches -- to the codec input only (batches then
also carry "clean", the target) or to both.  See flexitrain.data.augment.

Batches are dicts: audio float32 [B,1,T] (zero-padded), lengths int64 [B] (valid samples),
offsets float32 [B] (crop start, seconds), keys/texts/speakers/languages list[str]
(flexitrain.data.batching.lengths_to_mask makes the [B,1,T] mask).  B * T <= batch_seconds *
sample_rate (a single longer item forms a batch alone), B <= max_batch_size.  Utterances
shorter than the crop are kept and padded, never dropped.  texts are whole-utterance
transcripts even when the audio is a crop.

Training: random crops of train_crop_seconds (None: whole utterances up to max_duration),
seeded by seed/epoch/rank/worker; length-bucketed dynamic batches built in the workers.
With `teacher_features` (a directory written by tools/extract_teacher_features.py) crops start on the
teacher's frame grid and batches also carry "semantic" [B, D, T] and "semantic_lengths" [B].
With `epoch_samples`, shards are drawn with replacement (resampled stream); without it the
index.json gives the epoch size and shards are dealt to ranks x workers and cycled (with
fewer shards than ranks x workers each worker reads all shards and keeps every n-th sample).
Each worker yields ceil(epoch_samples / (world * workers * nominal batch size)) batches, so
every DDP rank makes the same number of steps.  With neither, a single process makes one pass;
several ranks then raise.

Evaluation (val/test): deterministic crops of eval_crop_seconds from the start (None: whole
utterances).  setup() scans the eval shards once (in parallel workers) and plans the batches;
every usable utterance is seen exactly once over ranks x workers and every rank gets the same
number of batches.  When that needs a repeat (fewer usable batches than ranks even after
splitting), the repeated batch carries "duplicate": True and metrics should skip it.

Bad input (see flexitrain.data.stats): skipped or repaired, counted by reason in shared memory
(bad_input_summary(), DataStatsLogger for logged metrics); malformed JSON keeps the audio with
empty metadata.  Clips over max_duration are skipped (long_clip_policy="skip") or cut to
max_duration ("crop"); all-silent means peak |x| <= silence_threshold (of the crop read).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader

from .augment import parse_augment, with_noise_urls
from .batching import BucketBatcher
from .decode import DecodeConfig
from .mixing import Mixture, build_mixture, expected_draws, parse_corpora
from .pipeline import AudioLoader, EvalAudioDataset, LoaderConfig, TrainAudioDataset, expand_shards, load_index
from .stats import REASONS, format_summary, merge


class AudioDataModule(pl.LightningDataModule):
    def __init__(
        self,
        train_shards=None,
        val_shards=None,
        test_shards=None,
        sample_rate: int = 16000,
        train_crop_seconds: float | None = 3.0,
        eval_crop_seconds: float | None = None,
        batch_seconds: float = 48.0,
        max_batch_size: int = 64,
        num_buckets: int = 8,
        pad_to_bucket: bool = True,
        num_workers: int = 2,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 1000,
        epoch_samples: int | None = None,
        max_duration: float = 30.0,
        long_clip_policy: str = "skip",
        min_duration: float = 0.1,
        silence_threshold: float = 1e-4,
        seed: int = 0,
        pin_memory: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        teacher_features: str | None = None,
        augment: dict | None = None,
    ):
        super().__init__()
        if long_clip_policy not in ("skip", "crop"):
            raise ValueError(f"long_clip_policy must be 'skip' or 'crop', got {long_clip_policy!r}")
        if batch_seconds <= 0 or max_batch_size < 1 or num_buckets < 1 or sample_rate <= 0:
            raise ValueError("batch_seconds, max_batch_size, num_buckets and sample_rate must be positive")
        if epoch_samples is not None and epoch_samples < 1:
            raise ValueError(f"epoch_samples must be positive or None, got {epoch_samples}")
        # Weighted corpora and augmentation are checked here (weights, keys, ranges), the shard specs at setup().
        self.corpora = parse_corpora(train_shards, "train_shards")
        self.augment = parse_augment(augment, sample_rate, "augment")
        self.save_hyperparameters(logger=False)
        self.train_shards, self.val_shards, self.test_shards = train_shards, val_shards, test_shards
        self.sample_rate, self.num_workers, self.pin_memory, self.seed = sample_rate, num_workers, pin_memory, seed
        self.epoch_samples, self.shuffle_shards, self.shuffle_buffer = epoch_samples, shuffle_shards, shuffle_buffer
        self._rank, self._world = rank, world_size
        self.batching = LoaderConfig(sample_rate, batch_seconds, max_batch_size, num_buckets, pad_to_bucket)
        common = dict(sample_rate=sample_rate, max_duration=max_duration, long_clip_policy=long_clip_policy,
                      min_duration=min_duration, silence_threshold=silence_threshold)
        crop = lambda s: None if s is None else max(1, int(round(s * sample_rate)))  # noqa: E731
        self.train_decode = DecodeConfig(crop_samples=crop(train_crop_seconds), random_crop=True, **common)
        self.eval_decode = DecodeConfig(crop_samples=crop(eval_crop_seconds), random_crop=False, **common)
        self.datasets: dict[str, object] = {}
        # Pre-extracted teacher features for the training shards (tools/extract_teacher_features.py): crops are then
        # aligned to their frame grid and batches carry them; validation/test run the teacher (whole utterances: the
        # same features). The task checks `teacher_features_index["teacher"]` against its own teacher.
        self.teacher_features = teacher_features
        self.teacher_features_index = None
        if teacher_features is not None:
            from .teacher_features import read_index

            self.teacher_features_index = read_index(teacher_features)
            self.train_decode = dataclasses.replace(self.train_decode,
                                                    crop_align=int(self.teacher_features_index["hop_samples"]))
        if self.augment is not None and self.augment.keep_clean and teacher_features is not None:
            rank_zero_info("[data] augment.target=input with teacher_features: the cached teacher features are of the "
                           "clean audio, while a teacher run in the task would see the augmented input")
        # Our datasets' __len__ is exact per rank (fixed batches per worker / planned eval batches).
        warnings.filterwarnings("ignore", message=r"Your `IterableDataset` has `__len__` defined")

    # ------------------------------------------------------------------ ranks
    def _dist(self) -> tuple[int, int]:
        if self._rank is not None or self._world is not None:
            return int(self._rank or 0), int(self._world or 1)
        trainer = getattr(self, "trainer", None)
        if trainer is not None:
            return trainer.global_rank, trainer.world_size
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    # ------------------------------------------------------------------ setup
    def setup(self, stage: str | None = None) -> None:
        rank, world = self._dist()
        if stage in (None, "fit") and "train" not in self.datasets:
            if self.train_shards is None:
                raise ValueError("data.train_shards is not set")
            mixture = None
            if self.corpora is not None:
                mixture = build_mixture(self.corpora, expand_shards, "train_shards")
                urls = mixture.all_urls
            else:
                urls = expand_shards(self.train_shards, "train_shards")
            self.datasets["train"] = self._train_dataset(urls, rank, world, mixture)
        if stage in (None, "fit", "validate") and "val" not in self.datasets and self.val_shards is not None:
            self.datasets["val"] = self._eval_dataset(expand_shards(self.val_shards, "val_shards"), rank, world)
        if stage in (None, "test") and "test" not in self.datasets:
            if self.test_shards is None:
                if stage == "test":
                    raise ValueError("data.test_shards is not set")
            else:
                self.datasets["test"] = self._eval_dataset(expand_shards(self.test_shards, "test_shards"), rank, world)

    def _train_dataset(self, urls: list[str], rank: int, world: int,
                       mixture: Mixture | None = None) -> TrainAudioDataset:
        index = load_index(urls) if mixture is None else self._mixture_index(mixture)
        features = None
        if self.teacher_features is not None:
            from .teacher_features import SidecarReader, check_covers

            check_covers(self.teacher_features_index, self.teacher_features, urls)
            features = SidecarReader(self.teacher_features, self.teacher_features_index["hop_samples"])
        workers = max(1, self.num_workers)
        total = self.epoch_samples or (index["num_samples"] if index else None)
        per_worker = None
        if total is not None:
            per_worker = max(1, math.ceil(total / (world * workers * self.nominal_batch_size(index))))
        elif mixture is not None:
            missing = [n for n, u in zip(mixture.names, mixture.urls) if load_index(list(u)) is None]
            raise ValueError(f"weighted train_shards need a fixed epoch length: set data.epoch_samples or put an "
                             f"index.json beside the shards of corpus(es) {missing}")
        elif world > 1:
            raise ValueError(
                f"training on {world} ranks needs a fixed epoch length: set data.epoch_samples "
                "or put an index.json beside the train shards")
        for name, shards in ([("train", urls)] if mixture is None else zip(mixture.names, mixture.urls)):
            if self.epoch_samples is None and index is not None and len(shards) < world * workers:
                rank_zero_info(f"[data] {len(shards)} {name} shards < {world} ranks x {workers} workers: "
                               "every worker reads all of them and keeps every n-th sample")
        if mixture is not None:
            sizes = index["per_corpus"] if index else {}
            lines = [f"{n}: p={p:.3f}, ~{d:.0f} samples/epoch"
                     + (f" ({d / sizes[n]:.2f} x its {sizes[n]})" if sizes.get(n) else "")
                     for (n, d), p in zip(expected_draws(total, mixture).items(), mixture.probs)]
            rank_zero_info("[data] weighted train corpora: " + "; ".join(lines))
        augment = with_noise_urls(self.augment, expand_shards, "augment.noise.shards")
        return TrainAudioDataset(
            urls, self.train_decode, self.batching, rank=rank, world_size=world, num_workers=self.num_workers,
            resampled=self.epoch_samples is not None, shuffle_shards=self.shuffle_shards,
            shuffle_buffer=self.shuffle_buffer, batches_per_worker=per_worker, seed=self.seed, features=features,
            mixture=mixture, augment=augment)

    @staticmethod
    def _mixture_index(mixture: Mixture) -> dict | None:
        """An index for a mixture (when every corpus has one): the corpora's total size, and a duration that
        makes the mean utterance length the draw-weighted mean (it sizes the nominal batch)."""
        indexes = [load_index(list(u)) for u in mixture.urls]
        if any(i is None or not i["num_samples"] for i in indexes):
            return None
        total = sum(i["num_samples"] for i in indexes)
        mean = sum(p * i["duration"] / i["num_samples"] for p, i in zip(mixture.probs, indexes))
        return {"num_samples": total, "duration": mean * total,
                "per_corpus": {n: i["num_samples"] for n, i in zip(mixture.names, indexes)}}

    def _eval_dataset(self, urls: list[str], rank: int, world: int) -> EvalAudioDataset:
        return EvalAudioDataset(urls, self.eval_decode, self.batching, rank=rank, world_size=world,
                                num_workers=self.num_workers)

    def nominal_batch_size(self, index: dict | None = None) -> int:
        """Expected training batch size: the bucket capacity at the typical item length (the
        crop, or the mean utterance duration from index.json when shorter)."""
        d = self.train_decode
        max_len = d.crop_samples or int(d.max_duration * self.sample_rate)
        typical = max_len
        if index and index.get("duration") and index.get("num_samples"):
            typical = min(max_len, max(1, int(index["duration"] / index["num_samples"] * self.sample_rate)))
        b = BucketBatcher(self.batching.budget, self.batching.max_batch_size, self.batching.num_buckets, max_len)
        bucket = min(len(b.capacity) - 1, max(0, math.ceil(typical / b.width) - 1))
        return b.capacity[bucket]

    # ------------------------------------------------------------------ loaders
    def _loader(self, split: str) -> DataLoader:
        if split not in self.datasets:
            raise RuntimeError(f"no {split} data: set data.{split}_shards (and call setup())")
        trainer = getattr(self, "trainer", None)
        epoch_fn = (lambda: trainer.current_epoch) if trainer is not None else None
        skip_fn = None
        if split == "train" and trainer is not None:
            # Protocol: a LightningModule may expose `consume_resume_skip()` -> batches of the current
            # epoch it had already trained on when its checkpoint was written (0 otherwise).
            skip_fn = lambda: getattr(trainer.lightning_module, "consume_resume_skip", lambda: 0)()  # noqa: E731
        return AudioLoader(self.datasets[split], epoch_fn=epoch_fn, skip_fn=skip_fn, num_workers=self.num_workers,
                           pin_memory=self.pin_memory, persistent_workers=False)

    def train_dataloader(self):
        return self._loader("train")

    def val_dataloader(self):
        return self._loader("val") if "val" in self.datasets else []

    def test_dataloader(self):
        return self._loader("test")

    # ------------------------------------------------------------------ stats
    def bad_input_summary(self, split: str | None = None) -> dict[str, int]:
        """Counts by reason (see flexitrain.data.stats) on this rank, for one split or all."""
        if split is not None:
            ds = self.datasets.get(split)
            return ds.stats.totals() if ds is not None else dict.fromkeys(REASONS, 0)
        return merge(*(ds.stats.totals() for ds in self.datasets.values()))

    def teardown(self, stage: str | None = None) -> None:
        for split, ds in self.datasets.items():
            rank_zero_info(f"[data] {split}: {format_summary(ds.stats.totals())}")
