#!/usr/bin/env python
"""Evaluation-metric throughput: utterances/s for the signal metrics (PESQ wb/nb, STOI, eSTOI, SI-SDR, mel
distance) on real espeak-ng speech, serial vs the worker pool, plus the ASR / speaker / MOS models.

    python tools/bench_eval.py [--utterances 32] [--workers 2] [--no-models]
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from flexitrain.metrics.parallel import MetricPool, compute_quality_batch
from flexitrain.metrics.quality import QUALITY_METRICS


def espeak_clips(n: int, sr: int = 16000) -> list[np.ndarray]:
    from flexitrain.data.demo_corpus import Speaker, load_sentences, synthesize

    sentences = load_sentences(None)[:n]
    return [synthesize(s, Speaker("en-us", "", 160, 50), sr) for s in sentences]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--utterances", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-models", action="store_true")
    args = ap.parse_args(argv)
    sr = 16000
    refs = espeak_clips(args.utterances, sr)
    rng = np.random.default_rng(0)
    degs = [r + 0.01 * rng.standard_normal(r.shape).astype(np.float32) for r in refs]
    seconds = sum(len(r) for r in refs) / sr
    t = time.perf_counter()
    compute_quality_batch(refs, degs, sr, QUALITY_METRICS, num_workers=1)
    serial = time.perf_counter() - t
    with MetricPool(args.workers) as pool:
        compute_quality_batch(refs[:2], degs[:2], sr, QUALITY_METRICS, pool=pool)  # start the workers
        t = time.perf_counter()
        compute_quality_batch(refs, degs, sr, QUALITY_METRICS, pool=pool)
        pooled = time.perf_counter() - t
    print(f"{args.utterances} utterances ({seconds:.1f} s of audio), metrics {', '.join(QUALITY_METRICS)}")
    print(f"signal metrics serial: {args.utterances / serial:.1f} utt/s | pool of {args.workers}: "
          f"{args.utterances / pooled:.1f} utt/s | speed-up {serial / pooled:.2f}x")
    if args.no_models:
        return
    from flexitrain.metrics.asr import build_asr
    from flexitrain.metrics.mos import build_mos_predictor
    from flexitrain.metrics.speaker import build_speaker_encoder

    for name, build, run in [
        ("ASR (faster-whisper tiny.en)", build_asr, lambda m, r, d: m.transcribe_batch(d, sr)),
        ("speaker similarity (resemblyzer)", build_speaker_encoder, lambda m, r, d: m.similarities(r, d, sr)),
        ("MOS (DNSMOS)", build_mos_predictor, lambda m, r, d: [m.score(x, sr) for x in d]),
    ]:
        model = build()
        run(model, refs[:1], degs[:1])  # warm-up (lazy loading, JIT)
        t = time.perf_counter()
        run(model, refs, degs)
        print(f"{name}: {args.utterances / (time.perf_counter() - t):.1f} utt/s")


if __name__ == "__main__":
    main()
