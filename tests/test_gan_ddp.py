"""GanDDPStrategy (flexitrain/cluster/gan_ddp.py): per-part DDP for the GAN tasks.

A 2-process gloo run of the micro codec with the new strategy (trainer=ddp_cpu) against the same run with
Lightning's whole-module ``ddp_find_unused_parameters_true`` (the previous trainer=ddp_cpu): the same per-step
losses, the same weights and state-dict keys, identical replicas; and, counted by a DDP communication hook on
each part's wrapper, the D backward reduces only D's buckets and the G backward only G's — each once, covering
exactly the part's parameters — also on steps where one rank bypasses the RVQ (the generator's skipped
parameters) and the other does not.
"""
from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn

from codec_fixtures import MICRO_MODEL, MICRO_TASK, build_tiny_corpus, data_overrides, run_train

STEPS = 2


class CommProbe(L.Callback):
    """Test-only callback (imported by train.py through PYTHONPATH): a comm hook on each DDP part records which
    part reduces how many gradient elements in which backward of the step (0: D loss, 1: G loss), and a forward
    hook on the RVQ records whether this rank bypassed it; written to <run dir>/commprobe_rank<r>.json."""

    def __init__(self):
        self.steps: list[dict] = []

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        parts = dict(getattr(trainer.strategy, "ddp_parts", {}))
        self.part_numel = {name: sum(p.numel() for p in ddp.module.parameters() if p.requires_grad)
                           for name, ddp in parts.items()}

        def hook(name, bucket):
            self.steps[-1]["reduced"].append([self.steps[-1]["backwards"] - 1, name, bucket.buffer().numel()])
            return default_hooks.allreduce_hook(None, bucket)

        for name, ddp in parts.items():
            ddp.register_comm_hook(name, hook)
        backward = pl_module.manual_backward

        def counted_backward(loss, *args, **kwargs):
            self.steps[-1]["backwards"] += 1
            return backward(loss, *args, **kwargs)

        pl_module.manual_backward = counted_backward

        def rvq_ran(module, args, output):
            self.steps[-1]["rvq"] = True

        pl_module.generator.dac.quantizer.register_forward_hook(rvq_ran)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.steps.append({"backwards": 0, "reduced": [], "rvq": False})

    def on_train_end(self, trainer, pl_module):
        out = {"rank": trainer.global_rank, "strategy": type(trainer.strategy).__name__,
               "part_numel": self.part_numel, "steps": self.steps}
        (Path(trainer.default_root_dir) / f"commprobe_rank{trainer.global_rank}.json").write_text(json.dumps(out))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_tiny_corpus(tmp_path_factory.mktemp("corpus") / "demo")


def losses(run: Path) -> dict[int, tuple[float, float]]:
    out = {}
    with open(run / "csv" / "metrics.csv") as fh:
        for row in csv.DictReader(fh):
            if row.get("train/loss_g"):
                out[int(row["step"])] = (float(row["train/loss_g"]), float(row["train/loss_d"]))
    return out


def test_per_part_ddp_matches_whole_module_ddp_and_reduces_each_part_in_its_own_backward(corpus, tmp_path,
                                                                                         monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(Path(__file__).resolve().parent),
                                                                   os.environ.get("PYTHONPATH")])))
    common = [*MICRO_MODEL, *MICRO_TASK, *data_overrides(corpus), "trainer=ddp_cpu", f"trainer.max_steps={STEPS}",
              "trainer.limit_val_batches=0", "trainer.log_every_n_steps=1", "validate_first=false", "logger=csv",
              "~callbacks.progress", "experiment=gan_ddp", "torch_threads=1",
              # RVQ bypass drawn per rank with p = 0.5: a step where one rank skips the generator's encoder and
              # quantiser and the other does not (the seeds make it the second step; asserted below).
              "task.bypass_quantize_prob=0.5",
              "+callbacks.replicas._target_=flexitrain.callbacks.ReplicaConsistencyCheck"]
    run_train(tmp_path, [*common, "run_name=whole", "trainer.strategy=ddp_find_unused_parameters_true"], timeout=600)
    run_train(tmp_path, [*common, "run_name=parts", "+callbacks.probe._target_=test_gan_ddp.CommProbe"], timeout=600)
    whole, parts = tmp_path / "runs" / "gan_ddp" / "whole", tmp_path / "runs" / "gan_ddp" / "parts"

    for run in (whole, parts):
        report = json.loads((run / "replicas.json").read_text())
        assert report["world_size"] == 2 and report["consistent"] and report["global_step"] == STEPS, report
    la, lb = losses(whole), losses(parts)
    assert sorted(la) == sorted(lb) and len(la) == STEPS, (la, lb)
    for step in la:  # same losses within float rounding (bit-identical here)
        assert all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9) for a, b in zip(la[step], lb[step])), (step, la, lb)
    wa = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    wb = torch.load(parts / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert list(wa) == list(wb)  # no `.module.` or other wrapper prefix
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-7, msg=k)

    probes = [json.loads((parts / f"commprobe_rank{r}.json").read_text()) for r in range(2)]
    assert all(p["strategy"] == "GanDDPStrategy" for p in probes)
    numel = probes[0]["part_numel"]
    assert set(numel) == {"generator", "discriminator"}  # codec_demo: no REPA head
    for p in probes:
        assert len(p["steps"]) == STEPS
        for step in p["steps"]:
            assert step["backwards"] == 2  # D loss, then G loss
            per_backward = {}
            for backward, part, n in step["reduced"]:
                per_backward.setdefault(backward, {}).setdefault(part, 0)
                per_backward[backward][part] += n
            # D backward: D's gradients once, nothing of G; G backward (D frozen): G's once, nothing of D.
            assert per_backward == {0: {"discriminator": numel["discriminator"]},
                                    1: {"generator": numel["generator"]}}, step
    # the per-rank RVQ bypass happened on one rank only in some step: the generator's skipped parameters were
    # reduced (as zeros from that rank) without find_unused on the whole module
    rvq = [[p["steps"][i]["rvq"] for p in probes] for i in range(STEPS)]
    assert any(a != b for a, b in rvq), rvq


def test_parts_must_cover_every_trainable_parameter_once():
    from flexitrain.cluster.gan_ddp import GanDDPStrategy, declared_parts

    class Task(nn.Module):
        def __init__(self, spec):
            super().__init__()
            self.generator, self.discriminator, self.head = nn.Linear(2, 2), nn.Linear(2, 1), nn.Linear(2, 2)
            self.repa_mlp = None
            self.spec = spec

        def ddp_submodules(self):
            return self.spec

    full = Task({"generator": {"find_unused_parameters": True}, "discriminator": {}, "head": {}, "repa_mlp": {}})
    parts = declared_parts(full)
    assert parts == {"generator": {"find_unused_parameters": True}, "discriminator": {}, "head": {}}
    GanDDPStrategy._check_partition(full, parts)
    assert declared_parts(nn.Linear(2, 2)) is None  # no declaration: plain whole-module DDP
    partial = Task(["generator", "discriminator"])
    with pytest.raises(ValueError, match="outside every part"):
        GanDDPStrategy._check_partition(partial, declared_parts(partial))
    shared = Task(["generator", "discriminator", "head"])
    shared.head.weight = shared.generator.weight
    with pytest.raises(ValueError, match="share parameters"):
        GanDDPStrategy._check_partition(shared, declared_parts(shared))
    strategy = GanDDPStrategy(find_unused_parameters=False)
    assert strategy.part_ddp_kwargs({})["find_unused_parameters"] is False
    assert strategy.part_ddp_kwargs({})["gradient_as_bucket_view"] is True
    assert strategy.part_ddp_kwargs({"find_unused_parameters": True})["find_unused_parameters"] is True
    # a part can switch detection on, never off what the strategy asks for
    assert GanDDPStrategy(find_unused_parameters=True).part_ddp_kwargs(
        {"find_unused_parameters": False})["find_unused_parameters"] is True
    with pytest.raises(ValueError, match="static_graph"):
        GanDDPStrategy(static_graph=True).part_ddp_kwargs({})
