"""Evaluation metrics: text/WER, signal quality, rates, and offline ASR / speaker / MOS models.

Importing this package is cheap: optional packages (faster-whisper, resemblyzer, speechmos,
transformers, ...) are imported only when a model is built.
"""

from .asr import (ASR_BACKENDS, AsrModel, build_asr, build_asr_from_config, bundled_whisper_path,
                  transcribe_and_score)
from .mos import MOS_BACKENDS, MosPredictor, build_mos_from_config, build_mos_predictor, build_mos_predictor_from_config
from .parallel import MetricPool, compute_quality_batch, default_num_workers, parallel_map
from .quality import (QUALITY_METRICS, compute_quality, mel_distance, pesq_score, si_sdr, stoi_score, summarize,
                      summarize_records, trim_to_shorter)
from .rates import (FLEXICODEC_FRAME_RATE_HZ, RateAccumulator, bits_per_token, duration_side_bits,
                    flexicodec_codebook_sizes, frame_rate_stats, split_token_lengths, token_length_histogram)
from .speaker import (SPEAKER_BACKENDS, SpeakerEncoder, build_speaker_encoder, build_speaker_encoder_from_config,
                      cosine_similarity)
from .text_norm import normalize_text, number_to_words
from .wer import ErrorCounts, char_error_rate, error_counts, utterance_error_rates, word_error_rate


def __getattr__(name: str):
    # torchmetrics (and through it onnxruntime/librosa) is imported only when these are used.
    if name in ("WordErrorRate", "CharErrorRate"):
        from . import wer_metric

        return getattr(wer_metric, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    # text / WER
    "normalize_text", "number_to_words", "ErrorCounts", "error_counts", "word_error_rate", "char_error_rate",
    "utterance_error_rates", "WordErrorRate", "CharErrorRate",
    # signal quality
    "QUALITY_METRICS", "trim_to_shorter", "pesq_score", "stoi_score", "si_sdr", "mel_distance", "compute_quality",
    "summarize", "summarize_records",
    # parallel
    "MetricPool", "parallel_map", "compute_quality_batch", "default_num_workers",
    # rates
    "FLEXICODEC_FRAME_RATE_HZ", "flexicodec_codebook_sizes", "bits_per_token", "duration_side_bits",
    "frame_rate_stats", "token_length_histogram", "split_token_lengths", "RateAccumulator",
    # offline models
    "ASR_BACKENDS", "AsrModel", "build_asr", "build_asr_from_config", "bundled_whisper_path", "transcribe_and_score",
    "SPEAKER_BACKENDS", "SpeakerEncoder", "build_speaker_encoder", "build_speaker_encoder_from_config",
    "cosine_similarity",
    "MOS_BACKENDS", "MosPredictor", "build_mos_predictor", "build_mos_predictor_from_config", "build_mos_from_config",
]
