"""LightningModules: losses, optimisation and logging around the plain-PyTorch models."""
from flexitrain.tasks.codec import CodecTask

__all__ = ["CodecTask"]
