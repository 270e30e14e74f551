"""Text front end of the AR TTS: espeak-ng IPA G2P, pypinyin Mandarin G2P and the Whisper multilingual BPE
(offline)."""
from flexitrain.text.phonemize import SUPPORTED_LANGUAGES, Phonemizer, shorten_ipa
from flexitrain.text.tokenizer import TextFrontend, WhisperTextTokenizer

__all__ = ["Phonemizer", "shorten_ipa", "SUPPORTED_LANGUAGES", "TextFrontend", "WhisperTextTokenizer"]
