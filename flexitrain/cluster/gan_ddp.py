"""DDP for GAN tasks: one `DistributedDataParallel` per trainable part, so each backward reduces only its own part.

Lightning's `DDPStrategy` wraps the whole LightningModule in one DDP. A GAN step with manual optimisation has two
backwards (D loss, then G loss), so with G and D in one wrapper both backwards reduce *every* gradient (262 M
for codec_12hz), and the parameters the other backward does not reach need `find_unused_parameters=True`: an
autograd-graph walk over the whole module per backward and zeros all-reduced for the idle network.

`GanDDPStrategy` wraps each part that the LightningModule declares in its own DDP instead::

    class CodecTask(L.LightningModule):
        def ddp_submodules(self):        # names of submodules; per part DDP keyword overrides (or a list of names)
            return {"generator": {"find_unused_parameters": True}, "discriminator": {}, "repa_mlp": {}}

How it works (and why it needs no forward indirection):

- The parts stay registered where they are; the DDP wrappers live on the strategy only (``strategy.ddp_parts``),
  out of the module tree. ``self.generator(...)``, ``self.generator.encode(...)``, ``state_dict()`` keys,
  optimisers and checkpoints are exactly those of a single-process run: no ``.module.`` prefix, no patching.
- A DDP reducer does its work in autograd hooks on its parameters' gradient accumulators; in gradient reduction
  the DDP *forward*'s only job is to arm it (``reducer.prepare_for_backward``; the rest of it syncs buffers, moves
  inputs and sets up optimiser-in-backward, none of which is used here). Lightning's manual optimisation already
  arms its one wrapper from the loss in ``pre_backward`` (and disarms the forward); this strategy does the same
  for every part, from the loss given to ``manual_backward``, and never runs a part's DDP forward. A part whose
  parameters the loss does not reach gets no hook call, so nothing of it is reduced: the D backward (on detached
  fakes) reduces D's buckets only; the G backward reduces G's (and extra heads') only, provided D's parameters do
  not require grad during the G pass (the generator-side D forward is an ordinary call either way: no DDP
  involvement). An armed part that the backward does not reach stays armed harmlessly and is re-armed at the
  next ``manual_backward``.
- Unused parameters: parts default to ``find_unused_parameters=False`` (no graph walk). A part that may leave
  some of its parameters without a gradient in some step, on some rank, declares ``find_unused_parameters=True``;
  for it the walk starts at the loss (as Lightning does), so parameters that only a zero-weighted or absent loss
  term reaches are detected too. Partial reach without it is a DDP error ("Expected to have finished reduction in
  the prior iteration"), raised at the next ``manual_backward``. A task that knows on the host which parameters a
  step skips can instead keep the flag off and give them exact zero gradients (`with_zero_gradients`, one zeros
  buffer per backward): the codec generator does so on its RVQ-bypass steps (see `CodecTask.training_step`).
- Buffers of the whole module are broadcast from rank 0 once at setup (as DDP's constructor does), not before
  every forward: the GAN tasks have no running statistics. Parts containing BatchNorm are refused.

Tasks without ``ddp_submodules`` (AR-TTS, Voicebox) get Lightning's ordinary whole-module DDP with the keyword
arguments given here (``find_unused_parameters=False`` in ``configs/trainer/ddp.yaml``).
Not supported for parts: ``static_graph`` (the set of used parameters differs between steps and ranks) and
post-local-SGD model averaging. Every backward of a task with parts must go through ``manual_backward``.
"""
from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from lightning.pytorch.overrides.distributed import _register_ddp_comm_hook, prepare_for_backward
from lightning.pytorch.strategies import DDPStrategy
from torch import Tensor, nn
from torch.distributed.distributed_c10d import _get_default_group
from torch.distributed.utils import _sync_module_states
from torch.nn.parallel import DistributedDataParallel

log = logging.getLogger(__name__)

# DDP keyword arguments that parts use unless the strategy or the task says otherwise. Gradients as views of the
# communication buckets: no second copy of every gradient (they are set to None by zero_grad, which DDP supports).
PART_DEFAULTS: dict[str, Any] = {"find_unused_parameters": False, "gradient_as_bucket_view": True}


def declared_parts(module: nn.Module) -> dict[str, dict[str, Any]] | None:
    """``{name: ddp_kwargs}`` from ``module.ddp_submodules()`` (a mapping or a list of names), or None when the
    module declares none. Entries naming a missing/None attribute (e.g. REPA switched off) are dropped."""
    fn = getattr(module, "ddp_submodules", None)
    if fn is None:
        return None
    spec = fn() if callable(fn) else fn
    if spec is None:
        return None
    spec = dict(spec) if isinstance(spec, Mapping) else {name: {} for name in spec}
    parts = {}
    for name, kwargs in spec.items():
        sub = getattr(module, name, None)
        if sub is None:
            continue
        if not isinstance(sub, nn.Module):
            raise TypeError(f"ddp_submodules: {name!r} is a {type(sub).__name__}, not an nn.Module")
        parts[name] = dict(kwargs or {})
    return parts


class _ZeroGradients(torch.autograd.Function):
    """Identity on a loss whose backward also hands each of ``params`` an exact zero gradient (see
    `with_zero_gradients`)."""

    @staticmethod
    def forward(ctx: Any, loss: Tensor, *params: Tensor) -> Tensor:
        ctx.layout = [(p.shape, p.dtype, p.device) for p in params]
        return loss.clone()  # bitwise the same value (a scalar copy); an output may not be an input as is

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        # One zeros buffer per dtype/device, split into views shaped like the parameters: one fill kernel for all
        # of them (AccumulateGrad may take a view with its parameter's layout as is; under DDP the reducer copies
        # it into its bucket and points .grad at the bucket). No host sync.
        groups: dict[tuple, list[int]] = {}
        for i, (_, dtype, device) in enumerate(ctx.layout):
            groups.setdefault((dtype, device), []).append(i)
        zeros: list[Tensor | None] = [None] * len(ctx.layout)
        for (dtype, device), idx in groups.items():
            sizes = [ctx.layout[i][0].numel() for i in idx]
            flat = torch.zeros(sum(sizes), dtype=dtype, device=device)
            for i, view in zip(idx, flat.split(sizes)):
                zeros[i] = view.view(ctx.layout[i][0])
        return (grad, *zeros)


def with_zero_gradients(loss: Tensor, params: Sequence[Tensor]) -> Tensor:
    """``loss`` (the same value, and the same gradient everywhere it already reaches) whose backward also gives
    each of ``params`` a gradient of exact zeros, so that a DDP part without ``find_unused_parameters`` sees every
    one of its gradient hooks fire in a step that leaves ``params`` out. All-reduced with the other ranks' real
    gradients, such zeros give the very sum that unused-parameter detection gives (it fills the bucket slots of
    locally unused parameters with zeros); a parameter that was already reached gets ``g + 0 = g``. The one
    difference: a parameter that *no* rank reached keeps ``.grad`` None under detection (the optimiser skips it)
    but gets zeros here (fused AdamW would still decay it and step its moments); the caller must know that case
    on the host and set those gradients back to None (`CodecTask` does, from every rank's bypass draws)."""
    params = [p for p in params if p.requires_grad]
    if not params:
        return loss
    return _ZeroGradients.apply(loss, *params)


class GanDDPStrategy(DDPStrategy):
    """`DDPStrategy` that wraps each part declared by ``ddp_submodules()`` in its own DDP (see the module doc).

    Keyword arguments are those of `DDPStrategy`; DDP keyword arguments (``find_unused_parameters``,
    ``bucket_cap_mb``, ...) apply to the whole-module fallback and, under the task's per-part overrides, to every
    part. ``part_kwargs`` are DDP keyword arguments for parts only (default: ``gradient_as_bucket_view=True``).
    """

    def __init__(self, *args: Any, part_kwargs: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._part_kwargs = dict(part_kwargs or {})
        self._parts: dict[str, DistributedDataParallel] = {}

    # ------------------------------------------------------------------ wrapping
    @property
    def ddp_parts(self) -> Mapping[str, DistributedDataParallel]:
        """The DDP wrapper of each part (empty for whole-module DDP or outside fitting)."""
        return dict(self._parts)

    def part_ddp_kwargs(self, overrides: Mapping[str, Any]) -> dict[str, Any]:
        kwargs = {**PART_DEFAULTS, **self._ddp_kwargs, **self._part_kwargs, **overrides}
        # A part may switch unused-parameter detection on (it knows when it skips parameters), never off.
        kwargs["find_unused_parameters"] = bool(overrides.get("find_unused_parameters")) or bool(
            {**PART_DEFAULTS, **self._ddp_kwargs, **self._part_kwargs}["find_unused_parameters"])
        if kwargs.get("static_graph"):
            raise ValueError("GanDDPStrategy: static_graph is not supported for parts (their used parameters vary "
                             "between steps and ranks, and the parts' DDP forward is never run)")
        return kwargs

    def configure_ddp(self) -> None:
        lm = self.lightning_module
        parts = declared_parts(lm) if lm is not None else None
        if not parts:
            self._parts = {}
            super().configure_ddp()  # plain whole-module DDP
            return
        if self._model_averaging_period is not None:
            raise ValueError("GanDDPStrategy: model averaging is not supported with per-part DDP")
        self._check_partition(lm, parts)
        device_ids = self.determine_ddp_device_ids()
        ctx = torch.cuda.stream(torch.cuda.Stream()) if device_ids is not None else nullcontext()
        wrapped = {}
        with ctx:
            for name, overrides in parts.items():
                kwargs = self.part_ddp_kwargs(overrides)
                log.debug("GanDDPStrategy: wrapping %s in DDP (%s)", name, kwargs)
                # The constructor checks shapes across ranks and broadcasts rank 0's parameters and buffers.
                wrapped[name] = DistributedDataParallel(getattr(lm, name), device_ids=device_ids, **kwargs)
        # Parameters and buffers outside the parts (e.g. the step-guard counter, loss filterbanks), once, as
        # whole-module DDP's constructor would.
        inside = {f"{name}.{key}" for name in parts for key, _ in
                  [*getattr(lm, name).named_parameters(), *getattr(lm, name).named_buffers()]}
        _sync_module_states(lm, _get_default_group(), 250 * 1024 * 1024, src=0, params_and_buffers_to_ignore=inside)
        self._parts = wrapped
        if self._ddp_comm_hook is not None or self._ddp_comm_wrapper is not None:
            for ddp in wrapped.values():
                _register_ddp_comm_hook(model=ddp, ddp_comm_state=self._ddp_comm_state,
                                        ddp_comm_hook=self._ddp_comm_hook, ddp_comm_wrapper=self._ddp_comm_wrapper)

    @staticmethod
    def _check_partition(lm: nn.Module, parts: Mapping[str, Any]) -> None:
        """Every trainable parameter in exactly one part (else some gradient would never be synchronised, or be
        reduced twice), and no BatchNorm (its running statistics would drift apart without per-forward syncs)."""
        owner: dict[int, str] = {}
        for name in parts:
            sub = getattr(lm, name)
            for m in sub.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    raise ValueError(f"GanDDPStrategy: part {name!r} contains BatchNorm; use plain DDP")
            for p in sub.parameters():
                if p.requires_grad:
                    if id(p) in owner:
                        raise ValueError(f"GanDDPStrategy: parts {owner[id(p)]!r} and {name!r} share parameters")
                    owner[id(p)] = name
        left = [n for n, p in lm.named_parameters() if p.requires_grad and id(p) not in owner]
        if left:
            raise ValueError(f"GanDDPStrategy: trainable parameters outside every part of ddp_submodules(): "
                             f"{left[:10]}{' ...' if len(left) > 10 else ''}")

    # ------------------------------------------------------------------ backward
    def pre_backward(self, closure_loss: Tensor) -> None:
        if not self._parts:
            super().pre_backward(closure_loss)
            return
        with warnings.catch_warnings():
            # Arming a find_unused part from a loss that reaches all of its parameters makes DDP warn (once) that
            # the flag was not needed; it is needed on the steps/ranks that skip some of them.
            warnings.filterwarnings("ignore", message=".*find_unused_parameters=True was specified.*")
            for ddp in self._parts.values():
                prepare_for_backward(ddp, closure_loss)

    def post_backward(self, closure_loss: Tensor) -> None:
        if not self._parts:
            super().post_backward(closure_loss)

    def on_exception(self, exception: BaseException) -> None:
        if not self._parts:
            super().on_exception(exception)
            return
        if "Expected to have finished reduction in the prior iteration" in str(exception):
            names = ", ".join(self._parts)
            log.error("GanDDPStrategy: a DDP part (%s) had parameters without a gradient in a backward that reached "
                      "others of its parameters; declare find_unused_parameters=True for that part in "
                      "ddp_submodules()", names)

    def teardown(self) -> None:
        self._parts = {}  # dropping the wrappers removes their reducers' autograd hooks
        super().teardown()
