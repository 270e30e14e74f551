"""The metric set of an evaluation, built once from the `metrics` config node (all offline, local assets)."""
from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from flexitrain.metrics.quality import QUALITY_METRICS, compute_quality

log = logging.getLogger(__name__)


def _quality_job(args):
    ref, deg, sr, names = args
    return compute_quality(ref, deg, sr, names)


@dataclass
class Scorers:
    """Signal metrics in a process pool; ASR, speaker similarity and MOS models in this process."""

    sample_rate: int
    quality: Sequence[str] = QUALITY_METRICS
    asr: Any = None
    speaker: Any = None
    mos: Any = None
    num_workers: int = 2
    _pool: ProcessPoolExecutor | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, cfg: dict, sample_rate: int) -> "Scorers":
        cfg = dict(cfg or {})
        asr = speaker = mos = None
        if (cfg.get("asr") or {}).get("enabled", True):
            from flexitrain.metrics.asr import build_asr_from_config

            asr = build_asr_from_config(cfg.get("asr") or {}, key="metrics.asr")
        if (cfg.get("speaker") or {}).get("enabled", True):
            from flexitrain.metrics.speaker import build_speaker_encoder_from_config

            speaker = build_speaker_encoder_from_config(cfg.get("speaker") or {}, key="metrics.speaker")
        if (cfg.get("mos") or {}).get("enabled", True):
            from flexitrain.metrics.mos import build_mos_from_config

            mos = build_mos_from_config(cfg.get("mos") or {}, key="metrics.mos")
        return cls(sample_rate, tuple(cfg.get("quality", QUALITY_METRICS)), asr, speaker, mos,
                   int(cfg.get("num_workers", 2)))

    def quality_batch(self, refs: Sequence[np.ndarray], degs: Sequence[np.ndarray]) -> list[dict[str, float]]:
        jobs = [(r, d, self.sample_rate, tuple(self.quality)) for r, d in zip(refs, degs)]
        if not self.quality:
            return [{} for _ in jobs]
        if self.num_workers <= 1 or len(jobs) <= 1:
            return [_quality_job(j) for j in jobs]
        if self._pool is None:
            self._pool = ProcessPoolExecutor(self.num_workers)
        return list(self._pool.map(_quality_job, jobs))

    def transcribe(self, wavs: Sequence[np.ndarray]) -> list[str] | None:
        return None if self.asr is None else self.asr.transcribe_batch(list(wavs), self.sample_rate)

    def similarity(self, refs: Sequence[np.ndarray], degs: Sequence[np.ndarray]) -> list[float] | None:
        return None if self.speaker is None else self.speaker.similarities(list(refs), list(degs), self.sample_rate)

    def mos_scores(self, wavs: Sequence[np.ndarray]) -> list[float] | None:
        return None if self.mos is None else [float(self.mos.score(w, self.sample_rate)) for w in wavs]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
