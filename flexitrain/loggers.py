"""Loggers that keep one clean history per run directory across restarts (requeues, `kill -9` + `ckpt_path=auto`).

Lightning's CSVLogger deletes an existing metrics.csv when it starts, so a requeued run in the same (stable) run
directory would lose everything logged before the requeue; appending instead (as this module did before) writes
the steps that are replayed after resuming from an older checkpoint twice. TensorBoard has the same problem: the
new process writes a second event file that repeats the replayed steps.

Both loggers here keep the earlier history and *replace* the replayed steps. The rule needs no knowledge of the
checkpoint: a run logs with non-decreasing steps, and a resumed run replays deterministically from its checkpoint,
so the first step a (re)started process logs is the first replayed step; every row an earlier process logged at
that step or later belongs to a replayed step (or to a run that is being restarted from scratch) and is dropped.

- CSV: on the first `log_metrics` call of a process, rows of the existing metrics.csv with `step >=` that step are
  removed (the file is rewritten atomically) before the new rows are appended.
- TensorBoard: on the first `log_metrics` call, when the log directory already holds event files, the writer emits
  the event that `SummaryWriter(purge_step=...)` writes (a `SessionLog.START` at that step): TensorBoard then
  discards all earlier events with `step >=` it, so the replayed steps appear once.
"""
from __future__ import annotations

import csv
import logging
import os
from typing import Any, Mapping, Optional

from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricExperimentWriter
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)


def _row_step(row: Mapping[str, str]) -> Optional[int]:
    try:
        return int(float(row.get("step") or ""))
    except ValueError:
        return None


def truncate_metrics_csv(path: str | os.PathLike, from_step: int, fs: Any = None) -> int:
    """Drop the rows of a Lightning metrics.csv whose `step` is >= `from_step` (rows without a step are kept);
    the header is kept. The file is replaced atomically (a kill during the rewrite leaves the old file).
    Returns the number of rows dropped."""
    from lightning.fabric.utilities.cloud_io import get_filesystem

    path = str(path)
    fs = fs or get_filesystem(path)
    if not fs.isfile(path):
        return 0
    with fs.open(path, "r", newline="") as fh:
        reader = csv.DictReader(fh)
        fieldnames = list(reader.fieldnames or [])
        rows = list(reader)
    keep = [row for row in rows if (_row_step(row) is None or _row_step(row) < from_step)]
    dropped = len(rows) - len(keep)
    if dropped:
        tmp = path + ".tmp"
        with fs.open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=fieldnames)
            writer.writeheader()
            writer.writerows(keep)
        fs.mv(tmp, path)
    return dropped


class ReplacingExperimentWriter(ExperimentWriter):
    """Keeps an existing metrics.csv (Lightning's writer deletes it) and, on this process's first `log_metrics`,
    drops its rows at or after the step being logged: replayed steps are replaced, not duplicated."""

    def __init__(self, log_dir: str, replace_replayed_steps: bool = True) -> None:
        super().__init__(log_dir)
        self._pending_truncation = False
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = list(csv.DictReader(fh).fieldnames or [])
            self._pending_truncation = replace_replayed_steps

    def _check_log_dir_exists(self) -> None:
        pass  # keep the earlier attempts' metrics.csv

    def log_metrics(self, metrics_dict: dict[str, float], step: Optional[int] = None) -> None:
        if self._pending_truncation:
            self._pending_truncation = False
            first = len(self.metrics) if step is None else int(step)
            dropped = truncate_metrics_csv(self.metrics_file_path, first, self._fs)
            if dropped:
                log.info("metrics.csv: replaced %d row(s) of steps >= %d logged before the restart", dropped, first)
        super().log_metrics(metrics_dict, step)


class ResumableCSVLogger(CSVLogger):
    """CSVLogger for a stable run directory: keeps the history of earlier attempts and replaces the rows of steps
    that a resumed run logs again (see the module docstring). `replace_replayed_steps=False`: append only."""

    def __init__(self, *args: Any, replace_replayed_steps: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._replace_replayed_steps = replace_replayed_steps

    @property
    @rank_zero_experiment
    def experiment(self) -> _FabricExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ReplacingExperimentWriter(self.log_dir, self._replace_replayed_steps)
        return self._experiment


def _has_event_files(fs: Any, log_dir: str) -> bool:
    try:
        return fs.isdir(log_dir) and any("tfevents" in os.path.basename(p) for p in fs.listdir(log_dir, detail=False))
    except FileNotFoundError:
        return False


class ResumableTensorBoardLogger(TensorBoardLogger):
    """TensorBoardLogger for a stable run directory: when the directory already holds event files (an earlier
    attempt of this run), the first `log_metrics` of this process marks a restart at its step, exactly what
    `SummaryWriter(purge_step=step)` does, so TensorBoard hides the earlier events of the replayed steps."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restart_checked = False
        self._had_events: Optional[bool] = None

    @property
    @rank_zero_experiment
    def experiment(self):
        if self._experiment is None and self._had_events is None:
            self._had_events = _has_event_files(self._fs, self.log_dir)  # before this process writes its own file
        return super().experiment

    def mark_restart(self, step: int) -> None:
        """Write the purge marker: TensorBoard drops earlier events with `step >=` this step."""
        try:
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog
        except ImportError:  # only tensorboardX installed
            from tensorboardX.proto.event_pb2 import Event, SessionLog

        writer = self.experiment._get_file_writer()
        writer.add_event(Event(step=int(step), session_log=SessionLog(status=SessionLog.START)))
        writer.flush()
        log.info("tensorboard: events of steps >= %d logged before the restart are purged", step)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        if not self._restart_checked and step is not None:
            self._restart_checked = True
            _ = self.experiment  # records whether event files existed before this process
            if self._had_events:
                self.mark_restart(step)
        super().log_metrics(metrics, step)
