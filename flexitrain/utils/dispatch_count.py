"""Count dispatched aten ops and host-device synchronisations while a block of code runs.

    from flexitrain.utils.dispatch_count import SyncCounter

    with SyncCounter() as c:
        task.training_step(batch, 0)
    print(c.ops, c.syncs)        # dispatched aten ops, host syncs
    print(c.report())            # per kind and per source location (file:line inside flexitrain/)
    c.assert_no_syncs()          # AssertionError that lists every sync site

Two Python modes cooperate:

* a ``TorchDispatchMode`` sees every aten op that reaches a kernel (forward, backward and optimiser ops; the
  autograd engine propagates the mode to its threads). It counts all of them (``ops``, ``op_counts``) and
  as syncs: ``aten._local_scalar_dense`` (``.item()``, ``float()/int()/bool()`` of a tensor, ``if tensor:``,
  slicing with a tensor bound, ...), ``aten.is_nonzero`` / ``aten.equal``, the ops whose output shape depends
  on the data (``nonzero``, ``masked_select``, ``unique*``, ``bincount``, ``repeat_interleave`` without
  ``output_size``, indexing / ``index_put_`` with a boolean mask), and copies to the CPU from another device
  (``_to_copy`` / ``copy_`` with a CPU destination). On an accelerator it also counts blocking host-to-device
  copies (``torch.tensor(x, device=cuda)``, ``.to(cuda)`` without ``non_blocking``), which wait for the stream.
* a ``TorchFunctionMode`` sees the Python-level calls that hand data to the host: ``Tensor.item``,
  ``tolist``, ``numpy``, ``cpu``, ``to("cpu")``, ``__bool__``, ``__int__``, ``__float__``, ``__index__``,
  ``__array__`` and ``torch.tensor([...tensors...])``. On a CPU tensor most of these dispatch nothing (a
  ``.cpu()`` of a CPU tensor is a no-op), so on CPU the dispatch level alone would miss code that syncs on a
  GPU. With ``cpu_as_device=True`` (the default) CPU tensors are treated as if they lived on the
  accelerator, so a CPU test catches those syncs. A sync found at the Python level is counted once: the aten
  ops it dispatches (e.g. the ``_local_scalar_dense`` under ``.item()``) are not counted again as syncs.
  ``.to(device)`` on CPU counts only with a literal ``"cpu"`` string (``.to(x.device)`` cannot be told apart
  from a real host copy there); blocking host-to-device copies are only visible on an accelerator.

Each sync records its kind (``"Tensor.item"``, ``"aten._local_scalar_dense"``, ``"aten.nonzero"``, ...) and
where it came from: the innermost frame inside ``flexitrain/`` (else the innermost frame outside torch and
this file, e.g. Lightning's logger), plus a short chain of outer repository frames. A sync in the backward
pass (e.g. ``index_put_`` with a boolean mask, the gradient of ``x[mask]``) is named after its autograd node
and located at the forward line that built the node (``trace_backward=True`` turns on autograd's anomaly
mode without NaN checks while active, so nodes remember their forward stack).

Reads of CPU tensors from inside ``torch/optim`` (the ``step`` counters of non-capturable optimisers, which
stay on the host on GPUs too) or under a function named in ``host_functions`` (default: Lightning's
``on_before_batch_transfer`` hook, which sees the batch before it moves to the device, `host_random`, a draw
from a CPU generator, and the codec's `check_host_lengths`, given host lengths only) are not syncs; with
``cpu_as_device`` they are counted apart in ``host_only``.

On CUDA, ``CudaSyncDebug`` (or ``SyncCounter(cuda_sync_debug=True)``) additionally turns on
``torch.cuda.set_sync_debug_mode("warn")`` and records the "synchronizing CUDA operation" warnings with their
Python locations: the driver-level ground truth (run it without the dispatch modes for a compiled model:
``torch.compile`` skips frames while a Python dispatch mode is active).
"""
from __future__ import annotations

import os
import re
import sys
import threading
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["SyncCounter", "SyncEvent", "CudaSyncDebug", "count_syncs"]

_PKG_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # .../flexitrain
_REPO_DIR = os.path.dirname(_PKG_DIR)
_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))

aten = torch.ops.aten


def _packet_names(*names: str) -> set:
    out = set()
    for n in names:
        p = getattr(aten, n, None)
        if p is not None:
            out.add(p)
    return out


# Syncs by their aten op (overload packets).
_SCALAR_OPS = _packet_names("_local_scalar_dense", "is_nonzero", "equal", "item")

def host_random(generator: torch.Generator | None = None) -> float:
    """One U[0, 1) draw from a CPU generator (or the global CPU RNG), as a Python float. Reading a host tensor
    waits for no device; naming this function in `SyncCounter.host_functions` tells the counter so on a CPU
    run, where it cannot see which tensors would live on the host on a GPU."""
    return torch.rand(1, generator=generator).item()

# Output shape depends on the values: the host must read a count back before it can allocate.
_DATA_DEPENDENT_OPS = _packet_names(
    "nonzero", "argwhere", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "unique_dim_consecutive", "bincount", "nonzero_numpy")
_REPEAT_INTERLEAVE = _packet_names("repeat_interleave")
_INDEX_OPS = _packet_names("index", "_unsafe_index")
_INDEX_PUT_OPS = _packet_names("index_put", "index_put_", "_index_put_impl", "_index_put_impl_", "_unsafe_index_put")
_TO_COPY = _packet_names("_to_copy")
_COPY = _packet_names("copy_", "_copy_from", "copy")

# Python-level (TorchFunctionMode) calls that hand tensor data to the host.
_T = torch.Tensor
_HOST_FUNCS: dict[Any, str] = {}
for _name in ("item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "__array__",
              "__complex__"):
    _f = getattr(_T, _name, None)
    if _f is not None:
        _HOST_FUNCS[_f] = f"Tensor.{_name}"
_TO_FUNC = _T.to
_TENSOR_CTORS = {torch.tensor: "torch.tensor(tensors)", torch.as_tensor: "torch.as_tensor(tensors)"}


@dataclass
class SyncEvent:
    kind: str                  # e.g. "Tensor.item", "aten._local_scalar_dense", "aten.nonzero", "d2h copy"
    location: str              # innermost flexitrain/ frame ("flexitrain/audio/mel.py:88 in forward") or fallback
    # repository frames, innermost first (for a location outside the roots: the non-torch frames)
    stack: tuple[str, ...] = field(default_factory=tuple)
    device: str = ""           # device of the tensor involved

    def __str__(self) -> str:
        chain = f"  <- {' <- '.join(self.stack[1:4])}" if len(self.stack) > 1 else ""
        return f"{self.kind} at {self.location}{chain}"


def _short(path: str) -> str:
    path = os.path.abspath(path)
    if "site-packages" + os.sep in path:
        return path.split("site-packages" + os.sep, 1)[1]
    if path.startswith(_REPO_DIR + os.sep):
        return os.path.relpath(path, _REPO_DIR)
    return path


def _is_repo_file(path: str) -> bool:
    return path.startswith(_REPO_DIR + os.sep) and "site-packages" not in path and path != _THIS_FILE


_TB_LINE = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


def _python_frames(skip: int) -> list[tuple[str, int, str]]:
    """(file, line, function) of the current Python stack, innermost first."""
    out = []
    f = sys._getframe(skip)
    while f is not None:
        out.append((f.f_code.co_filename, f.f_lineno, f.f_code.co_name))
        f = f.f_back
    return out


def _traceback_frames(lines) -> list[tuple[str, int, str]]:
    """Frames of an autograd node's forward traceback (anomaly mode), innermost first."""
    out = []
    for line in lines or ():
        m = _TB_LINE.search(str(line))
        if m:
            out.append((m.group(1), int(m.group(2)), m.group(3)))
    return out[::-1]


def _locate(frames, roots: tuple[str, ...], depth: int = 6) -> tuple[str, tuple[str, ...], list[str]]:
    """(innermost frame under `roots`, else the innermost frame outside torch and this file; repository
    frames, innermost first; files of the innermost run of torch frames)."""
    location = fallback = None
    chain: list[str] = []
    outside: list[str] = []  # non-torch frames: the chain when no repository frame is on the stack
    torch_block: list[str] = []
    in_block = True
    for raw, line, func in frames:
        if raw.startswith("<"):
            continue
        path = os.path.abspath(raw)
        if path == _THIS_FILE:
            continue
        is_torch = path.startswith(_TORCH_DIR + os.sep)
        if in_block:
            if is_torch:
                torch_block.append(path)
            else:
                in_block = False
        where = f"{_short(path)}:{line} in {func}"
        if location is None and any(path.startswith(r + os.sep) for r in roots):
            location = where
        if not is_torch:
            if fallback is None:
                fallback = where
            if len(outside) < depth:
                outside.append(where)
        if _is_repo_file(path) and len(chain) < depth:
            chain.append(where)
    if location is not None:
        return location, tuple(chain), torch_block
    return fallback or "<unknown>", tuple(outside), torch_block


_OPTIM_DIR = os.path.join(_TORCH_DIR, "optim") + os.sep
_current_node = getattr(torch._C, "_current_autograd_node", None)  # the backward node running now, if any


def _device_of(args, kwargs) -> torch.device | None:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a.device
    return None


def _has_tensor(data) -> bool:
    if isinstance(data, torch.Tensor):
        return True
    if isinstance(data, (list, tuple)):
        return any(_has_tensor(x) for x in data)
    return False


class _FunctionLevel(TorchFunctionMode):
    def __init__(self, owner: "SyncCounter"):
        super().__init__()
        self.owner = owner

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = self.owner._classify_function(func, args, kwargs)
        if kind is None:
            return func(*args, **kwargs)
        self.owner._record(kind, _device_of(args, kwargs))
        self.owner._suppress += 1  # the aten ops under it are the same sync
        try:
            return func(*args, **kwargs)
        finally:
            self.owner._suppress -= 1


class _DispatchLevel(TorchDispatchMode):
    def __init__(self, owner: "SyncCounter"):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        o = self.owner
        with o._lock:
            o.ops += 1
            o.op_counts[func._overloadpacket.__name__] += 1
        if not o._suppress:
            kind = o._classify_aten(func, args, kwargs)
            if kind is not None:
                o._record(kind, _device_of(args, kwargs))
        return func(*args, **kwargs)


class SyncCounter:
    """Context manager counting dispatched aten ops and host syncs (see the module docstring).

    Attributes after (or during) the block: ``ops`` (int), ``op_counts`` (Counter by aten op name),
    ``syncs`` (int), ``sync_counts`` (Counter by kind), ``sites`` (Counter by "kind at location"),
    ``events`` (list of `SyncEvent`), ``cuda_sync_warnings`` (list of "message at file:line", CUDA only).
    """

    def __init__(self, cpu_as_device: bool = True, roots: Iterable[str] | None = None,
                 cuda_sync_debug: bool = False, trace_backward: bool = True,
                 host_functions: Iterable[str] = ("on_before_batch_transfer", "host_random", "check_host_lengths")):
        self.cpu_as_device = cpu_as_device
        self.roots = tuple(os.path.abspath(r) for r in (roots or (_PKG_DIR,)))
        self.cuda_sync_debug = cuda_sync_debug
        self.trace_backward = trace_backward
        self.host_functions = frozenset(host_functions)
        self._anomaly = None
        self._lock = threading.Lock()
        self._suppress = 0
        self._modes: list = []
        self._cuda: CudaSyncDebug | None = None
        self.reset()

    def reset(self) -> None:
        self.ops = 0
        self.op_counts: Counter = Counter()
        self.events: list[SyncEvent] = []
        self.async_copies = 0
        self.host_only: Counter = Counter()  # reads of tensors that live on the host on GPUs too

    # ---------------------------------------------------------------- results
    @property
    def syncs(self) -> int:
        return len(self.events)

    @property
    def sync_counts(self) -> Counter:
        return Counter(e.kind for e in self.events)

    @property
    def sites(self) -> Counter:
        return Counter(f"{e.kind} at {e.location}" for e in self.events)

    @property
    def cuda_sync_warnings(self) -> list[str]:
        return list(self._cuda.warnings) if self._cuda is not None else []

    def report(self, top_ops: int = 0) -> str:
        lines = [f"{self.ops} aten ops dispatched, {self.syncs} host syncs"]
        for site, n in sorted(self.sites.items(), key=lambda kv: (-kv[1], kv[0])):
            lines.append(f"  {n:4d} x {site}")
        if self._cuda is not None:
            lines.append(f"  CUDA sync debug mode: {len(self._cuda.warnings)} synchronizing operations")
            for w, n in Counter(self._cuda.warnings).most_common():
                lines.append(f"  {n:4d} x {w}")
        if top_ops:
            lines.append("  most dispatched ops: " + ", ".join(f"{k} {v}" for k, v in self.op_counts.most_common(top_ops)))
        return "\n".join(lines)

    def assert_no_syncs(self, allow: Callable[[SyncEvent], bool] | None = None) -> None:
        bad = [e for e in self.events if not (allow and allow(e))]
        if bad:
            sites = Counter(str(e) for e in bad)
            raise AssertionError(f"{len(bad)} host sync(s):\n" + "\n".join(f"  {n} x {s}" for s, n in sites.items()))

    # ---------------------------------------------------------------- classification
    def _counts_as_device(self, device: torch.device | None) -> bool:
        if device is None:
            return False
        if device.type == "meta":
            return False
        return device.type != "cpu" or self.cpu_as_device

    def _classify_function(self, func, args, kwargs) -> str | None:
        kind = _HOST_FUNCS.get(func)
        if kind is not None:
            t = args[0] if args and isinstance(args[0], torch.Tensor) else None
            return kind if t is not None and self._counts_as_device(t.device) else None
        if func is _TO_FUNC and args and isinstance(args[0], torch.Tensor):
            t = args[0]
            try:
                device, _, non_blocking, _ = torch._C._nn._parse_to(*args[1:], **kwargs)
            except Exception:
                return None
            if device is None or device.type != "cpu":
                return None
            if t.device.type != "cpu":
                if non_blocking:
                    self.async_copies += 1
                    return None
                return "Tensor.to(cpu)"
            # A CPU tensor: only an explicit "cpu" string says the code means a host copy.
            literal = any(isinstance(a, str) and a.startswith("cpu") for a in list(args[1:]) + [kwargs.get("device")])
            return "Tensor.to('cpu')" if literal and self.cpu_as_device else None
        kind = _TENSOR_CTORS.get(func)
        if kind is not None and args and not isinstance(args[0], torch.Tensor) and _has_tensor(args[0]):
            devs = [x.device for x in _flatten(args[0])]
            return kind if any(self._counts_as_device(d) for d in devs) else None
        return None

    def _classify_aten(self, func, args, kwargs) -> str | None:
        packet = func._overloadpacket
        name = f"aten.{packet.__name__}"
        dev = _device_of(args, kwargs)
        if packet in _SCALAR_OPS:
            return name if self._counts_as_device(dev) else None
        if packet in _DATA_DEPENDENT_OPS:
            return name if self._counts_as_device(dev) else None
        if packet in _REPEAT_INTERLEAVE:
            # repeat_interleave(Tensor repeats) without output_size reads the total back
            repeats_tensor = (len(args) >= 2 and isinstance(args[1], torch.Tensor)) or (
                len(args) == 1 and isinstance(args[0], torch.Tensor) and func.__name__.endswith("Tensor"))
            if repeats_tensor and kwargs.get("output_size") is None and self._counts_as_device(dev):
                return f"{name}(tensor repeats)"
            return None
        if packet in _INDEX_OPS or packet in _INDEX_PUT_OPS:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (indices or ())):
                return f"{name}(bool mask)" if self._counts_as_device(dev) else None
            return None
        if packet in _TO_COPY:
            src = args[0] if args else None
            target = kwargs.get("device")
            if isinstance(src, torch.Tensor) and target is not None:
                target = torch.device(target)
                if target.type == "cpu" and src.device.type not in ("cpu", "meta"):
                    if kwargs.get("non_blocking"):
                        self.async_copies += 1
                        return None
                    return "d2h copy (aten._to_copy)"
                if target.type not in ("cpu", "meta") and src.device.type == "cpu" and not kwargs.get("non_blocking"):
                    return "blocking h2d copy (aten._to_copy)"
            return None
        if packet in _COPY and len(args) >= 2:
            dst, src = args[0], args[1]
            if isinstance(dst, torch.Tensor) and isinstance(src, torch.Tensor):
                non_blocking = bool(args[2]) if len(args) > 2 else bool(kwargs.get("non_blocking", False))
                if dst.device.type == "cpu" and src.device.type not in ("cpu", "meta"):
                    if non_blocking:
                        self.async_copies += 1
                        return None
                    return f"d2h copy ({name})"
                if dst.device.type not in ("cpu", "meta") and src.device.type == "cpu" and not non_blocking \
                        and src.numel() > 0:
                    return f"blocking h2d copy ({name})"
        return None

    def _record(self, kind: str, device: torch.device | None) -> None:
        node = _current_node() if _current_node is not None else None
        if node is not None:  # an op of the backward pass: locate the forward op that made this node
            frames = _traceback_frames((getattr(node, "metadata", None) or {}).get("traceback_"))
            kind = f"{kind} (backward of {node.name()})"
            if not frames:
                frames = _python_frames(3)
        else:
            frames = _python_frames(3)
        location, stack, torch_block = _locate(frames, self.roots)
        host_only = device is not None and device.type == "cpu" and (
            any(p.startswith(_OPTIM_DIR) for p in torch_block)
            or any(func in self.host_functions for _, _, func in frames))
        with self._lock:
            if host_only:  # an optimiser's step counter: a CPU tensor on GPUs too (non-capturable optimisers)
                self.host_only[kind] += 1
            else:
                self.events.append(SyncEvent(kind, location, stack, str(device) if device is not None else ""))

    # ---------------------------------------------------------------- context manager
    def __enter__(self) -> "SyncCounter":
        self.reset()
        if self.cuda_sync_debug and torch.cuda.is_available():
            self._cuda = CudaSyncDebug().__enter__()
        if self.trace_backward:  # autograd nodes record their forward stack: backward syncs get a location
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._anomaly = torch.autograd.set_detect_anomaly(True, check_nan=False)
                self._anomaly.__enter__()
        fn, disp = _FunctionLevel(self), _DispatchLevel(self)
        fn.__enter__()
        try:
            disp.__enter__()
        except BaseException:
            fn.__exit__(None, None, None)
            raise
        self._modes = [fn, disp]
        return self

    def __exit__(self, *exc) -> None:
        fn, disp = self._modes
        self._modes = []
        try:
            disp.__exit__(*exc)
        finally:
            fn.__exit__(*exc)
            if self._anomaly is not None:
                self._anomaly.__exit__(*exc)
                self._anomaly = None
            if self._cuda is not None:
                self._cuda.__exit__(*exc)


def _flatten(data) -> list[torch.Tensor]:
    if isinstance(data, torch.Tensor):
        return [data]
    if isinstance(data, (list, tuple)):
        return [t for x in data for t in _flatten(x)]
    return []


class CudaSyncDebug:
    """``torch.cuda.set_sync_debug_mode("warn")`` while active; ``warnings`` lists each synchronizing CUDA
    operation as "message at file:line" (the Python line that triggered it). A no-op without CUDA."""

    def __init__(self):
        self.warnings: list[str] = []
        self._prev = None
        self._catch = None
        self._showwarning = None

    def __enter__(self) -> "CudaSyncDebug":
        self.warnings = []
        if not torch.cuda.is_available():
            return self
        self._prev = torch.cuda.get_sync_debug_mode()
        self._catch = warnings.catch_warnings(record=True)
        self._log = self._catch.__enter__()
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc) -> None:
        if self._catch is None:
            return
        torch.cuda.set_sync_debug_mode(self._prev)
        self._catch.__exit__(*exc)
        self._catch = None
        for w in self._log:
            msg = str(w.message)
            if "synchroniz" in msg.lower():
                self.warnings.append(f"{msg.splitlines()[0][:80]} at {_short(w.filename)}:{w.lineno}")

    @property
    def count(self) -> int:
        return len(self.warnings)


def count_syncs(fn: Callable, *args, cpu_as_device: bool = True, **kwargs) -> tuple[Any, SyncCounter]:
    """Run ``fn(*args, **kwargs)`` under a `SyncCounter`; returns (result, counter)."""
    with SyncCounter(cpu_as_device=cpu_as_device) as c:
        out = fn(*args, **kwargs)
    return out, c
