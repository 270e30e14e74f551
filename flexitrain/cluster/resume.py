"""Which checkpoint a (re)started run resumes from: the newest of the periodic `last.ckpt` and the checkpoints
written on a preemption signal (`hpc_ckpt_<n>.ckpt`, by PreemptionCheckpoint or by Lightning's own SLURM
handler in the run directory). Newest = highest global step, then modification time."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

log = logging.getLogger(__name__)
HPC_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The global step stored in a Lightning checkpoint (memory-mapped: tensors are not read); None if unreadable."""
    try:
        ckpt = torch.load(str(path), map_location="cpu", mmap=True, weights_only=False)
        return int(ckpt["global_step"])
    except Exception as err:  # a truncated file (killed mid-write) must not block resuming from an older one
        log.warning("ignoring unreadable checkpoint %s: %s", path, err)
        return None


def hpc_checkpoints(*dirs: str | os.PathLike) -> list[Path]:
    return sorted(p for d in dirs if Path(d).is_dir() for p in Path(d).iterdir() if HPC_PATTERN.search(p.name))


def newest_checkpoint(checkpoint_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> str | None:
    """The resumable checkpoint with the highest (global step, mtime) among `<checkpoint_dir>/last.ckpt` and
    `hpc_ckpt_*.ckpt` in `checkpoint_dir` and `run_dir`; None when there is none."""
    candidates = [Path(checkpoint_dir) / "last.ckpt"] if (Path(checkpoint_dir) / "last.ckpt").is_file() else []
    candidates += hpc_checkpoints(checkpoint_dir, *([run_dir] if run_dir is not None else []))
    best, best_key = None, None
    for path in candidates:
        step = checkpoint_step(path)
        if step is None:
            continue
        key = (step, path.stat().st_mtime)
        if best_key is None or key > best_key:
            best, best_key = path, key
    return str(best) if best is not None else None


def resolve_resume_checkpoint(ckpt_path: str | None, checkpoint_dir: str | os.PathLike,
                              run_dir: str | os.PathLike | None = None) -> str | None:
    """`ckpt_path` config value -> checkpoint to resume from. `auto`: the newest of last/hpc (None: fresh run);
    null: never resume; a path: must exist (a typo must not silently start from scratch)."""
    if ckpt_path in (None, "", "null", "none"):
        return None
    if ckpt_path == "auto":
        return newest_checkpoint(checkpoint_dir, run_dir)
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist (use ckpt_path=auto or null for a fresh run)")
    return str(ckpt_path)
