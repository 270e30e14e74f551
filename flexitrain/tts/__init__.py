"""End-to-end FlexiCodec-TTS inference (AR → NAR → Vocos) and its command line, `flexitrain-tts`."""
from flexitrain.tts.pipeline import TTSPipeline, TTSRequest, TTSResult

__all__ = ["TTSPipeline", "TTSRequest", "TTSResult"]
