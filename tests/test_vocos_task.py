"""VocosTask: the mel loss falls when overfitting a few clips; the GAN step updates both networks;
non-finite steps are skipped on every rank and counted."""
import copy
import math

import lightning as L
import pytest
import torch

from flexitrain.models.vocos import TINY_VOCOS
from flexitrain.tasks.vocos import VocosTask

SMALL = dict(discriminator={"periods": [2], "fft_sizes": [512], "channels": 8},
             mel_loss={"window_lengths": [256, 1024], "n_mels": [40, 80]})


pytestmark = pytest.mark.usefixtures("one_thread")


def tones(sr: int, n: int) -> dict:
    t = torch.arange(n) / sr
    f0 = torch.tensor([150.0, 220.0])[:, None]
    audio = sum(torch.sin(2 * math.pi * k * f0 * t) / k for k in range(1, 6)) * 0.1
    return {"audio": audio[:, None].float(), "lengths": torch.tensor([n, n - sr // 10])}


def fit(task, batch, steps):
    class Repeat(torch.utils.data.Dataset):
        def __len__(self):
            return steps

        def __getitem__(self, i):
            return batch

    # max_epochs=1: stop after one pass over the repeated batch whatever global_step says.
    trainer = L.Trainer(max_steps=steps, max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(task, torch.utils.data.DataLoader(Repeat(), batch_size=None))
    return trainer


def mel_distance(task, batch):
    with torch.no_grad():
        return float(task.mel_loss(*task.vocode(batch)))


def test_overfits_a_few_clips():
    batch = tones(24000, 12000)
    task = VocosTask(model=TINY_VOCOS, sample_rate=24000, optimizer={"lr": 1e-3}, disc_start_step=10**6, **SMALL)
    before = mel_distance(task, batch)
    fit(task, batch, 40)
    assert mel_distance(task, batch) < 0.6 * before


def test_gan_step_from_16k_data_updates_generator_and_discriminator():
    batch = tones(16000, 8000)
    task = VocosTask(model=TINY_VOCOS, sample_rate=16000, disc_start_step=0, **SMALL)
    fake, real, lengths = task.vocode(batch)
    assert fake.shape == real.shape == (2, 1, 12000) and lengths.tolist() == [12000, 9600]
    assert float(fake.detach()[1, 0, 9600:].abs().max()) == 0  # padding zeroed in what D and the mel loss see
    g0 = [p.detach().clone() for p in task.generator.parameters()]
    d0 = [p.detach().clone() for p in task.discriminator.parameters()]
    trainer = fit(task, batch, 2)
    assert trainer.global_step == 2
    assert {"train/loss_d", "train/loss_adv", "train/loss_feat", "train/loss_mel"} <= set(trainer.callback_metrics)
    assert any(not torch.equal(a, b) for a, b in zip(g0, task.generator.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(d0, task.discriminator.parameters()))


def test_rejects_a_non_24k_vocoder():
    with pytest.raises(ValueError, match="24 kHz"):
        VocosTask(model={**TINY_VOCOS, "sample_rate": 16000})


def test_hparams_from_hydra_configs_load_weights_only(tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"model": TINY_VOCOS, **SMALL})
    task = VocosTask(model=cfg.model, discriminator=cfg.discriminator, mel_loss=cfg.mel_loss)
    torch.save({"hyper_parameters": dict(task.hparams)}, tmp_path / "h.ckpt")
    assert torch.load(tmp_path / "h.ckpt", weights_only=True)["hyper_parameters"]["discriminator"]["periods"] == [2]


def test_non_finite_loss_skips_update_and_is_counted(tmp_path):
    task = VocosTask(model=TINY_VOCOS, sample_rate=24000, disc_start_step=0, **SMALL)
    before = copy.deepcopy(task.state_dict())
    bad = tones(24000, 12000)
    bad["audio"][0, 0, 100] = float("nan")
    trainer = fit(task, bad, 1)
    after = task.state_dict()
    # The skip happens on the device (fused AdamW's found_inf): the optimiser is called, so global_step counts
    # the step, but nothing is updated.
    assert trainer.global_step == 1
    assert int(after["skipped_steps"]) == 2  # the generator update and the discriminator update
    assert float(trainer.callback_metrics["train/skipped_steps"]) == 2
    for k, v in before.items():
        if k != "skipped_steps":
            assert torch.equal(v, after[k]), f"{k} changed after a non-finite step"
            assert torch.isfinite(after[k].float()).all()
    # The optimisers' state is untouched (step counts and moments of a never-applied update) ...
    for opt in trainer.optimizers:
        for state in opt.state.values():
            assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()
    # ... while both LR schedules advance, as for AMP-skipped steps (tasks/guards.py).
    assert [c.scheduler.last_epoch for c in trainer.lr_scheduler_configs] == [1, 1]
    # The counter is saved with the weights and restored on resume.
    trainer.save_checkpoint(tmp_path / "skip.ckpt")
    assert int(VocosTask.load_from_checkpoint(tmp_path / "skip.ckpt").skipped_steps) == 2


def test_skip_decision_is_agreed_across_ranks(monkeypatch):
    """A finite local step is still skipped when another rank saw a non-finite one (all-reduced decision)."""
    from flexitrain.tasks import guards

    local = []

    def other_rank_failed(flag, strategy=None):  # the MAX all-reduce, with another rank's flag = 1
        local.append(float(flag))
        return torch.maximum(flag, torch.ones_like(flag))

    monkeypatch.setattr(guards, "all_ranks_max", other_rank_failed)
    task = VocosTask(model=TINY_VOCOS, sample_rate=24000, disc_start_step=0, **SMALL)
    before = copy.deepcopy(task.state_dict())
    fit(task, tones(24000, 12000), 1)
    assert local == [0.0, 0.0]  # both local steps (D, then G) were finite
    assert int(task.skipped_steps) == 2
    assert all(torch.equal(v, task.state_dict()[k]) for k, v in before.items() if k != "skipped_steps")


def test_checkpoint_without_skip_counter_still_resumes(tmp_path):
    task = VocosTask(model=TINY_VOCOS, sample_rate=24000, disc_start_step=0, **SMALL)
    trainer = fit(task, tones(24000, 12000), 1)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["state_dict"]["skipped_steps"]  # as written before the counter existed
    torch.save(ckpt, path)
    assert int(VocosTask.load_from_checkpoint(path).skipped_steps) == 0
    resumed = VocosTask(model=TINY_VOCOS, sample_rate=24000, disc_start_step=0, **SMALL)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(resumed, torch.utils.data.DataLoader([tones(24000, 12000)] * 2, batch_size=None), ckpt_path=path)
    assert trainer.global_step == 2 and int(resumed.skipped_steps) == 0
