"""A CSV logger that survives restarts: Lightning's CSVLogger deletes an existing metrics.csv when it starts, so a
requeued run in the same (stable) run directory would lose everything logged before the requeue. This one
appends to it instead (merging the header when new columns appear). Steps redone after a resume from an older
checkpoint appear twice; readers keep the last row per step (tools/sweep_report.py, tests/test_slurm.py)."""
from __future__ import annotations

import csv

from lightning.fabric.loggers.csv_logs import _ExperimentWriter as _FabricExperimentWriter
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class AppendingExperimentWriter(ExperimentWriter):
    def __init__(self, log_dir: str) -> None:
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as fh:
                self.metrics_keys = list(csv.DictReader(fh).fieldnames or [])

    def _check_log_dir_exists(self) -> None:
        pass  # keep the earlier attempts' metrics.csv


class ResumableCSVLogger(CSVLogger):
    @property
    @rank_zero_experiment
    def experiment(self) -> _FabricExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingExperimentWriter(log_dir=self.log_dir)
        return self._experiment
