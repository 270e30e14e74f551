"""Counters of what the data pipeline skipped or repaired, shared with DataLoader workers.

Each dataset owns a small int64 table in shared memory (one row per worker plus one for
the main process).  A worker only writes its own row, so no locking is needed, and the
main process can read the totals at any time: the counts survive worker processes and do
not travel inside batches.

Besides the fixed REASONS a dataset may count `extra` named counters that depend on its
configuration: samples per corpus of a weighted mixture (`corpus/<name>`, see mixing.py) and
items changed by each augmentation (`augment/<transform>`, see augment.py).  They are info,
not bad input, and are logged as `data/<split>/<name>` like the reasons.
"""

from __future__ import annotations

import numpy as np
import torch

# Skipped (the sample is dropped).
SKIP_REASONS = (
    "corrupt_audio",  # undecodable, truncated or unreadable audio bytes
    "empty_audio",  # zero frames
    "silent_audio",  # peak below silence_threshold
    "nonfinite_audio",  # NaN or inf samples
    "too_short",  # shorter than min_duration
    "too_long",  # over max_duration with long_clip_policy="skip", or a member over shard_reader.MAX_MEMBER_BYTES
    "missing_audio",  # no flac/wav/ogg/mp3 member in the sample
)
# Repaired and kept.
FIX_REASONS = (
    "resampled",  # sample rate differed from the target rate
    "multichannel",  # mixed down to mono
    "pcm_8bit",  # 8-bit PCM decoded to float32
    "pcm_24bit",  # 24-bit PCM decoded to float32
    "long_cropped",  # longer than max_duration with long_clip_policy="crop"
    "bad_json",  # malformed metadata: the audio is kept with empty metadata
    "duplicate_member",  # a second member with a sample's key and extension: the first is kept
)
# Shard level and bookkeeping.
SHARD_REASONS = ("empty_shard", "bad_shard")
INFO_COUNTERS = ("samples", "batches", "shards_read", "eval_padding_batches")
REASONS = SKIP_REASONS + FIX_REASONS + SHARD_REASONS + INFO_COUNTERS
INDEX = {name: i for i, name in enumerate(REASONS)}


def current_row() -> int:
    """Row of the calling process: its worker id, or -1 (the last row) in the main process."""
    info = torch.utils.data.get_worker_info()
    return -1 if info is None else info.id


def is_info(name: str) -> bool:
    """Bookkeeping counters (and every extra counter: corpus/..., augment/...), not bad input."""
    return name in INFO_COUNTERS or "/" in name


class DataStats:
    """Per-process counters; `local` is written in the hot path, `flush()` publishes it.
    `extra`: further counter names (e.g. "corpus/emilia"), appended after REASONS."""

    def __init__(self, num_workers: int, extra: tuple[str, ...] | list[str] = ()):
        extra = tuple(extra)
        clash = [n for n in extra if n in INDEX or "/" not in n]
        if clash or len(set(extra)) != len(extra):
            raise ValueError(f"extra data counters must be unique 'group/name' strings, got {list(extra)}")
        self.names = REASONS + extra
        self.index = {**INDEX, **{n: len(REASONS) + i for i, n in enumerate(extra)}}
        self.table = torch.zeros(max(num_workers, 0) + 1, len(self.names), dtype=torch.int64).share_memory_()
        self.local = np.zeros(len(self.names), dtype=np.int64)
        self._row: int | None = None

    def add(self, reason: str, n: int = 1) -> None:
        self.local[self.index[reason]] += n

    def start(self) -> None:
        """Called at the start of an iteration in the process that iterates."""
        self._row = current_row()
        if self._row >= self.table.shape[0] - 1:  # more workers than announced: share the last worker row
            self._row = self.table.shape[0] - 2
        self.local = self.table[self._row].numpy().copy()

    def flush(self) -> None:
        if self._row is None:
            self._row = current_row()
        self.table[self._row] = torch.from_numpy(self.local)

    def totals(self) -> dict[str, int]:
        return dict(zip(self.names, self.table.sum(0).tolist()))


class NullStats(DataStats):
    """Counts nothing (for re-reads whose problems were already counted)."""

    def __init__(self):
        self.names, self.index = REASONS, INDEX
        self.local = np.zeros(len(REASONS), dtype=np.int64)

    def add(self, reason: str, n: int = 1) -> None:
        pass

    def flush(self) -> None:
        pass


def merge(*totals: dict[str, int]) -> dict[str, int]:
    out = dict.fromkeys(REASONS, 0)
    for t in totals:
        for k, v in t.items():
            out[k] = out.get(k, 0) + v
    return out


def format_summary(summary: dict[str, int]) -> str:
    bad = {k: v for k, v in summary.items() if v and not is_info(k)}
    extra = {k: v for k, v in summary.items() if "/" in k}
    head = f"{summary.get('samples', 0)} samples in {summary.get('batches', 0)} batches"
    if extra:  # per-corpus samples and augmentation counts
        head += " (" + ", ".join(f"{k}={v}" for k, v in extra.items()) + ")"
    return head + ("; " + ", ".join(f"{k}={v}" for k, v in bad.items()) if bad else "; no bad input")


try:  # the callback is optional: the data layer itself does not need Lightning
    from lightning.pytorch import Callback
    from lightning.pytorch.utilities import rank_zero_info

    class DataStatsLogger(Callback):
        """Logs the datamodule's bad-input counters (summed over ranks) at each epoch end
        as `data/<split>/<reason>` -- with the split's extra counters, `data/train/corpus/<name>`
        and `data/train/augment/<transform>` -- and prints the summary when fitting/testing ends."""

        def _log(self, trainer, pl_module, split: str) -> None:
            dm = trainer.datamodule
            if dm is None or not hasattr(dm, "bad_input_summary"):
                return
            summary = dm.bad_input_summary(split)
            # Every rank logs every key (the sum reduction needs the same calls): the extra names come from the
            # config (corpus names, augmentations), the same on all ranks.
            for name in REASONS + tuple(k for k in summary if k not in INDEX):
                pl_module.log(f"data/{split}/{name}", float(summary.get(name, 0)), sync_dist=True, reduce_fx="sum")

        def on_train_epoch_end(self, trainer, pl_module):
            self._log(trainer, pl_module, "train")

        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                self._log(trainer, pl_module, "val")

        def on_test_epoch_end(self, trainer, pl_module):
            self._log(trainer, pl_module, "test")

        def _print(self, trainer):
            dm = trainer.datamodule
            if dm is not None and hasattr(dm, "bad_input_summary"):
                rank_zero_info(f"[data] rank 0 input summary: {format_summary(dm.bad_input_summary())}")

        def on_fit_end(self, trainer, pl_module):
            self._print(trainer)

        def on_test_end(self, trainer, pl_module):
            self._print(trainer)

except ImportError:  # pragma: no cover
    DataStatsLogger = None
