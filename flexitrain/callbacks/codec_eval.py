"""CodecEvalCallback: quality against frame rate on a fixed validation subset during training.

Every `every_n_validations` validation runs, each rank encodes/decodes its share of a fixed subset at every
(threshold, num_quantizers) setting, scores it (signal metrics in a process pool; ASR/SIM/MOS optional), the
records are gathered on rank 0, and rank 0 writes `<run dir>/eval/step_XXXXXXXX/` (metrics.json, table.md,
rate_quality.png, spectrograms with merge boundaries, audio) and logs scalars, the table, the plot and audio
to whichever loggers are configured (CSV, TensorBoard, wandb) — or only the files with no logger.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import numpy as np
import soundfile as sf
import torch
import torch.distributed as dist

from flexitrain.evaluation.loading import encode_decode
from flexitrain.evaluation.report import aggregate, codec_rate_info, plot_rate_quality, setting_name, write_report
from flexitrain.evaluation.scorers import Scorers
from flexitrain.metrics.wer import word_error_rate

log = logging.getLogger(__name__)


def plot_merge_spectrogram(audio: np.ndarray, token_lengths: Sequence[int], sample_rate: int, hop: int,
                           path: Path, title: str = "") -> bool:
    """Log-magnitude spectrogram with a vertical line at every token boundary (merged groups visible)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    spec = torch.stft(torch.as_tensor(audio, dtype=torch.float32), 512, 128, window=torch.hann_window(512),
                      return_complex=True).abs().clamp(min=1e-5).log10().numpy()
    fig, ax = plt.subplots(figsize=(8, 2.8))
    ax.imshow(spec, origin="lower", aspect="auto", extent=(0, len(audio) / sample_rate, 0, sample_rate / 2000))
    for t in np.cumsum(token_lengths)[:-1] * hop / sample_rate:
        ax.axvline(t, color="w", lw=0.8, alpha=0.8)
    ax.set_xlabel("s")
    ax.set_ylabel("kHz")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


class CodecEvalCallback(L.Callback):
    def __init__(self, every_n_validations: int = 1, thresholds: Sequence[float] = (1.0, 0.91),
                 num_quantizers: Sequence[int | None] = (1, None), max_utterances: int = 8,
                 metrics: dict | None = None, num_audio_examples: int = 2, out_subdir: str = "eval"):
        self.every = max(1, int(every_n_validations))
        self.settings = [(float(t), None if q in (None, "all") else int(q)) for q in num_quantizers for t in thresholds]
        self.max_utterances = int(max_utterances)
        self.metrics_cfg = dict(metrics or {"asr": {"enabled": False}, "speaker": {"enabled": False},
                                            "mos": {"enabled": False}})
        self.num_audio = int(num_audio_examples)
        self.out_subdir = out_subdir
        self._subset: list[dict] | None = None
        self._scorers: Scorers | None = None
        self._validations = 0

    # ------------------------------------------------------------------ data
    def _fixed_subset(self, trainer: L.Trainer) -> list[dict]:
        """The first `max_utterances` validation utterances of this rank, cached on CPU (identical every time)."""
        if self._subset is None:
            self._subset = []
            for batch in trainer.datamodule.val_dataloader():
                for i in range(batch["audio"].shape[0]):
                    if len(self._subset) >= self.max_utterances:
                        break
                    n = int(batch["lengths"][i])
                    self._subset.append({"key": batch["keys"][i], "text": (batch.get("texts") or [""] * 99)[i],
                                         "audio": batch["audio"][i, :, :n].clone()})
                if len(self._subset) >= self.max_utterances:
                    break
        return self._subset

    # ------------------------------------------------------------------ hooks
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        self._validations += 1
        if (self._validations - 1) % self.every:
            return
        records = self.evaluate(trainer, pl_module)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, records)
            records = [r for part in gathered for r in part]
        if trainer.is_global_zero and records:
            self.publish(trainer, pl_module, records)

    @torch.no_grad()
    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> list[dict]:
        gen, teacher = pl_module.generator, pl_module.teacher
        sr = int(gen.sample_rate)
        if self._scorers is None:
            self._scorers = Scorers.from_config(self.metrics_cfg, sr)
        was_training = gen.training
        gen.eval()
        records = []
        for item in self._fixed_subset(trainer):
            audio = item["audio"][None].to(pl_module.device)
            lengths = torch.tensor([audio.shape[-1]], device=pl_module.device)
            ref = audio[0, 0].float().cpu().numpy()
            semantic = teacher(audio, lengths)
            for tau, nq in self.settings:
                tokens, recon, _ = encode_decode(gen, teacher, audio, lengths, tau, nq, semantic)
                deg = recon[0, 0, : len(ref)].float().cpu().numpy()
                lens = tokens.token_lengths[0][tokens.token_lengths[0] > 0].tolist()
                rec = {"key": item["key"], "setting": setting_name(tau, nq), "threshold": tau, "num_quantizers": nq,
                       "text": item["text"], "duration": len(ref) / sr, "num_tokens": len(lens),
                       "token_lengths": lens, "frame_rate": len(lens) * sr / len(ref),
                       **self._scorers.quality_batch([ref], [deg])[0], "_audio": deg}
                hyp = self._scorers.transcribe([deg])
                if hyp:
                    rec.update(hypothesis=hyp[0], utt_wer=word_error_rate(item["text"], hyp[0]) if item["text"] else None)
                sim = self._scorers.similarity([ref], [deg])
                if sim:
                    rec["sim"] = float(sim[0])
                mos = self._scorers.mos_scores([deg])
                if mos:
                    rec["mos"] = mos[0]
                records.append(rec)
        gen.train(was_training)
        return records

    def publish(self, trainer: L.Trainer, pl_module: L.LightningModule, records: list[dict]) -> None:
        gen = pl_module.generator
        sr, step = int(gen.sample_rate), trainer.global_step
        out = Path(trainer.default_root_dir) / self.out_subdir / f"step_{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        audio = {(r["key"], r["setting"]): r.pop("_audio") for r in records}
        summary = aggregate(records, **codec_rate_info(gen))
        (out / "metrics.json").write_text(json.dumps({"step": step, "settings": summary}, indent=2))
        plot_rate_quality(summary, out / "rate_quality.png")
        table = write_report(out, summary, {"model": f"step {step}", "seed": None, "num_utterances": len({r['key'] for r in records}),
                                            "audio_seconds": sum(r["duration"] for r in records) / max(1, len(self.settings))})
        hop = int(np.prod(getattr(gen, "encoder_rates", [1280])))
        examples = []
        for key in sorted({r["key"] for r in records})[: self.num_audio]:
            for r in (r for r in records if r["key"] == key):
                wav = audio[(key, r["setting"])]
                stem = f"{key}_{r['setting']}"
                sf.write(out / f"{stem}.wav", wav, sr)
                plot_merge_spectrogram(wav, r["token_lengths"], sr, hop, out / f"{stem}.png",
                                       f"{key} {r['setting']}: {r['frame_rate']:.2f} tokens/s")
                examples.append((stem, wav))
        scalars = {}
        for name, s in summary.items():
            for k in ("frame_rate", "kbps", "wer", "pesq_wb", "stoi", "si_sdr", "mel_distance", "sim", "mos"):
                if isinstance(s.get(k), float) and np.isfinite(s[k]):
                    scalars[f"eval/{name}/{k}"] = s[k]
        # Logged at Lightning's logging step (the one `self.log` uses for this validation's val/* metrics), not at
        # global_step (one higher after a training batch): a run resumed from the checkpoint written at the end of
        # that batch replays from global_step on, so its logs would replace these rows, which it does not redo.
        log_step = int(trainer.fit_loop.epoch_loop._batches_that_stepped)
        for logger in trainer.loggers:
            logger.log_metrics(scalars, step=log_step)
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_text"):  # TensorBoard
                exp.add_text("eval/table", table.read_text(), log_step)
                for stem, wav in examples:
                    exp.add_audio(f"eval_audio/{stem}", torch.as_tensor(wav).clamp(-1, 1), log_step, sample_rate=sr)
                if (out / "rate_quality.png").is_file():
                    exp.add_image("eval/rate_quality", _png(out / "rate_quality.png"), log_step, dataformats="HWC")
            elif type(logger).__name__ == "WandbLogger":
                import wandb

                cols = ["setting", "frame_rate", "kbps", "wer", "pesq_wb", "stoi", "mel_distance", "sim", "mos"]
                rows = [[name] + [s.get(c) for c in cols[1:]] for name, s in summary.items()]
                payload = {"eval/table": wandb.Table(columns=cols, data=rows)}
                if (out / "rate_quality.png").is_file():
                    payload["eval/rate_quality"] = wandb.Image(str(out / "rate_quality.png"))
                payload.update({f"eval_audio/{stem}": wandb.Audio(wav, sample_rate=sr) for stem, wav in examples})
                logger.experiment.log({**payload, "trainer/global_step": log_step})  # as WandbLogger.log_metrics
        log.info("eval at step %d written to %s", step, out)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._scorers is not None:
            self._scorers.close()
            self._scorers = None


def _png(path: Path) -> np.ndarray:
    import matplotlib.image as mpimg

    img = mpimg.imread(str(path))
    return (img[..., :3] * 255).astype(np.uint8) if img.dtype != np.uint8 else img[..., :3]
