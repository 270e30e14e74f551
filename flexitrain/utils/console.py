"""A console that reads like a tool: each message once, no library chatter.

- `ConsoleFormatter` (Hydra's console handler, configs/hydra/default.yaml): the message alone, "warning: " /
  "error: " before those levels; the run's train.log keeps timestamps and logger names.
- `quiet_console()` (start of `python train.py`): Lightning's own console handlers go (Hydra's root handlers print
  and file its messages once), its advertising tip and hints that do not apply (srun present but unused; a
  LightningDataModule next to the task's own `on_before_batch_transfer`; ModelCheckpoint's manual-optimisation note
  with its source snippet — this project's checkpoints are written after the step on purpose) are dropped.
"""
from __future__ import annotations

import logging
import warnings

LIGHTNING_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning")
# (message regex, what it is) of warnings that do not apply to flexitrain runs
IGNORED_WARNINGS = (
    r"The `srun` command is available on your system but is not used",
    r"Using ModelCheckpoint with manual optimization and every_n_train_steps",
    r"You have overridden `on_before_batch_transfer` in `LightningModule` but have passed in a",
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    r"Your `IterableDataset` has `__len__` defined",
)
DROPPED_MESSAGES = ("💡 Tip:",)


class ConsoleFormatter(logging.Formatter):
    """``message`` for INFO and below, ``warning: message`` / ``error: message`` above."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return text


class _DropMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return not any(m in msg for m in DROPPED_MESSAGES)


def quiet_console() -> None:
    """Call once at start-up, after Hydra configured logging (idempotent)."""
    root_has_handlers = bool(logging.getLogger().handlers)
    for name in LIGHTNING_LOGGERS:
        lg = logging.getLogger(name)
        if root_has_handlers:  # Hydra's handlers print (and file) these already: Lightning's own would repeat them
            for h in list(lg.handlers):
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler):
                    lg.removeHandler(h)
        if not any(isinstance(f, _DropMessages) for f in lg.filters):
            lg.addFilter(_DropMessages())
    # Messages of child loggers reach the root handlers without passing the parents' filters: filter there too.
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _DropMessages) for f in h.filters):
            h.addFilter(_DropMessages())
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
