"""Cluster support: preemption checkpoints + SLURM requeue, and choosing the checkpoint a requeued run resumes."""
from flexitrain.cluster.preemption import PreemptionCheckpoint, Preempted, requeue_slurm_job
from flexitrain.cluster.resume import newest_checkpoint, resolve_resume_checkpoint

__all__ = ["PreemptionCheckpoint", "Preempted", "requeue_slurm_job", "newest_checkpoint", "resolve_resume_checkpoint"]
