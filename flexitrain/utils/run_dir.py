"""Run-directory helpers: one stable directory per experiment, shared by every rank and every restart."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def find_resume_checkpoint(ckpt_path: str | None, checkpoint_dir: str | os.PathLike) -> str | None:
    """Resolve the `ckpt_path` config value.

    `auto` resumes from `<checkpoint_dir>/last.ckpt` when it exists (a fresh run otherwise); `null` never
    resumes; anything else must be an existing file, else a clear error (a typo must not start from scratch).
    """
    if ckpt_path in (None, "", "null", "none"):
        return None
    if ckpt_path == "auto":
        last = Path(checkpoint_dir) / "last.ckpt"
        return str(last) if last.is_file() else None
    if not Path(ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={ckpt_path!r} does not exist (use ckpt_path=auto or null for a fresh run)")
    return str(ckpt_path)


def stable_run_id(output_dir: str | os.PathLike) -> str:
    """A logger run id derived from the run directory, so a requeued job continues the same (wandb) run."""
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]
