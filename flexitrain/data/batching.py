"""Dynamic batching by a budget of padded audio samples, length bucketing, and collation.

Budget rule (all modes): a batch of B items padded to T samples has B * T <= budget, except a
single item longer than the budget, which forms a batch alone.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch


class Item(NamedTuple):
    audio: np.ndarray  # float32 [T] at the model rate
    key: str
    meta: dict
    offset: float  # crop start in seconds within the source utterance


def _text(meta: dict, name: str) -> str:
    value = meta.get(name)
    return "" if value is None else str(value)


def _shared_zeros(shape: tuple[int, ...]) -> torch.Tensor:
    """A float32 tensor allocated in shared memory: sending it from a DataLoader worker to the main
    process then costs no extra copy (torch would otherwise copy every batch into shared memory)."""
    n = int(np.prod(shape))
    storage = torch.UntypedStorage._new_shared(max(n, 1) * 4)
    t = torch.empty(0, dtype=torch.float32).set_(storage, 0, (n,))
    return t.view(shape)  # fresh shared memory is zero-filled by the kernel


def collate(items: list[Item], shared: bool | None = None) -> dict:
    """-> {"audio": float32 [B,1,T] (zero padding at the end), "lengths": int64 [B], "offsets":
    float32 [B] (crop start, seconds), "keys"/"texts"/"speakers"/"languages": list[str]}.
    Filled through numpy: torch's intra-op thread pool makes small copies slow on a busy CPU."""
    if shared is None:
        shared = torch.utils.data.get_worker_info() is not None
    lengths = np.fromiter((it.audio.shape[0] for it in items), dtype=np.int64, count=len(items))
    shape = (len(items), 1, int(lengths.max()))
    audio = _shared_zeros(shape) if shared else torch.from_numpy(np.zeros(shape, dtype=np.float32))
    view = audio.numpy()
    for i, it in enumerate(items):
        view[i, 0, : it.audio.shape[0]] = it.audio
    offsets = [it.offset for it in items]
    return {
        "audio": audio,
        # In a worker these stay lists: every tensor sent to the main process costs a shared-memory
        # segment (~0.5 ms); AudioLoader/finalize_batch turn them into tensors there.
        "lengths": lengths.tolist() if shared else torch.from_numpy(lengths),
        "offsets": offsets if shared else torch.tensor(offsets, dtype=torch.float32),
        "keys": [it.key for it in items],
        "texts": [_text(it.meta, "text") for it in items],
        "speakers": [_text(it.meta, "speaker") for it in items],
        "languages": [_text(it.meta, "language") for it in items],
    }


def finalize_batch(batch: dict) -> dict:
    """Main-process half of `collate`: lengths/offsets lists -> int64/float32 tensors."""
    if isinstance(batch.get("lengths"), list):
        batch["lengths"] = torch.tensor(batch["lengths"], dtype=torch.int64)
        batch["offsets"] = torch.tensor(batch["offsets"], dtype=torch.float32)
    return batch


def lengths_to_mask(lengths: torch.Tensor, length: int | None = None) -> torch.Tensor:
    """bool [B, 1, T], True on valid samples (batches carry lengths only: a mask is cheap to make
    on the device and would add a quarter to the bytes each batch moves between processes)."""
    length = int(lengths.max()) if length is None else length
    return (torch.arange(length, device=lengths.device) < lengths[:, None]).unsqueeze(1)


class BucketBatcher:
    """Streams items into `num_buckets` length buckets over (0, max_samples]; a bucket is
    emitted when it holds as many items as fit the budget at the bucket's upper length."""

    def __init__(self, budget_samples: int, max_batch_size: int, num_buckets: int, max_samples: int):
        if budget_samples <= 0 or max_batch_size <= 0 or num_buckets <= 0 or max_samples <= 0:
            raise ValueError("batch budget, max_batch_size, num_buckets and max length must be positive")
        self.max_samples = max_samples
        self.width = max_samples / num_buckets
        self.upper = [math.ceil((b + 1) * self.width) for b in range(num_buckets)]
        self.capacity = [max(1, min(max_batch_size, budget_samples // u)) for u in self.upper]
        self.buckets: list[list[Item]] = [[] for _ in range(num_buckets)]

    def add(self, item: Item) -> list[Item] | None:
        n = item.audio.shape[0]
        if n > self.max_samples:
            return [item]
        b = min(len(self.buckets) - 1, max(0, math.ceil(n / self.width) - 1))
        bucket = self.buckets[b]
        bucket.append(item)
        if len(bucket) >= self.capacity[b]:
            self.buckets[b] = []
            return bucket
        return None

    def flush(self):
        for b, bucket in enumerate(self.buckets):
            if bucket:
                yield bucket
            self.buckets[b] = []


def plan_batches(lengths: list[int], budget_samples: int, max_batch_size: int) -> list[list[int]]:
    """Greedy packing of items sorted by length (a stable, deterministic order) -> lists of indices."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:  # ascending: the newest item sets the padded length
        if current and ((len(current) + 1) * lengths[i] > budget_samples or len(current) >= max_batch_size):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches
