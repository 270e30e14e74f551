"""CodecTask: GAN training of FlexiCodec with semantic distillation (codec.md §3, with its §7 bugs fixed).

One training step (manual optimisation, as the official trainer):
  teacher features (frozen, eval) -> generator forward at a per-rank τ -> D step on detached fakes ->
  G step on mel + adversarial + feature matching + VQ + distillation (+ REPA).
`trainer.global_step` counts generator steps only (a skipped non-finite one too, see tasks/guards.py): the
discriminator steps its raw optimiser. The step reads nothing back to the host (no device sync; enforced on CPU by
tests/test_codec_step_syncs.py): batch lengths are checked on the host in `on_before_batch_transfer`.
"""
from __future__ import annotations

import random
from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from flexitrain.cluster.gan_ddp import with_zero_gradients
from flexitrain.losses.adversarial import discriminator_step_loss, generator_gan_terms
from flexitrain.losses import build_repa_mlp, si_sdr
from flexitrain.losses.masking import lengths_to_mask, masked_mse
from flexitrain.losses.mel import MultiScaleMelLoss
from flexitrain.losses.weights import combine_losses, resolve_loss_weights
from flexitrain.models.codec.layers import clear_folded_weights
from flexitrain.models.discriminators import CodecDiscriminator
from flexitrain.tasks.checkpointing import load_weights_strict
from flexitrain.tasks.compiling import codec_compile_targets, compile_modules, compile_options
from flexitrain.tasks.guards import NonFiniteStepGuard
from flexitrain.tasks.schedules import lr_lambda
from flexitrain.tasks.training_state import TrainingStateMixin, gather_per_rank
from flexitrain.tasks.teacher import build_teacher, check_batch_lengths, check_feature_cache, teacher_min_samples


def _plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def build_repa_mlp_for(generator: nn.Module) -> nn.Module:
    """Linear(latent → 3·512) – GELU – Linear(→ ssl_dim): maps the bottleneck output onto teacher features."""
    dim = int(getattr(generator, "ssl_dim", 512))  # the teacher's width (512 for SenseVoice)
    mlp = build_repa_mlp(dim=dim, hidden=1536)
    latent = generator.latent_dim
    if latent != dim:
        mlp[0] = nn.Linear(latent, 1536)
    return mlp


def rvq_path_parameters(generator: nn.Module) -> list[nn.Parameter]:
    """The generator's trainable parameters that only the acoustic RVQ path reaches: what a step with
    ``bypass_quantize=True`` leaves without a gradient. `FlexiCodec.forward` still runs the DAC encoder (and the
    acoustic aggregator) then, but feeds their output only to the skipped RVQ (the REPA target reads it detached,
    and only without bypass); the semantic branch, bottleneck and decoder are reached either way. Checked
    against the autograd graph by tests/test_gan_ddp.py."""
    modules = [generator.dac.encoder, generator.dac.quantizer, getattr(generator, "acoustic_aggregator", None)]
    return [p for m in modules if m is not None for p in m.parameters() if p.requires_grad]


def _generator_skips_always(generator: nn.Module) -> bool:
    """A fixed-rate generator (``use_similarity_alignment=False``) never runs its aggregators or bottleneck
    transformer (the official stage-1 path): those parameters get no gradient in any step."""
    if getattr(generator, "use_similarity_alignment", True):
        return False
    unused = [getattr(generator, n, None) for n in ("bottleneck_transformer", "semantic_aggregator",
                                                     "acoustic_aggregator")]
    return any(p.requires_grad for m in unused if m is not None for p in m.parameters())


class CodecTask(NonFiniteStepGuard, TrainingStateMixin, L.LightningModule):
    _rng_attrs = ("_rng",)  # per-rank τ and bypass draws: checkpointed per rank (TrainingStateMixin)

    def __init__(
        self,
        model: dict,
        teacher: dict,
        discriminator: dict | None = None,
        mel_loss: dict | None = None,
        loss_weights: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        grad_clip: float | None = 1.0,
        disc_every: int = 1,
        disc_start_step: int = 0,
        accumulate_grad_batches: int = 1,
        threshold: dict | None = None,
        bypass_quantize_prob: float = 0.125,
        use_repa: bool = True,
        validation: dict | None = None,
        compile: bool | dict = False,
        ema: dict | None = None,
    ):
        super().__init__()
        self.automatic_optimization = False
        # Plain containers in the hyper-parameters: checkpoints then load with torch.load(weights_only=True).
        model, teacher, discriminator, mel_loss = _plain(model), _plain(teacher), _plain(discriminator), _plain(mel_loss)
        loss_weights, optimizer, scheduler = _plain(loss_weights), _plain(optimizer), _plain(scheduler)
        threshold, validation, ema = _plain(threshold), _plain(validation), _plain(ema)
        self.save_hyperparameters()
        self.generator = instantiate(model)
        self.discriminator = CodecDiscriminator(**(_plain(discriminator) or {}))
        self.mel_loss = MultiScaleMelLoss(sample_rate=self.generator.sample_rate, **(_plain(mel_loss) or {}))
        self.loss_weights = resolve_loss_weights(_plain(loss_weights))
        self.use_repa = use_repa
        # REPA head on the bottleneck output (official keys repa_mlp.0 / repa_mlp.2 at the released dims).
        self.repa_mlp = build_repa_mlp_for(self.generator) if use_repa else None
        # The frozen teacher is kept out of the module tree: never in the optimiser, the trainable state
        # dict or DDP's gradient buckets, and `train()` cannot switch its dropout on (codec.md §7.9).
        self._teacher = [build_teacher(teacher)]
        self.optim_cfg = {"lr": 1e-4, "lr_d": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.01,
                          **(_plain(optimizer) or {})}
        self.sched_cfg = {"warmup_steps": 0, "total_steps": 1, "min_lr_ratio": 1.0, "schedule_d": True,
                          **(_plain(scheduler) or {})}
        self.grad_clip = grad_clip
        self.disc_every = max(1, int(disc_every))
        self.disc_start_step = int(disc_start_step)
        self.accumulate = max(1, int(accumulate_grad_batches))
        self.threshold_cfg = {"fixed": None, "lower": 0.8, "upper": 1.0, **(_plain(threshold) or {})}
        self.bypass_quantize_prob = float(bypass_quantize_prob)
        self.val_cfg = {"thresholds": [1.0, 0.91], "num_quantizers": None, "num_audio_examples": 2,
                        **(_plain(validation) or {})}
        self.compile_cfg = compile_options(_plain(compile))
        self._rng = random.Random(0)  # reseeded per rank in setup(): τ and bypass draws differ across ranks
        # Per-part DDP without unused-parameter detection (see ddp_submodules, on_train_start): every rank's copy
        # of every rank's `_rng`, the RVQ-path parameters a bypass step touches with zero gradients, and whether
        # some rank ran the RVQ in the current accumulation window.
        self._peer_rngs: list[random.Random] | None = None
        self._zero_fill_bypass = False
        self._rvq_params: list[nn.Parameter] = []
        self._rvq_in_window = True
        self._init_step_guard()  # skipped_steps counter (a buffer: survives resume)
        self._init_training_state(ema, "generator")  # EMA of the generator (task.ema), RNG states (per rank)
        self._micro = 0
        self._epoch_batches = 0      # training batches consumed in the current epoch (checkpointed)
        self._resume_skip = 0        # batches the data loader skips after a mid-epoch resume
        self._pending_rng = None     # torch RNG state restored at the first step after a resume
        self._val_rng = None

    # ---------------------------------------------------------------- setup
    @property
    def teacher(self) -> nn.Module:
        t = self._teacher[0]
        p = next(t.parameters(), None)  # a host-side teacher (whisper_ct2) has none: it moves its outputs itself
        if p is not None and p.device != self.device:
            t.to(self.device)
        return t

    def setup(self, stage: str) -> None:
        # Pre-extracted teacher features (data.teacher_features) must come from this task's teacher and settings.
        check_feature_cache(getattr(getattr(self, "_trainer", None), "datamodule", None), self.hparams.teacher)
        seed = int(torch.initial_seed()) % (2**31)
        self._rng = random.Random(seed * 1000 + self.global_rank)
        if self.compile_cfg["enabled"]:
            teacher = self._teacher[0] if self.compile_cfg["teacher"] else None
            compile_modules(codec_compile_targets(self.generator, self.discriminator, self.mel_loss, teacher),
                            self.compile_cfg)

    def init_from(self, path: str) -> None:
        """Strictly initialise generator *and* discriminator (stage 2 from stage 1 or a released model)."""
        load_weights_strict(self, path)

    def ddp_submodules(self) -> dict[str, dict]:
        """One DDP per part under `GanDDPStrategy` (trainer=ddp): each backward reduces only its own part.

        The generator needs unused-parameter detection (a graph walk from the loss and an extra all-reduce of
        the used-parameter map, in every G backward) only when a step may leave some of its parameters without
        a gradient in a way the host cannot tell: a zero loss weight drops a term (e.g. the codebook loss, the
        codebooks' only gradient), and a fixed-rate generator never runs its aggregators / bottleneck.
        A bypassed RVQ (drawn per rank on the host, ``bypass_quantize_prob``, 0.125 by default and in the
        codec_12hz recipe) leaves out the DAC encoder, the quantiser and the acoustic aggregator
        (`rvq_path_parameters`), but the step knows it before its backward: the bypassing rank hands those
        parameters exact zero gradients, and when *no* rank ran the RVQ their gradients are set back to None,
        so the optimiser skips them as before (training_step). Losses, updated weights and optimiser states are
        those of unused-parameter detection (bit for bit with two ranks, tests/test_gan_ddp.py; with more, up to
        the all-reduce's summation order, which depends on DDP's bucket layout either way). One process: unchanged.
        Cost on a bypassing rank: one zeros buffer the size of the RVQ path, instead of a graph walk every step."""
        skips = any(w == 0 for w in self.loss_weights.values()) or _generator_skips_always(self.generator)
        return {"generator": {"find_unused_parameters": skips}, "discriminator": {}, "repa_mlp": {}}

    def on_train_start(self) -> None:
        super().on_train_start()
        strategy = getattr(getattr(self, "_trainer", None), "strategy", None)
        g_ddp = dict(getattr(strategy, "ddp_parts", None) or {}).get("generator")
        # Zero-fill the RVQ path on bypass steps only where it replaces unused-parameter detection: the generator
        # in its own DDP without it. One process (no DDP): nothing to do, the step is exactly as it always was.
        self._zero_fill_bypass = bool(g_ddp is not None and not g_ddp.find_unused_parameters
                                      and self.bypass_quantize_prob > 0)
        self._rvq_params = rvq_path_parameters(self.generator) if self._zero_fill_bypass else []
        self._peer_rngs = None
        if self._zero_fill_bypass:
            # Every rank replays every rank's τ/bypass stream (a few Python draws per rank and step), so all ranks
            # know on the host, without a collective or a device sync, whether some rank runs the RVQ in a step.
            # Gathered here, after a resume has restored each rank's stream; one object collective per fit.
            states = gather_per_rank(self._rng.getstate())
            peers = []
            for rank, state in enumerate(states):
                rng = self._rng if rank == self.global_rank else random.Random()
                if rng is not self._rng:
                    rng.setstate(state)
                peers.append(rng)
            self._peer_rngs = peers

    def configure_optimizers(self):
        oc = self.optim_cfg
        g_params = list(self.generator.parameters()) + (list(self.repa_mlp.parameters()) if self.repa_mlp else [])
        # fused=True: one kernel per parameter group, and the device-side skip of non-finite steps (found_inf,
        # see tasks/guards.py) that needs no host sync.
        opt_g = torch.optim.AdamW(g_params, lr=oc["lr"], betas=tuple(oc["betas"]), weight_decay=oc["weight_decay"],
                                  fused=True)
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=oc["lr_d"], betas=tuple(oc["betas"]),
                                  weight_decay=oc["weight_decay"], fused=True)
        # Fused steps update in place without bumping version counters: drop the generator's folded
        # inference weights after each step, or a later validation decodes with stale weights.
        opt_g.register_step_post_hook(lambda *_: clear_folded_weights(self.generator))
        sc = self.sched_cfg
        lam = lr_lambda(sc)  # task.scheduler.name: cosine (default), constant, linear, exponential, ...
        sched_g = torch.optim.lr_scheduler.LambdaLR(opt_g, lam)
        sched_d = torch.optim.lr_scheduler.LambdaLR(opt_d, lam if sc["schedule_d"] else (lambda _: 1.0))
        return [opt_g, opt_d], [sched_g, sched_d]

    # ---------------------------------------------------------------- forward pieces
    @torch.no_grad()
    def teacher_features(self, audio: Tensor, lengths: Tensor) -> tuple[Tensor, Tensor]:
        """Teacher features; ``lengths`` must lie in [one teacher frame, N] (`check_batch` runs on every batch
        on the host), so the teacher never reads them back (no host sync)."""
        # fp32 island: the teacher's features are the frozen distillation / REPA targets. In fp32 they are the
        # same under bf16-mixed as in fp32 training and as the pre-extracted ones (data.teacher_features: this
        # teacher run outside autocast, stored as fp32): autocast would put only the encoder's matmuls in bf16 and
        # move the targets by bf16 rounding. No grad, so it costs compute but no activation memory.
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self.teacher(audio.float(), lengths, lengths_checked=True)

    def sample_threshold(self, rng: random.Random | None = None) -> float:
        tc = self.threshold_cfg
        if tc["fixed"] is not None:
            return float(tc["fixed"])
        return (rng or self._rng).uniform(float(tc["lower"]), float(tc["upper"]))

    def draw_step(self) -> tuple[float, bool, bool]:
        """This rank's τ and RVQ-bypass draws for a step, and whether some rank runs the RVQ in it (host values,
        no sync). ``_rng`` is drawn from here only: the other ranks' copies (``_peer_rngs``) replay exactly the
        same calls, so they stay in step with the ranks they mirror."""
        p = self.bypass_quantize_prob
        threshold = self.sample_threshold()
        bypass = self._rng.random() < p
        rvq_somewhere = not bypass
        for rng in self._peer_rngs or ():
            if rng is not self._rng:
                self.sample_threshold(rng)
                rvq_somewhere |= not (rng.random() < p)
        return threshold, bypass, rvq_somewhere

    def generator_losses(self, batch: dict, threshold: float, bypass: bool) -> tuple[dict, Any, Tensor, Tensor]:
        audio, lengths = batch["audio"], batch["lengths"]
        if "semantic" in batch:  # pre-extracted teacher features (data.teacher_features): the teacher does not run
            semantic, semantic_lengths = batch["semantic"], batch["semantic_lengths"]
        else:
            semantic, semantic_lengths = self.teacher_features(audio, lengths)
        out = self.generator(audio, lengths, semantic_features=semantic, semantic_lengths=semantic_lengths,
                             threshold=threshold, bypass_quantize=bypass)
        fake = out.audio[..., : audio.shape[-1]]
        # data.augment with target=input: the codec reads the augmented audio and reconstructs the clean one.
        # The teacher above ran on the codec's input, as it does at inference.
        real = batch.get("clean", audio)[..., : fake.shape[-1]]
        fake_lengths = lengths.clamp(max=fake.shape[-1])
        # Padding is zero in both signals so the discriminator and the masked losses never see it.
        mask = lengths_to_mask(fake_lengths, fake.shape[-1])[:, None].to(fake.dtype)
        fake = fake * mask
        terms = {
            "mel": self.mel_loss(fake, real, fake_lengths, check_lengths=False),  # lengths: see check_batch
            "commit": out.commitment_loss,
            "codebook": out.codebook_loss,
            # Anchored to the mean-pooled teacher features, not the aggregator's own output (codec.md §7.10).
            "distill": masked_mse(out.semantic_decoded, out.semantic_target.detach(), out.group_mask),
        }
        if self.repa_mlp is not None:
            pred = self.repa_mlp(out.bottleneck_output.transpose(1, 2)).transpose(1, 2)
            target = out.semantic_frames
            if not out.bypassed_quantize and out.acoustic_frames.shape == target.shape:
                target = target + out.acoustic_frames
            # Detached: the official target leaks gradients into the encoder (codec.md §7.11).
            terms["repa"] = masked_mse(pred, target.detach(), out.frame_mask)
        return terms, out, fake, real

    # ---------------------------------------------------------------- training
    def _clip(self, params) -> Tensor:
        return torch.nn.utils.clip_grad_norm_(params, self.grad_clip if self.grad_clip else float("inf"))

    def on_train_epoch_end(self) -> None:
        self._epoch_batches = 0

    def consume_resume_skip(self) -> int:
        """Called by the data loader when a training pass starts (see AudioDataModule)."""
        skip, self._resume_skip = self._resume_skip, 0
        return skip

    def check_batch(self, batch: Any) -> None:
        """Host-side check of a batch's lengths, before it moves to the device: every length must lie in
        [one teacher fbank frame (400 samples at 16 kHz), padded width]. The step itself reads no value back
        to the host (no device sync), so the teacher's fbank, the mel loss and the codec trust these lengths.
        The data pipeline never yields shorter items (``data.min_duration``, 0.1 s by default)."""
        if not isinstance(batch, dict) or "audio" not in batch or "lengths" not in batch:
            return
        audio, lengths = batch["audio"], torch.as_tensor(batch["lengths"])
        n = audio.shape[-1]
        if lengths.dim() != 1 or lengths.shape[0] != audio.shape[0]:
            raise ValueError(f"batch['lengths'] must have shape [{audio.shape[0]}], got {tuple(lengths.shape)}")
        clean = batch.get("clean")
        if clean is not None and tuple(clean.shape) != tuple(audio.shape):
            raise ValueError(f"batch['clean'] must have the audio's shape {tuple(audio.shape)}, "
                             f"got {tuple(clean.shape)}")
        check_batch_lengths(lengths, teacher_min_samples(self._teacher[0]), n)  # host memory: no device sync

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        self.check_batch(batch)  # still on the host here
        return batch

    def training_step(self, batch: dict, batch_idx: int) -> None:
        self._restore_pending_rng()  # CPU + CUDA RNG after a resume (normally done in on_train_batch_start)
        self._epoch_batches += 1
        opt_g, opt_d = self.optimizers()
        sched_g, sched_d = self.lr_schedulers()
        threshold, bypass, rvq_somewhere = self.draw_step()
        gen_step = self.global_step
        gan_on = gen_step >= self.disc_start_step
        first_micro = self._micro % self.accumulate == 0
        self._micro += 1
        self._rvq_in_window = rvq_somewhere or (self._rvq_in_window and not first_micro)
        last_micro = self._micro % self.accumulate == 0
        logs: dict[str, Tensor] = {}

        terms, out, fake, real = self.generator_losses(batch, threshold, bypass)
        if gan_on and gen_step % self.disc_every == 0:
            loss_d = discriminator_step_loss(self.discriminator, fake, real)  # fake and real in one D call
            self.manual_backward(loss_d / self.accumulate)
            if last_micro:
                norm_d = self._clip(self.discriminator.parameters())
                # Raw step: global_step counts generator updates only.
                self._guarded_step(loss_d, norm_d, opt_d, sched_d, step=opt_d.optimizer.step)
                opt_d.zero_grad(set_to_none=True)
            logs["loss_d"] = loss_d.detach()
        if gan_on:
            # D frozen inside: its weight gradients from the generator loss would belong to no update.
            terms["adv"], terms["feat"] = generator_gan_terms(self.discriminator, fake, real)
        loss_g, term_logs = combine_losses(terms, self.loss_weights)
        loss_back = loss_g / self.accumulate
        if bypass and self._zero_fill_bypass:
            # Generator DDP without unused-parameter detection: every hook of it must fire in every G backward.
            # The bypassed RVQ path gets exact zeros, which all-reduce to what detection gives (zeros in the
            # bucket slots of locally unused parameters); the loss value and all other gradients are unchanged.
            loss_back = with_zero_gradients(loss_back, self._rvq_params)
        self.manual_backward(loss_back)
        if self._zero_fill_bypass and not self._rvq_in_window:
            # No rank ran the RVQ in this accumulation window (all drew a bypass: host knowledge, see draw_step):
            # its gradients are all-reduced zeros, where detection leaves them None (a globally unused
            # parameter's .grad is not touched) and fused AdamW skips a None gradient (no weight decay, no
            # moment or step-count update). Back to None: the update equals detection's (and one process's).
            for p in self._rvq_params:
                p.grad = None
        if last_micro:
            g_params = [p for g in opt_g.param_groups for p in g["params"]]
            norm_g = self._clip(g_params)
            self._guarded_step(loss_g, norm_g, opt_g, sched_g)
            self.ema_update()  # task.ema: average the generator's weights (no host sync)
            opt_g.zero_grad(set_to_none=True)
            logs["grad_norm_g"] = norm_g.detach()
        logs.update({f"loss_{k}" if k != "total" else "loss_g": v for k, v in term_logs.items()})
        logs["threshold"] = out.threshold[0]  # τ as the generator got it: already on the device, no copy
        logs["tokens_per_second"] = out.num_tokens.float().sum() / (batch["lengths"].float().sum() / self.generator.sample_rate)
        logs["skipped_steps"] = self.skipped_steps.float()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False, sync_dist=False)
        # Not on the progress bar: Lightning reads every progress-bar metric back to the host after every step
        # (a sync), even on steps that did not log it. In callback_metrics for callbacks; logged as train/loss_mel.
        self.log("loss_mel", term_logs["mel"], logger=False)

    # ---------------------------------------------------------------- validation
    # Validation consumes none of the training RNG streams (a resumed run replays exactly the same steps) and
    # runs on the EMA weights when task.ema is on: TrainingStateMixin.on_validation_start / on_validation_end.
    def validation_step(self, batch: dict, batch_idx: int) -> None:
        if batch.get("duplicate"):  # padding batch that evens out ranks: already counted elsewhere
            return
        audio, lengths = batch["audio"], batch["lengths"]
        sr = self.generator.sample_rate
        semantic, semantic_lengths = self.teacher_features(audio, lengths)
        bsz = audio.shape[0]
        for tau in self.val_cfg["thresholds"]:
            tokens = self.generator.encode(audio, lengths, threshold=float(tau),
                                           num_quantizers=self.val_cfg["num_quantizers"],
                                           semantic_features=semantic, semantic_lengths=semantic_lengths)
            decoded = self.generator.decode(tokens)
            recon, recon_lengths = decoded.audio, decoded.lengths
            recon = recon[..., : audio.shape[-1]]
            n = min(recon.shape[-1], audio.shape[-1])
            rl = torch.minimum(recon_lengths, lengths).clamp(max=n)
            mel = self.mel_loss(recon[..., :n] * lengths_to_mask(rl, n)[:, None], audio[..., :n], rl)
            sdr = si_sdr(recon[:, 0, :n], audio[:, 0, :n], rl).mean()
            rate = tokens.num_tokens.float().sum() / (lengths.float().sum() / sr)
            tag = f"tau{float(tau):g}"
            self.log_dict({f"val/mel_distance_{tag}": mel, f"val/si_sdr_{tag}": sdr, f"val/frame_rate_{tag}": rate},
                          batch_size=bsz, sync_dist=True)
            if float(tau) == float(self.val_cfg["thresholds"][0]):
                self.log("val/mel_distance", mel, batch_size=bsz, sync_dist=True, prog_bar=True)
            if batch_idx == 0:
                self._log_audio(f"{tag}", recon[:, 0], rl)
        if batch_idx == 0:
            self._log_audio("reference", audio[:, 0], lengths)

    def _log_audio(self, tag: str, audio: Tensor, lengths: Tensor) -> None:
        """The first ``validation.num_audio_examples`` clips to TensorBoard / wandb, or as .wav files in the run
        directory when no logger takes audio (`flexitrain.utils.media_log`)."""
        from flexitrain.utils.media_log import log_media

        k = int(self.val_cfg["num_audio_examples"])
        if k <= 0 or not self.trainer.is_global_zero:
            return
        clips = {f"val_audio/{i}_{tag}": audio[i, : int(lengths[i])] for i in range(min(k, audio.shape[0]))}
        log_media(self.trainer, audio=clips, sample_rate=self.generator.sample_rate)

    # ---------------------------------------------------------------- checkpoint state
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["flexitrain"] = {
            "rng_python": self._rng.getstate(),
            "rng_torch": torch.get_rng_state(),
            "micro_step": self._micro,
            "epoch_batches": self._epoch_batches,
            "rvq_in_window": self._rvq_in_window,  # (the same on every rank; only read mid-accumulation)
        }
        self._save_training_state(checkpoint)  # per-rank CPU + CUDA RNG states, the EMA ("rng_states", "ema")
        from flexitrain.tasks.checkpointing import save_hook

        save_hook(self, checkpoint)  # plain containers and tensors only: loads with weights_only=True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("flexitrain")
        if state:
            self._rng.setstate(state["rng_python"])
            self._pending_rng = state["rng_torch"]
            self._micro = int(state["micro_step"])
            self._epoch_batches = self._resume_skip = int(state["epoch_batches"])
            self._rvq_in_window = bool(state.get("rvq_in_window", True))
        self._load_training_state(checkpoint)  # per-rank RNG states (over the above), the EMA

    def export_generator(self, path: str) -> None:
        """Write a generator-only inference checkpoint that `FlexiCodec.from_pretrained` loads."""
        from flexitrain.models.codec.checkpoint import save_pretrained

        with self.ema_weights():  # the EMA weights when task.ema is on
            save_pretrained(self.generator, path)
