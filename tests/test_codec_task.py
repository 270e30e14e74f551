"""CodecTask: GAN steps, NaN guard, learning, masking, frozen teacher (in-process, micro model)."""
from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from codec_fixtures import MICRO_MODEL, MICRO_TASK
from flexitrain.utils.config import compose


def make_task(*extra: str):
    cfg = compose([*MICRO_MODEL, *MICRO_TASK, *extra])
    torch.manual_seed(0)
    return instantiate(cfg.task, _recursive_=False)


def speechlike_batch(batch: int = 2, seconds: float = 0.48, sr: int = 16000, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    n = int(seconds * sr)
    t = torch.arange(n) / sr
    f0 = 110 + 80 * torch.rand(batch, 1, generator=g)
    audio = 0.3 * torch.sin(2 * torch.pi * f0 * t) * (0.6 + 0.4 * torch.sin(2 * torch.pi * 3 * t))
    audio = audio + 0.02 * torch.randn(batch, n, generator=g)
    return {"audio": audio[:, None].float(), "lengths": torch.full((batch,), n), "keys": [f"u{i}" for i in range(batch)]}


def loader(batches):
    return torch.utils.data.DataLoader(batches, batch_size=None, collate_fn=lambda b: b)


def fit(task, batches, **trainer_kw):
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        **trainer_kw)
    trainer.fit(task, train_dataloaders=loader(batches))
    return trainer


def test_gan_step_updates_generator_and_discriminator_but_not_teacher():
    task = make_task()
    g0, d0 = copy.deepcopy(task.generator.state_dict()), copy.deepcopy(task.discriminator.state_dict())
    t0 = copy.deepcopy(task.teacher.state_dict())
    trainer = fit(task, [speechlike_batch()], max_steps=1)
    assert trainer.global_step == 1  # counts generator updates only
    changed = lambda before, after: any(not torch.equal(before[k], after[k]) for k in before)  # noqa: E731
    assert changed(g0, task.generator.state_dict())
    assert changed(d0, task.discriminator.state_dict())
    assert not changed(t0, task.teacher.state_dict())
    assert not task.teacher.training and not any(p.requires_grad for p in task.teacher.parameters())
    # The frozen teacher is neither optimised nor saved with the trainable weights.
    assert not any(k.startswith(("_teacher", "teacher", "semantic_model")) for k in task.state_dict())
    opt_params = {id(p) for opt in trainer.optimizers for grp in opt.param_groups for p in grp["params"]}
    assert not opt_params & {id(p) for p in task.teacher.parameters()}


def test_non_finite_loss_skips_update_and_is_counted():
    task = make_task()
    before = copy.deepcopy(task.state_dict())
    bad = speechlike_batch()
    bad["audio"][0, 0, 100] = float("nan")
    fit(task, [bad], max_epochs=1, limit_train_batches=1)
    after = task.state_dict()
    assert int(after["skipped_steps"]) == 2  # the generator update and the discriminator update
    for k, v in before.items():
        if k != "skipped_steps":
            assert torch.equal(v, after[k]), f"{k} changed after a non-finite step"
            assert torch.isfinite(after[k].float()).all()


def test_overfitting_one_batch_drives_mel_loss_down():
    task = make_task("task.disc_start_step=100000", "task.optimizer.lr=5e-3", "task.bypass_quantize_prob=0")
    batch = speechlike_batch()
    losses = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["loss_mel"]))

    trainer = L.Trainer(accelerator="cpu", max_steps=25, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(task, train_dataloaders=loader([batch] * 25))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.6 * first, losses


@torch.no_grad()
def test_padding_does_not_change_losses():
    task = make_task().eval()
    batch = speechlike_batch(batch=1)
    n = batch["audio"].shape[-1]
    padded = {"audio": torch.cat([batch["audio"], 0.5 * torch.randn(1, 1, 4000)], dim=-1), "lengths": batch["lengths"]}
    torch.manual_seed(1)
    a, *_ = task.generator_losses(batch, threshold=0.9, bypass=False)
    torch.manual_seed(1)
    b, *_ = task.generator_losses(padded, threshold=0.9, bypass=False)
    assert padded["audio"].shape[-1] == n + 4000
    for key in ("mel", "distill", "commit", "codebook"):
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-5), (key, a[key], b[key])


def test_threshold_draws_differ_across_ranks():
    task = make_task()
    draws = []
    for rank in (0, 1):
        task._rng.seed(1234 * 1000 + rank)
        draws.append([task.sample_threshold() for _ in range(4)])
    assert draws[0] != draws[1]
    assert all(0.8 <= t <= 1.0 for d in draws for t in d)
    fixed = make_task("task.threshold.fixed=1.0")
    assert fixed.sample_threshold() == 1.0


def test_init_from_is_strict(tmp_path):
    task = make_task()
    path = tmp_path / "w.ckpt"
    torch.save({"state_dict": task.state_dict()}, path)
    other = make_task()
    other.init_from(str(path))
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in task.state_dict().items())
    broken = dict(task.state_dict())
    broken.pop(next(k for k in broken if k.startswith("discriminator.")))
    broken["generator.bogus"] = torch.zeros(1)
    torch.save({"state_dict": broken}, path)
    with pytest.raises(RuntimeError, match=r"missing: discriminator\..*\n.*unexpected: generator\.bogus"):
        other.init_from(str(path))


def test_gradient_accumulation_updates_every_k_batches():
    task = make_task("task.accumulate_grad_batches=2")
    before = copy.deepcopy(task.generator.state_dict())
    trainer = fit(task, [speechlike_batch(seed=i) for i in range(4)], max_epochs=1)
    assert trainer.global_step == 2  # 4 batches, one generator update per 2
    assert any(not torch.equal(v, task.generator.state_dict()[k]) for k, v in before.items())
