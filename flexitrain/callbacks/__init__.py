from flexitrain.callbacks.codec_eval import CodecEvalCallback

__all__ = ["CodecEvalCallback"]
