"""ReplicaConsistencyCheck: verify that DDP replicas hold identical weights (gradients really were synchronised)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist


def parameter_digest(module: torch.nn.Module) -> str:
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class ReplicaConsistencyCheck(L.Callback):
    """At the end of fitting, every rank hashes its parameters; rank 0 writes `replicas.json` into the run
    directory and raises if the replicas disagree (a desynchronised run must not pass silently)."""

    def __init__(self, filename: str = "replicas.json"):
        self.filename = filename

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        digest = parameter_digest(pl_module)
        digests = [digest]
        if dist.is_available() and dist.is_initialized():
            digests = [None] * dist.get_world_size()
            dist.all_gather_object(digests, digest)
        if trainer.is_global_zero:
            out = {"world_size": len(digests), "digests": digests, "consistent": len(set(digests)) == 1,
                   "global_step": trainer.global_step}
            Path(trainer.default_root_dir).mkdir(parents=True, exist_ok=True)
            (Path(trainer.default_root_dir) / self.filename).write_text(json.dumps(out, indent=2))
            if not out["consistent"]:
                raise RuntimeError(f"DDP replicas diverged: {digests}")
