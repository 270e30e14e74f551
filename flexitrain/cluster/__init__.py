"""Cluster support: preemption checkpoints + SLURM requeue, choosing the checkpoint a requeued run resumes from,
and a CSV logger that keeps its history across requeues."""
from flexitrain.cluster.loggers import ResumableCSVLogger
from flexitrain.cluster.preemption import PreemptionCheckpoint, Preempted, requeue_slurm_job
from flexitrain.cluster.resume import newest_checkpoint, resolve_resume_checkpoint

__all__ = ["ResumableCSVLogger", "PreemptionCheckpoint", "Preempted", "requeue_slurm_job", "newest_checkpoint", "resolve_resume_checkpoint"]
