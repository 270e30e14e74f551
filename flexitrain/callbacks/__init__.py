from flexitrain.callbacks.codec_eval import CodecEvalCallback
from flexitrain.callbacks.replica_check import ReplicaConsistencyCheck

__all__ = ["CodecEvalCallback", "ReplicaConsistencyCheck"]
