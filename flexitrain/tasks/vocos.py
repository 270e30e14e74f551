"""VocosTask: GAN training of the 24 kHz Vocos vocoder on its own normalised 50 Hz mel (tts.md §2.8).

One step (manual optimisation, as CodecTask): audio → 24 kHz (resampled if the data rate differs) →
mel24k → Vocos → D step on the detached fake (multi-period + multi-resolution STFT discriminators) →
G step on multi-scale mel L1 + LSGAN + feature matching. Padding is zeroed in both signals and masked
in the mel loss. `trainer.global_step` counts generator steps. A non-finite loss or gradient norm on any
rank skips that update on every rank, on the device (the LR schedule and global_step still advance, as for
AMP-skipped steps), and is counted in ``skipped_steps``, as in CodecTask (tasks/guards.py).
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor

from flexitrain.audio.mel24k import SAMPLE_RATE, mel24k
from flexitrain.audio.resample import resample, resample_lengths
from flexitrain.losses.adversarial import discriminator_step_loss, generator_gan_terms
from flexitrain.losses.masking import lengths_to_mask
from flexitrain.losses.mel import MultiScaleMelLoss
from flexitrain.losses.weights import combine_losses, resolve_loss_weights
from flexitrain.models.discriminators import CodecDiscriminator
from flexitrain.models.vocos import Vocos
from flexitrain.tasks.guards import NonFiniteStepGuard
from flexitrain.tasks.schedules import lr_lambda
from flexitrain.tasks.training_state import TrainingStateMixin


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


class VocosTask(NonFiniteStepGuard, TrainingStateMixin, L.LightningModule):
    def __init__(self, model: dict, sample_rate: int = 16000, discriminator: dict | None = None,
                 mel_loss: dict | None = None, loss_weights: dict | None = None, optimizer: dict | None = None,
                 scheduler: dict | None = None, grad_clip: float | None = 1.0, disc_start_step: int = 0,
                 validation: dict | None = None, ema: dict | None = None):
        super().__init__()
        self.automatic_optimization = False
        # Plain containers only: checkpoints must load with torch.load(weights_only=True).
        model, discriminator, mel_loss, loss_weights = _plain(model), _plain(discriminator), _plain(mel_loss), \
            _plain(loss_weights)
        optimizer, scheduler, validation, ema = _plain(optimizer), _plain(scheduler), _plain(validation), _plain(ema)
        self.save_hyperparameters()
        self.generator = instantiate(model) if "_target_" in model else Vocos(**model)
        if self.generator.sample_rate != SAMPLE_RATE or self.generator.hop_size != 480:
            raise ValueError("VocosTask trains the 24 kHz / hop-480 mel vocoder (the mel24k front end)")
        self.discriminator = CodecDiscriminator(**(_plain(discriminator) or {}))
        self.mel_loss = MultiScaleMelLoss(sample_rate=SAMPLE_RATE, **(_plain(mel_loss) or {}))
        self.loss_weights = resolve_loss_weights({"mel": 15.0, "adv": 1.0, "feat": 2.0, **(_plain(loss_weights) or {})})
        self.sample_rate = int(sample_rate)
        self.optim_cfg = {"lr": 2e-4, "lr_d": 2e-4, "betas": (0.8, 0.9), "weight_decay": 0.0,
                          **(_plain(optimizer) or {})}
        self.sched_cfg = {"warmup_steps": 0, "total_steps": 1, "min_lr_ratio": 1.0, **(_plain(scheduler) or {})}
        self.grad_clip = grad_clip
        self.disc_start_step = int(disc_start_step)
        self.val_cfg = {"num_audio_examples": 2, **(_plain(validation) or {})}
        self._init_step_guard()  # skipped_steps counter (a buffer: survives resume)
        self._init_training_state(ema, "generator")  # EMA of the vocoder (task.ema), RNG states (per rank)

    def ddp_submodules(self) -> dict[str, dict]:
        """One DDP per part under `GanDDPStrategy` (trainer=ddp): each backward reduces only its own part. Every
        Vocos parameter gets a gradient each step unless a zero loss weight drops a term."""
        return {"generator": {"find_unused_parameters": any(w == 0 for w in self.loss_weights.values())},
                "discriminator": {}}

    def configure_optimizers(self):
        oc, sc = self.optim_cfg, self.sched_cfg
        # fused=True: the device-side skip of non-finite steps (found_inf, tasks/guards.py), no host sync.
        opt_g = torch.optim.AdamW(self.generator.parameters(), lr=oc["lr"], betas=tuple(oc["betas"]),
                                  weight_decay=oc["weight_decay"], fused=True)
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=oc["lr_d"], betas=tuple(oc["betas"]),
                                  weight_decay=oc["weight_decay"], fused=True)
        lam = lr_lambda(sc)  # task.scheduler.name (default cosine)
        return [opt_g, opt_d], [torch.optim.lr_scheduler.LambdaLR(opt_g, lam),
                                torch.optim.lr_scheduler.LambdaLR(opt_d, lam)]

    # ---------------------------------------------------------------- forward
    def vocode(self, batch: dict) -> tuple[Tensor, Tensor, Tensor]:
        """``(fake [B,1,N], real [B,1,N], lengths [B])`` at 24 kHz, N = frames·480, padding zeroed."""
        audio, lengths = batch["audio"].float(), batch["lengths"].long()
        if audio.dim() != 3 or audio.shape[1] != 1:
            raise ValueError(f"batch['audio'] must be [B, 1, T], got {tuple(audio.shape)}")
        if self.sample_rate != SAMPLE_RATE:
            audio = resample(audio, self.sample_rate, SAMPLE_RATE, backend="torch")
            lengths = resample_lengths(lengths, self.sample_rate, SAMPLE_RATE)
        # fp32 island: the mel is the vocoder's input condition, computed as at inference (fp32, see
        # audio/mel24k.py) whatever the training precision; no grad, element-wise and FFT work only.
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            mel, _ = mel24k(audio[:, 0], SAMPLE_RATE)
        fake = self.generator(mel)
        n = fake.shape[-1]
        lengths = lengths.clamp(max=n)
        mask = lengths_to_mask(lengths, n)[:, None].to(fake.dtype)
        return fake * mask, audio[..., :n] * mask, lengths

    def check_batch(self, batch: Any) -> None:
        """Host-side length check before the batch moves to the device: every length in [1, padded width]. After
        resampling (ceil: >= 1) and the clamp to the output's frames they stay in [1, N], so the mel loss can trust
        them without reading them back (no device sync in the step)."""
        if not isinstance(batch, dict) or "audio" not in batch or "lengths" not in batch:
            return
        lengths, width = torch.as_tensor(batch["lengths"]), batch["audio"].shape[-1]
        if lengths.numel() and (int(lengths.min()) < 1 or int(lengths.max()) > width):
            raise ValueError(f"batch lengths must lie in [1, {width}] samples (the padded width), got "
                             f"{lengths.tolist()}")

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.check_batch(batch)  # still on the host here
        return batch

    def _clip(self, params) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip else float("inf"))

    def training_step(self, batch: dict, batch_idx: int) -> None:
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        gan_on = self.global_step >= self.disc_start_step
        fake, real, lengths = self.vocode(batch)
        bsz = fake.shape[0]
        logs: dict[str, Tensor] = {}
        if gan_on:
            loss_d = discriminator_step_loss(self.discriminator, fake, real)  # fake and real in one D call
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            logs["grad_norm_d"] = norm_d = self._clip(self.discriminator.parameters())
            # Raw step: global_step counts generator updates only.
            self._guarded_step(loss_d, norm_d, opt_d, sched_d, step=opt_d.optimizer.step)
            logs["loss_d"] = loss_d.detach()
        terms = {"mel": self.mel_loss(fake, real, lengths, check_lengths=False)}  # checked: see check_batch
        if gan_on:
            # D frozen inside: its weight gradients from the generator loss would belong to no update.
            terms["adv"], terms["feat"] = generator_gan_terms(self.discriminator, fake, real)
        loss_g, term_logs = combine_losses(terms, self.loss_weights)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss_g)
        logs["grad_norm_g"] = norm_g = self._clip(self.generator.parameters())
        self._guarded_step(loss_g, norm_g, opt_g, sched_g)
        self.ema_update()  # task.ema (no host sync)
        logs.update({f"loss_{k}" if k != "total" else "loss_g": v for k, v in term_logs.items()})
        logs["skipped_steps"] = self.skipped_steps.float()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, batch_size=bsz)

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch.get("duplicate"):
            return
        fake, real, lengths = self.vocode(batch)
        self.log("val/mel_distance", self.mel_loss(fake, real, lengths), batch_size=fake.shape[0],
                 sync_dist=True, prog_bar=True)
        k = int(self.val_cfg["num_audio_examples"])
        if batch_idx == 0 and k > 0 and self.trainer.is_global_zero:  # TensorBoard / wandb / .wav files
            from flexitrain.utils.media_log import log_media

            clips = {f"val_audio/{i}": fake[i, 0, : int(lengths[i])] for i in range(min(k, fake.shape[0]))}
            log_media(self.trainer, audio=clips, sample_rate=SAMPLE_RATE)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._save_training_state(checkpoint)  # per-rank CPU + CUDA RNG states, the EMA
        from flexitrain.tasks.checkpointing import save_hook

        save_hook(self, checkpoint)  # plain containers and tensors only: loads with weights_only=True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)  # NonFiniteStepGuard: a missing skip counter
        self._load_training_state(checkpoint)

    def init_from(self, path: str) -> None:
        """Initialise the generator from a released ``.safetensors`` / exported directory, or the whole task
        from a Lightning checkpoint (strict)."""
        from pathlib import Path

        from flexitrain.tasks.checkpointing import load_weights_strict

        p = Path(path)
        if p.is_dir() or p.suffix == ".safetensors":
            self.generator.load_state_dict(Vocos.from_pretrained(p).state_dict(), strict=True)
        else:
            load_weights_strict(self, p)

    def export_model(self, path: str) -> None:
        with self.ema_weights():  # the EMA weights when task.ema is on
            self.generator.save_pretrained(path)
