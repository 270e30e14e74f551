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
    semantic: np.ndarray | None = None  # float32 [T, D] pre-extracted teacher frames of the crop (or None)
    corpus: int = -1  # index of the item's corpus in a weighted mixture (data stats); -1: a single corpus


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


class SlotPool:
    """Reusable shared-memory batch buffers, `slots` per worker, made in the main process before
    the workers start.  A fresh shared-memory tensor per batch costs page faults on both sides
    (~3 ms per 3 MB batch here, a quarter of the loader's CPU); a worker instead fills a free slot
    and sends its number, and the main process copies the batch out and frees the slot.  When no
    slot is free (or the batch is larger than a slot) the worker falls back to a fresh tensor.
    Pages are only committed when first used."""

    def __init__(self, workers: int, slots: int, capacity: int):
        self.workers, self.slots, self.capacity = max(1, workers), max(1, slots), max(1, capacity)
        n = self.workers * self.slots * self.capacity
        storage = torch.UntypedStorage._new_shared(n * 4)
        self.data = torch.empty(0, dtype=torch.float32).set_(storage, 0, (n,)).view(
            self.workers, self.slots, self.capacity)
        self.free = torch.ones(self.workers, self.slots, dtype=torch.uint8).share_memory_()

    def reset(self) -> None:
        """All slots free (call when no worker of this pool is running)."""
        self.free.fill_(1)

    def acquire(self, worker: int, numel: int) -> tuple[int, np.ndarray] | None:
        if worker >= self.workers or numel > self.capacity:
            return None
        free = self.free[worker].numpy()
        # Scan a snapshot: the main process frees slots (0 -> 1) concurrently, and numpy's nonzero
        # raises if the count changes while it runs.  Only this worker ever takes a slot of its row
        # (1 -> 0), so a slot seen free in the snapshot is still free.
        idx = np.flatnonzero(free.copy())
        if idx.size == 0:
            return None
        slot = int(idx[0])
        free[slot] = 0
        return slot, self.data[worker, slot].numpy()[:numel]

    def release(self, batch: dict, pin_memory: bool = False) -> None:
        """Main process: copy the batch out of its slot (into pinned memory if asked) and free the slot.
        A slot written with keep_clean holds the audio then the clean copy ("clean")."""
        worker, slot, b, t, *copies = batch.pop("_slot")
        data = self.data[worker, slot].numpy()
        for i, name in enumerate(("audio", "clean")[: copies[0] if copies else 1]):
            out = torch.empty((b, 1, t), dtype=torch.float32, pin_memory=pin_memory)
            np.copyto(out.numpy().reshape(-1), data[i * b * t : (i + 1) * b * t])
            batch[name] = out
        self.free[worker, slot] = 1


def collate(items: list[Item], shared: bool | None = None, pool: SlotPool | None = None,
            pad_to: int | None = None, transform=None, keep_clean: bool = False) -> dict:
    """-> {"audio": float32 [B,1,T] (zero padding at the end), "lengths": int64 [B], "offsets":
    float32 [B] (crop start, seconds), "keys"/"texts"/"speakers"/"languages": list[str]}.
    In a DataLoader worker (shared=True) the audio goes into a `pool` slot when one is free, and
    lengths/offsets stay lists (every tensor sent costs a shared-memory segment, ~0.5 ms):
    `finalize_batch` completes such batches in the main process.
    Filled through numpy: torch's intra-op thread pool makes small copies slow on a busy CPU.
    `pad_to`: pad T up to at least this (a bucket edge), so batch shapes repeat across steps.
    `transform(audio [B,1,T] numpy, lengths)`: changes the audio in place (augmentation); with `keep_clean`
    the batch also carries the audio from before it as "clean" [B,1,T] (the slot then holds both)."""
    if shared is None:
        shared = torch.utils.data.get_worker_info() is not None
    lengths = np.fromiter((it.audio.shape[0] for it in items), dtype=np.int64, count=len(items))
    b, t = len(items), int(lengths.max())
    if pad_to is not None:
        t = max(t, int(pad_to))
    copies = 2 if keep_clean else 1
    slot, clean = None, None
    if shared and pool is not None:
        slot = pool.acquire(torch.utils.data.get_worker_info().id, copies * b * t)
    if slot is not None:
        audio = None
        both = slot[1].reshape(copies, b, 1, t)
        view = both[0]
        for i, it in enumerate(items):
            n = it.audio.shape[0]
            view[i, 0, :n] = it.audio
            view[i, 0, n:] = 0.0  # the slot holds an older batch
    else:
        def new():
            return _shared_zeros((b, 1, t)) if shared else torch.from_numpy(np.zeros((b, 1, t), dtype=np.float32))

        audio = new()
        view = audio.numpy()
        for i, it in enumerate(items):
            view[i, 0, : it.audio.shape[0]] = it.audio
        if keep_clean:
            clean = new()
            both = (view, clean.numpy())
    if keep_clean:
        np.copyto(both[1], view)
    if transform is not None:
        transform(view, lengths)
    offsets = [it.offset for it in items]
    batch = {
        "audio": audio,
        "lengths": lengths.tolist() if shared else torch.from_numpy(lengths),
        "offsets": offsets if shared else torch.tensor(offsets, dtype=torch.float32),
        "keys": [it.key for it in items],
        "texts": [_text(it.meta, "text") for it in items],
        "speakers": [_text(it.meta, "speaker") for it in items],
        "languages": [_text(it.meta, "language") for it in items],
    }
    if clean is not None:
        batch["clean"] = clean
    if items[0].semantic is not None:  # pre-extracted teacher features: [B, D, T] zero-padded + lengths
        sem_lengths = [it.semantic.shape[0] for it in items]
        sem = np.zeros((b, items[0].semantic.shape[1], max(sem_lengths)), dtype=np.float32)
        for i, it in enumerate(items):
            sem[i, :, : sem_lengths[i]] = it.semantic.T
        batch["semantic"] = torch.from_numpy(sem)
        batch["semantic_lengths"] = torch.tensor(sem_lengths, dtype=torch.int64)
    if slot is not None:
        batch["_slot"] = [torch.utils.data.get_worker_info().id, slot[0], b, t] + ([copies] if keep_clean else [])
    return batch


def finalize_batch(batch: dict, pool: SlotPool | None = None, pin_memory: bool = False) -> dict:
    """Main-process half of `collate`: audio out of its pool slot, lengths/offsets -> tensors."""
    if "_slot" in batch:
        if pool is None:
            raise RuntimeError("batch audio is in a SlotPool slot but no pool was given (use AudioLoader)")
        pool.release(batch, pin_memory)
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

    def _bucket(self, n: int) -> int:
        return min(len(self.buckets) - 1, max(0, math.ceil(n / self.width) - 1))

    def add(self, item: Item) -> list[Item] | None:
        n = item.audio.shape[0]
        if n > self.max_samples:
            return [item]
        b = self._bucket(n)
        bucket = self.buckets[b]
        bucket.append(item)
        if len(bucket) >= self.capacity[b]:
            self.buckets[b] = []
            return bucket
        return None

    def padded_length(self, items: list[Item]) -> int | None:
        """The upper edge of the bucket of the batch's longest item: every batch of a bucket then has the same
        padded length, so a training run sees at most `num_buckets` shapes (what kernel autotuning, cudnn.benchmark
        and torch.compile need). None for an over-long item emitted alone."""
        n = max(it.audio.shape[0] for it in items)
        if n > self.max_samples:
            return None
        return self.upper[self._bucket(n)]

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
