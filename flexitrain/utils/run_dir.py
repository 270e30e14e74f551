"""Run-directory helpers: one stable directory per experiment, shared by every rank and every restart."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path


def stable_run_id(output_dir: str | os.PathLike) -> str:
    """A logger run id derived from the run directory, so a requeued job continues the same (wandb) run."""
    return hashlib.sha1(str(Path(output_dir).resolve()).encode()).hexdigest()[:16]
