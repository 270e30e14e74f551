"""Preemption-safe training: on SIGUSR1 (SLURM's `--signal` warning before the time limit, or a preemption
notice) or SIGTERM (`scontrol requeue`, preemption after its grace time, `scancel`), finish the current training
step, save `hpc_ckpt_<n>.ckpt` next to the periodic checkpoints, requeue the job (USR1 only: after SIGTERM the
scheduler has already decided) and exit. `flexitrain.cluster.resume.newest_checkpoint` then resumes from it.

Why not Lightning's own `SLURMEnvironment(auto_requeue=True)` handler: it saves from inside the signal handler,
i.e. in the middle of a training step (between the discriminator and generator updates of a GAN step), so the
checkpoint does not resume exactly. Here the handler only records the signal and the checkpoint is written at
the next step boundary, exactly like a periodic ModelCheckpoint save; Lightning's handler is switched off.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist

from flexitrain.cluster.resume import HPC_PATTERN, hpc_checkpoints

log = logging.getLogger(__name__)


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written: Lightning tears down (loggers, workers) and the process
    exits with 128 + signal number, so a script running `train.py && eval.py` does not go on to evaluate."""


def slurm_job_id() -> str | None:
    array_job, array_task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return os.environ.get("SLURM_JOB_ID")


def requeue_slurm_job() -> bool:
    job = slurm_job_id()
    if job is None:
        log.warning("preemption signal outside SLURM: checkpoint saved, nothing to requeue")
        return False
    res = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if res.returncode != 0:
        log.warning("scontrol requeue %s failed (%d): %s", job, res.returncode, res.stderr.strip())
        return False
    log.info("requeued SLURM job %s", job)
    return True


class PreemptionCheckpoint(L.Callback):
    def __init__(self, signals=("SIGUSR1", "SIGTERM"), requeue_on=("SIGUSR1",), requeue: bool = True,
                 dirpath: str | None = None, keep: int = 1):
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.requeue_on = {signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in requeue_on}
        self.requeue, self.dirpath, self.keep = requeue, dirpath, max(1, int(keep))
        self.pending: int = 0
        self.saved: str | None = None
        self.exit_code: int = 0
        self._previous: dict = {}
        # Installed now, before the (slow) setup: SIGUSR1's default action kills the process.
        self._install()

    # ------------------------------------------------------------------ signals
    def _handler(self, signum, _frame) -> None:
        self.pending = int(signum)  # only a flag: the checkpoint waits for the end of the training step

    def _install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                previous = signal.signal(s, self._handler)
                if previous != self._handler and s not in self._previous:
                    self._previous[s] = previous

    def restore_signal_handlers(self) -> None:
        """Give the signals back to whoever held them before this callback (after a normal end of training)."""
        if threading.current_thread() is threading.main_thread():
            for s, previous in self._previous.items():
                signal.signal(s, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from lightning.fabric.plugins.environments import SLURMEnvironment

        env = trainer._accelerator_connector.cluster_environment
        if isinstance(env, SLURMEnvironment):
            env.auto_requeue = False  # its handler checkpoints mid-step; ours waits for the step boundary

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._install()  # Lightning registered its own SIGTERM handler after setup: take the signals back

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.restore_signal_handlers()

    # ------------------------------------------------------------------ step boundary
    def _agreed_signal(self, trainer: L.Trainer) -> int:
        if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
            flag = torch.tensor([self.pending], device=trainer.strategy.root_device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
            return int(flag.item())
        return self.pending

    def on_train_batch_end(self, trainer: L.Trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if self.exit_code:
            return
        signum = self._agreed_signal(trainer)
        if not signum:
            return
        self.saved = self.save(trainer)
        log.warning("received %s: checkpoint at step %d: %s", signal.Signals(signum).name, trainer.global_step,
                    self.saved)
        # Requeue and exit at the next hook, not now: Lightning writes this step's metrics after
        # on_train_batch_end, and `scontrol requeue` makes SLURM signal (and soon kill) the whole job step.
        self.exit_code = 128 + signum

    def _exit_if_preempted(self, trainer: L.Trainer) -> None:
        if not self.exit_code:
            return
        for logger in trainer.loggers:  # everything up to the checkpointed step is on disk before the requeue
            logger.save()
        signum = signal.Signals(self.exit_code - 128)
        if self.requeue and signum in self.requeue_on and trainer.is_global_zero:
            requeue_slurm_job()
        raise Preempted(self.exit_code)  # Lightning finalizes the loggers and tears down

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        self._exit_if_preempted(trainer)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._exit_if_preempted(trainer)

    def save(self, trainer: L.Trainer) -> str:
        """Write hpc_ckpt_<n+1>.ckpt atomically (tmp file + rename: a SIGKILL mid-write leaves no bad checkpoint)."""
        ckpt_cb = trainer.checkpoint_callback
        folder = Path(self.dirpath or getattr(ckpt_cb, "dirpath", None) or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        old = hpc_checkpoints(folder)
        n = max((int(HPC_PATTERN.search(p.name).group(1)) for p in old), default=0) + 1
        final = folder / f"hpc_ckpt_{n}.ckpt"
        tmp = folder / f".hpc_ckpt_{n}.ckpt.tmp"
        trainer.save_checkpoint(str(tmp))  # every rank calls it (collective for sharded strategies)
        if trainer.is_global_zero:
            os.replace(tmp, final)
            for p in sorted(old, key=lambda p: int(HPC_PATTERN.search(p.name).group(1)))[: max(0, len(old) + 1 - self.keep)]:
                p.unlink(missing_ok=True)
        trainer.strategy.barrier("preemption_checkpoint")
        return str(final)
