"""ARTTSTask: teacher-forced training of the AR text -> FlexiCodec-token model (token CE + focal duration loss).

Targets come from pre-extracted shards (``targets.source: shards``, see ar_tts_data.py) or from a frozen
codec run on the batch audio (``targets.source: codec``). One merging threshold is drawn per batch from
``targets.thresholds`` (as the official trainer); validation scores every threshold. The frozen codec and
teacher are kept outside the module tree: they stay in eval mode (no dropout/dither, bug B11), are not
saved in checkpoints and get no optimizer state.
"""

from __future__ import annotations

import random

import lightning as L
import torch

from flexitrain.models.tts.ar_tts import ARTTSModel
from flexitrain.tasks.ar_tts_data import codec_targets, threshold_key
from flexitrain.tasks.schedules import lr_lambda
from flexitrain.tasks.training_state import TrainingStateMixin


def _plain(cfg):
    from omegaconf import DictConfig, ListConfig, OmegaConf

    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg


class ARTTSTask(TrainingStateMixin, L.LightningModule):
    def __init__(self, model: dict, targets: dict | None = None, optimizer: dict | None = None,
                 scheduler: dict | None = None, grad_clip: float | None = 1.0, seed: int = 0,
                 codec=None, teacher=None, ema: dict | None = None, validation: dict | None = None):
        """model: ARTTSModel arguments. targets: {source: shards|codec, thresholds: [...], codec_ckpt |
        codec_model (+ codec_seed), teacher, cache (source=codec: keep each utterance's targets in memory)}.
        codec/teacher: already built frozen objects (tests, notebooks) instead of codec_ckpt.
        ema: {decay, start_step, every} (flexitrain.tasks.ema) or None. validation: {num_samples (0: none),
        max_tokens, top_k, seed}: the sample decoded from the first validation text at each threshold."""
        super().__init__()
        # Plain containers in the hyper-parameters (not Hydra's DictConfig): checkpoints load with weights_only=True.
        model, targets, optimizer, scheduler = (_plain(model), _plain(targets), _plain(optimizer), _plain(scheduler))
        ema, validation = _plain(ema), _plain(validation)
        self.save_hyperparameters(ignore=["codec", "teacher"])
        model = {k: v for k, v in dict(model).items() if not k.startswith("_")}
        self.model = ARTTSModel(**model)
        self.model.checks_in_forward = False  # on_before_batch_transfer checks the host batch instead
        # Kept only for the released key set, never in the loss: frozen, so that DDP without unused-parameter
        # detection works (it would stop at step 2 waiting for its gradient). Still saved and AdamW-listed
        # (no gradient = no update), so checkpoints and optimizer states keep their layout.
        self.model.spk_embed_affine_layer.requires_grad_(False)
        t = {"source": "shards", "thresholds": [0.86, 0.91], "codec_ckpt": None, "codec_model": None,
             "teacher": None, "cache": False, **(targets or {})}
        if t["source"] not in ("shards", "codec"):
            raise ValueError(f"targets.source must be 'shards' or 'codec', got {t['source']!r}")
        self.source, self.thresholds = t["source"], [float(x) for x in t["thresholds"]]
        if not self.thresholds:
            raise ValueError("targets.thresholds is empty")
        if self.model.framerate_options:
            for thr in self.thresholds:
                self.model.framerate_index(thr)  # raises for a threshold the model has no embedding for
        self.optim_cfg = {"lr": 1e-4, "betas": (0.9, 0.99), "weight_decay": 0.01, **(optimizer or {})}
        self.sched_cfg = {"warmup_steps": 1000, "total_steps": 100_000, "min_lr_ratio": 0.1, **(scheduler or {})}
        self.grad_clip, self.seed = grad_clip, seed
        self.val_cfg = {"num_samples": 1, "max_tokens": 500, "top_k": 25, "seed": 0, **(validation or {})}
        self._init_training_state(ema, "model")  # EMA of the AR model (task.ema), RNG states (per rank)
        self._frozen = [codec, teacher]  # a list: not registered as submodules
        self.cache_targets = bool(t.get("cache", False)) and self.source == "codec"
        self._target_cache: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}
        if self.source == "codec" and codec is None:
            self._frozen = self._build_codec(t)
        for m in self._frozen:
            if isinstance(m, torch.nn.Module):
                m.eval().requires_grad_(False)

    @staticmethod
    def _build_codec(t: dict) -> list:
        """A trained codec (``codec_ckpt``) or, for demos, a seeded random one (``codec_model`` config)."""
        if t.get("codec_ckpt"):
            from flexitrain.evaluation.loading import load_codec

            return list(load_codec(t["codec_ckpt"], t.get("teacher")))
        if t.get("codec_model"):
            from hydra.utils import instantiate

            from flexitrain.tasks.teacher import build_teacher

            state = torch.random.get_rng_state()
            torch.manual_seed(int(t.get("codec_seed", 0)))
            codec = instantiate(t["codec_model"])
            torch.random.set_rng_state(state)
            return [codec, build_teacher(dict(t.get("teacher") or {}))]
        raise ValueError("targets.source=codec needs targets.codec_ckpt (a CodecTask checkpoint or an exported "
                         "FlexiCodec directory), targets.codec_model (random demo codec) or a codec object")

    # ---- targets ---------------------------------------------------------------------------------------------
    def draw_threshold(self) -> float:
        """One threshold per batch; seeded by step and rank so a resumed run draws the same sequence."""
        rng = random.Random(hash((self.seed, int(self.global_step), int(self.global_rank))))
        return rng.choice(self.thresholds)

    def targets(self, batch: dict, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(speech [B, T], durations [B, T], speech_lengths [B]) at ``threshold``."""
        if self.source == "shards":
            k = threshold_key(threshold)
            if f"speech/{k}" not in batch:
                raise KeyError(f"batch has no pre-extracted targets for threshold {threshold} ({k})")
            return batch[f"speech/{k}"], batch[f"durations/{k}"], batch[f"speech_lengths/{k}"]
        codec, teacher = self._frozen
        for m in self._frozen:
            if isinstance(m, torch.nn.Module):
                m.to(self.device).eval()
        keys = batch.get("keys")
        if not self.cache_targets or keys is None:
            # fp32 island: the frozen teacher + codec decide discrete target codes and durations; in fp32 they are
            # those of the pre-extracted shards (source=shards) and of inference, whatever the training precision.
            with torch.autocast(self.device.type, enabled=False):
                return codec_targets(codec, teacher, batch["audio"].float(), batch["audio_lengths"], threshold)
        # The codec is frozen and deterministic: encode each (utterance, threshold) once, then reuse.
        k = threshold_key(threshold)
        todo = [i for i, key in enumerate(keys) if (key, k) not in self._target_cache]
        if todo:
            idx = torch.tensor(todo, device=batch["audio"].device)
            lengths = batch["audio_lengths"][idx]
            audio = batch["audio"][idx, : int(lengths.max())].float()
            with torch.autocast(self.device.type, enabled=False):  # fp32 codes, as above (cached per utterance)
                codes, durs, num = codec_targets(codec, teacher, audio, lengths, threshold)
            for j, i in enumerate(todo):
                n = int(num[j])
                self._target_cache[(keys[i], k)] = (codes[j, :n].cpu(), durs[j, :n].cpu())
        rows = [self._target_cache[(key, k)] for key in keys]
        num = torch.tensor([len(c) for c, _ in rows])
        codes = torch.zeros(len(rows), max(len(c) for c, _ in rows), dtype=torch.long)
        durs = torch.zeros_like(codes)
        for i, (c, d) in enumerate(rows):
            codes[i, : len(c)], durs[i, : len(d)] = c, d
        return codes.to(self.device), durs.to(self.device), num.to(self.device)

    def loss(self, batch: dict, threshold: float):
        speech, durations, speech_lengths = self.targets(batch, threshold)
        return self.model(batch["text"], batch["text_lengths"], speech, durations=durations,
                          speech_lengths=speech_lengths, framerate=threshold)

    # ---- Lightning hooks ---------------------------------------------------------------------------------------
    def on_before_batch_transfer(self, batch, dataloader_idx: int = 0):
        """Range checks of text ids and pre-extracted targets on the host copy of the batch: free here, a
        device sync per check once the batch is on a GPU (the model's own checks are off in this task)."""
        if isinstance(batch, dict) and "text" in batch:
            self.model.check_text(batch["text"])
            for key in batch:
                if key.startswith("speech/"):
                    k = key[len("speech/"):]
                    self.model.check_targets(batch[key], batch[f"speech_lengths/{k}"], batch[f"durations/{k}"])
        return batch

    def training_step(self, batch: dict, batch_idx: int):
        threshold = self.draw_threshold()
        out = self.loss(batch, threshold)
        bs = batch["text"].size(0)
        self.log_dict({"train/loss": out.total_loss, "train/token_loss": out.token_loss,
                       "train/duration_loss": out.duration_loss, "train/acc": out.accuracy,
                       "train/duration_acc": out.duration_accuracy, "train/threshold": threshold},
                      prog_bar=False, batch_size=bs)
        self.log("train/tokens", out.token_valid.sum().float(), reduce_fx="sum", batch_size=bs)  # no .item()
        return out.total_loss

    def validation_step(self, batch: dict, batch_idx: int):
        bs = batch["text"].size(0)
        total = 0.0
        for thr in self.thresholds:
            out = self.loss(batch, thr)
            k = threshold_key(thr)
            self.log_dict({f"val/token_loss_{k}": out.token_loss, f"val/duration_loss_{k}": out.duration_loss,
                           f"val/acc_{k}": out.accuracy}, batch_size=bs, sync_dist=True)
            total = total + out.total_loss
        self.log("val/loss", total / len(self.thresholds), prog_bar=True, batch_size=bs, sync_dist=True)
        if batch_idx == 0 and int(self.val_cfg["num_samples"]) > 0 and self.trainer.is_global_zero:
            self._log_sample(batch)

    @torch.no_grad()
    def _log_sample(self, batch: dict) -> None:
        """Decode the first validation text freely (no prompt; seeded top-k) at each threshold and log the tokens,
        durations and frame rate next to the reference's, as text (TensorBoard / wandb / a .txt file in the run
        directory) and as ``val/sample_tokens_per_second_<thr>`` (rank 0)."""
        from flexitrain.models.tts.sampling import SamplingConfig, generate
        from flexitrain.utils.media_log import log_media

        text = batch["text"][:1, : int(batch["text_lengths"][0])]
        cfg = SamplingConfig(top_k=int(self.val_cfg["top_k"]), max_tokens=int(self.val_cfg["max_tokens"]))
        lines = [f"key {batch.get('keys', ['?'])[0]}: {text.shape[1]} text ids"]
        for thr in self.thresholds:
            gen = torch.Generator().manual_seed(int(self.val_cfg["seed"]))
            res = generate(self.model, text, thr, config=cfg, generator=gen)
            speech, durations, lengths = self.targets(batch, thr)
            ref_n = int(lengths[0])
            ref_d = durations[0, :ref_n]
            n, frames, ref_frames = res.tokens.shape[1], int(res.durations.sum()), int(ref_d.sum())
            rate = n / max(frames * 0.08, 1e-9)
            self.log(f"val/sample_tokens_per_second_{threshold_key(thr)}", rate, rank_zero_only=True, batch_size=1)
            lines += [f"threshold {thr:g}: generated {n} tokens, {frames} frames ({frames * 0.08:.2f} s, "
                      f"{rate:.2f} tokens/s, {'EOS' if res.stopped_by_eos else 'no EOS: cut at max_tokens'}); "
                      f"reference {ref_n} tokens, {ref_frames} frames ({ref_frames * 0.08:.2f} s, "
                      f"{ref_n / max(ref_frames * 0.08, 1e-9):.2f} tokens/s)",
                      f"  tokens    {res.tokens[0, :48].tolist()}",
                      f"  reference {speech[0, :min(ref_n, 48)].tolist()}",
                      f"  durations {res.durations[0, :48].tolist()}", f"  reference {ref_d[:48].tolist()}"]
        log_media(self.trainer, text={"val_sample/tokens": "\n".join(lines)})

    def configure_optimizers(self):
        oc, sc = self.optim_cfg, self.sched_cfg
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
        no_decay = [p for n, p in self.model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": oc["weight_decay"]},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=oc["lr"], betas=tuple(oc["betas"]),
                                fused=True)  # one kernel per group instead of ~4 per parameter
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(sc))  # task.scheduler.name (default cosine)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        clip = gradient_clip_val or self.grad_clip
        if clip:
            self.clip_gradients(optimizer, gradient_clip_val=clip, gradient_clip_algorithm="norm")

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        self._save_training_state(checkpoint)  # per-rank CPU + CUDA RNG states, the EMA
        from flexitrain.tasks.checkpointing import save_hook

        save_hook(self, checkpoint)  # plain containers and tensors only: loads with weights_only=True

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._load_training_state(checkpoint)

    def export_model(self, path: str) -> None:
        """An inference directory (config.json + model.safetensors) that `flexitrain-tts --ar` and
        `ar_checkpoint.load_pretrained` read; the EMA weights when task.ema is on."""
        from flexitrain.models.tts.ar_checkpoint import save_pretrained

        config = {k: v for k, v in dict(self.hparams["model"]).items() if not str(k).startswith("_")}
        with self.ema_weights():
            save_pretrained(self.model, path, config)

    def init_from(self, path: str) -> None:
        """Strict initialisation from a released artts.safetensors or an ARTTSTask checkpoint."""
        from flexitrain.models.tts.ar_checkpoint import load_ar_weights

        load_ar_weights(self.model, path)
