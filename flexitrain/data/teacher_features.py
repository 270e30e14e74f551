"""Pre-extracted semantic-teacher features as sidecar shards (written by tools/extract_teacher_features.py).

A features directory mirrors one shard directory::

    <features>/index.json                  {"version", "teacher": <signature>, "dim", "hop_samples", "frame_rate",
                                            "source", "shards": [{"name", "num_samples", "source_bytes"}]}
    <features>/shard-000000.safetensors    one float32 [T, D] tensor per utterance key (the teacher on the whole
                                           utterance, frames on the codec's 12.5 Hz grid)

`data.teacher_features=<features>` makes the training loader attach each crop's frames to its batch
(``batch["semantic"] [B, D, T]``, ``batch["semantic_lengths"] [B]``) with crops aligned to the teacher's frame grid
(``hop_samples``), and the codec task then skips its teacher. The task refuses features whose ``teacher`` signature
(`flexitrain.tasks.teacher.teacher_signature`) is not its own; a shard without its sidecar, changed since the
extraction (size), or a key without features is an error naming the file and the command that rebuilds them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

INDEX_NAME = "index.json"
VERSION = 1
REBUILD = "re-run tools/extract_teacher_features.py for these shards and this teacher"


class TeacherFeaturesError(ValueError):
    """Pre-extracted teacher features that do not match the shards or the teacher."""


def sidecar_path(features_dir: str | Path, shard_url: str) -> Path:
    """``<features_dir>/<shard name without .tar>.safetensors``."""
    name = os.path.basename(shard_url[5:] if shard_url.startswith("file:") else shard_url)
    return Path(features_dir) / ((name[:-4] if name.endswith(".tar") else name) + ".safetensors")


def read_index(features_dir: str | Path) -> dict:
    path = Path(features_dir) / INDEX_NAME
    if not path.is_file():
        raise TeacherFeaturesError(f"data.teacher_features={str(features_dir)!r}: no {INDEX_NAME} there ({REBUILD})")
    try:
        index = json.loads(path.read_text())
    except ValueError as e:
        raise TeacherFeaturesError(f"{path}: not JSON ({e}); {REBUILD}") from e
    if index.get("version") != VERSION or "teacher" not in index or "hop_samples" not in index:
        raise TeacherFeaturesError(f"{path}: not a version-{VERSION} teacher-features index; {REBUILD}")
    return index


def check_covers(index: dict, features_dir: str | Path, urls: list[str]) -> None:
    """Every shard has a sidecar written from the shard as it is now (same size)."""
    known = {s["name"]: s for s in index.get("shards", [])}
    for url in urls:
        local = url[5:] if url.startswith("file:") else url
        name = os.path.basename(local)
        entry = known.get(name)
        side = sidecar_path(features_dir, url)
        if entry is None or not side.is_file():
            raise TeacherFeaturesError(f"data.teacher_features={str(features_dir)!r} has no features for shard "
                                       f"{url} ({REBUILD})")
        if os.path.isfile(local) and entry.get("source_bytes") not in (None, os.path.getsize(local)):
            raise TeacherFeaturesError(f"shard {url} changed since its teacher features were extracted "
                                       f"(size {os.path.getsize(local)} != {entry['source_bytes']}); {REBUILD}")


class SidecarReader:
    """Attach each sample's features (``sample["__semantic__"]``, float32 [T, D]) while a shard is read."""

    def __init__(self, features_dir: str | Path, hop_samples: int):
        self.dir, self.hop_samples = Path(features_dir), int(hop_samples)

    def attach(self, url: str, samples):
        from safetensors import safe_open

        path = sidecar_path(self.dir, url)
        with safe_open(str(path), framework="np") as f:
            keys = set(f.keys())
            for sample in samples:
                key = sample["__key__"]
                if key not in keys:
                    raise TeacherFeaturesError(f"{path} has no teacher features for {key!r} of {url} ({REBUILD})")
                sample["__semantic__"] = f.get_tensor(key)
                yield sample


def crop_features(feats: np.ndarray, offset_samples: int, num_samples: int, hop: int) -> np.ndarray:
    """The frames of a crop starting at ``offset_samples`` (a multiple of ``hop``) with ``num_samples`` samples:
    ``feats[offset / hop : offset / hop + ceil(num_samples / hop)]`` (fewer at the utterance's end)."""
    start = offset_samples // hop
    return feats[start: start + -(-num_samples // hop)]


def is_cached(shard_urls: list[str], out_dir: str | Path, teacher_cfg: dict) -> bool:
    """True when ``out_dir`` already holds features of every shard (same size) from this teacher and settings."""
    from flexitrain.tasks.teacher import teacher_signature

    try:
        index = read_index(out_dir)
        if index.get("teacher") != teacher_signature(teacher_cfg):
            return False
        check_covers(index, out_dir, shard_urls)
    except TeacherFeaturesError:
        return False
    return all(s.get("source_bytes") is not None for s in index["shards"])


def extract_features(shard_urls: list[str], out_dir: str | Path, teacher, teacher_cfg: dict, *,
                     sample_rate: int = 16000, log=print) -> dict:
    """Run ``teacher`` on every utterance of ``shard_urls`` (whole, at ``sample_rate``) and write the sidecar
    shards + ``index.json`` into ``out_dir``. Shards whose sidecar is already there for the same teacher signature
    and shard size are kept (an interrupted extraction resumes; a second run does nothing). Returns the index."""
    import time

    import torch
    from safetensors.numpy import save_file

    from flexitrain.tasks.teacher import teacher_hop_samples, teacher_min_samples, teacher_signature

    from .decode import DecodeConfig
    from .pipeline import decode_sample, iter_shard
    from .stats import NullStats

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    signature = teacher_signature(teacher_cfg)
    hop = teacher_hop_samples(teacher, sample_rate)
    old = None
    try:
        old = read_index(out)
    except TeacherFeaturesError:
        pass
    same_teacher = old is not None and old.get("teacher") == signature and old.get("hop_samples") == hop
    old_shards = {s["name"]: s for s in (old or {}).get("shards", [])} if same_teacher else {}
    if old is not None and not same_teacher:
        log(f"[features] {out}: written by another teacher or settings: rebuilding")
    decode = DecodeConfig(sample_rate=sample_rate, crop_samples=None, random_crop=False, max_duration=float("inf"),
                          min_duration=0.0, silence_threshold=-1.0)
    lo = teacher_min_samples(teacher)
    entries, dim, start, done, seconds = [], None, time.time(), 0, 0.0
    for url in shard_urls:
        local = url[5:] if url.startswith("file:") else url
        name = os.path.basename(local)
        size = os.path.getsize(local) if os.path.isfile(local) else None
        side = sidecar_path(out, url)
        prev = old_shards.get(name)
        if prev is not None and side.is_file() and prev.get("source_bytes") == size:
            entries.append(prev)
            dim = dim or prev.get("dim")
            continue
        tensors, n = {}, 0
        for sample in iter_shard(url, NullStats()):
            item = decode_sample(sample, decode, NullStats(), None)
            if item is None or item.audio.shape[0] < lo:
                continue  # undecodable or shorter than one teacher window: training skips these too
            audio = torch.from_numpy(item.audio)[None, None]
            with torch.no_grad():
                feats, lengths = teacher(audio, torch.tensor([audio.shape[-1]]))
            tensors[item.key] = np.ascontiguousarray(feats[0, :, : int(lengths[0])].T.float().cpu().numpy())
            dim = tensors[item.key].shape[1]
            n += 1
            seconds += item.audio.shape[0] / sample_rate
        tmp = side.with_name(side.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"teacher": json.dumps(signature, sort_keys=True)})
        os.replace(tmp, side)
        os.chmod(side, 0o644)
        entries.append({"name": name, "num_samples": n, "source_bytes": size, "dim": dim})
        done += 1
    index = {"version": VERSION, "teacher": signature, "dim": dim, "hop_samples": hop,
             "frame_rate": sample_rate / hop, "sample_rate": sample_rate,
             "source": sorted({os.path.dirname(os.path.abspath(u[5:] if u.startswith("file:") else u))
                               for u in shard_urls}), "shards": entries}
    (out / INDEX_NAME).write_text(json.dumps(index, indent=1))
    if done:
        log(f"[features] {out}: {done} shard(s), {seconds / 60:.1f} min of audio in {time.time() - start:.1f} s "
            f"({signature['name']}, {dim}-d, {sample_rate / hop:g} Hz)")
    else:
        log(f"[features] {out}: cached ({len(entries)} shards, {signature['name']})")
    return index
