"""Opening a checkpoint never runs code, and a bad file gets one clear error.

Every file flexitrain reads weights from goes through here:

- `safe_torch_load`: ``torch.load(..., weights_only=True)`` (plain containers, numbers, strings and tensors only),
  after checking that the path is a non-empty file. A refused pickle is named for what it holds: an older
  flexitrain checkpoint (omegaconf / numpy objects) gets the command that converts it
  (``tools/convert_checkpoint.py``); anything else that references code (``os.system`` ...) is refused as such.
- `read_safetensors`, `read_yaml`, `read_json`: the export formats (no pickle at all).
- `plain_checkpoint`: what the tasks' ``on_save_checkpoint`` hooks call so that every checkpoint they write
  loads with ``weights_only=True`` (omegaconf containers -> dicts/lists, numpy -> tensors / Python numbers).

Each error is a `CheckpointError` (a ``ValueError`` and a ``RuntimeError``) whose message starts with the file
and says what is wrong; key lists are cut to a handful plus a count (`format_keys`). A missing path stays a
``FileNotFoundError``.
"""
from __future__ import annotations

import json
import logging
import pickle
import pickletools
import zipfile
from pathlib import Path, PurePath
from typing import Any, Iterable

import torch

log = logging.getLogger(__name__)

MAX_LISTED = 5
CONVERT_TOOL = "tools/convert_checkpoint.py"


# ---------------------------------------------------------------------------------------------- errors
class CheckpointError(ValueError, RuntimeError):
    """A checkpoint / model file that cannot be used: ``"<what> <path>: <problem>"``."""

    def __init__(self, path: str | Path, problem: str, what: str = "checkpoint"):
        self.path, self.problem, self.what = str(path), problem, what
        super().__init__(f"{what} {str(path)!r}: {problem}")


class CorruptCheckpointError(CheckpointError):
    """Empty, truncated, corrupt, or not the file format expected."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that references code or types outside the weights-only allow-list (nothing was run)."""

    def __init__(self, path, problem, what="checkpoint", globals_found: Iterable[str] = (), convertible=False):
        self.globals_found, self.convertible = sorted(set(globals_found)), convertible
        super().__init__(path, problem, what)


class WrongCheckpointError(CheckpointError):
    """A readable file of another kind (a Vocos checkpoint given as a codec, wrong sizes, other keys)."""


def format_keys(keys: Iterable[str], limit: int = MAX_LISTED) -> str:
    """``a, b, c, d, e (+12 more)``: a handful of names and how many were left out."""
    keys = list(keys)
    shown = ", ".join(str(k) for k in keys[:limit])
    return shown + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def mismatch_summary(missing: list[str], unexpected: list[str], mismatched: list[str],
                     limit: int = MAX_LISTED) -> str:
    """One paragraph: each kind of key problem with its count and a handful of names."""
    parts = []
    for title, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("wrong sizes", mismatched)):
        if keys:
            parts.append(f"  {title} ({len(keys)}): {format_keys(keys, limit)}")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------- paths
def check_file(path: str | Path, what: str = "checkpoint") -> Path:
    """The path as a non-empty regular file, else FileNotFoundError / CheckpointError naming it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    if p.is_dir():
        raise CheckpointError(p, "is a directory, but a checkpoint file is expected here", what)
    if not p.is_file():
        raise CheckpointError(p, "is not a regular file", what)
    if p.stat().st_size == 0:
        raise CorruptCheckpointError(p, "is empty (0 bytes)", what)
    return p


def check_dir(path: str | Path, what: str, expects: str) -> Path:
    """The path as a directory (``expects`` says what it should hold), else an error naming it."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist (expected {expects})")
    if not p.is_dir():
        raise CheckpointError(p, f"is a file, but a directory is expected here ({expects})", what)
    return p


# ---------------------------------------------------------------------------------------------- pickles
# Types an older flexitrain / Lightning checkpoint may hold that tools/convert_checkpoint.py turns into plain
# containers. They are admitted only by that tool (run on purpose on a trusted file), never by the loaders.
def convertible_globals() -> list:
    import collections
    import typing

    out: list = [collections.defaultdict, typing.Any, dict, list, tuple, set, int, float, str, bool, PurePath]
    import pathlib

    out += [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath, pathlib.Path]
    try:
        from omegaconf import DictConfig, ListConfig
        from omegaconf.base import ContainerMetadata, Metadata
        from omegaconf import nodes

        out += [DictConfig, ListConfig, ContainerMetadata, Metadata, nodes.AnyNode, nodes.StringNode,
                nodes.IntegerNode, nodes.FloatNode, nodes.BooleanNode, nodes.BytesNode]
        if hasattr(nodes, "PathNode"):
            out.append(nodes.PathNode)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    try:
        import numpy as np

        core = getattr(np, "_core", None) or np.core
        out += [np.ndarray, np.dtype, core.multiarray._reconstruct, core.multiarray.scalar,
                (core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
                (core.multiarray.scalar, "numpy.core.multiarray.scalar")]
        out += [type(np.dtype(t)) for t in ("f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "?")]
    except ImportError:  # pragma: no cover
        pass
    try:
        from lightning.fabric.utilities.data import AttributeDict

        out.append(AttributeDict)
    except ImportError:  # pragma: no cover
        pass
    try:
        import argparse

        out.append(argparse.Namespace)
    except ImportError:  # pragma: no cover
        pass
    return out


def _global_name(obj) -> str:
    if isinstance(obj, tuple):
        return obj[1]
    return f"{obj.__module__}.{obj.__qualname__}"


def convertible_global_names() -> set[str]:
    return {_global_name(g) for g in convertible_globals()}


def _pickle_bytes(path: Path) -> list[bytes]:
    """The pickle stream(s) of a torch.save file (``*/data.pkl`` inside the zip) or of a plain pickle file."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as zf:
            return [zf.read(n) for n in zf.namelist() if n.endswith("data.pkl")]
    return [path.read_bytes()]


def _py3_name(module: str, name: str = "") -> str:
    """``module.name`` as Python 3 imports it (protocol-2 pickles say ``__builtin__.long`` for ``builtins.int``)."""
    import _compat_pickle

    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def pickle_globals(path: str | Path) -> list[str]:
    """Every ``module.name`` the pickle(s) in ``path`` would import, found by reading the opcodes (nothing runs).
    Raises on a stream that is not a pickle."""
    names: list[str] = []
    for data in _pickle_bytes(Path(path)):
        memo: dict[int, Any] = {}
        stack: list[Any] = []  # only the strings matter (STACK_GLOBAL's module and name)
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                names.append(_py3_name(*str(arg).split(" ", 1)))
                stack.append(None)
            elif name == "STACK_GLOBAL":
                mod, qual = (stack[-2], stack[-1]) if len(stack) >= 2 else (None, None)
                names.append(_py3_name(mod, qual) if isinstance(mod, str) and isinstance(qual, str) else "<unknown>")
                stack.append(None)
            elif name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING",
                          "SHORT_BINSTRING"):
                stack.append(arg)
            elif name == "MEMOIZE":
                memo[len(memo)] = stack[-1] if stack else None
            elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[int(arg)] = stack[-1] if stack else None
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack.append(memo.get(int(arg)))
            else:
                stack.append(None)
            if len(stack) > 64:
                del stack[:-8]
    return names


def _allowed_global_names() -> set[str]:
    from torch import _weights_only_unpickler as wo

    names = set(wo._get_allowed_globals())
    names |= set(wo._get_user_allowed_globals())
    return names


def unsafe_globals(path: str | Path) -> list[str] | None:
    """The globals in ``path`` that ``weights_only=True`` refuses (sorted, unique); None if it is not a pickle."""
    try:
        found = pickle_globals(path)
    except Exception:
        return None
    allowed = _allowed_global_names()
    return sorted({g for g in found if g not in allowed})


def convert_hint(path: str | Path) -> str:
    p = Path(path)
    out = p.with_name(p.stem + ".converted" + (p.suffix or ".ckpt"))
    return (f"If you trust this file (e.g. your own run, written before flexitrain stored plain containers), "
            f"convert it once: python {CONVERT_TOOL} '{p}' --out '{out}' (or --in-place)")


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for sep in (". This is an internal", ". If you"):
        text = text.split(sep)[0]
    return text[:160]


def safe_torch_load(path: str | Path, what: str = "checkpoint", mmap: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU with one clear error for every way the file can be bad."""
    p = check_file(path, what)
    try:
        if mmap and zipfile.is_zipfile(p):
            return torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
        return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        bad = unsafe_globals(p)
        if bad:
            raise unsafe_error(p, bad, what) from None
        raise CorruptCheckpointError(
            p, f"cannot be read: truncated, corrupt or not a PyTorch checkpoint ({_weights_only_reason(err)})",
            what) from None
    except MemoryError:
        raise
    except Exception as err:  # noqa: BLE001 - zip/EOF/key/OS errors of a damaged file
        raise CorruptCheckpointError(
            p, f"cannot be read: truncated, corrupt or not a PyTorch checkpoint ({type(err).__name__}: {_short(err)})",
            what) from None


def _weights_only_reason(err: BaseException) -> str:
    text = str(err)
    marker = "WeightsUnpickler error:"
    if marker in text:
        text = text.split(marker, 1)[1]
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return (lines[0] if lines else type(err).__name__)[:160]


def unsafe_error(path: Path, bad: list[str], what: str) -> UnsafeCheckpointError:
    convertible = convertible_global_names()
    if all(g in convertible for g in bad):
        rank = lambda g: (0 if g.endswith(("DictConfig", "ListConfig", "ndarray")) else  # noqa: E731
                          2 if g.startswith(("builtins.", "typing.", "collections.")) else 1, g)
        shown = sorted(bad, key=rank)
        problem = (f"refused to load: it holds pickled Python objects ({format_keys(shown)}) that a weights-only "
                   f"load does not accept; nothing was run. {convert_hint(path)}")
        return UnsafeCheckpointError(path, problem, what, bad, convertible=True)
    code = [g for g in bad if g not in convertible]
    problem = (f"refused to load: its pickle references code ({format_keys(code)}) that would run on loading; "
               f"nothing was run. flexitrain checkpoints never hold such references: this file is not a "
               f"flexitrain checkpoint or it was tampered with")
    return UnsafeCheckpointError(path, problem, what, bad, convertible=False)


# ---------------------------------------------------------------------------------------------- exports
def read_safetensors(path: str | Path, what: str = "weights", device: str | torch.device = "cpu"
                     ) -> dict[str, torch.Tensor]:
    """A ``.safetensors`` file (no pickle) with one clear error for a missing, empty or damaged file."""
    from safetensors.torch import load_file

    p = check_file(path, what)
    try:
        return load_file(str(p), device=str(device))
    except Exception as err:  # noqa: BLE001 - SafetensorError and OS errors
        looks = " (it looks like a pickle / torch.save file, not safetensors)" if _looks_like_pickle(p) else ""
        raise CorruptCheckpointError(
            p, f"cannot be read as safetensors: truncated, corrupt or another format{looks} ({_short(err)})",
            what) from None


def _looks_like_pickle(p: Path) -> bool:
    try:
        head = p.open("rb").read(4)
    except OSError:
        return False
    return head[:2] == b"PK" or head[:1] == b"\x80"


def read_yaml(path: str | Path, what: str = "config") -> Any:
    import yaml

    p = check_file(path, what)
    try:
        return yaml.safe_load(p.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(p, f"is not valid YAML ({_short(err)})", what) from None


def read_json(path: str | Path, what: str = "config") -> Any:
    p = check_file(path, what)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptCheckpointError(p, f"is not valid JSON ({_short(err)})", what) from None


# ---------------------------------------------------------------------------------------------- kinds
# (name, test on the key set): which model / task a state dict belongs to, for "wrong task" errors.
_KINDS: list[tuple[str, Any]] = [
    ("CodecTask", lambda ks: any(k.startswith("generator.dac.") for k in ks)),
    ("VocosTask", lambda ks: any(k.startswith(("generator.backbone.", "generator.head.")) for k in ks)),
    ("VoiceboxTask", lambda ks: any(k.startswith("nar.voicebox_model.") for k in ks)),
    ("ARTTSTask", lambda ks: any(k.startswith(("model.llm.", "model.text_encoder.")) for k in ks)),
    ("FlexiCodec", lambda ks: any(k.startswith(("dac.", "module.dac.")) for k in ks)),
    ("Vocos", lambda ks: any(k.startswith(("backbone.convnext.", "backbone.embed.")) for k in ks)),
    ("VoiceboxNAR", lambda ks: any(k.startswith(("voicebox_model.", "module.voicebox_model.")) for k in ks)),
    ("ARTTSModel", lambda ks: any(k.startswith(("transformer_lm.", "llm.", "text_encoder.")) for k in ks)),
    ("SenseVoice", lambda ks: any(k.startswith("encoder.encoders0.") for k in ks)),
]
DESCRIBE = {"CodecTask": "a codec training checkpoint (CodecTask)",
            "VocosTask": "a Vocos training checkpoint (VocosTask)",
            "VoiceboxTask": "a Voicebox NAR training checkpoint (VoiceboxTask)",
            "ARTTSTask": "an AR TTS training checkpoint (ARTTSTask)", "FlexiCodec": "a FlexiCodec codec model",
            "Vocos": "a Vocos vocoder model", "VoiceboxNAR": "a Voicebox NAR model", "ARTTSModel": "an AR TTS model",
            "SenseVoice": "a SenseVoice teacher model"}


def guess_kind(keys: Iterable[str]) -> str | None:
    """Which flexitrain task / model a set of state-dict keys belongs to (None: unknown)."""
    keys = list(keys)
    for name, test in _KINDS:
        if test(keys):
            return name
    return None


def describe_kind(kind: str) -> str:
    return DESCRIBE.get(kind, kind)


def guess_config_kind(config: dict) -> str | None:
    """Which model a constructor-argument mapping (an export's config.yaml / config.json) describes."""
    if not isinstance(config, dict):
        return None
    keys = set(config.get("model", config) if isinstance(config.get("model"), dict) else config)
    if {"input_channels", "intermediate_dim", "n_fft", "hop_size"} <= keys:
        return "Vocos"
    if {"mel_dim", "hidden_size", "cond_codebook_size"} <= keys:
        return "VoiceboxNAR"
    if {"text_token_size", "speech_token_size", "llm_dim"} <= keys:
        return "ARTTSModel"
    if {"encoder_rates", "decoder_rates", "n_codebooks"} & keys:
        return "FlexiCodec"
    return None


def checkpoint_task(ckpt: dict) -> str | None:
    """The task a Lightning checkpoint was written by: stored by flexitrain (``flexitrain_task``), else guessed
    from its state-dict keys."""
    stored = ckpt.get("flexitrain_task")
    if isinstance(stored, str):
        return stored
    state = ckpt.get("state_dict")
    return guess_kind(state) if isinstance(state, dict) else None


def check_kind(path: str | Path, found: str | None, expected: str, what: str, hint: str = "") -> None:
    """A WrongCheckpointError when a file clearly belongs to another task / model than ``expected``."""
    if found is None or found == expected:
        return
    raise WrongCheckpointError(path, f"is {describe_kind(found)}, not {describe_kind(expected)}"
                               + (f"; {hint}" if hint else ""), what)


# ---------------------------------------------------------------------------------------------- writing
_PLAIN = (str, int, float, bool, bytes, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size,
          complex, bytearray)


def to_plain(obj: Any, where: str = "checkpoint", problems: list[str] | None = None) -> Any:
    """``obj`` with omegaconf containers, numpy arrays / scalars, paths and dict subclasses turned into plain
    containers, tensors and Python numbers (what ``weights_only=True`` reads). Containers are copied only where
    something changed (a state dict keeps its ``_metadata``). Anything else is left and named in ``problems``."""
    from collections import OrderedDict

    if isinstance(obj, _PLAIN):
        return obj
    try:
        from omegaconf import Container, OmegaConf

        if isinstance(obj, Container):
            try:
                return to_plain(OmegaConf.to_container(obj, resolve=True), where, problems)
            except Exception:  # noqa: BLE001 - an interpolation that only resolves inside Hydra
                return to_plain(OmegaConf.to_container(obj, resolve=False), where, problems)
    except ImportError:  # pragma: no cover
        pass
    try:
        import numpy as np

        if isinstance(obj, np.ndarray):
            return torch.from_numpy(obj.copy()) if obj.dtype != object else to_plain(obj.tolist(), where, problems)
        if isinstance(obj, np.generic):
            return obj.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(obj, PurePath):
        return str(obj)
    if isinstance(obj, dict):
        new = {k: to_plain(v, f"{where}[{k!r}]", problems) for k, v in obj.items()}
        if type(obj) in (dict, OrderedDict) and all(new[k] is obj[k] for k in obj):
            return obj
        return OrderedDict(new) if type(obj) is OrderedDict else dict(new)
    if isinstance(obj, (list, tuple)):
        new = [to_plain(v, f"{where}[{i}]", problems) for i, v in enumerate(obj)]
        if type(obj) in (list, tuple) and all(a is b for a, b in zip(new, obj)):
            return obj
        return new if isinstance(obj, list) else tuple(new)
    if isinstance(obj, (set, frozenset)):
        return set(to_plain(v, where, problems) for v in obj)
    if problems is not None:
        problems.append(f"{where}: {type(obj).__module__}.{type(obj).__qualname__}")
    return obj


def plain_checkpoint(checkpoint: dict, task: str | None = None) -> dict:
    """Make a Lightning checkpoint dict load with ``weights_only=True`` (in place, also returned): plain
    hyper-parameters (the ``*hparams_type`` class entries are dropped), plain RNG states / data positions, and
    ``flexitrain_task`` naming the task that wrote it. Objects it cannot make plain are logged."""
    problems: list[str] = []
    for key in list(checkpoint):
        if key.endswith("hparams_type") and isinstance(checkpoint[key], type):
            del checkpoint[key]
            continue
        checkpoint[key] = to_plain(checkpoint[key], key, problems)
    if task:
        checkpoint["flexitrain_task"] = task
    if problems:
        log.error("checkpoint entries that will not load with weights_only=True: %s", format_keys(problems))
    return checkpoint
