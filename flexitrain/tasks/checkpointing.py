"""Strict, safe checkpoint loading for the tasks: a checkpoint never loads half silently and never runs code.

Every Lightning checkpoint is read with ``torch.load(weights_only=True)`` (`flexitrain.utils.safe_load`); a bad
file raises one `CheckpointError` naming the file and what is wrong (empty, truncated, a directory, a pickle that
references code, another task's checkpoint, missing / unexpected keys or wrong sizes: a handful of each plus a
count) before any weights or training state are touched.

Besides Lightning's entries, a task checkpoint holds plain top-level entries of its own: ``flexitrain_task``,
``flexitrain`` (data position, task RNGs), ``rng_states`` (per-rank CPU / CUDA RNG states) and, with
``task.ema``, ``ema`` (`flexitrain.tasks.ema`: its weights are checked against the task like the state_dict's,
`ema_problems`). Inference loaders (`load_task(..., use_ema=True)`) use the EMA weights when present.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import nn

from flexitrain.utils.safe_load import (MAX_LISTED, CheckpointError, WrongCheckpointError, check_kind,
                                        checkpoint_task, guess_kind, plain_checkpoint, read_safetensors,
                                        safe_torch_load)

__all__ = ["read_checkpoint", "read_state_dict", "describe_mismatch", "load_weights_strict", "load_task",
           "check_task_checkpoint", "ema_problems", "save_hook", "CheckpointError"]


def read_checkpoint(path: str | Path, what: str = "checkpoint", mmap: bool = False,
                    require: tuple[str, ...] = ("state_dict",)) -> dict[str, Any]:
    """A Lightning checkpoint dict (weights-only load), with its ``state_dict`` of tensors and the ``require``d
    entries present."""
    ckpt = safe_torch_load(path, what, mmap=mmap)
    if not isinstance(ckpt, dict):
        raise CheckpointError(path, f"is not a training checkpoint: it holds a {type(ckpt).__name__}, not a dict",
                              what)
    missing = [k for k in require if k not in ckpt]
    if missing:
        top = ", ".join(map(str, list(ckpt)[:MAX_LISTED])) + (" ..." if len(ckpt) > MAX_LISTED else "")
        raise CheckpointError(path, f"is not a Lightning training checkpoint: it has no {' / '.join(missing)} "
                                    f"entry (it holds: {top or 'nothing'})", what)
    if "state_dict" in ckpt:
        _check_tensors(ckpt["state_dict"], path, what)
    return ckpt


def _check_tensors(state: Any, path, what: str) -> None:
    if not isinstance(state, dict):
        raise CheckpointError(path, f"its state_dict is a {type(state).__name__}, not a mapping of tensors", what)
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(path, f"its state_dict holds {len(bad)} entries that are not tensors "
                                    f"({', '.join(map(str, bad[:MAX_LISTED]))})", what)


def read_state_dict(path: str | Path, what: str = "checkpoint", expected: str | None = None
                    ) -> dict[str, torch.Tensor]:
    """Weights from a Lightning `.ckpt` (its `state_dict`), a plain saved state dict or a `.safetensors` file, as
    fp32 where floating. ``expected``: the task / model the file must belong to (else WrongCheckpointError)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        state = read_safetensors(path, what)
        found = guess_kind(state)
    else:
        ckpt = read_checkpoint(path, what, require=())
        if "state_dict" in ckpt:
            state, found = ckpt["state_dict"], checkpoint_task(ckpt)
        else:  # a bare state dict saved with torch.save
            _check_tensors(ckpt, path, what)
            state, found = ckpt, guess_kind(ckpt)
    if expected is not None:
        check_kind(path, found, expected, what)
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def describe_mismatch(module: nn.Module, state: dict[str, torch.Tensor], ignore_prefixes=(),
                      optional=()) -> list[str]:
    """Every missing, unexpected and mis-shaped key, one line each (empty when the two agree). ``optional``:
    module keys a checkpoint may lack (e.g. a counter added later)."""
    own = module.state_dict()
    keep = lambda k: not any(k.startswith(p) for p in ignore_prefixes)  # noqa: E731
    problems = [f"missing: {k} {tuple(v.shape)}" for k, v in own.items()
                if k not in state and keep(k) and k not in optional]
    problems += [f"unexpected: {k} {tuple(v.shape)}" for k, v in state.items() if k not in own and keep(k)]
    problems += [f"shape: {k} checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
                 for k, v in state.items() if k in own and keep(k) and tuple(v.shape) != tuple(own[k].shape)]
    return problems


def summarize(problems: list[str], limit: int = MAX_LISTED) -> str:
    """At most ``limit`` lines per kind of problem (missing / unexpected / shape), then how many more."""
    lines = []
    for kind in ("missing", "unexpected", "shape"):
        rows = [p for p in problems if p.startswith(kind + ":")]
        lines += ["  " + r for r in rows[:limit]]
        if len(rows) > limit:
            lines.append(f"  ... and {len(rows) - limit} more {'wrong sizes' if kind == 'shape' else kind}")
    return "\n".join(lines)


def mismatch_error(path, problems: list[str], target: str, what: str) -> WrongCheckpointError:
    counts = {k: sum(p.startswith(k + ":") for p in problems) for k in ("missing", "unexpected", "shape")}
    head = ", ".join(f"{n} {'wrong sizes' if k == 'shape' else k}" for k, n in counts.items() if n)
    return WrongCheckpointError(path, f"does not match the {target} strictly ({len(problems)} problems: {head}):\n"
                                + summarize(problems), what)


def load_weights_strict(module: nn.Module, path: str | Path, ignore_prefixes=(),
                        what: str = "init_from checkpoint") -> None:
    """Load every key of ``path`` into ``module`` or raise (before touching it) with the problems listed."""
    state = read_state_dict(path, what, expected=_task_name(module))
    problems = describe_mismatch(module, state, ignore_prefixes)
    if problems:
        raise mismatch_error(path, problems, type(module).__name__, what)
    state = {k: v for k, v in state.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert all(any(k.startswith(p) for p in ignore_prefixes) for k in missing), missing


def _task_name(module: nn.Module) -> str | None:
    name = type(module).__name__
    return name if name in ("CodecTask", "VocosTask", "VoiceboxTask", "ARTTSTask") else None


def _optional_keys(task: nn.Module) -> tuple[str, ...]:
    # NonFiniteStepGuard: checkpoints written before the skip counter existed resume with a zero count.
    return ("skipped_steps",) if "skipped_steps" in dict(task.named_buffers()) else ()


def ema_problems(task: nn.Module, ckpt: dict) -> list[str]:
    """Problems of the checkpoint's EMA entry (top-level ``"ema"``, `flexitrain.tasks.ema`) against ``task``'s
    EMA, as `describe_mismatch` lines (``missing: ema.<name>`` ...). None to check when either side has no EMA: a
    checkpoint without one resumes with a fresh average, one with it into a task without EMA ignores it."""
    ema = getattr(task, "ema", None)
    state = ckpt.get("ema")
    if ema is None or state is None:
        return []
    return ema.check_state(state)


def check_task_checkpoint(task: nn.Module, ckpt: dict, path: str | Path, what: str = "checkpoint") -> None:
    """The checkpoint belongs to ``task``'s class and its weights (and EMA weights) fit ``task`` exactly (nothing
    is loaded)."""
    check_kind(path, checkpoint_task(ckpt), type(task).__name__, what)
    problems = describe_mismatch(task, ckpt["state_dict"], optional=_optional_keys(task)) + ema_problems(task, ckpt)
    if problems:
        raise mismatch_error(path, problems, f"{type(task).__name__} of this configuration", what)


def load_task(cls, path: str | Path, what: str = "checkpoint", use_ema: bool = False, **overrides):
    """A task rebuilt from its Lightning checkpoint (constructor arguments from ``hyper_parameters``, updated by
    ``overrides``) and loaded strictly, on CPU. Replaces ``cls.load_from_checkpoint``: weights-only, one clear
    error per bad file, the task and the keys checked before anything is loaded. ``use_ema`` (inference): when
    the checkpoint holds EMA weights (``task.ema``), the model gets those instead of the live ones."""
    ckpt = read_checkpoint(path, what)
    check_kind(path, checkpoint_task(ckpt), cls.__name__, what)
    hparams = ckpt.get("hyper_parameters")
    if not isinstance(hparams, dict):
        raise CheckpointError(path, f"has no hyper_parameters to rebuild the {cls.__name__} from (was it saved "
                                    f"with save_weights_only or by another program?)", what)
    params = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in {**hparams, **overrides}.items() if takes_any or k in params}
    try:
        task = cls(**kwargs)
    except TypeError as err:
        raise CheckpointError(path, f"its hyper_parameters do not build a {cls.__name__}: {err}", what) from None
    problems = ema_problems(task, ckpt)  # before on_load_checkpoint reads the EMA entry
    if problems:
        raise mismatch_error(path, problems, f"{cls.__name__} its hyper_parameters build", what)
    task.on_load_checkpoint(ckpt)  # as Lightning's load_from_checkpoint (e.g. fills a missing skip counter)
    problems = describe_mismatch(task, ckpt["state_dict"])
    if problems:
        raise mismatch_error(path, problems, f"{cls.__name__} its hyper_parameters build", what)
    task.load_state_dict(ckpt["state_dict"], strict=True)
    if use_ema and ckpt.get("ema") is not None and hasattr(task, "use_ema_weights"):
        task.use_ema_weights()
    return task


def save_hook(task: nn.Module, checkpoint: dict) -> None:
    """Call from a task's ``on_save_checkpoint``: the checkpoint then loads with ``weights_only=True`` and names
    the task that wrote it."""
    plain_checkpoint(checkpoint, type(task).__name__)
