"""Native SenseVoiceSmall semantic teacher (Kaldi fbank + LFR/CMVN front end, SAN-M encoder); no FunASR at run time."""

from flexitrain.models.sensevoice.encoder import SANMEncoder
from flexitrain.models.sensevoice.frontend import SenseVoiceFrontend, apply_lfr, load_am_mvn
from flexitrain.models.sensevoice.teacher import SenseVoiceLoadError, SenseVoiceTeacher

__all__ = ["SANMEncoder", "SenseVoiceFrontend", "SenseVoiceLoadError", "SenseVoiceTeacher", "apply_lfr", "load_am_mvn"]
