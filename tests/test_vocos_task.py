"""VocosTask: the mel loss falls when overfitting a few clips; the GAN step updates both networks."""
import math

import lightning as L
import pytest
import torch

from flexitrain.models.vocos import TINY_VOCOS
from flexitrain.tasks.vocos import VocosTask

SMALL = dict(discriminator={"periods": [2], "fft_sizes": [512], "channels": 8},
             mel_loss={"window_lengths": [256, 1024], "n_mels": [40, 80]})


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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

    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False, enable_checkpointing=False,
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
