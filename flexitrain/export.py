"""Turn training checkpoints into inference folders (``flexitrain-export``) and average checkpoints
(``flexitrain-average``).

``flexitrain-export CKPT OUT``: a Lightning checkpoint of one of the four tasks → the folder its inference loader
reads, written by the task's own export method:

==============  =========================  ===============================================================
task            written by                 loaded by
==============  =========================  ===============================================================
CodecTask       ``export_generator``       ``FlexiCodec.from_pretrained`` (config.yaml + model.safetensors)
VocosTask       ``export_model``           ``Vocos.from_pretrained`` (config.yaml + model.safetensors)
VoiceboxTask    ``export_model``           ``VoiceboxNAR.from_pretrained`` (config.yaml + model.safetensors)
ARTTSTask       ``export_model``           ``ar_checkpoint.load_pretrained`` (config.json + model.safetensors)
==============  =========================  ===============================================================

All of them are what ``flexitrain-tts`` takes (``--ar/--nar/--vocoder DIR``). When the checkpoint holds EMA
weights (``task.ema``), those are exported (``--no-ema``: the live weights). The frozen codec / teacher a task
was trained against is not part of its export and is not loaded (the task is rebuilt without it).

``flexitrain-average CKPT... OUT``: the parameter mean of checkpoints of one run (same task, same keys and
shapes; anything else is refused with the differing keys named). OUT is a checkpoint of the same format: the
first input's hyper-parameters, floating-point weights (and EMA weights, when every input has them) averaged,
integer tensors (counters) taken from the first input. Optimiser, scheduler, RNG and data-position state are
dropped: OUT is for ``flexitrain-export``, ``init_from`` and evaluation, not for resuming a run.

Every file is read with ``torch.load(weights_only=True)`` (`flexitrain.utils.safe_load`): nothing runs code.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any, Callable

import torch

__all__ = ["export_checkpoint", "average_checkpoints", "export_main", "average_main", "TASKS"]

log = logging.getLogger(__name__)

# Lightning / flexitrain entries that describe the training process, not the model: dropped by averaging.
TRAINING_ONLY = ("optimizer_states", "lr_schedulers", "loops", "callbacks", "rng_states", "flexitrain",
                 "MixedPrecision", "native_amp_scaling_state", "amp_scaling_state")


# ------------------------------------------------------------------------------------------------ tasks
def _task_classes() -> dict[str, type]:
    from flexitrain.tasks.ar_tts import ARTTSTask
    from flexitrain.tasks.codec import CodecTask
    from flexitrain.tasks.vocos import VocosTask
    from flexitrain.tasks.voicebox import VoiceboxTask

    return {"CodecTask": CodecTask, "VocosTask": VocosTask, "VoiceboxTask": VoiceboxTask, "ARTTSTask": ARTTSTask}


TASKS = ("CodecTask", "VocosTask", "VoiceboxTask", "ARTTSTask")


def _without_frozen_models(kind: str, hparams: dict) -> dict:
    """Constructor overrides that keep the task from loading the frozen models it trained against (a codec
    checkpoint, SenseVoice): they are not in its export, and may live on another machine."""
    if kind == "CodecTask":
        # CodecTask always builds a teacher; a one-block random one is cheap and is never used here.
        return {"teacher": {"name": "sensevoice", "random_init": True, "num_blocks": 1}}
    if kind == "VoiceboxTask":
        return {"codec": None, "teacher": None}
    if kind == "ARTTSTask":
        return {"targets": {**dict(hparams.get("targets") or {}), "source": "shards"}}
    return {}


def _ema_override(ckpt: dict, use_ema: bool) -> dict:
    """``ema=`` for the task constructor: the checkpoint's EMA settings (so that its EMA weights are loaded even
    if the hyper-parameters predate ``task.ema``), or None to ignore them."""
    state = ckpt.get("ema")
    if not use_ema or not isinstance(state, dict):
        return {"ema": None}
    return {"ema": {k: state[k] for k in ("decay", "start_step", "every") if k in state}}


def _export_method(task) -> Callable[[str], None]:
    return task.export_generator if hasattr(task, "export_generator") else task.export_model


def _inference_loader(kind: str) -> Callable[[Path], Any]:
    """What reads the export back (the loaders ``flexitrain-tts`` and evaluation use)."""
    if kind == "CodecTask":
        from flexitrain.models.codec import FlexiCodec
        return FlexiCodec.from_pretrained
    if kind == "VocosTask":
        from flexitrain.models.vocos import Vocos
        return Vocos.from_pretrained
    if kind == "VoiceboxTask":
        from flexitrain.models.tts.voicebox import VoiceboxNAR
        return VoiceboxNAR.from_pretrained
    from flexitrain.models.tts.ar_checkpoint import load_pretrained
    return load_pretrained


def _checkpoint_kind(path: Path, ckpt: dict) -> str:
    from flexitrain.utils.safe_load import CheckpointError, checkpoint_task

    kind = checkpoint_task(ckpt)
    if kind not in TASKS:
        raise CheckpointError(path, f"is not a checkpoint of a flexitrain task ({', '.join(TASKS)}); found "
                                    f"{kind or 'unrecognised keys'}")
    return kind


def load_for_export(path: str | Path, use_ema: bool = True):
    """``(kind, task)``: the task rebuilt from its checkpoint (weights-only, strict), EMA state loaded when
    ``use_ema`` and present, frozen training-only models left out."""
    from flexitrain.tasks.checkpointing import load_task, read_checkpoint

    path = Path(path)
    ckpt = read_checkpoint(path, mmap=True)
    kind = _checkpoint_kind(path, ckpt)
    overrides = {**_without_frozen_models(kind, ckpt.get("hyper_parameters") or {}), **_ema_override(ckpt, use_ema)}
    del ckpt
    teacher_log = logging.getLogger("flexitrain.tasks.teacher")
    level = teacher_log.level
    teacher_log.setLevel(logging.ERROR)  # the stand-in teacher's "random SenseVoice" warning would mislead
    try:
        task = load_task(_task_classes()[kind], path, use_ema=False, **overrides)
    finally:
        teacher_log.setLevel(level)
    return kind, task.eval()


def export_checkpoint(ckpt: str | Path, out: str | Path, use_ema: bool = True, force: bool = False) -> dict:
    """Export ``ckpt`` into the inference folder ``out`` and read it back with its loader (a check that the
    folder is complete). Returns ``{"task", "out", "ema"}``."""
    out = Path(out)
    _check_output_dir(out, force)
    kind, task = load_for_export(ckpt, use_ema)
    ema = task.ema is not None
    _export_method(task)(str(out))
    _inference_loader(kind)(out)
    return {"task": kind, "out": str(out), "ema": ema}


def _check_output_dir(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise FileExistsError(f"{out} is not empty (pass --force to write into it)")


# ------------------------------------------------------------------------------------------------ averaging
def _shape_problems(ref: dict[str, torch.Tensor], other: dict[str, torch.Tensor], prefix: str = "") -> list[str]:
    """Every key only one side has, or with another shape / kind of dtype, one line each."""
    problems = [f"missing: {prefix}{k}" for k in ref if k not in other]
    problems += [f"unexpected: {prefix}{k}" for k in other if k not in ref]
    for k, v in ref.items():
        w = other.get(k)
        if w is None:
            continue
        if tuple(v.shape) != tuple(w.shape):
            problems.append(f"shape: {prefix}{k} {tuple(v.shape)} vs {tuple(w.shape)}")
        elif v.is_floating_point() != w.is_floating_point():
            problems.append(f"dtype: {prefix}{k} {v.dtype} vs {w.dtype}")
    return problems


def _incompatibility(first: Path, path: Path, problems: list[str]):
    from flexitrain.utils.safe_load import MAX_LISTED, WrongCheckpointError

    listed = "\n  ".join(problems[:4 * MAX_LISTED])
    more = f"\n  ... and {len(problems) - 4 * MAX_LISTED} more" if len(problems) > 4 * MAX_LISTED else ""
    return WrongCheckpointError(path, f"cannot be averaged with {first}: {len(problems)} differing keys "
                                      f"(missing/unexpected relative to {first.name}):\n  {listed}{more}")


class _Mean:
    """Running float64 sum of the floating-point tensors of a mapping (integer tensors: the first value)."""

    def __init__(self, state: dict[str, torch.Tensor]):
        self.first = state
        self.sums = {k: v.detach().double().clone() for k, v in state.items() if v.is_floating_point()}
        self.count = 1

    def add(self, state: dict[str, torch.Tensor]) -> None:
        for k, s in self.sums.items():
            s.add_(state[k].detach().double())
        self.count += 1

    def result(self) -> dict[str, torch.Tensor]:
        # float64 accumulation, one rounding to the stored dtype: the correctly rounded mean.
        return {k: (self.sums[k] / self.count).to(v.dtype) if k in self.sums else v.clone()
                for k, v in self.first.items()}


def _ema_weights(ckpt: dict) -> dict[str, torch.Tensor] | None:
    state = ckpt.get("ema")
    return state.get("weights") if isinstance(state, dict) else None


def _read_for_average(path: Path) -> tuple[str, dict]:
    from flexitrain.tasks.checkpointing import read_checkpoint

    ckpt = read_checkpoint(path, require=("state_dict", "hyper_parameters"))
    return _checkpoint_kind(path, ckpt), ckpt


def _check_compatible(first: tuple[Path, str, dict], path: Path, kind: str, ckpt: dict) -> None:
    from flexitrain.utils.safe_load import WrongCheckpointError, describe_kind

    first_path, first_kind, first_ckpt = first
    if kind != first_kind:
        raise WrongCheckpointError(path, f"is {describe_kind(kind)}, but {first_path} is "
                                         f"{describe_kind(first_kind)}: only checkpoints of one task average")
    problems = _shape_problems(first_ckpt["state_dict"], ckpt["state_dict"])
    a, b = _ema_weights(first_ckpt), _ema_weights(ckpt)
    if (a is None) != (b is None):
        has, lacks = (first_path, path) if a is not None else (path, first_path)
        problems.append(f"ema: {has} holds EMA weights, {lacks} does not")
    elif a is not None:
        problems += _shape_problems(a, b, prefix="ema.")
    if problems:
        raise _incompatibility(first_path, path, problems)
    if first_ckpt["hyper_parameters"].get("model") != ckpt["hyper_parameters"].get("model"):
        log.warning("%s and %s were built from different model settings (same keys and shapes): the output "
                    "keeps %s's", first_path, path, first_path)


def average_checkpoints(paths: list[str | Path], out: str | Path, force: bool = False) -> dict:
    """Write the parameter mean of ``paths`` to ``out`` (see the module docstring). Inputs are read one at a
    time (memory: one checkpoint plus the float64 sums). Returns ``{"task", "inputs", "ema"}``."""
    paths = [Path(p) for p in paths]
    out = Path(out)
    if len(paths) < 2:
        raise ValueError("give at least two checkpoints to average")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists (pass --force to overwrite it)")
    if any(out.resolve() == p.resolve() for p in paths):
        raise ValueError(f"{out} is one of the inputs")
    kind, ckpt = _read_for_average(paths[0])
    first = (paths[0], kind, ckpt)
    weights = _Mean(ckpt["state_dict"])
    ema = _Mean(_ema_weights(ckpt)) if _ema_weights(ckpt) is not None else None
    for path in paths[1:]:
        other_kind, other = _read_for_average(path)
        _check_compatible(first, path, other_kind, other)
        weights.add(other["state_dict"])
        if ema is not None:
            ema.add(_ema_weights(other))
        del other
    result = {k: v for k, v in ckpt.items() if k not in TRAINING_ONLY}
    result["state_dict"] = weights.result()
    if ema is not None:
        result["ema"] = {**ckpt["ema"], "weights": ema.result()}
    result["averaged_from"] = [str(p) for p in paths]
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, out)
    return {"task": kind, "inputs": len(paths), "ema": ema is not None}


# ------------------------------------------------------------------------------------------------ CLIs
def _run(fn: Callable[[], str]) -> int:
    from flexitrain.utils.safe_load import CheckpointError

    try:
        print(fn())
    except (CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def export_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="flexitrain-export",
        description="Export a CodecTask / VocosTask / VoiceboxTask / ARTTSTask checkpoint to the inference folder "
                    "that FlexiCodec / Vocos / VoiceboxNAR.from_pretrained and flexitrain-tts load (the EMA "
                    "weights when the checkpoint has them).")
    ap.add_argument("ckpt", type=Path, help="Lightning checkpoint (.ckpt) of a flexitrain task")
    ap.add_argument("out", type=Path, help="output folder (config + model.safetensors)")
    ap.add_argument("--no-ema", action="store_true", help="export the live weights even if EMA weights exist")
    ap.add_argument("--force", action="store_true", help="write into a non-empty output folder")
    args = ap.parse_args(argv)

    def run() -> str:
        info = export_checkpoint(args.ckpt, args.out, use_ema=not args.no_ema, force=args.force)
        weights = "EMA" if info["ema"] else "live (no EMA in the checkpoint)" if not args.no_ema else "live"
        return f"exported {info['task']} {args.ckpt} -> {info['out']} ({weights} weights)"

    return _run(run)


def average_main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="flexitrain-average",
        description="Average the weights (and EMA weights) of checkpoints of one task with the same keys and "
                    "shapes. The output is a checkpoint of the same format without optimiser / scheduler / RNG "
                    "state: export it, init_from it or evaluate it; it does not resume a run.")
    ap.add_argument("ckpts", type=Path, nargs="+", metavar="CKPT", help="two or more Lightning checkpoints")
    ap.add_argument("out", type=Path, metavar="OUT", help="output checkpoint (.ckpt)")
    ap.add_argument("--force", action="store_true", help="overwrite OUT")
    args = ap.parse_args(argv)

    def run() -> str:
        info = average_checkpoints(args.ckpts, args.out, force=args.force)
        ema = " and EMA weights" if info["ema"] else ""
        return f"averaged the weights{ema} of {info['inputs']} {info['task']} checkpoints -> {args.out}"

    return _run(run)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(export_main())
