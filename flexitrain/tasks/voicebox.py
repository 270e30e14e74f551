"""VoiceboxTask: conditional flow matching of the FlexiCodec-TTS NAR (tts.md §2.4-2.5, bugs of §7 fixed).

One step: targets (50 Hz normalised mel of the 24 kHz audio; 12.5 Hz semantic codes of a frozen FlexiCodec,
expanded by their durations; optional SenseVoice features at 12.5 Hz for REPA) → `flow_matching_loss`.

`flow_matching_loss` draws t, z and the prompt in the released order (t ~ U, z ~ N, drop ~ U, prompt
lengths ~ randint), so with the same RNG state it reproduces the official numbers. Fixes, all default on:
the valid-frame mask in true units (``official_mask_units=True`` restores lengths/24000·50 on 16 kHz
lengths, B7), a prompt range that cannot be empty for short clips (B13), eval-mode fp32 codec/teacher kept
out of the module tree and DDP (B11), per-rank RNG streams, an explicit codec threshold each call (B11).
"""
from __future__ import annotations

import logging
import math
import random
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from flexitrain.audio.mel24k import mel24k, mel_frames
from flexitrain.audio.resample import resample, resample_lengths
from flexitrain.losses.masking import lengths_to_mask
from flexitrain.models.codec.merging import downsample_features_per_item, expand_groups, frame_to_group_from_lengths
from flexitrain.models.tts.flow_sampling import sample_mel
from flexitrain.models.tts.voicebox import VoiceboxNAR
from flexitrain.tasks.schedules import lr_lambda
from flexitrain.tasks.training_state import TrainingStateMixin
from flexitrain.utils.dispatch_count import host_random

log = logging.getLogger(__name__)


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def sample_flow_time(batch: int, scheduler: str = "cos", generator: torch.Generator | None = None) -> Tensor:
    """t ~ U(0, 1) clamped to [1e-5, 1]; "cos": ``1 − cos(πt/2)`` (more mass near the noise end)."""
    t = torch.rand(batch, generator=generator).clamp(1e-5, 1.0)
    if scheduler == "cos":
        return 1 - torch.cos(t * math.pi * 0.5)
    if scheduler != "linear":
        raise ValueError(f"time_scheduler must be 'cos' or 'linear', got {scheduler!r}")
    return t


def prompt_range(num_frames: int, max_ratio: float = 0.4) -> tuple[int, int]:
    """randint bounds of the prefix prompt: [min(T//4, 5), int(max_ratio·T)), widened to >= 1 value."""
    low = min(num_frames // 4, 5)
    return low, max(int(num_frames * max_ratio), low + 1)


def expand_token_codes(codes: Tensor, token_lengths: Tensor, num_frames: int | None = None) -> Tensor:
    """Merged codes ``[B, G]`` + durations ``[B, G]`` → 12.5 Hz codes ``[B, T]`` (0 past each item's end)."""
    f2g = frame_to_group_from_lengths(token_lengths.long(), num_frames)
    return expand_groups(codes[:, None].long(), f2g)[:, 0]


def flow_matching_loss(nar: VoiceboxNAR, mel: Tensor, x_mask: Tensor, codes: Tensor,
                       repa_target: Tensor | None = None, *, sigma: float = 1e-5, time_scheduler: str = "cos",
                       cond_drop_prob: float = 0.2, prompt_max_ratio: float = 0.4, loss_type: str = "l1",
                       repa_weight: float = 1.0, generator: torch.Generator | None = None) -> tuple[Tensor, dict]:
    """Released Voicebox objective.

    mel ``[B, T, 128]`` normalised target; x_mask ``[B, T]`` (1 = valid frame); codes ``[B, T/4]`` 12.5 Hz;
    repa_target ``[B, D_ssl, T/4]`` or None (REPA off). Returns ``(loss, logs)``: logs hold the
    terms and the draws (``t``, ``z``, ``prompt_len``, ``x_t``, ``cond``, ``flow_pred``, ``hidden``).
    """
    vb = nar.voicebox_model
    cond = vb.embed_codes(codes)
    if abs(cond.shape[1] - mel.shape[1]) > 8:
        raise ValueError(f"condition ({cond.shape[1]} frames from {codes.shape[1]} codes) and mel ({mel.shape[1]} "
                         "frames) differ by more than 8 frames: codes and audio do not belong together")
    T = min(cond.shape[1], mel.shape[1])
    x, x_mask, cond = mel[:, :T], x_mask[:, :T].float(), cond[:, :T]
    B, device = x.shape[0], x.device
    t = sample_flow_time(B, time_scheduler, generator).to(device)
    z = torch.randn(x.shape, generator=generator).to(device, x.dtype)
    if host_random(generator) > cond_drop_prob:
        low, high = prompt_range(T, prompt_max_ratio)
        prompt_len = torch.randint(low, high, (B,), generator=generator).to(device)
    else:  # the unconditional branch of classifier-free guidance: no prompt and no tokens
        prompt_len = torch.zeros(B, dtype=torch.long, device=device)
    not_prompt = (torch.arange(T, device=device)[None] >= prompt_len[:, None]).to(x.dtype)[..., None]
    tt = t[:, None, None]
    x_t = ((1 - (1 - sigma) * tt) * z + tt * x) * not_prompt + x * (1 - not_prompt)
    cond = cond * (prompt_len > 0).to(cond.dtype)[:, None, None]
    use_repa = repa_target is not None
    out = vb(x_t, t, cond, x_mask, return_hidden=use_repa)
    flow_pred, hidden = out if use_repa else (out, None)

    final_mask = not_prompt[..., 0] * x_mask
    err = flow_pred - (x - (1 - sigma) * z)
    err = err.abs() if loss_type == "l1" else err.pow(2) if loss_type == "mse" else None
    if err is None:
        raise ValueError(f"loss_type must be 'l1' or 'mse', got {loss_type!r}")
    diff_loss = (err.float().mean(-1) * final_mask).sum() / final_mask.sum().clamp(min=1)
    logs = {"diff_loss": diff_loss.detach(), "prompt_len_mean": prompt_len.float().mean(), "t": t, "z": z,
            "prompt_len": prompt_len, "x_t": x_t, "cond": cond, "flow_pred": flow_pred, "hidden": hidden}
    loss = diff_loss
    if use_repa:
        if nar.repa_projection is None:
            raise ValueError("REPA targets given but the model was built with use_repa=False")
        factor = vb.cond_scale_factor
        pooled = F.avg_pool1d(hidden.transpose(1, 2), factor, factor)
        if repa_target.shape[1] != nar.config.repa_projection_dim:
            raise ValueError(f"REPA target has {repa_target.shape[1]} channels but model.repa_projection_dim is "
                             f"{nar.config.repa_projection_dim} (the teacher width, 512 for SenseVoice)")
        if abs(pooled.shape[-1] - repa_target.shape[-1]) > 2:
            raise ValueError(f"REPA target has {repa_target.shape[-1]} frames, the pooled hidden state "
                             f"{pooled.shape[-1]}")
        n = min(pooled.shape[-1], repa_target.shape[-1])
        pred = nar.repa_projection(pooled[..., :n].transpose(1, 2)).transpose(1, 2)
        # Released mask: the 50 Hz mask linearly interpolated to 12.5 Hz, any overlap counts as valid.
        mask = F.interpolate(x_mask[:, None], size=n, mode="linear", align_corners=False)[:, 0] > 0
        cos = F.cosine_similarity(pred, repa_target[..., :n].to(pred.dtype), dim=1)
        repa_loss = ((1 - cos) * mask).sum() / mask.sum().clamp(min=1)
        loss = loss + repa_weight * repa_loss
        logs["repa_loss"] = repa_loss.detach()
    logs["loss"] = loss.detach()
    return loss, logs


class VoiceboxTask(TrainingStateMixin, L.LightningModule):
    """Lightning wrapper: targets, optimiser, logging, validation sampling, resume state.

    model: `VoiceboxNAR` kwargs (or a ``_target_`` config). codec: None (batches then carry
    ``semantic_codes [B, T12]`` at 12.5 Hz, or merged ``semantic_codes [B, G]`` + ``token_lengths [B, G]``,
    and, for REPA, ``semantic_repr [B, 512, T12]``), or
    ``{checkpoint: <flexitrain codec dir>}`` / ``{model: <FlexiCodec config>, random_init: true}``;
    teacher: the SenseVoice teacher config of `flexitrain.tasks.teacher.build_teacher`.
    """

    _rng_attrs = ("_rng", "_gen")  # per-rank threshold and flow-matching draws, saved per rank

    def __init__(self, model: dict, codec: dict | None = None, teacher: dict | None = None,
                 sample_rate: int = 16000, thresholds: list[float] = (0.91,), sigma: float = 1e-5,
                 time_scheduler: str = "cos", cond_drop_prob: float = 0.2, prompt_max_ratio: float = 0.4,
                 loss_type: str = "l1", use_repa: bool = True, repa_weight: float = 1.0,
                 official_mask_units: bool = False, optimizer: dict | None = None, scheduler: dict | None = None,
                 grad_clip: float | None = 1.0, validation: dict | None = None, ema: dict | None = None):
        super().__init__()
        # Plain containers only: checkpoints must load with torch.load(weights_only=True).
        model, codec, teacher, thresholds = _plain(model), _plain(codec), _plain(teacher), list(_plain(thresholds))
        optimizer, scheduler, validation, ema = _plain(optimizer), _plain(scheduler), _plain(validation), _plain(ema)
        self.save_hyperparameters()
        self.nar = instantiate(model) if "_target_" in model else VoiceboxNAR(**model)
        self.nar.voicebox_model.checks_in_forward = False  # check_batch + the codebook check in _build_codec
        self.use_repa = bool(use_repa)
        if self.use_repa and self.nar.repa_projection is None:
            raise ValueError("task.use_repa=true needs a model built with use_repa=true")
        self.loss_cfg = dict(sigma=float(sigma), time_scheduler=time_scheduler, cond_drop_prob=float(cond_drop_prob),
                             prompt_max_ratio=float(prompt_max_ratio), loss_type=loss_type,
                             repa_weight=float(repa_weight))
        self.sample_rate, self.thresholds = int(sample_rate), [float(x) for x in thresholds]
        self.official_mask_units = bool(official_mask_units)
        self.optim_cfg = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.01, **(_plain(optimizer) or {})}
        self.sched_cfg = {"warmup_steps": 0, "total_steps": 1, "min_lr_ratio": 1.0, **(_plain(scheduler) or {})}
        self.grad_clip = grad_clip
        self.val_cfg = {"n_timesteps": 15, "cfg": 2.0, "rescale_cfg": 0.75, "seed": 0, "prompt_ratio": 0.3,
                        **(_plain(validation) or {})}
        # Frozen codec / teacher out of the module tree: no optimiser, no DDP buckets, never train().
        self._frozen: dict[str, nn.Module | None] = {"codec": None, "teacher": None}
        if codec:
            self._frozen["codec"] = self._build_codec(codec)
        if teacher and (codec or self.use_repa):
            from flexitrain.tasks.teacher import build_teacher

            self._frozen["teacher"] = build_teacher(teacher)
        self._gen = torch.Generator().manual_seed(0)
        self._rng = random.Random(0)
        self._init_training_state(ema, "nar")  # EMA of the NAR (task.ema), RNG states (per rank)

    def _build_codec(self, cfg: dict) -> nn.Module:
        from flexitrain.models.codec import FlexiCodec

        if cfg.get("checkpoint"):
            codec = FlexiCodec.from_pretrained(cfg["checkpoint"])
        elif cfg.get("model") and cfg.get("random_init"):
            log.warning("using a RANDOMLY initialised codec for NAR targets: demo/test use only")
            state = torch.random.get_rng_state()
            torch.manual_seed(int(cfg.get("seed", 0)))
            codec = instantiate(cfg["model"]) if "_target_" in cfg["model"] else FlexiCodec(**cfg["model"])
            torch.random.set_rng_state(state)
        else:
            raise ValueError("task.codec needs `checkpoint` (a flexitrain codec directory) or `model` with "
                             "`random_init: true` (demo only)")
        size = codec.semantic_vq.codebook_size
        if size > self.nar.config.cond_codebook_size:
            raise ValueError(f"codec has {size} semantic codes but model.cond_codebook_size is "
                             f"{self.nar.config.cond_codebook_size}")
        for p in codec.parameters():
            p.requires_grad_(False)
        return codec.eval()

    def _frozen_module(self, name: str) -> nn.Module | None:
        m = self._frozen[name]
        if m is not None and next(m.parameters()).device != self.device:
            m.to(self.device)
        return m.eval() if m is not None else None

    # ---------------------------------------------------------------- setup / optimiser
    def setup(self, stage: str) -> None:
        seed = int(torch.initial_seed()) % (2**31) * 1000 + self.global_rank
        self._gen.manual_seed(seed)
        self._rng = random.Random(seed)

    def configure_optimizers(self):
        oc, sc = self.optim_cfg, self.sched_cfg
        opt = torch.optim.AdamW(self.nar.parameters(), lr=oc["lr"], betas=tuple(oc["betas"]),
                                weight_decay=oc["weight_decay"], fused=True)  # one kernel per group, not ~4 per parameter
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sc))  # task.scheduler.name (default cosine)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val or self.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    # ---------------------------------------------------------------- targets
    @torch.no_grad()
    def targets(self, batch: dict, threshold: float) -> dict[str, Tensor]:
        """``mel [B, T, 128]``, ``x_mask [B, T]``, ``codes [B, T12]`` and ``repa [B, 512, T12]`` (or None)."""
        audio, lengths = batch["audio"].float(), batch["lengths"].long()
        if audio.dim() != 3 or audio.shape[1] != 1:
            raise ValueError(f"batch['audio'] must be [B, 1, T], got {tuple(audio.shape)}")
        # fp32 island (no grad): the targets -- the regression target mel (fp32 FFT / log, audio/mel24k.py), the
        # frozen codec's semantic codes (discrete decisions, as pre-extracted ones) and REPA features -- must not
        # depend on the training precision.
        with torch.autocast(self.device.type, enabled=False):
            mel, _ = mel24k(audio[:, 0], self.sample_rate)
            mel = mel.transpose(1, 2)
            n_valid = ((lengths.float() / 24000 * 50).long() if self.official_mask_units
                       else mel_frames(lengths, self.sample_rate))
            x_mask = lengths_to_mask(n_valid, mel.shape[1]).float()
            repa = batch.get("semantic_repr")
            if "semantic_codes" in batch:  # pre-extracted: 12.5 Hz codes, or merged codes + token_lengths
                codes = batch["semantic_codes"].long()
                if "token_lengths" in batch:
                    codes = expand_token_codes(codes, batch["token_lengths"], (mel.shape[1] + 3) // 4)
            else:
                codes, feats12 = self._codec_targets(audio, lengths, threshold)
                repa = feats12 if repa is None else repa
        if self.use_repa and repa is None:
            raise ValueError("REPA is on but there are no teacher features: configure task.teacher or pass "
                             "batch['semantic_repr'] (or set task.use_repa=false)")
        return {"mel": mel, "x_mask": x_mask, "codes": codes, "repa": repa if self.use_repa else None}

    def _codec_targets(self, audio: Tensor, lengths: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
        codec, teacher = self._frozen_module("codec"), self._frozen_module("teacher")
        if codec is None or teacher is None:
            raise ValueError("batches carry no 'semantic_codes': configure task.codec and task.teacher")
        if self.sample_rate != codec.sample_rate:
            audio = resample(audio, self.sample_rate, codec.sample_rate, backend="torch")
            lengths = resample_lengths(lengths, self.sample_rate, codec.sample_rate).clamp(max=audio.shape[-1])
        # Lengths were checked on the host (check_batch): neither the teacher nor the codec reads them back.
        feats, feat_lens = teacher(audio[:, 0], lengths, lengths_checked=True)
        codes = codec.frame_semantic_codes(audio, lengths, feats, feat_lens, threshold)  # [B, C, T]: no host sync
        if codes.shape[1] != 1:
            raise ValueError("the NAR needs a single-codebook semantic FSQ")
        feats12, _ = downsample_features_per_item(feats.float(), feat_lens, codec.semantic_downsample_factor)
        t12 = feats12.shape[-1]  # the condition covers the teacher's 12.5 Hz frames (0 past each item's tokens)
        codes = F.pad(codes[:, 0], (0, max(0, t12 - codes.shape[-1])))[:, :t12]
        return codes, feats12

    def check_batch(self, batch) -> None:
        """Host-side checks before the batch moves to the device, so that the step reads nothing back: audio
        lengths long enough for one teacher frame (on-the-fly targets), pre-extracted codes in range."""
        if not isinstance(batch, dict) or "audio" not in batch or "lengths" not in batch:
            return
        lengths, n = torch.as_tensor(batch["lengths"]), batch["audio"].shape[-1]
        codec, teacher = self._frozen["codec"], self._frozen["teacher"]
        if "semantic_codes" not in batch and codec is not None and teacher is not None:
            from flexitrain.tasks.teacher import check_batch_lengths, teacher_min_samples

            low = math.ceil(teacher_min_samples(teacher) * self.sample_rate / codec.sample_rate)  # at the batch's rate
            check_batch_lengths(lengths, low, n)
        codes = batch.get("semantic_codes")
        size = self.nar.config.cond_codebook_size
        if codes is not None and codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= size):
            raise ValueError(f"batch semantic_codes must lie in [0, {size}), got [{int(codes.min())}, "
                             f"{int(codes.max())}]: wrong codec / codebook size?")

    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        self.check_batch(batch)  # still on the host here
        return batch

    # ---------------------------------------------------------------- steps
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        threshold = self._rng.choice(self.thresholds)
        tg = self.targets(batch, threshold)
        loss, logs = flow_matching_loss(self.nar, tg["mel"], tg["x_mask"], tg["codes"], tg["repa"],
                                        generator=self._gen, **self.loss_cfg)
        bsz = tg["mel"].shape[0]
        scalars = {k: v for k, v in logs.items() if k in ("loss", "diff_loss", "repa_loss", "prompt_len_mean")}
        scalars["threshold"] = torch.tensor(threshold)
        self.log_dict({f"train/{k}": v for k, v in scalars.items()}, batch_size=bsz)
        return loss

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch.get("duplicate"):
            return
        tg = self.targets(batch, self.thresholds[0])
        gen = torch.Generator().manual_seed(int(self.val_cfg["seed"]) + batch_idx)
        _, logs = flow_matching_loss(self.nar, tg["mel"], tg["x_mask"], tg["codes"], tg["repa"],
                                     generator=gen, **self.loss_cfg)
        bsz = tg["mel"].shape[0]
        self.log_dict({f"val/{k}": logs[k] for k in ("loss", "diff_loss") if k in logs}, batch_size=bsz,
                      sync_dist=True)
        if batch_idx == 0:
            distance, sample = self.sample_distance(tg, return_sample=True)
            self.log("val/sample_mel_l1", distance, batch_size=1, sync_dist=True, prog_bar=True)
            self._log_sample(sample, tg["mel"][0])

    def _log_sample(self, sample: Tensor | None, target: Tensor) -> None:
        """The prompt-infilled first item of the first validation batch, every validation: its mel over the true
        one as an image and, with ``validation.vocoder`` (a Vocos .ckpt / export / .safetensors), both as 24 kHz
        audio; to TensorBoard / wandb, or files in the run directory (`flexitrain.utils.media_log`)."""
        if sample is None or not int(self.val_cfg.get("num_samples", 1)) or not self.trainer.is_global_zero:
            return
        from flexitrain.utils.media_log import log_media, mel_image

        target = target[: sample.shape[0]]
        images = {"val_mel/sample_over_target": mel_image(torch.cat([target, sample], dim=1).T)}
        audio = {}
        vocoder = self._vocoder()
        if vocoder is not None:
            with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
                for name, mel in (("sample", sample), ("target", target)):
                    audio[f"val_audio/{name}"] = vocoder(mel.T[None].float())[0, 0]
        log_media(self.trainer, audio=audio, sample_rate=24000, images=images)

    def _vocoder(self) -> nn.Module | None:
        path = self.val_cfg.get("vocoder")
        if not path:
            return None
        if self._frozen.get("vocoder") is None:  # loaded once, kept out of the module tree and checkpoints
            from flexitrain.tts.loading import load_vocoder

            self._frozen["vocoder"] = load_vocoder(path).requires_grad_(False)
        return self._frozen_module("vocoder")

    @torch.no_grad()
    def sample_distance(self, tg: dict, return_sample: bool = False):
        """Prompt-infill the first item (its first `prompt_ratio` kept) and return the L1 to its true mel (and,
        with ``return_sample``, the infilled mel ``[T, mel_dim]``: prompt + generated, or None)."""
        n = int(tg["x_mask"][0].sum())
        codes = tg["codes"][:1, : n // self.nar.config.cond_scale_factor]
        T = codes.shape[1] * self.nar.config.cond_scale_factor
        target = tg["mel"][:1, :T]
        n_prompt = max(1, int(T * float(self.val_cfg["prompt_ratio"])))
        if T - n_prompt < 1:
            zero = torch.zeros((), device=self.device)
            return (zero, None) if return_sample else zero
        cond = self.nar.voicebox_model.embed_codes(codes)
        out = sample_mel(self.nar.voicebox_model, cond, target[:, :n_prompt],
                         n_timesteps=int(self.val_cfg["n_timesteps"]),
                         cfg=float(self.val_cfg["cfg"]), rescale_cfg=float(self.val_cfg["rescale_cfg"]),
                         seed=int(self.val_cfg["seed"]))
        distance = (out - target[:, n_prompt:]).abs().mean()
        if return_sample:
            return distance, torch.cat([target[:, :n_prompt], out.to(target.dtype)], dim=1)[0]
        return distance

    # ---------------------------------------------------------------- checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["flexitrain"] = {"rng_python": self._rng.getstate(), "rng_task": self._gen.get_state()}
        self._save_training_state(checkpoint)  # per-rank RNG states (CPU, CUDA, the draws above), the EMA
        from flexitrain.tasks.checkpointing import save_hook

        save_hook(self, checkpoint)  # plain containers and tensors only: loads with weights_only=True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("flexitrain")
        if state:
            self._rng.setstate(state["rng_python"])
            self._gen.set_state(state["rng_task"])
        self._load_training_state(checkpoint)

    def init_from(self, path: str) -> None:
        """Strictly initialise the NAR from a Lightning checkpoint or an exported/imported directory."""
        from pathlib import Path

        from flexitrain.tasks.checkpointing import load_weights_strict

        p = Path(path)
        if p.is_dir():
            self.nar.load_state_dict(VoiceboxNAR.from_pretrained(p).state_dict(), strict=True)
        else:
            load_weights_strict(self, p)

    def export_model(self, path: str) -> None:
        with self.ema_weights():  # the EMA weights when task.ema is on
            self.nar.save_pretrained(path)
