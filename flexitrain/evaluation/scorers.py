"""The metric set of an evaluation, built once from the `metrics` config node (all offline, local assets)."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from flexitrain.metrics.parallel import MetricPool, compute_quality_batch
from flexitrain.metrics.quality import QUALITY_METRICS

log = logging.getLogger(__name__)


@dataclass
class Scorers:
    """Signal metrics in a process pool; ASR, speaker similarity and MOS models in this process."""

    sample_rate: int
    quality: Sequence[str] = QUALITY_METRICS
    asr: Any = None
    speaker: Any = None
    mos: Any = None
    num_workers: int = 2
    _pool: MetricPool | None = field(default=None, init=False, repr=False)

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
        if not self.quality:
            return [{} for _ in refs]
        if self._pool is None:
            self._pool = MetricPool(self.num_workers)  # started once, reused for every batch
        return compute_quality_batch(refs, degs, self.sample_rate, tuple(self.quality), pool=self._pool)

    def transcribe(self, wavs: Sequence[np.ndarray]) -> list[str] | None:
        return None if self.asr is None else self.asr.transcribe_batch(list(wavs), self.sample_rate)

    def similarity(self, refs: Sequence[np.ndarray], degs: Sequence[np.ndarray]) -> list[float] | None:
        return None if self.speaker is None else self.speaker.similarities(list(refs), list(degs), self.sample_rate)

    def mos_scores(self, wavs: Sequence[np.ndarray]) -> list[float] | None:
        return None if self.mos is None else [float(self.mos.score(w, self.sample_rate)) for w in wavs]

    def close(self) -> None:
        if self._pool is not None:
            self._pool.close()
            self._pool = None
