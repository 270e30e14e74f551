"""Weighted mixtures of training corpora (`data.train_shards` as a list of {shards, weight}).

    train_shards:
      - {name: emilia, shards: /data/emilia/train, weight: 3.0}
      - {name: libritts, shards: '/data/libritts/shard-{000000..000127}.tar', weight: 1.0}

Each entry's `shards` is any spec `expand_shards` takes (directory, brace pattern, glob, `pipe:` URL or a
list of them); `weight` (default 1.0) is a non-negative number; `name` (default `corpus<i>`) labels the
corpus in errors and in the data stats (`data/train/corpus/<name>`: samples of that corpus in emitted
batches).  Plain string / list-of-string specs are not a mixture and keep the single-corpus stream.

Sampling: every training sample is drawn from corpus c with probability weight_c / sum(weights), by a
per-(seed, epoch, rank, worker) generator, from that corpus's own stream -- which is exactly the
single-corpus stream of `TrainAudioDataset` restricted to the corpus's shards (resampled, or split over
ranks x workers so each worker reads only its share of each corpus).  The mixed stream is therefore a
deterministic function of (seed, epoch, rank, worker) and a resumed run replays it batch for batch.

Epoch of a mixed stream: `data.epoch_samples` draws if set, else the total size of the corpora with a
positive weight (each then needs an index.json), dealt to ranks x workers as for one corpus: every worker
makes the same number of batches, its draws mixed in the weights' proportions.  A corpus contributes about
epoch x weight share draws; in split mode it repeats within an epoch only when that exceeds its size (it
is upsampled by its weight: its stream starts a reshuffled new pass), and a down-weighted corpus is read
partially -- each epoch reshuffles its shards, so the part read differs between epochs.  In resampled mode
(epoch_samples set) each worker draws each corpus's shards with replacement, as for a single corpus.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

ENTRY_KEYS = ("shards", "weight", "name")


@dataclass(frozen=True)
class Corpus:
    name: str
    spec: object  # as given: expanded by `expand_shards`
    weight: float


@dataclass(frozen=True)
class Mixture:
    """Expanded corpora: names, shard URLs per corpus, and drawing probabilities (zero-weight corpora dropped)."""

    names: tuple[str, ...]
    urls: tuple[tuple[str, ...], ...]
    probs: tuple[float, ...]

    def __post_init__(self):
        if not (len(self.names) == len(self.urls) == len(self.probs)) or not self.names:
            raise ValueError("a mixture needs one name, shard list and probability per corpus")
        if any(not u for u in self.urls):
            raise ValueError(f"every corpus of a mixture needs shards: {dict(zip(self.names, map(len, self.urls)))}")

    @property
    def all_urls(self) -> list[str]:
        return [u for urls in self.urls for u in urls]

    @property
    def counter_names(self) -> tuple[str, ...]:
        return tuple(f"corpus/{n}" for n in self.names)


def is_mixture_spec(spec) -> bool:
    """True for a list whose entries are mappings (a weighted mixture); plain specs are not."""
    if spec is None or isinstance(spec, (str, bytes)) or isinstance(spec, Mapping):
        return isinstance(spec, Mapping)
    try:
        return any(isinstance(e, Mapping) for e in spec)
    except TypeError:
        return False


def parse_corpora(spec, what: str = "train_shards") -> list[Corpus] | None:
    """The corpora of a weighted spec, validated, or None for a plain (string / list of strings) spec."""
    if not is_mixture_spec(spec):
        return None
    entries = [spec] if isinstance(spec, Mapping) else list(spec)
    corpora: list[Corpus] = []
    for i, entry in enumerate(entries):
        where = f"{what}[{i}]"
        if not isinstance(entry, Mapping):
            raise ValueError(f"{where}: a weighted corpus list takes only {{shards, weight, name}} entries, "
                             f"got {entry!r} (write {{shards: {entry!r}, weight: 1.0}})")
        unknown = sorted(str(k) for k in entry if k not in ENTRY_KEYS)
        if unknown:
            raise ValueError(f"{where}: unknown key(s) {unknown}; a corpus entry takes {list(ENTRY_KEYS)}")
        name = entry.get("name")
        name = f"corpus{i}" if name is None else str(name)
        if not name or "/" in name or not name.isprintable():
            raise ValueError(f"{where}: corpus name {name!r} must be non-empty, printable and without '/'")
        where = f"{where} ({name})"
        if entry.get("shards") is None:
            raise ValueError(f"{where}: missing 'shards' (a directory, brace pattern, glob, pipe: URL or a list)")
        weight = entry.get("weight", 1.0)
        # bool is a numbers.Real too: `weight: yes` is a config mistake, not a weight of 1
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ValueError(f"{where}: weight must be a number, got {weight!r} ({type(weight).__name__})")
        weight = float(weight)
        if not math.isfinite(weight) or weight < 0:
            raise ValueError(f"{where}: weight must be finite and >= 0, got {weight}")
        corpora.append(Corpus(name, entry["shards"], weight))
    if not corpora:
        raise ValueError(f"{what}: the corpus list is empty")
    names = [c.name for c in corpora]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{what}: corpus names must be unique, repeated: {dup}")
    total = sum(c.weight for c in corpora)
    if total <= 0:
        raise ValueError(f"{what}: the corpus weights sum to {total}; at least one must be positive")
    return corpora


def build_mixture(corpora: list[Corpus], expand, what: str = "train_shards") -> Mixture:
    """Expand every corpus (also zero-weight ones: a wrong path is an error either way) with `expand(spec,
    label)`; the label names the corpus in its error.  Zero-weight corpora are then left out."""
    kept = []
    for i, c in enumerate(corpora):
        urls = expand(c.spec, f"{what}[{i}] ({c.name})")
        if not urls:
            raise ValueError(f"{what}[{i}] ({c.name}): {c.spec!r} matches no shards")
        if c.weight > 0:
            kept.append((c.name, tuple(urls), c.weight))
    total = sum(w for _, _, w in kept)
    return Mixture(tuple(n for n, _, _ in kept), tuple(u for _, u, _ in kept), tuple(w / total for _, _, w in kept))


def mix(streams: list[Iterator[dict]], probs: Sequence[float], rng: np.random.Generator,
        chunk: int = 1024) -> Iterator[dict]:
    """Interleave endless sample streams: each sample comes from stream c with probability probs[c].
    The sample dict is tagged with `__corpus__` = c.  Corpus choices are drawn `chunk` at a time (one
    generator call instead of one per sample); the sequence depends only on rng's seed."""
    p = np.asarray(probs, dtype=np.float64)
    p = p / p.sum()
    while True:
        for c in rng.choice(len(streams), size=chunk, p=p).tolist():
            sample = next(streams[c])
            sample["__corpus__"] = c
            yield sample


def expected_draws(total: int, mixture: Mixture) -> dict[str, float]:
    """Draws per corpus in an epoch of `total` samples."""
    return {n: total * p for n, p in zip(mixture.names, mixture.probs)}
