"""Load a codec (+ its semantic teacher) for evaluation from a training checkpoint or an exported model."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn


def file_hash(path: str | Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of every file of a directory in name order (first 16 hex digits)."""
    path = Path(path)
    h = hashlib.sha256()
    for f in sorted(path.rglob("*")) if path.is_dir() else [path]:
        if f.is_file():
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while block := fh.read(chunk):
                    h.update(block)
    return h.hexdigest()[:16]


def load_codec(ckpt: str | Path, teacher_cfg: dict | None = None, device: str = "cpu") -> tuple[nn.Module, nn.Module]:
    """`(generator, teacher)` in eval mode.

    `ckpt` is a CodecTask Lightning checkpoint (`.ckpt`: its teacher config comes along unless `teacher_cfg`
    overrides it) or a directory written by `FlexiCodec.save_pretrained` (then `teacher_cfg` is required).
    Nothing is unpickled beyond plain data (weights-only load); a bad file raises one `CheckpointError` naming it
    (empty, truncated, unsafe, another task's checkpoint, wrong sizes, missing / extra keys).
    """
    from flexitrain.tasks.teacher import build_teacher

    path = Path(ckpt)
    if not path.exists():
        raise FileNotFoundError(f"ckpt={str(ckpt)!r} does not exist")
    if path.is_dir():
        from flexitrain.models.codec import FlexiCodec

        generator = FlexiCodec.from_pretrained(path, what="codec checkpoint")  # checked before the teacher
        if not teacher_cfg:
            raise ValueError("an exported model directory needs teacher settings: set teacher.model_dir "
                             "(or teacher.random_init=true for a model trained with a random teacher)")
        teacher = build_teacher(teacher_cfg)
    else:
        from flexitrain.tasks.checkpointing import load_task
        from flexitrain.tasks.codec import CodecTask

        overrides = {"teacher": teacher_cfg} if teacher_cfg else {}
        task = load_task(CodecTask, path, "codec checkpoint", use_ema=True, **overrides)  # EMA weights if any
        generator, teacher = task.generator, task._teacher[0]
    return generator.eval().to(device), teacher.eval().to(device)


@torch.no_grad()
def encode_decode(generator: nn.Module, teacher: nn.Module, audio: torch.Tensor, lengths: torch.Tensor,
                  threshold: float, num_quantizers: int | None, semantic=None):
    """Teacher features (unless given) -> tokens -> reconstruction trimmed to the input lengths."""
    if semantic is None:
        semantic = teacher(audio, lengths)
    tokens = generator.encode(audio, lengths, threshold=threshold, num_quantizers=num_quantizers,
                              semantic_features=semantic[0], semantic_lengths=semantic[1])
    decoded = generator.decode(tokens)
    return tokens, decoded.audio, decoded.lengths
