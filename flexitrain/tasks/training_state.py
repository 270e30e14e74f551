"""Training state that every task checkpoints the same way: RNG states (CPU and CUDA, per rank) and the EMA.

`TrainingStateMixin` (before ``L.LightningModule`` in a task's bases; call ``_init_training_state`` in
``__init__``, ``_save_training_state`` in ``on_save_checkpoint`` and ``_load_training_state`` in
``on_load_checkpoint``) provides:

- **RNG states, per rank.** A checkpoint holds, under the plain key ``"rng_states"``, one bundle per rank:
  ``{"torch": CPU state, "cuda": [one state per visible CUDA device] (when CUDA is initialised), "attrs":
  {name: state}}`` (the task's own generators: a ``random.Random`` or a ``torch.Generator`` attribute named in
  ``_rng_attrs``), as plain tensors / tuples. Lightning calls ``on_save_checkpoint`` on every rank, so under DDP
  the bundles are all-gathered (one small collective per checkpoint) and every rank resumes with its own
  streams. The task generators are restored at load; the torch CPU and CUDA states at the first training batch
  (``on_train_batch_start``), after everything that runs between loading and training (sanity validation, data
  loader start-up) has drawn what it draws, as in the uninterrupted run. Validation never consumes the training
  streams: they are saved at ``on_validation_start`` and put back at ``on_validation_end`` (and a checkpoint
  written during validation stores the saved ones).
- **EMA** (`flexitrain.tasks.ema`, ``task.ema``): ``ema_update()`` after each optimiser step of the averaged
  module (the GAN tasks call it in their training step; automatic-optimisation tasks get it from
  ``optimizer_step``), validation on the averaged weights, ``ema_weights()`` for exports, the ``"ema"``
  checkpoint entry.
"""
from __future__ import annotations

import contextlib
import logging
import random
from typing import Any, Iterator

import torch

from flexitrain.tasks.ema import CHECKPOINT_KEY as EMA_KEY
from flexitrain.tasks.ema import ModelEMA, build_ema

log = logging.getLogger(__name__)

RNG_KEY = "rng_states"


# ------------------------------------------------------------------------------------------------ RNG helpers
def cuda_rng_active() -> bool:
    """CUDA's generators are worth saving: CUDA is available and this process has initialised it."""
    return bool(torch.cuda.is_available() and torch.cuda.is_initialized())


def capture_global_rng() -> dict[str, Any]:
    """``{"torch": CPU state[, "cuda": [state per device]]}`` as plain CPU ByteTensors."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if cuda_rng_active():
        state["cuda"] = [s.clone() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_global_rng(state: Any) -> None:
    """Inverse of `capture_global_rng` (a bare tensor: a CPU state from an older checkpoint). CUDA states are
    restored for the devices this process sees (a checkpoint from a GPU run resumed on CPU skips them)."""
    if state is None:
        return
    if isinstance(state, torch.Tensor):
        torch.set_rng_state(state)
        return
    if state.get("torch") is not None:
        torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda and torch.cuda.is_available():
        n = torch.cuda.device_count()
        if len(cuda) != n:
            log.warning("the checkpoint holds CUDA RNG states for %d devices, this process sees %d: restoring the "
                        "first %d", len(cuda), n, min(n, len(cuda)))
        if len(cuda) == n:
            torch.cuda.set_rng_state_all(cuda)
        else:
            for i, s in enumerate(cuda[:n]):
                torch.cuda.set_rng_state(s, device=i)
    elif cuda:
        log.info("the checkpoint holds CUDA RNG states but CUDA is not available here: not restored")


def _dist_world() -> tuple[int, int]:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_per_rank(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, ...]`` (every rank must call it under DDP; one process: ``[obj]``)."""
    rank, world = _dist_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


# ------------------------------------------------------------------------------------------------ the mixin
class TrainingStateMixin:
    """See the module docstring. ``_rng_attrs``: the task's own RNG attributes saved per rank."""

    _rng_attrs: tuple[str, ...] = ()

    def _init_training_state(self, ema_cfg: Any = None, ema_module: str | None = None) -> None:
        self._ema_holder = [build_ema(ema_cfg, getattr(self, ema_module)) if ema_module else None]
        self._ema_prefix = f"{ema_module}." if ema_module else ""
        self._pending_rng = None   # global RNG state restored at the first training batch after a resume
        self._val_rng = None       # training streams set aside during validation

    # ---------------------------------------------------------------- EMA
    @property
    def ema(self) -> ModelEMA | None:
        holder = self.__dict__.get("_ema_holder")
        return holder[0] if holder else None

    def ema_update(self) -> None:
        """After an optimiser step of the averaged module (no host sync)."""
        if self.ema is not None:
            self.ema.update()

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """The averaged weights in the model inside the block (the live ones outside); no-op without EMA."""
        with (self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext()):
            yield

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        # Automatic optimisation calls this once per real optimiser step (not per accumulated micro-batch).
        super().optimizer_step(*args, **kwargs)
        if self.automatic_optimization:
            self.ema_update()

    # ---------------------------------------------------------------- hooks
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> Any:
        self._restore_pending_rng()
        return super().on_train_batch_start(batch, batch_idx)

    def _restore_pending_rng(self) -> None:
        if self._pending_rng is not None:  # restored here, after everything that ran since the load
            restore_global_rng(self._pending_rng)
            self._pending_rng = None

    # Validation must not consume the training RNG streams (a resumed run replays exactly the same steps), and it
    # scores the EMA weights when there are any.
    def on_validation_start(self) -> None:
        super().on_validation_start()
        self._val_rng = capture_global_rng()
        if self.ema is not None:
            self.ema.swap_in()

    def on_validation_end(self) -> None:
        if self.ema is not None:
            self.ema.swap_out()
        if self._val_rng is not None:
            restore_global_rng(self._val_rng)
            self._val_rng = None
        super().on_validation_end()

    # ---------------------------------------------------------------- checkpoints
    def _rng_bundle(self) -> dict[str, Any]:
        bundle = dict(self._val_rng) if self._val_rng is not None else capture_global_rng()
        if self._pending_rng is not None:  # saved again before the restored state was used: keep it
            pending = self._pending_rng
            bundle = dict(pending) if isinstance(pending, dict) else {**bundle, "torch": pending}
        attrs = {}
        for name in self._rng_attrs:
            obj = getattr(self, name, None)
            if isinstance(obj, random.Random):
                attrs[name] = obj.getstate()
            elif isinstance(obj, torch.Generator):
                attrs[name] = obj.get_state()
        bundle["attrs"] = attrs
        return bundle

    def _save_training_state(self, checkpoint: dict) -> None:
        """Write the RNG bundles (all ranks gathered) and the EMA into ``checkpoint`` (plain containers)."""
        ranks = gather_per_rank(self._rng_bundle())
        checkpoint[RNG_KEY] = {"world_size": len(ranks), "ranks": ranks}
        if self.ema is not None:
            checkpoint[EMA_KEY] = self.ema.state_dict()
            if isinstance(checkpoint.get("state_dict"), dict):
                self.ema.fix_state_dict(checkpoint["state_dict"], self._ema_prefix)

    def _load_training_state(self, checkpoint: dict) -> None:
        saved = checkpoint.get(RNG_KEY)
        if isinstance(saved, dict) and saved.get("ranks"):
            rank, world = _dist_world()
            ranks = saved["ranks"]
            if len(ranks) != world:
                log.warning("the checkpoint was written by %d ranks, this run has %d: rank %d resumes rank %d's "
                            "RNG streams", len(ranks), world, rank, rank % len(ranks))
            bundle = ranks[rank % len(ranks)]
            for name, state in (bundle.get("attrs") or {}).items():
                obj = getattr(self, name, None)
                if isinstance(obj, random.Random):
                    obj.setstate(_as_random_state(state))
                elif isinstance(obj, torch.Generator):
                    obj.set_state(state)
            self._pending_rng = {k: v for k, v in bundle.items() if k in ("torch", "cuda")}
        ema_state = checkpoint.get(EMA_KEY)
        if self.ema is not None:
            if ema_state is not None:
                self.ema.load_state_dict(ema_state)
            else:
                log.warning("task.ema is on but the checkpoint holds no EMA state: the average starts from the "
                            "loaded weights")
                self.ema.shadow = None
                self.ema.num_updates = int(checkpoint.get("global_step", 0) or 0)
        elif ema_state is not None:
            log.info("the checkpoint holds EMA weights but task.ema is off: they are not used")

    def use_ema_weights(self) -> None:
        """Inference: replace the live weights by the averaged ones for good (no-op without EMA)."""
        if self.ema is not None:
            self.ema.copy_to_model()


def _as_random_state(state: Any) -> tuple:
    """``random.Random.setstate`` wants tuples; a state that went through a checkpoint may come back as lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss
