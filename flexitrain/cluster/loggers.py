"""Kept for the import path `flexitrain.cluster.ResumableCSVLogger`: the restart-safe loggers live in
`flexitrain.loggers` (earlier history kept, replayed steps replaced instead of duplicated)."""
from flexitrain.loggers import ReplacingExperimentWriter, ResumableCSVLogger, ResumableTensorBoardLogger

AppendingExperimentWriter = ReplacingExperimentWriter  # the former name

__all__ = ["ResumableCSVLogger", "ResumableTensorBoardLogger", "ReplacingExperimentWriter", "AppendingExperimentWriter"]
