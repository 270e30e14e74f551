"""Data for the AR TTS task: WebDataset shards (``__key__``, ``flac``, ``json`` with text/speaker/language)
-> text ids + either the audio (targets computed on the fly by a frozen codec) or pre-extracted targets.

Pre-extracted targets live in a ``tokens.json`` member written by ``tools/extract_tokens.py``::

    {"codec": "<codec id>", "sample_rate": 16000,
     "t0.91": {"codes": [...], "durations": [...]},   # FSQ codes and 12.5 Hz frames per token
     "t0.86": {...}}

Batches are dicts: ``text [B, L]`` (0-padded), ``text_lengths [B]``, ``keys``; then ``audio [B, N]`` +
``audio_lengths`` (on the fly) or, per threshold key ``k`` ("t0.91"): ``speech/k [B, T]``,
``durations/k [B, T]`` (0-padded) and ``speech_lengths/k [B]``. Batches are cut by a token budget:
batch size x longest (text + speech tokens) <= ``token_budget``, from a length-sorted buffer.
"""

from __future__ import annotations

import json
import logging
import random
from typing import Iterator

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from flexitrain.data.pipeline import ignore_job_signals

log = logging.getLogger(__name__)
TOKENS_MEMBER = "tokens.json"
FRAME_RATE = 12.5  # codec frames per second before merging


def threshold_key(threshold: float) -> str:
    return f"t{float(threshold):.2f}"


@torch.no_grad()
def codec_targets(codec, teacher, audio: torch.Tensor, lengths: torch.Tensor, threshold: float
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Frozen codec -> (codes [B, T], durations [B, T], num_tokens [B]); padding is 0, T = max num_tokens.
    ``teacher(audio, lengths) -> (semantic [B, 512, T_sem], semantic_lengths)``; None lets the codec run its own."""
    semantic = semantic_lengths = None
    if teacher is not None:
        semantic, semantic_lengths = teacher(audio, lengths)
    out = codec.encode(audio, lengths, threshold=threshold, num_quantizers=1,
                       semantic_features=semantic, semantic_lengths=semantic_lengths)
    codes = out.semantic_codes[:, 0] if out.semantic_codes.dim() == 3 else out.semantic_codes
    num = out.num_tokens.long()
    t = int(num.max())
    valid = torch.arange(t, device=num.device) < num.unsqueeze(1)
    return codes[:, :t].long() * valid, out.token_lengths[:, :t].long() * valid, num


def _pad(rows: list, dtype=torch.long) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(r) for r in rows], dtype=torch.long)
    out = torch.zeros(len(rows), int(lengths.max()) if len(rows) else 0, dtype=dtype)
    for i, r in enumerate(rows):  # per item, but at batch-assembly time in the loader workers
        out[i, : len(r)] = torch.as_tensor(np.asarray(r), dtype=dtype)
    return out, lengths


def collate(items: list[dict], threshold_keys: list[str], with_audio: bool) -> dict:
    text, text_lengths = _pad([it["text_ids"] for it in items])
    batch = {"keys": [it["key"] for it in items], "text": text, "text_lengths": text_lengths}
    if with_audio:
        batch["audio"], batch["audio_lengths"] = _pad([it["audio"] for it in items], torch.float32)
    for k in threshold_keys:
        batch[f"speech/{k}"], batch[f"speech_lengths/{k}"] = _pad([it["tokens"][k]["codes"] for it in items])
        batch[f"durations/{k}"], _ = _pad([it["tokens"][k]["durations"] for it in items])
    return batch


class ARTTSDataset(IterableDataset):
    """Streams items from shards, phonemises + tokenises the text, and emits budget-cut batches."""

    def __init__(self, urls: list[str], thresholds: list[float], source: str, token_budget: int = 4000,
                 max_batch_size: int = 32, buffer_size: int = 500, shuffle: bool = True, repeat: bool = True,
                 sample_rate: int = 16000, max_duration: float = 30.0, g2p: bool = True, g2p_prob: float = 1.0,
                 language: str = "en", seed: int = 0, rank: int = 0, world_size: int = 1):
        super().__init__()
        if source not in ("shards", "codec"):
            raise ValueError(f"target source must be 'shards' or 'codec', got {source!r}")
        if not urls:
            raise ValueError("no shards given")
        self.urls, self.source = list(urls), source
        self.keys = [threshold_key(t) for t in thresholds] if source == "shards" else []
        self.token_budget, self.max_batch_size, self.buffer_size = token_budget, max_batch_size, buffer_size
        self.shuffle, self.repeat, self.sample_rate, self.max_duration = shuffle, repeat, sample_rate, max_duration
        self.g2p, self.g2p_prob, self.language, self.seed = g2p, g2p_prob, language, seed
        self.rank, self.world_size, self.epoch = rank, world_size, 0

    def shard_order(self, epoch: int) -> list[str]:
        """This epoch's shard order, the same on every rank and worker (they then take every parts-th
        shard): a per-part shuffle before the split would give overlapping, incomplete shares."""
        urls = list(self.urls)
        if self.shuffle:
            random.Random(hash((self.seed, epoch, -1))).shuffle(urls)  # ints only: hash() is stable across processes
        return urls

    def _items(self, epoch: int, frontend, part: int, parts: int) -> Iterator[dict]:
        from flexitrain.data.pipeline import DataStats, iter_shard
        from flexitrain.data.decode import DecodeConfig, decode_audio, parse_meta

        stats = DataStats(0, extra=("skipped/missing_tokens",))  # items extract_tokens could not tokenise
        decode_cfg = DecodeConfig(sample_rate=self.sample_rate, max_duration=self.max_duration)
        urls = self.shard_order(epoch)
        by_shard = len(urls) >= parts  # enough shards: split shards, else split samples
        for si, url in enumerate(urls):
            if by_shard and si % parts != part:
                continue
            with_tokens = without_tokens = 0
            for ni, sample in enumerate(iter_shard(url, stats)):
                if not by_shard and ni % parts != part:
                    continue
                meta = parse_meta(sample.get("json"), stats)
                text = meta.get("text")
                if not text:
                    continue
                item = {"key": sample["__key__"], "text": text, "language": meta.get("language", self.language)}
                if self.source == "codec":
                    decoded = decode_audio(sample.get("flac") or sample.get("wav"), decode_cfg, stats)
                    if decoded is None:
                        continue
                    item["audio"] = decoded[0]
                    item["size"] = len(decoded[0]) / self.sample_rate * FRAME_RATE
                else:
                    raw = sample.get(TOKENS_MEMBER)
                    if raw is None:  # e.g. audio that extract_tokens could not decode: skipped and counted
                        without_tokens += 1
                        stats.add("skipped/missing_tokens")
                        continue
                    with_tokens += 1
                    tokens = json.loads(raw)
                    missing = [k for k in self.keys if k not in tokens]
                    if missing:
                        raise ValueError(f"{url}: {sample['__key__']} has no tokens for {missing} "
                                         f"(has {[k for k in tokens if k.startswith('t')]})")
                    item["tokens"] = tokens
                    item["size"] = max(len(tokens[k]["codes"]) for k in self.keys)
                item["text_ids"] = frontend([text], [item["language"]])[0]
                item["size"] += len(item["text_ids"])
                yield item
            if without_tokens and not with_tokens:  # a shard never tokenised, not an item that failed
                raise ValueError(f"{url}: its samples have no {TOKENS_MEMBER}; run tools/extract_tokens.py or set "
                                 "task.targets.source=codec")

    def _batches(self, buffer: list[dict], rng: random.Random) -> list[list[dict]]:
        buffer.sort(key=lambda it: it["size"])
        batches, current = [], []
        for it in buffer:
            longest = max([it["size"]] + [c["size"] for c in current[-1:]])
            if current and ((len(current) + 1) * longest > self.token_budget or len(current) >= self.max_batch_size):
                batches.append(current)
                current = []
            current.append(it)
        if current:
            batches.append(current)
        if self.shuffle:
            rng.shuffle(batches)
        return batches

    def __iter__(self):
        from flexitrain.text import TextFrontend

        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        part, parts = self.rank * nw + wid, self.world_size * nw
        frontend = TextFrontend(g2p=self.g2p, g2p_prob=self.g2p_prob, seed=self.seed + part)
        epoch = self.epoch
        while True:
            rng = random.Random(hash((self.seed, epoch, part)))
            buffer = []
            for item in self._items(epoch, frontend, part, parts):
                buffer.append(item)
                if len(buffer) >= self.buffer_size:
                    for b in self._batches(buffer, rng):
                        yield collate(b, self.keys, self.source == "codec")
                    buffer = []
            for b in self._batches(buffer, rng):
                yield collate(b, self.keys, self.source == "codec")
            if not self.repeat:
                return
            epoch += 1


class ARTTSDataModule(L.LightningDataModule):
    """Train/val loaders of ``ARTTSDataset`` for ``ARTTSTask``."""

    def __init__(self, train_shards, val_shards=None, thresholds=(0.86, 0.91), source: str = "shards",
                 token_budget: int = 4000, max_batch_size: int = 32, buffer_size: int = 500, num_workers: int = 2,
                 sample_rate: int = 16000, max_duration: float = 30.0, g2p: bool = True, g2p_prob: float = 1.0,
                 language: str = "en", seed: int = 0):
        from flexitrain.data.pipeline import expand_shards

        super().__init__()
        self.train_urls = expand_shards(train_shards, "train_shards")
        self.val_urls = expand_shards(val_shards, "val_shards") if val_shards else []
        self.kw = dict(thresholds=list(thresholds), source=source, token_budget=token_budget,
                       max_batch_size=max_batch_size, buffer_size=buffer_size, sample_rate=sample_rate,
                       max_duration=max_duration, g2p=g2p, g2p_prob=g2p_prob, language=language, seed=seed)
        self.num_workers = num_workers

    def _dist(self):
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _loader(self, urls, train: bool):
        rank, world = self._dist()
        ds = ARTTSDataset(urls, shuffle=train, repeat=train, rank=rank, world_size=world, **self.kw)
        if train:
            # The stream is endless and restarts with the process: a run resumed at step N starts a fresh shuffle
            # seeded by N instead of replaying the first shards of epoch 0 after every requeue (statistically a
            # continuation; not batch-exact like the codec loader, which would have to re-read N batches).
            ds.epoch = int(getattr(getattr(self, "trainer", None), "global_step", 0) or 0)
        return DataLoader(ds, batch_size=None, num_workers=self.num_workers, worker_init_fn=ignore_job_signals,
                          persistent_workers=train and self.num_workers > 0)

    def train_dataloader(self):
        return self._loader(self.train_urls, True)

    def val_dataloader(self):
        return self._loader(self.val_urls, False) if self.val_urls else []
