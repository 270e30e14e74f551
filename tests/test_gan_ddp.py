"""GanDDPStrategy (flexitrain/cluster/gan_ddp.py): per-part DDP for the GAN tasks.

A 2-process gloo run of the micro codec with the new strategy (trainer=ddp_cpu) against the same run with
Lightning's whole-module ``ddp_find_unused_parameters_true`` (the previous trainer=ddp_cpu): the same per-step
losses, the same weights and state-dict keys, identical replicas; and, counted by a DDP communication hook on
each part's wrapper, the D backward reduces only D's buckets and the G backward only G's — each once, covering
exactly the part's parameters — also on steps where one rank bypasses the RVQ (the generator's skipped
parameters) and the other does not, and on steps where every rank bypasses it.

The codec generator's part runs without unused-parameter detection (`CodecTask.ddp_submodules`): a bypassing rank
gives the RVQ path (`rvq_path_parameters`) exact zero gradients, and when no rank ran the RVQ those gradients are
set back to None. The weights *and the optimiser states* (AdamW step counts and moments) then equal those of the
whole-module run with detection, where the globally unused parameters keep None gradients and AdamW skips them.
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
from test_codec_step_syncs import make_task, speech_batch

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
        self.find_unused = {name: bool(ddp.find_unused_parameters) for name, ddp in parts.items()}

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
               "part_numel": self.part_numel, "find_unused": self.find_unused, "steps": self.steps}
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
              # RVQ bypass drawn per rank with p = 0.5: with seed 8, rank 0 skips the generator's encoder,
              # quantiser and acoustic aggregator in the first step and rank 1 does not; in the second step both
              # skip them (asserted below).
              "task.bypass_quantize_prob=0.5", "seed=8",
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
    ca = torch.load(whole / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    cb = torch.load(parts / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    wa, wb = ca["state_dict"], cb["state_dict"]
    assert list(wa) == list(wb)  # no `.module.` or other wrapper prefix
    # Bit-identical: a two-rank all-reduce sums a + b whatever the bucket layout, and the zeros a bypassing rank
    # contributes are the zeros detection puts in its buckets.
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=0, msg=k)
    # The optimisers' states too (same parameter order in both runs): the generator's AdamW skipped the RVQ path
    # in the step no rank ran it (None gradients), exactly as with unused-parameter detection -- zero gradients
    # would have decayed those weights, stepped their moments and counted the step.
    for opt_a, opt_b in zip(ca["optimizer_states"], cb["optimizer_states"], strict=True):
        assert sorted(opt_a["state"]) == sorted(opt_b["state"])
        for i, sa in opt_a["state"].items():
            for key, va in sa.items():
                torch.testing.assert_close(opt_b["state"][i][key], va, rtol=0, atol=0, msg=f"{i}.{key}")

    probes = [json.loads((parts / f"commprobe_rank{r}.json").read_text()) for r in range(2)]
    assert all(p["strategy"] == "GanDDPStrategy" for p in probes)
    numel = probes[0]["part_numel"]
    assert set(numel) == {"generator", "discriminator"}  # codec_demo: no REPA head
    # no part walks the autograd graph for unused parameters, the RVQ bypass (p = 0.5) notwithstanding
    assert all(p["find_unused"] == {"generator": False, "discriminator": False} for p in probes), probes
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
    # Step 1: one rank bypassed the RVQ (its zero gradients reduced with the other rank's real ones); step 2: no
    # rank ran it (the reduced zeros set back to None: AdamW counted one step for the RVQ path, two for the rest).
    rvq = [[p["steps"][i]["rvq"] for p in probes] for i in range(STEPS)]
    assert rvq == [[False, True], [False, False]], rvq
    steps_g = {int(v["step"]) for v in cb["optimizer_states"][0]["state"].values()}
    assert steps_g == {1, 2}, steps_g


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


# ------------------------------------------------------------------------------------------------------------------
MICRO = ["recipe=codec_demo", "task.teacher.model_dir=null", "task.teacher.random_init=true", *MICRO_MODEL,
         *[o for o in MICRO_TASK if not o.startswith("task=")]]


@pytest.mark.parametrize("extra", [[], ["model.use_query_token_aggregator=false"]], ids=["query_agg", "mean_pool"])
def test_rvq_path_parameters_are_exactly_what_a_bypass_step_leaves_without_gradient(extra):
    """The parameters a bypassing rank zero-fills (and sets back to None when no rank ran the RVQ) are exactly
    those the G loss of a bypass step does not reach (DAC encoder, RVQ, acoustic aggregator); without bypass the
    loss reaches every generator parameter. A missing one would be a DDP error, an extra one a dropped gradient."""
    from flexitrain.losses.adversarial import generator_gan_terms
    from flexitrain.losses.weights import combine_losses
    from flexitrain.tasks.codec import rvq_path_parameters

    task = make_task(*MICRO, *extra)
    task.train()
    batch = speech_batch(3, 0.48, seed=0)
    rvq = {id(p) for p in rvq_path_parameters(task.generator)}
    assert rvq
    for bypass in (False, True):
        task.zero_grad(set_to_none=True)
        terms, _, fake, real = task.generator_losses(batch, 0.9, bypass)
        terms["adv"], terms["feat"] = generator_gan_terms(task.discriminator, fake, real)
        combine_losses(terms, task.loss_weights)[0].backward()
        unreached = {id(p) for p in task.generator.parameters() if p.requires_grad and p.grad is None}
        assert unreached == (rvq if bypass else set())


def test_default_codec_generator_needs_no_unused_parameter_detection():
    """Default codec config (RVQ bypass p = 0.125, as codec_12hz): the generator part is declared without
    find_unused_parameters, and the strategy keeps it off; a zero loss weight (a term left out of the graph: the
    host cannot tell which parameters lose their only gradient) or a fixed-rate generator (aggregators and
    bottleneck never run) switch it on."""
    from flexitrain.cluster.gan_ddp import GanDDPStrategy

    task = make_task(*MICRO)
    assert task.bypass_quantize_prob == 0.125
    spec = task.ddp_submodules()
    assert spec["generator"] == {"find_unused_parameters": False}
    assert GanDDPStrategy(find_unused_parameters=False).part_ddp_kwargs(spec["generator"])[
        "find_unused_parameters"] is False
    # the codec_12hz recipe (trainer=ddp): per-part DDP without detection, bypass p = 0.125, generator part off too
    from flexitrain.utils.config import compose

    cfg = compose(["recipe=codec_12hz"])
    assert cfg.trainer.strategy._target_.endswith("GanDDPStrategy") and not cfg.trainer.strategy.find_unused_parameters
    stage1 = make_task("recipe=codec_12hz", *MICRO_MODEL, "task.teacher.model_dir=null",
                       "task.teacher.random_init=true", "task.teacher.num_blocks=1")
    assert stage1.bypass_quantize_prob == 0.125
    assert stage1.ddp_submodules()["generator"] == {"find_unused_parameters": False}
    assert make_task(*MICRO, "task.loss_weights.codebook=0").ddp_submodules()["generator"] == {
        "find_unused_parameters": True}
    assert make_task(*MICRO, "model.use_similarity_alignment=false").ddp_submodules()["generator"] == {
        "find_unused_parameters": True}


def test_with_zero_gradients_keeps_the_loss_and_its_gradients_and_adds_exact_zeros():
    from flexitrain.cluster.gan_ddp import with_zero_gradients

    torch.manual_seed(0)
    used, unused = nn.Linear(4, 3), nn.Linear(5, 2)
    unused.weight.data = unused.weight.data.t().contiguous().t()  # a non-contiguous parameter too
    x = torch.randn(6, 4)
    ref = used(x).pow(2).mean()
    ref.backward()
    ref_grads = [p.grad.clone() for p in used.parameters()]
    used.zero_grad(set_to_none=True)

    loss = used(x).pow(2).mean()
    touched = with_zero_gradients(loss, [*unused.parameters(), used.bias])  # an already reached one too
    assert touched.dtype == loss.dtype and torch.equal(touched, loss)
    touched.backward()
    for p, g in zip(used.parameters(), ref_grads):
        assert torch.equal(p.grad, g)  # g + 0 = g
    for p in unused.parameters():
        assert p.grad is not None and p.grad.shape == p.shape and p.grad.dtype == p.dtype
        assert torch.count_nonzero(p.grad) == 0
    assert with_zero_gradients(loss, []) is loss


def test_every_rank_replays_every_ranks_bypass_draws():
    """`CodecTask.draw_step` with the other ranks' streams (as `on_train_start` gathers them): this rank's τ and
    bypass draws are those it makes alone, and "some rank runs the RVQ" is exactly what the ranks drew."""
    p = 0.5
    ranks = [make_task(*MICRO, f"task.bypass_quantize_prob={p}") for _ in range(2)]
    alone = make_task(*MICRO, f"task.bypass_quantize_prob={p}")
    for r, task in enumerate(ranks):
        task._rng.seed(8000 + r)
    alone._rng.seed(8000)
    # rank 0 with copies of both streams (its own object in its slot)
    mirror = ranks[0]
    peer = type(mirror._rng)()
    peer.setstate(ranks[1]._rng.getstate())
    mirror._peer_rngs = [mirror._rng, peer]
    seen = set()
    for _ in range(40):
        tau0, bypass0, somewhere = mirror.draw_step()
        tau1, bypass1, _ = ranks[1].draw_step()
        assert (tau0, bypass0, not bypass0) == alone.draw_step()  # without peers: only its own draws
        assert somewhere == (not (bypass0 and bypass1))
        assert tau0 != tau1
        seen.add((bypass0, bypass1))
    assert seen == {(False, False), (False, True), (True, False), (True, True)}
