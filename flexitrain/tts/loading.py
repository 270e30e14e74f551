"""Load the FlexiCodec-TTS stages from local files: Lightning checkpoints of the flexitrain tasks, exported /
imported model directories, or released files. Nothing is downloaded; a missing path is a clear error.

No file runs code: task checkpoints are read with ``torch.load(weights_only=True)``, exports and released files
are safetensors + YAML/JSON. A bad file (empty, truncated, a directory, unsafe pickle, another stage's checkpoint,
wrong sizes, missing / extra keys) raises one `CheckpointError` naming it and what is wrong."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn


def _existing(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    return p


def load_task(cls, path: Path, what: str = "checkpoint", use_ema: bool = True):
    """A flexitrain task from its Lightning checkpoint, strictly and weights-only (`tasks.checkpointing.load_task`:
    the right task, every key and size checked first), with its EMA weights when it holds them (``task.ema``).
    Checkpoints written before flexitrain stored plain hyper-parameters are refused with the command that
    converts them (tools/convert_checkpoint.py)."""
    from flexitrain.tasks.checkpointing import load_task as _load

    return _load(cls, path, what, use_ema=use_ema)


def load_ar(path: str | Path) -> tuple[nn.Module, tuple[nn.Module, nn.Module] | None]:
    """`(ARTTSModel, (codec, teacher) or None)`. An ARTTSTask ``.ckpt`` brings the frozen codec it was trained
    against (``targets.source: codec``); a directory from tools/import_artts.py (config.json + model.safetensors)
    or a released ``artts.safetensors`` (released dimensions) brings none."""
    from flexitrain.models.tts.ar_checkpoint import load_ar_weights
    from flexitrain.models.tts.ar_tts import ARTTSModel, released_config

    from flexitrain.models.tts.ar_checkpoint import load_pretrained

    p = _existing(path, "AR checkpoint")
    if p.is_dir():
        return load_pretrained(p, "AR checkpoint"), None
    if p.suffix == ".safetensors":
        model = ARTTSModel(**released_config())
        load_ar_weights(model, p)
        return model.eval(), None
    from flexitrain.tasks.ar_tts import ARTTSTask

    task = load_task(ARTTSTask, p, "AR checkpoint")
    codec, teacher = task._frozen
    return task.model.eval(), ((codec, teacher) if codec is not None and teacher is not None else None)


def load_nar(path: str | Path) -> tuple[nn.Module, tuple[nn.Module, nn.Module] | None]:
    """`(VoiceboxNAR, (codec, teacher) or None)` from a VoiceboxTask ``.ckpt`` or a `save_pretrained` directory."""
    from flexitrain.models.tts.voicebox import VoiceboxNAR

    p = _existing(path, "NAR checkpoint")
    if p.is_dir():
        return VoiceboxNAR.from_pretrained(p, what="NAR checkpoint"), None
    if p.suffix == ".safetensors":
        from flexitrain.models.tts.voicebox_import import import_released_nartts

        return import_released_nartts(p, what="NAR checkpoint"), None
    from flexitrain.tasks.voicebox import VoiceboxTask

    task = load_task(VoiceboxTask, p, "NAR checkpoint")
    codec, teacher = task._frozen.get("codec"), task._frozen.get("teacher")
    return task.nar.eval(), ((codec, teacher) if codec is not None and teacher is not None else None)


def load_vocoder(path: str | Path) -> nn.Module:
    """Vocos from a VocosTask ``.ckpt``, a `save_pretrained` directory or the released ``vocos_emilia.safetensors``."""
    from flexitrain.models.vocos import Vocos

    p = _existing(path, "vocoder checkpoint")
    if p.is_dir() or p.suffix == ".safetensors":
        return Vocos.from_pretrained(p, what="vocoder checkpoint")
    from flexitrain.tasks.vocos import VocosTask

    return load_task(VocosTask, p, "vocoder checkpoint").generator.eval()


def codec_fingerprint(codec: nn.Module) -> str:
    """Hash of the codec's weights: AR and NAR must have been trained on tokens of the same codec."""
    import hashlib

    h = hashlib.sha256()
    for name, tensor in sorted(codec.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def same_codec(a: nn.Module, b: nn.Module) -> bool:
    return a is b or codec_fingerprint(a) == codec_fingerprint(b)


@torch.no_grad()
def teacher_features(teacher: nn.Module, audio16: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One 16 kHz clip ``[N]`` → SenseVoice features ``[1, 512, T]`` and their length."""
    return teacher(audio16[None].float(), torch.tensor([audio16.numel()], device=audio16.device))
