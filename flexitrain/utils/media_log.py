"""Audio, images and text from training/validation to whatever loggers a run has: TensorBoard, wandb (offline
works), or, when none of its loggers takes media (``logger=none``, ``logger=csv``), files in the run directory.

    log_media(trainer, audio={"val_audio/0_tau1": wav}, sample_rate=16000,
              images={"val_mel/0": mel_image(mel)}, text={"val_text/0": "..."})

Files: ``<trainer.default_root_dir>/samples/step_<NNNNNNNN>/<tag with / as __>.{wav,png,txt}``. Only global rank
0 writes. The step is Lightning's logging step (the one ``self.log`` uses), so a resumed run that replays a step
replaces its media rows as it replaces its metrics.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

log = logging.getLogger(__name__)
SAMPLES_DIR = "samples"


def logging_step(trainer: Any) -> int:
    try:
        return int(trainer.fit_loop.epoch_loop._batches_that_stepped)
    except AttributeError:
        return int(getattr(trainer, "global_step", 0))


def _np_audio(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    return np.clip(np.asarray(x, dtype=np.float32).reshape(-1), -1.0, 1.0)


# A short perceptual colour map (viridis anchors) so that images need no matplotlib.
_ANCHORS = np.array([[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]], dtype=np.float32)


def mel_image(mel: Any, low_at_bottom: bool = True) -> np.ndarray:
    """A ``[bins, frames]`` array (bins first) -> an ``[bins, frames, 3]`` uint8 image, min-max scaled, low
    frequencies at the bottom."""
    if isinstance(mel, torch.Tensor):
        mel = mel.detach().float().cpu().numpy()
    m = np.asarray(mel, dtype=np.float32)
    lo, hi = float(np.nanmin(m)), float(np.nanmax(m))
    m = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
    pos = np.nan_to_num(m) * (len(_ANCHORS) - 1)
    idx = np.clip(pos.astype(int), 0, len(_ANCHORS) - 2)
    frac = (pos - idx)[..., None]
    rgb = _ANCHORS[idx] * (1 - frac) + _ANCHORS[idx + 1] * frac
    if low_at_bottom:
        rgb = rgb[::-1]
    return np.ascontiguousarray(rgb.round().astype(np.uint8))


def _safe(tag: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", tag.replace("/", "__"))


def _write_png(path: Path, img: np.ndarray) -> None:
    try:
        from PIL import Image

        Image.fromarray(img).save(path)
    except ImportError:  # pragma: no cover - Pillow comes with matplotlib / tensorboard setups
        np.save(path.with_suffix(".npy"), img)


def log_media(trainer: Any, audio: Mapping[str, Any] | None = None, sample_rate: int = 16000,
              images: Mapping[str, np.ndarray] | None = None, text: Mapping[str, str] | None = None,
              step: int | None = None) -> list[str]:
    """Send the media to every logger that takes them (TensorBoard, wandb); with none, write files. Returns where
    they went (``"tensorboard"``, ``"wandb"``, or the sample directory). Rank 0 only; never raises for a logger
    that fails (a warning instead): samples must not stop training."""
    audio, images, text = dict(audio or {}), dict(images or {}), dict(text or {})
    if not (audio or images or text) or not getattr(trainer, "is_global_zero", True):
        return []
    step = logging_step(trainer) if step is None else int(step)
    went: list[str] = []
    for logger in getattr(trainer, "loggers", []) or []:
        try:
            if type(logger).__name__ == "WandbLogger":
                import wandb

                payload: dict[str, Any] = {k: wandb.Audio(_np_audio(v), sample_rate=sample_rate)
                                           for k, v in audio.items()}
                payload.update({k: wandb.Image(v) for k, v in images.items()})
                payload.update({k: wandb.Html(f"<pre>{v}</pre>") for k, v in text.items()})
                logger.experiment.log({**payload, "trainer/global_step": step})  # as WandbLogger.log_metrics
                went.append("wandb")
                continue
            exp = getattr(logger, "experiment", None)
            if hasattr(exp, "add_audio"):  # TensorBoard
                for k, v in audio.items():
                    exp.add_audio(k, torch.from_numpy(_np_audio(v)), step, sample_rate=sample_rate)
                for k, v in images.items():
                    exp.add_image(k, v, step, dataformats="HWC")
                for k, v in text.items():
                    exp.add_text(k, v, step)
                went.append("tensorboard")
        except Exception as err:  # noqa: BLE001 - a logger's failure must not stop training
            log.warning("could not log samples to %s: %s", type(logger).__name__, err)
    if not went:
        out = Path(getattr(trainer, "default_root_dir", ".")) / SAMPLES_DIR / f"step_{step:08d}"
        out.mkdir(parents=True, exist_ok=True)
        import soundfile as sf

        for k, v in audio.items():
            sf.write(out / f"{_safe(k)}.wav", _np_audio(v), int(sample_rate))
        for k, v in images.items():
            _write_png(out / f"{_safe(k)}.png", np.asarray(v))
        for k, v in text.items():
            (out / f"{_safe(k)}.txt").write_text(str(v) + "\n")
        went.append(str(out))
    return went
