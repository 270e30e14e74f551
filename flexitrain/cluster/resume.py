"""Which checkpoint a (re)started run resumes from: the newest of the periodic `last.ckpt` and the checkpoints
written on a preemption signal (`hpc_ckpt_<n>.ckpt`, by PreemptionCheckpoint or by Lightning's own SLURM
handler in the run directory). Newest = highest global step, then modification time.

Every candidate is read weights-only (memory-mapped: tensors are not read). A truncated or corrupt one is
skipped with a warning; when one of them was unreadable, the other checkpoints of the directory
(`step*.ckpt`) are candidates too, so a run whose `last.ckpt` is damaged resumes from the newest readable one
and says so. A checkpoint that is refused as unsafe (an older pickle, or one that references code) stops the
run with the command that converts it: resuming from an older file instead would silently lose progress.
With the task given, the chosen checkpoint is checked against it (the right task, every key, every size)
before training starts."""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

log = logging.getLogger(__name__)
HPC_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt$")


def _read(path: str | os.PathLike, what: str = "checkpoint") -> dict:
    """The checkpoint dict (weights-only, memory-mapped) with an integer ``global_step``; CheckpointError if not."""
    from flexitrain.utils.safe_load import CheckpointError, safe_torch_load

    ckpt = safe_torch_load(path, what, mmap=True)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("global_step"), int):
        raise CheckpointError(path, "is not a Lightning training checkpoint (no global_step)", what)
    return ckpt


def checkpoint_step(path: str | os.PathLike) -> int | None:
    """The global step stored in a Lightning checkpoint (memory-mapped, weights-only); None if unreadable."""
    from flexitrain.utils.safe_load import CheckpointError

    try:
        return int(_read(path)["global_step"])
    except (CheckpointError, OSError) as err:  # a truncated file (killed mid-write) must not block an older one
        log.warning("ignoring unreadable checkpoint %s: %s", path, getattr(err, "problem", err))
        return None


def hpc_checkpoints(*dirs: str | os.PathLike) -> list[Path]:
    return sorted(p for d in dirs if Path(d).is_dir() for p in Path(d).iterdir() if HPC_PATTERN.search(p.name))


def _scan(checkpoint_dir, run_dir) -> tuple[Path | None, int | None, list[tuple[Path, str]]]:
    """(newest readable checkpoint, its step, [(unreadable path, why)]). Unsafe files raise."""
    from flexitrain.utils.safe_load import CheckpointError, UnsafeCheckpointError

    ckpt_dir = Path(checkpoint_dir)
    primary = [ckpt_dir / "last.ckpt"] if (ckpt_dir / "last.ckpt").is_file() else []
    primary += hpc_checkpoints(ckpt_dir, *([run_dir] if run_dir is not None else []))
    best, best_key, unreadable = None, None, []

    def consider(paths):
        nonlocal best, best_key
        for path in paths:
            try:
                step = int(_read(path)["global_step"])
            except UnsafeCheckpointError:
                raise
            except (CheckpointError, OSError) as err:
                why = getattr(err, "problem", str(err))
                log.warning("ignoring unreadable checkpoint %s: %s", path, why)
                unreadable.append((Path(path), why))
                continue
            key = (step, Path(path).stat().st_mtime)
            if best_key is None or key > best_key:
                best, best_key = Path(path), key

    consider(primary)
    if unreadable and ckpt_dir.is_dir():  # fall back to the periodic checkpoints (step*.ckpt)
        others = sorted(p for p in ckpt_dir.glob("*.ckpt") if p.is_file() and p not in primary)
        consider(others)
    return best, (best_key[0] if best_key else None), unreadable


def newest_checkpoint(checkpoint_dir: str | os.PathLike, run_dir: str | os.PathLike | None = None) -> str | None:
    """The resumable checkpoint with the highest (global step, mtime) among `<checkpoint_dir>/last.ckpt` and
    `hpc_ckpt_*.ckpt` in `checkpoint_dir` and `run_dir` (and, when one of those is unreadable, the other
    `*.ckpt` of `checkpoint_dir`); None when there is none."""
    best, step, unreadable = _scan(checkpoint_dir, run_dir)
    if best is not None and unreadable:
        bad = "; ".join(f"{p.name}: {why}" for p, why in unreadable)
        log.warning("resuming from %s (step %d), the newest readable checkpoint, because %s", best, step, bad)
    return str(best) if best is not None else None


def validate_resume_checkpoint(path: str | os.PathLike, task=None, what: str = "ckpt_path") -> None:
    """Everything a resume needs is in ``path`` (weights-only read, Lightning's training state present) and, with
    ``task``, it is that task's checkpoint with exactly its keys and sizes. Nothing is loaded into the task."""
    from flexitrain.tasks.checkpointing import check_task_checkpoint, read_checkpoint

    ckpt = read_checkpoint(path, what, mmap=True, require=("state_dict", "global_step"))
    if "optimizer_states" not in ckpt:
        from flexitrain.utils.safe_load import CheckpointError

        raise CheckpointError(path, "holds weights only (no optimizer / scheduler state), so training cannot "
                                    "resume from it: use init_from= to start a new run from its weights", what)
    if task is not None:
        check_task_checkpoint(task, ckpt, path, what)


def resolve_resume_checkpoint(ckpt_path: str | None, checkpoint_dir: str | os.PathLike,
                              run_dir: str | os.PathLike | None = None, task=None) -> str | None:
    """`ckpt_path` config value -> checkpoint to resume from. `auto`: the newest readable of last/hpc (None: fresh
    run; every candidate unreadable: an error, not a silent fresh start); null: never resume; a path: must exist
    (a typo must not silently start from scratch). The result is read weights-only and, with ``task``, validated
    against it (`validate_resume_checkpoint`), so that a bad file fails here, before any training state is
    touched."""
    from flexitrain.utils.safe_load import CheckpointError

    if ckpt_path in (None, "", "null", "none"):
        return None
    if ckpt_path == "auto":
        best, step, unreadable = _scan(checkpoint_dir, run_dir)
        if best is None:
            if unreadable:
                bad = "; ".join(f"{p.name}: {why}" for p, why in unreadable[:5])
                raise CheckpointError(checkpoint_dir, f"holds no readable checkpoint to resume from ({bad}). Move "
                                                      "them away or set ckpt_path=null to start from scratch",
                                      "checkpoint directory")
            return None
        if unreadable:
            bad = "; ".join(f"{p.name}: {why}" for p, why in unreadable)
            log.warning("resuming from %s (step %d), the newest readable checkpoint, because %s", best, step, bad)
        if task is not None:
            validate_resume_checkpoint(best, task, what="checkpoint")
        return str(best)
    if not Path(ckpt_path).exists():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist (use ckpt_path=auto or null for a fresh run)")
    if task is not None:
        validate_resume_checkpoint(ckpt_path, task, what="ckpt_path")
    else:
        _read(ckpt_path, "ckpt_path")
    return str(ckpt_path)
