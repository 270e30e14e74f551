"""FlexiCodec codec model (port of amphionspace/FlexiCodec with official state-dict keys)."""

from .checkpoint import CheckpointMismatchError, load_state_dict_strict, save_pretrained
from .config import RELEASED_CONFIG, load_config
from .flexicodec import CodecAudio, CodecForwardOutput, CodecTokens, FlexiCodec

__all__ = [
    "FlexiCodec", "CodecTokens", "CodecAudio", "CodecForwardOutput", "RELEASED_CONFIG", "load_config",
    "load_state_dict_strict", "save_pretrained", "CheckpointMismatchError",
]
